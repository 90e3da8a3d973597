"""Turning trained models into release artefacts, and the registry of tasks both sides share.

Importing ``export`` is cheap on purpose: the Flower relay process imports ``export.wire``
and must not pay for torch. The torch-backed names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Each module is imported on first use only.
_LAZY: dict[str, str] = {
    "TASKS": "export.tasks",
    "TaskSpec": "export.tasks",
    "UnknownTaskError": "export.tasks",
    "build_model": "export.tasks",
    "get_task": "export.tasks",
    "UnsupportedModelError": "export.onnx_export",
    "export_onnx": "export.onnx_export",
    "export_onnx_int8": "export.onnx_export",
    "export_openvino": "export.onnx_export",
    "ParityReport": "export.parity",
    "load_session": "export.parity",
    "parity_report": "export.parity",
    "BundleVerificationError": "export.bundle",
    "BundleWriteError": "export.bundle",
    "VerifiedBundle": "export.bundle",
    "generate_release_key": "export.bundle",
    "load_revocations": "export.revocations",
    "RevocationSource": "export.revocations",
    "public_key_fingerprint": "export.bundle",
    "verify_bundle": "export.bundle",
    "write_bundle": "export.bundle",
    "create_app": "export.serve",
    "canonical_digest": "export.canonical",
}

__all__ = [
    "TASKS",
    "BundleVerificationError",
    "BundleWriteError",
    "ParityReport",
    "RevocationSource",
    "TaskSpec",
    "UnknownTaskError",
    "UnsupportedModelError",
    "VerifiedBundle",
    "build_model",
    "canonical_digest",
    "create_app",
    "export_onnx",
    "export_onnx_int8",
    "export_openvino",
    "generate_release_key",
    "get_task",
    "load_revocations",
    "load_session",
    "parity_report",
    "public_key_fingerprint",
    "verify_bundle",
    "write_bundle",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
