"""Turning trained models into release artefacts: exports, parity, signed bundles, revocation,
and the clinician's tools (``fedward-verify``, ``fedward-serve``).

Importing ``export`` is cheap on purpose: the torch-backed names load on first use. The
task and model registry both sides share lives in :mod:`fedward.tasks`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Each module is imported on first use only.
_LAZY: dict[str, str] = {
    "UnsupportedModelError": "export.onnx_export",
    "export_onnx": "export.onnx_export",
    "export_onnx_int8": "export.onnx_export",
    "export_openvino": "export.onnx_export",
    "ParityReport": "export.parity",
    "load_session": "export.parity",
    "parity_report": "export.parity",
    "BundleVerificationError": "export.bundle_format",
    "BundleWriteError": "export.bundle_format",
    "VerifiedBundle": "export.bundle_verify",
    "generate_release_key": "export.bundle_keys",
    "load_revocations": "export.revocations",
    "RevocationSource": "export.revocations",
    "public_key_fingerprint": "export.bundle_keys",
    "verify_bundle": "export.bundle_verify",
    "write_bundle": "export.bundle",
    "create_app": "export.serve",
    "canonical_digest": "export.canonical",
}

__all__ = [
    "BundleVerificationError",
    "BundleWriteError",
    "ParityReport",
    "RevocationSource",
    "UnsupportedModelError",
    "VerifiedBundle",
    "canonical_digest",
    "create_app",
    "export_onnx",
    "export_onnx_int8",
    "export_openvino",
    "generate_release_key",
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
