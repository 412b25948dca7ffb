"""Write Hugging Face compatible sharded safetensors checkpoints to any ObjectStore.

Output is committed in a fixed order so that readers never see a half-written checkpoint:
``begin`` removes the completion marker, shards are written (by any number of workers, each
its own object), then ``commit`` writes the index, config and tokenizer files, and the
marker LAST. A folder without the marker is not a checkpoint. Each shard's sha256 is
recorded so a rerun can skip shards that are already written and intact.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mediator_ray.checkpoint import safetensors_format
from mediator_ray.checkpoint.catalog import CONFIG_FILE, INDEX_FILE, CheckpointCatalog
from mediator_ray.errors import CheckpointFormatError, ObjectNotFoundError
from mediator_ray.storage.base import ObjectStore

if TYPE_CHECKING:  # torch is imported where tensors are serialised: the driver writes none
    import torch

DEFAULT_MARKER = "_COMPLETE"
#: Default shard size cap (5 GB, the size Hugging Face used for years; hub-friendly).
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


def shard_name(k: int, n: int) -> str:
    """Hugging Face shard file name: ``model-0000k-of-0000n.safetensors`` (1-based)."""
    if not 1 <= k <= n:
        raise ValueError(f"shard number {k} out of range 1..{n}")
    return f"model-{k:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class ShardRecord:
    """What was written: enough to build the index and to verify the shard on resume."""

    file: str
    tensor_names: tuple[str, ...]
    tensor_bytes: int
    file_size: int
    sha256: str


def serialize_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """One safetensors file as bytes, byte-for-byte deterministic.

    ``safetensors.torch.save`` writes ``__metadata__`` in hash-map order, which changes from
    process to process; identical tensors must give identical bytes here (resume verifies
    shards by sha256, and S3 and local outputs must match), so the header is written with
    sorted keys and tensors laid out in name order. The layout is the safetensors spec's:
    u64 header length, JSON header padded with spaces to 8 bytes, then the data; the result
    loads with ``safetensors.torch.load``. Metadata carries ``format: pt`` (transformers needs
    it). Tensors are moved to CPU and made contiguous.
    """
    import torch

    codes = safetensors_format.DTYPE_CODES
    header: dict[str, Any] = {
        "__metadata__": dict(sorted({"format": "pt", **(metadata or {})}.items()))
    }
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in codes:
            raise CheckpointFormatError(f"tensor {name!r}: dtype {t.dtype} cannot be written")
        data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        header[name] = {
            "dtype": codes[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return b"".join([struct.pack("<Q", len(header_bytes)), header_bytes, *chunks])


def _sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split ``(name, nbytes)`` in order into shards of at most ``max_shard_bytes``.

    A tensor larger than the cap gets a shard of its own (tensors are never split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


class CheckpointWriter:
    """Writes shards and commits a Hugging Face checkpoint folder in ``store``."""

    def __init__(self, store: ObjectStore, marker: str = DEFAULT_MARKER):
        self.store = store
        self.marker = marker

    def begin(self) -> None:
        """Invalidate any previous output until the next commit (removes the marker)."""
        self.store.delete(self.marker)

    def is_complete(self) -> bool:
        return self.store.exists(self.marker)

    def write_shard(
        self,
        file: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> ShardRecord:
        data = serialize_tensors(tensors, metadata)
        self.store.write(file, data)
        return ShardRecord(
            file=file,
            tensor_names=tuple(tensors),
            tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            file_size=len(data),
            sha256=_sha256(data),
        )

    def shard_is_current(
        self, record_or_file: ShardRecord | str, expected_sha256: str | None = None
    ) -> bool:
        """True when the shard exists with the expected size (if known) and sha256."""
        if isinstance(record_or_file, ShardRecord):
            file, size = record_or_file.file, record_or_file.file_size
            expected = expected_sha256 or record_or_file.sha256
        else:
            file, size = record_or_file, None
            if expected_sha256 is None:
                raise ValueError("expected_sha256 is required when passing a file name")
            expected = expected_sha256
        try:
            if size is not None and self.store.size(file) != size:
                return False
            return _sha256(self.store.read(file)) == expected
        except ObjectNotFoundError:
            return False

    def commit(
        self,
        shards: Sequence[ShardRecord],
        copy_from: CheckpointCatalog | None = None,
        extra_files: Mapping[str, bytes] | None = None,
        marker_content: bytes = b"{}",
    ) -> None:
        """:meth:`write_metadata`, then :meth:`publish` — the marker last."""
        self.write_metadata(shards, copy_from, extra_files)
        self.publish(marker_content)

    def publish(self, marker_content: bytes = b"{}") -> None:
        """Write the marker: from now on the folder is a complete checkpoint."""
        self.store.write(self.marker, marker_content)

    def write_metadata(
        self,
        shards: Sequence[ShardRecord],
        copy_from: CheckpointCatalog | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> None:
        """Write the index, copy config/tokenizer files and write ``extra_files``; no marker.

        Split from :meth:`publish` so work that needs the loadable folder (fitting a router on
        the merged model) can run before the checkpoint is declared complete.
        ``extra_files`` win over copied files (e.g. a ``config.json`` with a new dtype).
        Every shard must exist with its recorded size, so a lost write cannot be committed.
        """
        extra = dict(extra_files or {})
        weight_map: dict[str, str] = {}
        for record in shards:
            for name in record.tensor_names:
                if name in weight_map:
                    raise CheckpointFormatError(
                        f"{self.store.uri}: tensor {name!r} written to both "
                        f"{weight_map[name]!r} and {record.file!r}"
                    )
                weight_map[name] = record.file
            try:
                actual = self.store.size(record.file)
            except ObjectNotFoundError:
                actual = None
            if actual != record.file_size:
                raise CheckpointFormatError(
                    f"{self.store.url(record.file)}: expected a {record.file_size}-byte shard, "
                    f"found {'nothing' if actual is None else f'{actual} bytes'}; not committing"
                )
        index = {
            "metadata": {"total_size": sum(record.tensor_bytes for record in shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        self.store.write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        if copy_from is not None:
            for key in [CONFIG_FILE, *copy_from.tokenizer_files]:
                if key not in extra:
                    self.store.write(key, copy_from.store.read(key))
        for key, data in extra.items():
            self.store.write(key, data)


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    store: ObjectStore,
    copy_from: CheckpointCatalog | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    marker: str = DEFAULT_MARKER,
    *,
    metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[ShardRecord]:
    """Write ``tensors`` (in order) as a sharded checkpoint in ``store`` and commit it."""
    if not tensors:
        raise ValueError(f"{store.uri}: refusing to save a checkpoint with no tensors")
    sizes = [(name, t.numel() * t.element_size()) for name, t in tensors.items()]
    plan = plan_shards(sizes, max_shard_bytes)
    writer = CheckpointWriter(store, marker)
    writer.begin()
    records = [
        writer.write_shard(
            shard_name(k, len(plan)), {name: tensors[name] for name in names}, metadata
        )
        for k, names in enumerate(plan, start=1)
    ]
    writer.commit(records, copy_from=copy_from, extra_files=extra_files)
    return records
