"""Task-level router: features, classifier, calibration and the uncertainty rule."""

from mediator_ray.router.features import EMBEDDINGS, default_feature_layer, prompt_features
from mediator_ray.router.fit import RouterOptions, fit_router, load_calibration
from mediator_ray.router.router import ROUTER_META, ROUTER_WEIGHTS, RouterInfo, TaskRouter
from mediator_ray.router.uncertainty import (
    Routing,
    Thresholds,
    mix_key,
    normalized_entropy,
    parse_mix,
    quantize,
    select,
)

__all__ = [
    "EMBEDDINGS",
    "ROUTER_META",
    "ROUTER_WEIGHTS",
    "RouterInfo",
    "RouterOptions",
    "Routing",
    "TaskRouter",
    "Thresholds",
    "default_feature_layer",
    "fit_router",
    "load_calibration",
    "mix_key",
    "normalized_entropy",
    "parse_mix",
    "prompt_features",
    "quantize",
    "select",
]
