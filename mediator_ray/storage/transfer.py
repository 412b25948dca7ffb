"""Whole-object copies between stores: staging a folder to S3, or S3 to a local folder.

Used where a consumer needs real files (``from_pretrained`` reads a local folder) and by
tests and benchmarks that put a local checkpoint on an S3 server.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from mediator_ray.storage.base import ObjectStore


def copy_tree(src: ObjectStore, dst: ObjectStore, keys: Iterable[str] | None = None) -> list[str]:
    """Copy ``keys`` (default: every object of ``src``) to the same keys in ``dst``."""
    todo = sorted(keys) if keys is not None else src.list()

    def copy_one(key: str) -> None:
        dst.write(key, src.read(key))

    workers = max(1, min(src.options.concurrency, len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copy") as pool:
        list(pool.map(copy_one, todo))
    return todo
