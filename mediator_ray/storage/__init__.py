"""Object storage behind one small interface: local folders (the default) and S3."""

from __future__ import annotations

from mediator_ray.errors import StorageError
from mediator_ray.storage.base import ByteRange, IOStats, ObjectStore, StorageOptions, plan_fetches
from mediator_ray.storage.local import LocalStore
from mediator_ray.storage.s3 import S3Store, split_s3_uri
from mediator_ray.storage.transfer import copy_tree, local_folder

__all__ = [
    "ByteRange",
    "IOStats",
    "LocalStore",
    "ObjectStore",
    "S3Store",
    "StorageOptions",
    "copy_tree",
    "local_folder",
    "open_store",
    "plan_fetches",
    "split_s3_uri",
]


def open_store(
    uri: str, options: StorageOptions | None = None, stats: IOStats | None = None
) -> ObjectStore:
    """The store rooted at ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    if uri.startswith("s3://"):
        return S3Store(uri, options, stats)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri!r}: unsupported scheme {scheme!r} (use a path, file:// or s3://)")
    return LocalStore(uri, options, stats)
