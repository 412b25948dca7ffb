"""Ray job entrypoint for the scheduled batch merge of newly registered experts.

    ray job submit --working-dir . -- python jobs/merge_new_experts.py \
        --registry s3://models/registry --output s3://models/mediator

Merges experts announced in the registry but not yet in the latest version into a new
version under OUTPUT/versions/, then moves OUTPUT/LATEST.json. Nothing new: no writes.
"""

from __future__ import annotations

import argparse
import sys

from mediator_ray.cli import run_merge_new_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="registry prefix (path or s3://)")
    parser.add_argument("--output", required=True, help="versioned output root")
    parser.add_argument("--config", help="merge options template (YAML): options, dtype, …")
    parser.add_argument("--retain", type=int, default=3, help="versions to keep")
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=120.0,
        help="seconds without renewal before a dead run's lease may be taken over",
    )
    parser.add_argument("--no-progress", action="store_true", help="plain log output")
    args = parser.parse_args(argv)
    return run_merge_new_command(
        args.registry,
        args.output,
        args.config,
        args.retain,
        show_progress=not args.no_progress,
        lease_ttl_s=args.lease_ttl,
    )


if __name__ == "__main__":
    sys.exit(main())
