"""Task-level router: features, classifier, calibration and the uncertainty rule.

Names load their submodule on first use (:mod:`mediator_ray.lazy_exports`): the
torch-free option models import without torch.
"""

from mediator_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "EMBEDDINGS": "features",
    "default_feature_layer": "features",
    "prompt_features": "features",
    "RouterOptions": "options",
    "fit_router": "fit",
    "load_calibration": "fit",
    "ROUTER_META": "router",
    "ROUTER_WEIGHTS": "router",
    "RouterInfo": "router",
    "TaskRouter": "router",
    "Routing": "uncertainty",
    "Thresholds": "uncertainty",
    "mix_key": "uncertainty",
    "normalized_entropy": "uncertainty",
    "parse_mix": "uncertainty",
    "quantize": "uncertainty",
    "select": "uncertainty",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
