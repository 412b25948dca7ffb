"""Fitting the router of a written checkpoint: at the end of a merge, or on demand.

Loads the dense part (an ordinary HF folder) and the calibration prompts, fits the router on
the dense model's early layers, and returns the router's files and its manifest entry; the
caller writes them and then the manifest, so the checkpoint stays consistent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mediator_ray.errors import ConfigError
from mediator_ray.router.features import default_feature_layer
from mediator_ray.router.fit import RouterOptions, fit_router, load_calibration
from mediator_ray.router.router import ROUTER_META, ROUTER_WEIGHTS, TaskRouter
from mediator_ray.storage import StorageOptions, local_folder, open_store


def router_summary(router: TaskRouter) -> dict[str, Any]:
    """The manifest's ``router`` entry: where it is and how good it is."""
    info = router.info
    return {
        "files": [ROUTER_WEIGHTS, ROUTER_META],
        "experts": info.experts,
        "feature_layer": info.feature_layer,
        "heldout_accuracy": info.heldout_accuracy,
        "temperature": info.temperature,
        "thresholds": {
            "u_low": info.thresholds.u_low,
            "u_high": info.thresholds.u_high,
            "top_k": info.thresholds.top_k,
        },
        "n_train": info.n_train,
        "n_heldout": info.n_heldout,
    }


def fit_checkpoint_router(
    uri: str,
    calibration: Mapping[str, str],
    expert_order: Sequence[str],
    routed_blocks: Sequence[int],
    options: RouterOptions | None = None,
    storage: StorageOptions | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(router files as {key: bytes}, manifest entry) for the checkpoint at ``uri``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in expert_order if name not in calibration]
    if missing:
        raise ConfigError(f"calibration prompts missing for experts {missing}")
    prompts = {name: load_calibration(calibration[name], storage) for name in expert_order}
    store = open_store(uri, storage)
    folder = local_folder(store)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    router = fit_router(model, tokenizer, prompts, default_feature_layer(routed_blocks), options)
    return router.files(), router_summary(router)
