"""Local-folder backend: the embedded default (plain paths and ``file://`` URIs)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from mediator_ray.errors import ObjectNotFoundError, StorageError
from mediator_ray.storage.base import IOStats, ObjectStore, StorageOptions


class LocalStore(ObjectStore):
    """Objects are files below a root folder; writes go through a temp file and a rename."""

    def __init__(
        self, uri: str, options: StorageOptions | None = None, stats: IOStats | None = None
    ):
        super().__init__(uri, options, stats)
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        self.root = Path(path).expanduser().absolute()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in Path(key).parts:
            raise StorageError(f"{self.uri}: key {key!r} escapes the store root")
        return self.root / key if key else self.root

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path}: no such file") from None
        if not path.is_file():
            raise ObjectNotFoundError(f"{path}: not a file")
        return stat.st_size

    def _get_into(self, key: str, start: int, out: memoryview) -> int:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path}: no such file") from None
        try:
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], start + done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith((".tmp-", ".lock-")):
                    continue  # an in-flight write of another process, or a writers' lock
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def _put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def tag(self, key: str) -> str | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

    def _put_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One lock file per key serialises conditional writers; the write itself is still a
        # temp file + rename, so readers never see a partial object.
        with open(path.parent / f".lock-{path.name}", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.tag(key) != expected_tag:
                    return False
                self._put(key, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Folders exist only to hold objects (as in S3): drop the ones this leaves empty.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone): stop
                break
            parent = parent.parent

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(str(self._path(prefix.strip("/"))), self.options, self.stats)
