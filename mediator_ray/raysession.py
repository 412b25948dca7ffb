"""Joining Ray for a merge, and the Ray options of its layer tasks (no torch here)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from mediator_ray.config import MergeConfig


def ensure_ray() -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray bound to 127.0.0.1.

    A process that uses torch must import it *before* this: a job driver that loads torch's
    libraries after ``ray.init()`` aborts in oneMKL on the first job of a fresh cluster
    ("Cannot load libtorch_cpu.so", exit 134; seen with ``ray job submit``, Ray 2.x, torch
    2.13 CPU). The merge driver imports no torch at all (``tests/test_cli.py`` checks it);
    the runtime, Serve and the quality code import it at module level.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")


def task_options(config: MergeConfig) -> dict[str, Any]:
    """Ray options of every layer task of ``config``."""
    compute = config.compute
    options: dict[str, Any] = {
        "num_cpus": compute.cpus_per_task,
        "num_gpus": compute.gpus_per_task,
        "max_retries": compute.max_retries,
    }
    if compute.memory_per_task:
        options["memory"] = compute.memory_per_task
    return options
