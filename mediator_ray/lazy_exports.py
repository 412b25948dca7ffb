"""Package re-exports that import their submodule on first use (PEP 562).

``mediator_ray.merge`` and ``mediator_ray.router`` re-export names from submodules of which
some import torch (and transformers). Imported eagerly, any ``from mediator_ray.merge.plan
import …`` would pay for all of them — ~1.2 s and ~110 MB for torch — even in the merge driver
and the CLI, which only need the torch-free option models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to its submodule."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
