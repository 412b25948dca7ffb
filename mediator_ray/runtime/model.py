"""MediatorModel: one dense transformers model + compact sparse experts + the router.

The dense part is an ordinary Hugging Face model resident on the device. Sparse experts stay
in CPU memory in their compact encoding (pinned when CUDA exists). A *mix* (expert weights)
is materialised only in the routed layers, as D + Σ w_i S_i, and kept in an LRU of at most
``cache_size`` mixes; activating a cached mix swaps parameter tensors, nothing else. A request
is routed once (task level), then served by the mix its routing chose.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mediator_ray.checkpoint import read_manifest
from mediator_ray.merge import apply_sparse, dtype_from_name
from mediator_ray.router import Routing, TaskRouter, mix_key
from mediator_ray.storage import LocalStore, StorageOptions, local_folder, open_store

log = logging.getLogger(__name__)
EncodedSparse = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Generation:
    """One generated completion and how it was routed."""

    prompt: str
    text: str
    routing: Routing
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_sparse(folder: Path, expert: str) -> dict[str, EncodedSparse]:
    index = json.loads((folder / "experts" / expert / "index.json").read_text())
    encoded: dict[str, EncodedSparse] = {}
    for file in sorted(set(index["weight_map"].values())):
        for key, value in load_file(folder / file).items():
            name, _, field = key.partition("::")
            encoded.setdefault(name, {})[field] = value
    return encoded


def _unique_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class MediatorModel:
    """See the module docstring. Build with :meth:`from_pretrained`."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        manifest: dict[str, Any],
        sparse: dict[str, dict[str, EncodedSparse]],
        router: TaskRouter | None,
        cache_size: int = 4,
    ):
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.sparse = sparse
        self.router = router
        self.cache_size = cache_size
        self.device = next(model.parameters()).device
        self.expert_names: list[str] = list(manifest["expert_names"])
        self.routed_tensors = sorted({name for per in sparse.values() for name in per})
        # D of the routed layers: the loaded parameters themselves (never modified in place;
        # activating a mix rebinds parameters to other tensors).
        self._dense = {n: model.get_parameter(n).data for n in self.routed_tensors}
        self._mixes: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.active_mix = "dense"
        self.materializations = 0
        self.version: int | None = None  # set when loaded from a versioned output root
        if router is None:
            log.warning(
                "checkpoint %s has no router: every request is served by the dense model",
                manifest.get("output"),
            )

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        uri: str,
        device: str = "auto",
        cache_size: int = 4,
        storage: StorageOptions | None = None,
        cache_dir: str | Path | None = None,
    ) -> MediatorModel:
        """Load a committed Mediator checkpoint (local folder or s3:// URI).

        ``uri`` may also be a versioned output root (``LATEST.json`` + ``versions/``): the
        latest published version is loaded and its number kept in :attr:`version`.
        """
        from mediator_ray.registry.versions import resolve_checkpoint

        resolved, version = resolve_checkpoint(open_store(uri, storage))
        store = open_store(resolved, storage)
        manifest = read_manifest(store)
        folder = local_folder(store, cache_dir)
        target = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype_from_name(manifest["dtype"])
        ).to(target)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"  # generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        sparse = {}
        for expert in manifest["expert_names"]:
            if (folder / "experts" / expert / "index.json").exists():
                sparse[expert] = _load_sparse(folder, expert)
                if target.type == "cuda":  # host-pinned for fast copies to the device
                    for fields in sparse[expert].values():
                        for key in fields:
                            fields[key] = fields[key].pin_memory()
        router = TaskRouter.load(LocalStore(str(folder)))
        loaded = cls(model, tokenizer, manifest, sparse, router, cache_size)
        loaded.version = version
        return loaded

    # ---- mixes -------------------------------------------------------------------------------
    def _mix_tensors(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        unknown = set(weights) - set(self.sparse)
        if unknown:
            raise ValueError(f"unknown experts {sorted(unknown)} (have {sorted(self.sparse)})")
        names = [n for n, w in weights.items() if w != 0]
        self.materializations += 1
        return {
            tensor: apply_sparse(
                self._dense[tensor],
                [self.sparse[n][tensor] for n in names],
                [weights[n] for n in names],
            )
            for tensor in self.routed_tensors
        }

    def prepare(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """The routed-layer tensors of a mix, materialised into the LRU if not there yet."""
        key = mix_key(weights)
        if key == "dense" or not self.routed_tensors:
            return self._dense
        if key in self._mixes:
            self._mixes.move_to_end(key)
            return self._mixes[key]
        tensors = self._mix_tensors(weights)
        self._mixes[key] = tensors
        while len(self._mixes) > self.cache_size:
            self._mixes.popitem(last=False)
        return tensors

    def activate(self, weights: Mapping[str, float]) -> str:
        """Make ``weights`` the model's mix (routed layers only); returns the mix key."""
        key = mix_key(weights)
        if key == self.active_mix:
            if key in self._mixes:
                self._mixes.move_to_end(key)
            return key
        for name, tensor in self.prepare(weights).items():
            self.model.get_parameter(name).data = tensor
        self.active_mix = key
        return key

    @property
    def cached_mixes(self) -> list[str]:
        return list(self._mixes)

    def materialize(self, weights: Mapping[str, float]) -> PreTrainedModel:
        """A standalone copy of the model with ``weights`` materialised (for evaluation)."""
        clone = copy.deepcopy(self.model)
        tensors = self._dense if mix_key(weights) == "dense" else self._mix_tensors(weights)
        for name, tensor in tensors.items():
            clone.get_parameter(name).data = tensor.clone()
        return clone.eval()

    def expert(self, name: str) -> PreTrainedModel:
        """Expert ``name`` reconstructed as D + S_name in the routed layers."""
        return self.materialize({name: 1.0})

    # ---- routing and generation --------------------------------------------------------------
    def route(self, prompts: Sequence[str]) -> list[Routing]:
        """Task probabilities, uncertainty, mode and expert weights per prompt."""
        if self.router is None:
            return [Routing({}, 1.0, "dense", {}) for _ in prompts]
        if self._features_see_routed_layers():
            self.activate({})
        return self.router.route(self.model, self.tokenizer, prompts)

    def _features_see_routed_layers(self) -> bool:
        routed_blocks = self.manifest_routed_blocks()
        layer = self.router.info.feature_layer if self.router else -1
        routes_non_blocks = any(
            entry["action"] == "route" and entry["kind"] != "block"
            for entry in self.manifest["layers"]
        )
        return routes_non_blocks or any(block <= layer for block in routed_blocks)

    def manifest_routed_blocks(self) -> list[int]:
        return [
            entry["index"]
            for entry in self.manifest["layers"]
            if entry["action"] == "route" and entry["kind"] == "block"
        ]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        weights: Sequence[Mapping[str, float] | None] | None = None,
        **generation_kwargs: Any,
    ) -> list[Generation]:
        """Route each prompt (unless ``weights`` pins its mix), group by mix, generate.

        Only prompts without pinned weights are routed. Generation is greedy unless
        ``do_sample`` and friends are passed (transformers ``generate`` keyword arguments).
        """
        pinned = list(weights) if weights is not None else [None] * len(prompts)
        if len(pinned) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(pinned)} weights")
        to_route = [i for i, w in enumerate(pinned) if w is None]
        routed = iter(self.route([prompts[i] for i in to_route]) if to_route else [])
        routings = [
            next(routed) if w is None else Routing({}, 0.0, "pinned", dict(w)) for w in pinned
        ]
        groups: dict[str, list[int]] = {}
        for index, routing in enumerate(routings):
            groups.setdefault(routing.mix, []).append(index)
        results: list[Generation | None] = [None] * len(prompts)
        for indices in groups.values():
            self.activate(routings[indices[0]].weights)
            outputs = self._generate([prompts[i] for i in indices], generation_kwargs)
            for i, (text, n_prompt, n_completion, finish) in zip(indices, outputs, strict=True):
                results[i] = Generation(
                    prompts[i], text, routings[i], n_prompt, n_completion, finish
                )
        return [r for r in results if r is not None]

    def stream(
        self, prompt: str, weights: Mapping[str, float], **generation_kwargs: Any
    ) -> Iterator[str]:
        """Text pieces of one completion as they are generated, with ``weights`` active."""
        from transformers import TextIteratorStreamer

        self.activate(weights)
        batch = self.tokenizer([prompt], return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300
        )
        options = {"max_new_tokens": 32, "do_sample": False, **generation_kwargs}
        options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        worker = threading.Thread(
            target=self.model.generate, kwargs={**batch, **options, "streamer": streamer}
        )
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            worker.join()

    def _generate(
        self, prompts: Sequence[str], kwargs: Mapping[str, Any]
    ) -> list[tuple[str, int, int, str]]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        options = {"max_new_tokens": 32, "do_sample": False, **kwargs}
        options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        output = self.model.generate(**batch, **options)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        out = []
        for row, mask in zip(new_tokens, batch["attention_mask"], strict=True):
            tokens = row.tolist()
            if self.tokenizer.pad_token_id != eos:
                tokens = [t for t in tokens if t != self.tokenizer.pad_token_id]
            finished = eos in tokens
            if finished:
                tokens = tokens[: tokens.index(eos)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append((text, int(mask.sum()), len(tokens), "stop" if finished else "length"))
        return out

    # ---- accounting --------------------------------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Bytes of tensors this object holds, by kind (shared storages counted once)."""
        params = [p.data for p in self.model.parameters()] + list(self.model.buffers())
        sparse = [
            t for per in self.sparse.values() for fields in per.values() for t in fields.values()
        ]
        dense_routed = list(self._dense.values())
        mixes = [t for mix in self._mixes.values() for t in mix.values()]
        everything = _unique_bytes(params + sparse + dense_routed + mixes)
        return {
            "model": _unique_bytes(params),
            "sparse_experts": _unique_bytes(sparse),
            "routed_dense_copy": _unique_bytes(dense_routed),
            "cached_mixes": _unique_bytes(mixes),
            "total": everything,
        }
