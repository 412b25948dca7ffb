"""Live progress of a merge: layers done, bytes fetched per second, ETA (rich)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class MergeProgress:
    """One bar per pass; ``advance`` also accumulates fetched bytes for the rate column."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("layers"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self._started: dict[TaskID, float] = {}
        self._bytes: dict[TaskID, int] = {}

    def __enter__(self) -> MergeProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def phase(self, name: str, total: int) -> TaskID:
        task = self._progress.add_task(name, total=total, rate="")
        self._started[task] = time.perf_counter()
        self._bytes[task] = 0
        return task

    def advance(self, task: TaskID, nbytes: int = 0) -> None:
        self._bytes[task] += nbytes
        elapsed = max(time.perf_counter() - self._started[task], 1e-6)
        rate = f"{human_bytes(self._bytes[task] / elapsed)}/s" if self._bytes[task] else ""
        self._progress.update(task, advance=1, rate=rate)
