"""The one small interface every storage backend implements.

A store is rooted at a URI (a local folder or ``s3://bucket/prefix``); keys are relative,
``/``-separated paths below that root. Backends implement five primitives (size, one ranged
GET, list, put, delete); everything else — coalescing adjacent ranges, splitting large ones
into parts, fetching many ranges in parallel, counting bytes — lives here once, so the local
and S3 backends behave identically and the byte counter means the same thing for both.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mediator_ray.errors import ObjectNotFoundError


class StorageOptions(BaseModel):
    """Knobs shared by all backends; S3 fields fall back to the standard AWS environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: caches key on it

    concurrency: int = Field(16, ge=1, le=256, description="parallel GETs per read_many call")
    part_size: int = Field(
        8 * 1024 * 1024, ge=64 * 1024, description="large ranges are fetched in parts this big"
    )
    coalesce_gap: int = Field(
        0, ge=0, description="merge ranges separated by at most this many unrequested bytes"
    )
    multipart_threshold: int = Field(64 * 1024 * 1024, ge=5 * 1024 * 1024)
    max_attempts: int = Field(5, ge=1, le=20, description="attempts per request, with backoff")
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None


@dataclass(frozen=True, order=True)
class ByteRange:
    """Half-open byte range ``[start, end)`` of one object."""

    key: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class IOStats:
    """Thread-safe counters of traffic to the store.

    Tests and the merge job use them to prove that each input byte is fetched once.
    """

    bytes_read: int = 0
    read_requests: int = 0
    bytes_written: int = 0
    write_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.read_requests += 1

    def add_write(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes
            self.write_requests += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "bytes_read": self.bytes_read,
                "read_requests": self.read_requests,
                "bytes_written": self.bytes_written,
                "write_requests": self.write_requests,
            }

    def reset(self) -> None:
        with self._lock:
            self.bytes_read = self.read_requests = self.bytes_written = self.write_requests = 0


def plan_fetches(ranges: Iterable[ByteRange], coalesce_gap: int, part_size: int) -> list[ByteRange]:
    """Turn requested ranges into the GETs to issue.

    Ranges of the same key that touch, overlap or lie within ``coalesce_gap`` bytes are merged
    (fewer requests), then merged spans larger than ``part_size`` are split (parallelism).
    Pure function, so the fetch plan is easy to test on its own.
    """
    merged: list[ByteRange] = []
    for r in sorted(r for r in ranges if r.length > 0):
        last = merged[-1] if merged else None
        if last is not None and last.key == r.key and r.start <= last.end + coalesce_gap:
            merged[-1] = ByteRange(last.key, last.start, max(last.end, r.end))
        else:
            merged.append(r)
    parts: list[ByteRange] = []
    for span in merged:
        for start in range(span.start, span.end, part_size):
            parts.append(ByteRange(span.key, start, min(start + part_size, span.end)))
    return parts


