"""Parse and strictly validate safetensors headers, fetched with two small range reads.

The catalog of a 100 GB checkpoint must cost a few kilobytes of traffic, so we never open a
whole file: the 8-byte length prefix and the JSON header are all we read. Because the merge
later fetches tensors by the byte ranges computed here, a header that lies (overlapping
tensors, offsets past the end, holes) must be refused up front with a message that names the
file and the tensor, not discovered as garbage weights hours later.

The rules follow the safetensors specification and its reference (Rust) implementation:
the header is a UTF-8 JSON object starting with ``{`` (trailing spaces allowed), at most
100 MB; ``__metadata__`` is a string-to-string map; every tensor has exactly ``dtype``,
``shape`` and ``data_offsets`` relative to the data section; tensors tile the data section
with no overlap and no holes (the spec forbids holes so a file cannot double as another
format), and the last tensor ends exactly at the end of the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mediator_ray.errors import CheckpointFormatError
from mediator_ray.storage.base import ByteRange, ObjectStore

if TYPE_CHECKING:
    import torch

#: Accepted safetensors dtype codes: (torch dtype name, bytes per element). Other codes
#: (F8_*, …) are refused on purpose: merging them needs more than elementwise float arithmetic.
_CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "BOOL": ("bool", 1),
}

#: Bytes per element of each accepted code.
ITEMSIZE: dict[str, int] = {code: size for code, (_, size) in _CODES.items()}


@lru_cache(maxsize=1)
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {code: getattr(torch, name) for code, (name, _) in _CODES.items()}


def __getattr__(name: str) -> Any:
    # DTYPES (code -> torch dtype) and DTYPE_CODES (its inverse) are built on first use, so
    # that parsing headers — all a merge driver does — never imports torch (~1.2 s, ~110 MB).
    if name == "DTYPES":
        return dict(_torch_dtypes())
    if name == "DTYPE_CODES":
        return {dtype: code for code, dtype in _torch_dtypes().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The length prefix: a little-endian u64 holding the header size.
PREFIX_BYTES = 8

#: Bytes the first header read asks for (see :func:`read_header`).
HEADER_PROBE_BYTES = 64 * 1024

#: Largest header accepted, as in the reference implementation (guards against a bogus
#: length making us fetch and parse gigabytes).
MAX_HEADER_BYTES = 100_000_000

_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: ``[start, end)`` are ABSOLUTE byte offsets in ``file``.

    ``file`` is the key relative to the checkpoint root, so a ref plus the checkpoint's store
    is all a worker needs to fetch the tensor with one ranged read.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _torch_dtypes()[self.dtype]

    @property
    def byte_range(self) -> ByteRange:
        return ByteRange(self.file, self.start, self.end)


@dataclass(frozen=True)
class SafetensorsHeader:
    """One validated safetensors header; ``tensors`` is ordered by position in the file."""

    file: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        """Absolute offset of the first data byte."""
        return PREFIX_BYTES + self.header_len


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(
    header_json: bytes,
    header_len: int,
    file_size: int,
    file: str,
    *,
    location: str | None = None,
) -> SafetensorsHeader:
    """Validate a raw header and compute absolute tensor byte ranges.

    ``file`` is the key stored in each :class:`TensorRef`; ``location`` (default: ``file``)
    is what error messages call the file — pass the store URL so users can find it.
    """
    where = location or file

    def fail(message: str, tensor: str | None = None) -> CheckpointFormatError:
        subject = f"{where}: tensor {tensor!r}: " if tensor is not None else f"{where}: "
        return CheckpointFormatError(f"{subject}{message} (not a valid safetensors file)")

    if len(header_json) != header_len:
        raise fail(f"header is {len(header_json)} bytes but its length prefix says {header_len}")
    data_size = file_size - PREFIX_BYTES - header_len
    if data_size < 0:
        raise fail(f"header length {header_len} past end of file ({file_size} bytes)")
    if not header_json.startswith(b"{"):
        raise fail("header is not a JSON object (it must start with '{')")
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except ValueError as e:  # JSONDecodeError is a ValueError; so are our hooks' errors
        raise fail(f"header is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise fail("header is not a JSON object")

    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("__metadata__ must be a map of strings to strings")

    refs: list[TensorRef] = []
    for name, info in raw.items():
        if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS:
            found = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise fail(f"entry must have exactly dtype, shape and data_offsets, got {found}", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            known = ", ".join(ITEMSIZE)
            raise fail(f"unknown or unsupported dtype {dtype!r} (known: {known})", name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"shape must be a list of non-negative integers, got {shape!r}", name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise fail(f"data_offsets must be two non-negative integers, got {offsets!r}", name)
        begin, end = offsets
        if begin > end:
            raise fail(f"data_offsets [{begin}, {end}] end before they begin", name)
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise fail(
                f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} "
                f"of {dtype} needs {expected}",
                name,
            )
        if end > data_size:
            raise fail(
                f"data_offsets [{begin}, {end}] past the end of the {data_size}-byte data "
                "section: file truncated",
                name,
            )
        start = PREFIX_BYTES + header_len + begin
        refs.append(TensorRef(name, dtype, tuple(shape), file, start, start + expected))

    # Tensors must tile the data section: sorted by offset, each begins where the last ended.
    refs.sort(key=lambda r: (r.start, r.end))
    cursor = PREFIX_BYTES + header_len
    previous: TensorRef | None = None
    for ref in refs:
        if ref.start < cursor:
            assert previous is not None
            overlap = f"bytes {ref.start}-{cursor} overlap tensor {previous.name!r}"
            raise fail(overlap, ref.name)
        if ref.start > cursor:
            hole = f"the {ref.start - cursor} bytes before it belong to no tensor (a hole)"
            raise fail(hole, ref.name)
        cursor = ref.end
        previous = ref
    if cursor != file_size:
        raise fail(
            f"the last {file_size - cursor} bytes of the data section belong to no tensor "
            "(the spec allows no holes or trailing bytes)"
        )
    return SafetensorsHeader(
        file=file,
        header_len=header_len,
        file_size=file_size,
        tensors={ref.name: ref for ref in refs},
        metadata=dict(metadata),
    )


def header_probe_end(size: int) -> int:
    """End of the first read of a header.

    :data:`HEADER_PROBE_BYTES`, but never more than 1/64 of the file (at least 1 KiB): what
    the probe reads past the header is tensor data fetched twice, so it is kept to ≤ 1.6%
    of any file larger than 64 KiB — tiny shards do not pay a large relative over-read.
    """
    return min(size, HEADER_PROBE_BYTES, max(1024, size // 64))


def header_read_bytes(header: SafetensorsHeader) -> int:
    """Bytes :func:`read_header` fetched for ``header`` (for byte accounting)."""
    return max(header_probe_end(header.file_size), PREFIX_BYTES + header.header_len)


def read_header(store: ObjectStore, key: str) -> SafetensorsHeader:
    """Read and validate the header of ``key`` with range reads only.

    The first read takes :data:`HEADER_PROBE_BYTES` (length prefix + JSON of most real
    checkpoints' shards, whose headers are a few tens of KB); only a longer header costs a
    second read. Round trips, not bytes, dominate the cost of small reads on object storage.
    """
    where = store.url(key)
    size = store.size(key)
    if size < PREFIX_BYTES:
        raise CheckpointFormatError(
            f"{where}: truncated: the file is {size} bytes, shorter than the "
            f"{PREFIX_BYTES}-byte header length prefix (not a valid safetensors file)"
        )
    probe = store.read_range(key, 0, header_probe_end(size))
    if len(probe) < PREFIX_BYTES:
        raise CheckpointFormatError(f"{where}: truncated while reading the header length")
    header_len = int.from_bytes(probe[:PREFIX_BYTES], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
            "(not a valid safetensors file)"
        )
    if header_len > size - PREFIX_BYTES:
        raise CheckpointFormatError(
            f"{where}: header length {header_len} past end of file ({size} bytes): "
            "truncated or not a safetensors file"
        )
    end = PREFIX_BYTES + header_len
    if end <= len(probe):
        header_json = probe[PREFIX_BYTES:end]
    else:
        header_json = probe[PREFIX_BYTES:] + store.read_range(key, len(probe), end)
    if len(header_json) != header_len:
        raise CheckpointFormatError(f"{where}: truncated while reading the header")
    return parse_header(header_json, header_len, size, key, location=where)
