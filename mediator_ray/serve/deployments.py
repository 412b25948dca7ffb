"""The Serve deployments: an expert pool (model multiplexing keyed by expert mix) and the
HTTP ingress that routes each request once and sends it to a replica holding its mix.

ExpertPool replicas each hold one MediatorModel (dense model + compact sparse experts).
``@serve.multiplexed`` makes the mix key the "model id": Serve's router sends a request to a
replica that already materialised that mix, and each replica keeps at most ``cache_size``
mixes (the same LRU bound as the runtime's). Requests that reach a replica together are
batched (``@serve.batch``) and generated per mix. The model is used under a lock: a mix swap
rebinds parameters, so two generations must never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from mediator_ray.router import Routing, parse_mix
from mediator_ray.serve.api import ServeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    """One prompt to complete with a given mix and sampling parameters."""

    prompt: str
    mix: str
    generation_kwargs: dict[str, Any]

    @property
    def batch_key(self) -> tuple:
        return (self.mix, tuple(sorted(self.generation_kwargs.items())))


def routing_payload(routing: Routing) -> dict[str, Any]:
    return {
        "probabilities": routing.probabilities,
        "uncertainty": routing.uncertainty,
        "mode": routing.mode,
        "mix": routing.mix,
        "weights": routing.weights,
    }


class ExpertPool:
    """One MediatorModel per replica; see the module docstring."""

    def __init__(self, options: ServeOptions):
        from mediator_ray.runtime import MediatorModel

        self.options = options
        self.model = MediatorModel.from_pretrained(
            options.checkpoint, device=options.device, cache_size=options.cache_size
        )
        self.lock = asyncio.Lock()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.served = 0
        self._generate_batch.set_max_batch_size(options.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self._pending: Any = None  # a newer version, loaded and waiting to be swapped in
        if options.reload_interval_s:
            threading.Thread(target=self._watch_versions, daemon=True).start()

    # ---- new versions ------------------------------------------------------------------------
    def _watch_versions(self) -> None:
        while True:
            time.sleep(self.options.reload_interval_s or 60)
            try:
                self.check_for_new_version()
            except Exception:  # keep serving the current version; try again later
                log.exception("checking %s for a new version failed", self.options.checkpoint)

    def check_for_new_version(self) -> int | None:
        """Load the latest version in the background if it is newer; returns its number.

        The loaded model waits in ``_pending`` until the next request swaps it in under the
        model lock, so no generation ever runs across the swap and no request fails.
        """
        from mediator_ray.registry.versions import resolve_checkpoint
        from mediator_ray.runtime import MediatorModel
        from mediator_ray.storage import open_store

        _, latest = resolve_checkpoint(open_store(self.options.checkpoint))
        pending = self._pending.version if self._pending is not None else None
        if latest is None or latest in (self.model.version, pending):
            return None
        self._pending = MediatorModel.from_pretrained(
            self.options.checkpoint, device=self.options.device, cache_size=self.options.cache_size
        )
        return latest

    async def _swap_in_new_version(self) -> None:
        if self._pending is None:
            return
        async with self.lock:
            if self._pending is not None:
                log.info("now serving version %s", self._pending.version)
                self.model, self._pending = self._pending, None

    async def reload(self) -> dict[str, Any]:
        """Check for a new version now (this replica; the others follow by polling)."""
        loaded = await asyncio.to_thread(self.check_for_new_version)
        await self._swap_in_new_version()
        return {"replica": self.replica_id, "version": self.model.version, "loaded": loaded}

    async def info(self) -> dict[str, Any]:
        await self._swap_in_new_version()
        m = self.model.manifest
        return {
            "experts": self.model.expert_names,
            "router": m.get("router"),
            "routed_layers": [x["name"] for x in m["layers"] if x["action"] == "route"],
            "density": m["sparse"]["density"],
            "dtype": m["dtype"],
            "version": self.model.version,
        }

    async def route(self, prompts: list[str]) -> list[dict[str, Any]]:
        await self._swap_in_new_version()
        async with self.lock:
            routings = await asyncio.to_thread(self.model.route, prompts)
        return [routing_payload(r) for r in routings]

    async def _load_mix(self, mix: str) -> dict[str, float]:
        """Materialise ``mix`` into this replica's LRU (the "model load" of multiplexing).

        Wrapped with ``@serve.multiplexed`` by :func:`pool_class`, whose bound must equal the
        runtime's ``cache_size``: a larger one would make Serve send a mix to a replica that
        has already evicted it."""
        weights = parse_mix(mix, self.model.expert_names)
        async with self.lock:
            await asyncio.to_thread(self.model.prepare, weights)
        return weights

    async def generate(self, job: GenerationJob) -> dict[str, Any]:
        await self._swap_in_new_version()
        await self._load_mix(serve.get_multiplexed_model_id() or job.mix)
        return await self._generate_batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerationJob]) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(index)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        async with self.lock:
            for indices in groups.values():
                first = jobs[indices[0]]
                weights = parse_mix(first.mix, self.model.expert_names)
                generations = await asyncio.to_thread(
                    self.model.generate,
                    [jobs[i].prompt for i in indices],
                    [weights] * len(indices),
                    **first.generation_kwargs,
                )
                for i, g in zip(indices, generations, strict=True):
                    results[i] = {
                        "text": g.text,
                        "finish_reason": g.finish_reason,
                        "prompt_tokens": g.prompt_tokens,
                        "completion_tokens": g.completion_tokens,
                        "replica": self.replica_id,
                        "version": self.model.version,
                        "batch_size": len(jobs),
                    }
        self.served += len(jobs)
        return results

    async def stream(self, job: GenerationJob) -> AsyncIterator[str]:
        """Text pieces of one completion as they are generated."""
        await self._swap_in_new_version()
        await self._load_mix(serve.get_multiplexed_model_id() or job.mix)
        weights = parse_mix(job.mix, self.model.expert_names)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        def produce() -> None:
            try:
                for piece in self.model.stream(job.prompt, weights, **job.generation_kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as e:  # surfaced to the caller below
                loop.call_soon_threadsafe(queue.put_nowait, e)

        async with self.lock:
            producer = loop.run_in_executor(None, produce)
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            await producer
        self.served += 1

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat: the tokenizer's chat template, or a plain transcript."""
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "served": self.served,
            "cached_mixes": self.model.cached_mixes,
            "active_mix": self.model.active_mix,
            "materializations": self.model.materializations,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def pool_class(cache_size: int) -> type[ExpertPool]:
    """ExpertPool whose multiplexing bound is ``cache_size`` (the decorator takes a constant)."""

    class MultiplexedExpertPool(ExpertPool):
        @serve.multiplexed(max_num_models_per_replica=cache_size)
        async def _load_mix(self, mix: str) -> dict[str, float]:
            return await ExpertPool._load_mix(self, mix)

    MultiplexedExpertPool.__name__ = MultiplexedExpertPool.__qualname__ = "ExpertPool"
    return MultiplexedExpertPool
