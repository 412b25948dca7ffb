"""Ray Serve application: uncertainty router + expert pool behind an OpenAI-style HTTP API.

``import_path: mediator_ray.serve:app`` in a Serve config (``serve run`` / ``serve deploy`` /
a KubeRay RayService), with the application arguments of :class:`ServeOptions` as ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from mediator_ray.serve.api import ServeOptions
from mediator_ray.serve.deployments import pool_class
from mediator_ray.serve.ingress import Ingress


def build(options: ServeOptions) -> Application:
    """The application graph: Ingress → ExpertPool (replicas, autoscaling, GPUs from options)."""
    env = {"runtime_env": options.runtime_env} if options.runtime_env else {}
    pool_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus, **env},
        "max_ongoing_requests": max(16, 2 * options.max_batch_size),
    }
    if options.autoscaling:
        pool_options["autoscaling_config"] = options.autoscaling
    else:
        pool_options["num_replicas"] = options.replicas
    pool = serve.deployment(pool_class(options.cache_size)).options(**pool_options).bind(options)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, **env})
    return ingress.bind(pool, options)


def app(args: dict[str, Any]) -> Application:
    """Application builder for Serve configs: ``args`` are :class:`ServeOptions` fields."""
    return build(ServeOptions(**args))


__all__ = ["ServeOptions", "app", "build"]
