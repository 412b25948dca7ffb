"""Catalog a Hugging Face checkpoint folder from its headers alone, and check experts fit it.

``open_checkpoint`` reads ``config.json``, the shard index and every shard's safetensors
header (in parallel, two small range reads each) and returns where each tensor lives. It
never reads tensor data, so cataloguing a remote 70B checkpoint costs kilobytes. Only
safetensors are accepted: pickle checkpoints (``.bin``) can run code when loaded.

``check_compatible`` is the gate before any merge work: every expert must have the base's
tensor names, shapes and dtypes, and the same architecture.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mediator_ray.checkpoint.layers import LayerGroup, group_layers
from mediator_ray.checkpoint.safetensors_format import SafetensorsHeader, TensorRef, read_header
from mediator_ray.errors import (
    CheckpointFormatError,
    IncompatibleCheckpointError,
    ObjectNotFoundError,
)
from mediator_ray.storage import ObjectStore, StorageOptions, open_store

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
#: The Mediator manifest: written last, its presence marks a committed checkpoint.
MANIFEST_FILE = "mediator.json"
SINGLE_FILE = "model.safetensors"

#: Files that travel with the weights: a merged checkpoint copies them from the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

#: config.json fields that must agree between base and experts (compared when both have them).
CORE_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class CheckpointCatalog:
    """Everything known about one checkpoint without reading its weights.

    ``tensors`` is ordered by shard (in ``files`` order) and by position within each shard,
    which is also the cheapest order to read them in.
    """

    uri: str
    store: ObjectStore
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    files: list[str]
    layers: list[LayerGroup]
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False)
    keys: list[str] = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (what a full read of the weights costs)."""
        return sum(ref.nbytes for ref in self.tensors.values())

    def layer(self, name: str) -> LayerGroup:
        for group in self.layers:
            if group.name == name:
                return group
        known = ", ".join(group.name for group in self.layers)
        raise KeyError(f"{self.uri}: no layer {name!r} (layers: {known})")

    def refs(self, layer: LayerGroup | str) -> list[TensorRef]:
        """Refs of one layer's tensors, in the layer's order."""
        group = self.layer(layer) if isinstance(layer, str) else layer
        return [self.tensors[name] for name in group.tensor_names]

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architecture(self) -> str | None:
        """``architectures[0]`` of the config (e.g. ``LlamaForCausalLM``), else model_type."""
        architectures = self.config.get("architectures")
        if isinstance(architectures, list) and architectures:
            return str(architectures[0])
        return self.model_type

    @property
    def tokenizer_files(self) -> list[str]:
        """Tokenizer and generation files present in the folder."""
        present = set(self.keys)
        return [name for name in TOKENIZER_FILES if name in present]


def _read_json(store: ObjectStore, key: str, what: str) -> Any:
    try:
        return json.loads(store.read(key))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(f"{store.url(key)}: {what} is not valid JSON: {e}") from None


