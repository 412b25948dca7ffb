"""Serving-side model: the dense model, compact sparse experts, mixes and the router."""

from mediator_ray.runtime.model import Generation, MediatorModel, resolve_device

__all__ = ["Generation", "MediatorModel", "resolve_device"]
