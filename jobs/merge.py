"""Ray job entrypoint for one merge.

    ray job submit --working-dir . -- python jobs/merge.py --config merge.yaml

Attaches to the cluster in RAY_ADDRESS (set by ``ray job submit``), else starts a local Ray.
The config may be a local path or an s3:// URI.
"""

from __future__ import annotations

import argparse
import sys

from mediator_ray.cli import run_merge_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="merge.yaml (path or s3:// URI)")
    parser.add_argument("--no-progress", action="store_true", help="plain log output")
    args = parser.parse_args(argv)
    return run_merge_command(args.config, show_progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