class ObjectStore(ABC):
    """A folder of objects with ranged reads; see the module docstring."""

    def __init__(
        self, uri: str, options: StorageOptions | None = None, stats: IOStats | None = None
    ):
        self.uri = uri.rstrip("/")
        self.options = options or StorageOptions()
        self.stats = stats if stats is not None else IOStats()

    # ---- primitives each backend implements -------------------------------------------------
    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of ``key``; :class:`ObjectNotFoundError` when absent."""

    @abstractmethod
    def _get_into(self, key: str, start: int, out: memoryview) -> int:
        """One ranged read of ``len(out)`` bytes at ``start`` straight into ``out``, without
        counting (the caller counts); returns the bytes read (fewer past the end)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys below ``prefix`` (recursive), relative to the root, sorted."""

    @abstractmethod
    def _put(self, key: str, data: bytes | memoryview) -> None:
        """Write one whole object atomically: readers see the old object or the new one."""

    @abstractmethod
    def _put_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        """Conditional write: create ``key`` only if absent (``expected_tag`` None), or replace
        it only if its current tag equals ``expected_tag``. False when the condition fails.
        Atomic against concurrent writers: the building block of leases and pointers."""

    @abstractmethod
    def tag(self, key: str) -> str | None:
        """An opaque version tag of ``key`` (S3 ETag; local inode/mtime/size), None if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    @abstractmethod
    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at ``prefix`` below this one, sharing options and stats."""

    # ---- derived operations -----------------------------------------------------------------
    def url(self, key: str) -> str:
        """Human-readable location of ``key``, for error messages."""
        return f"{self.uri}/{key}" if key else self.uri

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key``, one request (fewer if the object is shorter)."""
        buffer = bytearray(max(0, end - start))
        got = self._get_into(key, start, memoryview(buffer))
        self.stats.add_read(got)
        return bytes(buffer[:got]) if got != len(buffer) else bytes(buffer)

    def read(self, key: str) -> bytes:
        """The whole object (small objects: configs, manifests, tokenizer files)."""
        size = self.size(key)
        return bytes(self.read_many([ByteRange(key, 0, size)])[0]) if size else b""

    def read_text(self, key: str) -> str:
        return self.read(key).decode("utf-8")

    def read_many(self, ranges: Sequence[ByteRange]) -> list[memoryview]:
        """Fetch many ranges (of any keys) in parallel; results in the order asked.

        Requested ranges are coalesced and split by :func:`plan_fetches`, fetched on a thread
        pool of ``options.concurrency``, assembled into one buffer per merged span and handed
        back as zero-copy, writable memoryviews (``torch.frombuffer`` accepts them as they are).
        """
        if not ranges:
            return []
        fetches = plan_fetches(ranges, self.options.coalesce_gap, self.options.part_size)
        # Contiguous parts of one key share a buffer, so a tensor split into parts comes back
        # as one view. spans: (key, start, end) of each buffer; slots: (span index, offset).
        span_bounds: list[list[Any]] = []
        slots: list[tuple[int, int]] = []
        for part in fetches:
            last = span_bounds[-1] if span_bounds else None
            if last is not None and last[0] == part.key and last[2] == part.start:
                slots.append((len(span_bounds) - 1, part.start - last[1]))
                last[2] = part.end
            else:
                slots.append((len(span_bounds), 0))
                span_bounds.append([part.key, part.start, part.end])
        # Uninitialised (every byte is about to be overwritten) and writable.
        buffers = [
            memoryview(np.empty(end - start, dtype=np.uint8)) for _, start, end in span_bounds
        ]

        def fetch(index: int) -> None:
            part = fetches[index]
            span_index, offset = slots[index]
            got = self._get_into(
                part.key, part.start, buffers[span_index][offset : offset + part.length]
            )
            self.stats.add_read(got)
            if got != part.length:
                raise ObjectNotFoundError(
                    f"{self.url(part.key)}: asked for bytes {part.start}-{part.end} "
                    f"but got {got} bytes (object shorter than expected)"
                )

        if len(fetches) == 1:
            fetch(0)
        elif fetches:
            workers = min(self.options.concurrency, len(fetches))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-read") as pool:
                for future in [pool.submit(fetch, i) for i in range(len(fetches))]:
                    future.result()

        starts_by_key: dict[str, list[tuple[int, int]]] = {}
        for index, (key, start, _) in enumerate(span_bounds):
            starts_by_key.setdefault(key, []).append((start, index))
        results: list[memoryview] = []
        for r in ranges:
            if r.length <= 0:
                results.append(memoryview(bytearray()))
                continue
            spans_of_key = starts_by_key[r.key]
            pos = bisect.bisect_right(spans_of_key, (r.start, len(span_bounds))) - 1
            span_start, index = spans_of_key[pos]
            results.append(buffers[index][r.start - span_start : r.end - span_start])
        return results

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write one object atomically and count it."""
        self._put(key, data)
        self.stats.add_write(len(data))

    def write_text(self, key: str, text: str) -> None:
        self.write(key, text.encode("utf-8"))

    def write_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        """:meth:`_put_if`, counted."""
        ok = self._put_if(key, bytes(data), expected_tag)
        if ok:
            self.stats.add_write(len(data))
        return ok

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Stores travel to Ray workers by URI and options; counters stay per process.
        return (type(self), (self.uri, self.options))
