"""Ray orchestration of a merge: layer tasks, bounded scheduling, resume, commit, report."""

from mediator_ray.pipeline.driver import MANIFEST, MergeOutcome, ensure_ray, run_merge

__all__ = ["MANIFEST", "MergeOutcome", "ensure_ray", "run_merge"]