def _no_weights_error(store: ObjectStore, keys: list[str]) -> CheckpointFormatError:
    listing = ", ".join(keys[:20]) + (f", … ({len(keys)} files)" if len(keys) > 20 else "")
    message = (
        f"{store.uri}: no safetensors weights: expected {INDEX_FILE} or {SINGLE_FILE}; "
        f"the folder has: {listing}"
    )
    pickles = [key for key in keys if key.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        message += (
            f". Refusing {', '.join(pickles[:3])}: pickle checkpoints (.bin/.pt) can run "
            "arbitrary code, only safetensors are loaded — convert them first "
            "(e.g. load with transformers and save_pretrained(safe_serialization=True))"
        )
    return CheckpointFormatError(message)


def _read_index(store: ObjectStore, keys: set[str]) -> dict[str, str]:
    """The index's weight_map, checked for shape and for shards that do not exist."""
    index = _read_json(store, INDEX_FILE, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointFormatError(
            f"{store.url(INDEX_FILE)}: the shard index has no weight_map of tensor name to file"
        )
    for shard in dict.fromkeys(weight_map.values()):
        if shard not in keys:
            count = sum(1 for v in weight_map.values() if v == shard)
            raise CheckpointFormatError(
                f"{store.url(INDEX_FILE)}: the index names shard {shard!r} "
                f"({count} tensors) but {store.url(shard)} does not exist"
            )
    return weight_map


def _check_index_matches(
    store: ObjectStore, weight_map: dict[str, str], headers: dict[str, SafetensorsHeader]
) -> None:
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise CheckpointFormatError(
                f"{store.url(INDEX_FILE)}: tensor {name!r} is mapped to {shard!r} "
                f"but {store.url(shard)} does not contain it"
            )
    for shard, header in headers.items():
        for name in header.tensors:
            if weight_map.get(name) != shard:
                mapped = weight_map.get(name)
                where = f"maps it to {mapped!r}" if mapped is not None else "omits it"
                raise CheckpointFormatError(
                    f"{store.url(shard)}: tensor {name!r} is in this shard but the index {where}"
                )


def open_checkpoint(
    uri_or_store: str | ObjectStore, options: StorageOptions | None = None
) -> CheckpointCatalog:
    """Catalog the checkpoint folder at ``uri_or_store`` (path, ``file://`` or ``s3://``)."""
    store = (
        uri_or_store if isinstance(uri_or_store, ObjectStore) else open_store(uri_or_store, options)
    )
    keys = store.list()
    key_set = set(keys)
    if CONFIG_FILE not in key_set:
        what = f"it has: {', '.join(keys[:20])}" if keys else "it is empty or does not exist"
        raise CheckpointFormatError(
            f"{store.uri}: not a Hugging Face checkpoint folder: {CONFIG_FILE} is missing ({what})"
        )
    config = _read_json(store, CONFIG_FILE, CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{store.url(CONFIG_FILE)}: {CONFIG_FILE} is not a JSON object")

    weight_map: dict[str, str] | None = None
    if INDEX_FILE in key_set:
        weight_map = _read_index(store, key_set)
        files = sorted(set(weight_map.values()))
    elif SINGLE_FILE in key_set:
        files = [SINGLE_FILE]
    else:
        raise _no_weights_error(store, keys)

    workers = max(1, min(store.options.concurrency, len(files)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catalog") as pool:
        headers = dict(
            zip(files, pool.map(lambda key: read_header(store, key), files), strict=True)
        )

    tensors: dict[str, TensorRef] = {}
    for shard, header in headers.items():
        for name, ref in header.tensors.items():
            if name in tensors:
                raise CheckpointFormatError(
                    f"{store.uri}: tensor {name!r} is in two shards: "
                    f"{tensors[name].file!r} and {shard!r}"
                )
            tensors[name] = ref
    if not tensors:
        raise CheckpointFormatError(f"{store.uri}: the checkpoint has no tensors")
    if weight_map is not None:
        _check_index_matches(store, weight_map, headers)

    return CheckpointCatalog(
        uri=store.uri,
        store=store,
        config=config,
        tensors=tensors,
        files=files,
        layers=group_layers(tensors),
        headers=headers,
        keys=keys,
    )


def _compatibility_problems(base: CheckpointCatalog, expert: CheckpointCatalog) -> list[str]:
    problems = []
    if expert.architecture != base.architecture:
        problems.append(
            f"architecture {expert.architecture!r} differs from the base's {base.architecture!r}"
        )
    if expert.model_type != base.model_type:
        problems.append(
            f"model_type {expert.model_type!r} differs from the base's {base.model_type!r}"
        )
    for key in CORE_CONFIG_FIELDS:
        if key in base.config and key in expert.config and base.config[key] != expert.config[key]:
            problems.append(
                f"config field {key} = {expert.config[key]!r} differs from the base's "
                f"{base.config[key]!r}"
            )
    for name, ref in base.tensors.items():
        other = expert.tensors.get(name)
        if other is None:
            problems.append(f"tensor {name!r} of the base is missing")
        elif other.shape != ref.shape:
            problems.append(
                f"tensor {name!r} has shape {list(other.shape)}, the base has {list(ref.shape)}"
            )
        elif other.dtype != ref.dtype:
            problems.append(f"tensor {name!r} has dtype {other.dtype}, the base has {ref.dtype}")
    problems.extend(
        f"extra tensor {name!r} not in the base"
        for name in expert.tensors
        if name not in base.tensors
    )
    return problems


def check_compatible(base: CheckpointCatalog, experts: Mapping[str, CheckpointCatalog]) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless every expert matches the base.

    The message names the first expert and problem found and counts the rest; the full
    list of ``(expert, problem)`` pairs is on the exception's ``problems`` attribute.
    """
    problems = [
        (name, problem)
        for name, expert in experts.items()
        for problem in _compatibility_problems(base, expert)
    ]
    if not problems:
        return
    name, first = problems[0]
    message = f"expert {name!r} ({experts[name].uri}) is incompatible with the base: {first}"
    if len(problems) > 1:
        bad = ", ".join(repr(n) for n in dict.fromkeys(expert for expert, _ in problems))
        message += f" (and {len(problems) - 1} more problems, in experts {bad})"
    error = IncompatibleCheckpointError(message)
    error.problems = problems  # type: ignore[attr-defined]
    raise error


def read_manifest(store: ObjectStore) -> dict[str, Any]:
    """The committed Mediator manifest in ``store``; an error naming it if there is none."""
    try:
        return json.loads(store.read_text(MANIFEST_FILE))
    except ObjectNotFoundError:
        raise CheckpointFormatError(
            f"{store.url(MANIFEST_FILE)} not found: {store.uri} is not a committed "
            "mediator-ray checkpoint"
        ) from None
