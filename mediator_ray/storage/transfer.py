"""Whole-object copies between stores: staging a folder to S3, or S3 to a local folder.

Used where a consumer needs real files (``from_pretrained`` reads a local folder) and by
tests and benchmarks that put a local checkpoint on an S3 server.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def local_folder(store: ObjectStore, cache_dir: str | Path | None = None) -> Path:
    """A local folder with the store's files: the folder itself for a local store, else a
    one-time download (``_progress/`` records excluded) into ``cache_dir`` or a temp folder.

    For consumers that only read real files, like ``from_pretrained``.
    """
    from mediator_ray.storage.local import LocalStore

    if isinstance(store, LocalStore):
        return store.root
    target = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="mediator-"))
    keys = [k for k in store.list() if not k.startswith("_progress/")]
    copy_tree(store, LocalStore(str(target)), keys)
    return target
