"""Turning trained models into release artefacts, and the registry of tasks both sides share.

Importing ``export`` is cheap on purpose: the Flower relay process imports ``export.wire``
and must not pay for torch. The torch-backed names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TASKS", "TaskSpec", "UnknownTaskError", "build_model", "get_task"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("export.tasks"), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
