"""Versioned Mediator outputs: ``OUTPUT/versions/NNNN/`` plus a ``LATEST.json`` pointer.

Every published version is a complete, immutable checkpoint; ``LATEST.json`` names the one
to serve and moves only by compare-and-swap, so two concurrent scheduled runs cannot both
publish, and a run that crashes leaves the previous version serving. A lease object keeps a
second run from even starting the same work; an expired lease (a crashed holder) can be taken
over.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from mediator_ray.errors import ObjectNotFoundError
from mediator_ray.storage import ObjectStore

POINTER = "LATEST.json"
LEASE = "_lease.json"
VERSIONS = "versions"


def version_path(number: int) -> str:
    return f"{VERSIONS}/{number:04d}"


@dataclass(frozen=True)
class Pointer:
    version: int
    path: str  # relative to the output root
    experts: list[str]
    published_at: float


class VersionedOutput:
    """The versions of one output root and the pointer to the latest."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def latest(self) -> tuple[Pointer | None, str | None]:
        """(pointer, its tag for compare-and-swap); (None, None) before the first version."""
        tag = self.store.tag(POINTER)
        if tag is None:
            return None, None
        data = json.loads(self.store.read_text(POINTER))
        return Pointer(**data), tag

    def uri(self, pointer: Pointer) -> str:
        return f"{self.store.uri}/{pointer.path}"

    def publish(self, pointer: Pointer, expected_tag: str | None) -> bool:
        """Move LATEST to ``pointer`` unless someone else moved it since ``expected_tag``."""
        body = json.dumps(asdict(pointer), indent=1).encode()
        return self.store.write_if(POINTER, body, expected_tag)

    def versions(self) -> list[int]:
        numbers = set()
        for key in self.store.list(VERSIONS):
            part = key.split("/")[1]
            if part.isdigit():
                numbers.add(int(part))
        return sorted(numbers)

    def prune(self, keep: int, protect: int) -> list[int]:
        """Delete all but the newest ``keep`` versions (never ``protect``); returns deleted."""
        deleted = []
        for number in self.versions()[:-keep] if keep > 0 else []:
            if number == protect:
                continue
            for key in self.store.list(version_path(number)):
                self.store.delete(key)
            deleted.append(number)
        return deleted


class Lease:
    """An exclusive, expiring claim on an output root (create-if-absent on ``_lease.json``).

    The holder renews it every ``ttl_s / 3`` while it works, so the TTL can be short: a run
    that dies stops renewing and its lease can be taken over within ``ttl_s``, however long
    a healthy merge takes.
    """

    def __init__(self, store: ObjectStore, ttl_s: float = 120.0):
        self.store = store
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s}).encode()

    def acquire(self) -> bool:
        """Take the lease (or an expired one) and keep it renewed until :meth:`release`."""
        if not self.store.write_if(LEASE, self._body(), None):
            tag = self.store.tag(LEASE)
            held = self._read()
            if held is None or tag is None or held.get("expires_at", 0) > time.time():
                return False
            if not self.store.write_if(LEASE, self._body(), tag):  # take over an expired lease
                return False
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._renewer.start()
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_text(LEASE))
        except (ObjectNotFoundError, json.JSONDecodeError):
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            tag = self.store.tag(LEASE)
            held = self._read()
            if tag is None or held is None or held.get("owner") != self.owner:
                return  # lost it (taken over after we stalled): the pointer CAS still guards
            self.store.write_if(LEASE, self._body(), tag)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.store.delete(LEASE)


def resolve_checkpoint(store: ObjectStore) -> tuple[str, int | None]:
    """(URI of the checkpoint to load, version) — the latest version if ``store`` is a
    versioned output root, else ``store`` itself."""
    pointer, _ = VersionedOutput(store).latest()
    if pointer is None:
        return store.uri, None
    return f"{store.uri}/{pointer.path}", pointer.version
