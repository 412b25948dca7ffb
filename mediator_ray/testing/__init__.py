"""Test helpers shared by the test-suite, the merge job tests and the benchmarks."""

from mediator_ray.testing.zoo import NORM_REF, ZOO_FORMAT, Zoo, ZooSpec, build_zoo, sample_prompts

__all__ = ["NORM_REF", "ZOO_FORMAT", "Zoo", "ZooSpec", "build_zoo", "sample_prompts"]
