"""What a signed release bundle holds: formats, standard file names, errors, safe names.

A bundle is a plain folder::

    <release>/
        model.onnx          the artefacts (names in ARTEFACT_FILES)
        model.int8.onnx
        model.xml, model.bin
        model_card.json     intended use, metrics, privacy statement, lineage, release_id
        model_card.md       the same for people
        model.sig           the signature over a manifest of every other file's SHA-256

It is written and signed by :mod:`export.bundle`, verified by :mod:`export.bundle_verify`;
the release keys are in :mod:`export.bundle_keys`, the model card's Markdown in
:mod:`export.bundle_card`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Final, Literal

__all__ = [
    "ARTEFACT_FILES",
    "CHUNK_BYTES",
    "FORMATS",
    "MODEL_CARD_JSON",
    "MODEL_CARD_MD",
    "RELEASE_ID_KEY",
    "RELEASE_ID_RE",
    "SAFE_PART_RE",
    "SERVING_FILE",
    "SIGNATURE_FILE",
    "ArtefactFormat",
    "BundleError",
    "BundleVerificationError",
    "BundleWriteError",
    "check_names",
    "name_problem",
]


ArtefactFormat = Literal["onnx", "onnx-int8", "openvino"]
FORMATS: Final[tuple[ArtefactFormat, ...]] = ("onnx", "onnx-int8", "openvino")

# Standard names of each format's files inside a bundle (and in an export folder).
ARTEFACT_FILES: Final[Mapping[ArtefactFormat, tuple[str, ...]]] = {
    "onnx": ("model.onnx",),
    "onnx-int8": ("model.int8.onnx",),
    "openvino": ("model.xml", "model.bin"),
}
SERVING_FILE: Final = "model.onnx"  # what the inference service loads
SIGNATURE_FILE: Final = "model.sig"
MODEL_CARD_JSON: Final = "model_card.json"
MODEL_CARD_MD: Final = "model_card.md"
RELEASE_ID_KEY: Final = "release_id"
_RESERVED: Final = frozenset({SIGNATURE_FILE, MODEL_CARD_JSON, MODEL_CARD_MD})


# One path component: starts with a letter, digit or underscore (no hidden files, no "."
# or ".."), then letters, digits, "._-". Nothing that a shell, Windows or a URL treats
# specially.
SAFE_PART_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
RELEASE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

CHUNK_BYTES: Final = 1024 * 1024


class BundleError(Exception):
    """Base class of the bundle errors."""


class BundleWriteError(BundleError):
    """A bundle could not be written; nothing was left at the final path."""


class BundleVerificationError(BundleError):
    """A bundle failed verification. The message is the reason, fit to show a person."""


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain relative path inside a bundle, or None if it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or NUL"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..'"
    if any(not SAFE_PART_RE.fullmatch(p) for p in parts):
        return "has an empty, hidden or unsafe path component"
    return None


def check_names(names: list[str]) -> None:
    problems = []
    for name in names:
        why = name_problem(name)
        if why is not None:
            problems.append(f"{name!r} {why}")
        elif name in _RESERVED:
            problems.append(f"{name!r} is reserved for the bundle itself")
    as_set = set(names)
    for name in names:
        parents = PurePosixPath(name).parents
        clash = [str(p) for p in parents if str(p) in as_set]
        if clash:
            problems.append(f"{name!r} would sit inside the file {clash[0]!r}")
    if problems:
        raise BundleWriteError("file names must be plain relative paths inside the bundle: "
                               + "; ".join(problems))
