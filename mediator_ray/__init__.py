"""mediator-ray: merge fine-tuned LLM experts into one Mediator checkpoint on Ray, and serve it."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MediatorModel", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `mediator-ray --help` and Ray workers do not import transformers up front.
    if name == "MediatorModel":
        from mediator_ray.runtime import MediatorModel

        return MediatorModel
    raise AttributeError(f"module 'mediator_ray' has no attribute {name!r}")
