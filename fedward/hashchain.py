"""The hash chain both audit logs use: canonical JSON, entry hashes, link checks.

The coordinator's audit table (``coordinator.audit``) and each site's audit log
(``site_agent.audit``) chain their entries the same way: an entry stores its predecessor's
hash, and its own hash is ``SHA-256(prev_hash || canonical_json(body))``, where ``body`` is
the entry without the two hashes and with ``"v": 2``. Changing, deleting, inserting or
reordering an entry breaks the chain at that entry or the next.

Canonical JSON is RFC 8785 (JSON Canonicalization Scheme, the ``rfc8785`` package): sorted
keys, no insignificant whitespace, UTF-8, numbers in their shortest ECMAScript form, so any
RFC 8785 implementation recomputes a hash. Before canonicalising, an integer outside the
range a JSON number holds exactly (``|n| > 2**53 - 1``, e.g. a Flower run id) is written as
its decimal string, as I-JSON (RFC 7493) asks; NaN and infinities are refused.

**Versions.** Entries written before this module carry format version 1: each log then had
its own JSON form (Python's ``json.dumps`` with sorted keys and no spaces; the coordinator
kept non-ASCII characters, the site escaped them and hashed ``prev_hash`` inside the body).
:class:`ChainFormat` keeps both so that an existing log still verifies; every new entry is
version 2. A version-1 entry after a version-2 one breaks the chain (an old-form entry cannot
be slipped in after the switch), and the version is inside the hashed body, so it cannot be
changed without breaking the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import rfc8785

__all__ = [
    "COORDINATOR_FORMAT",
    "CURRENT_VERSION",
    "GENESIS_HASH",
    "SITE_FORMAT",
    "VERSIONS",
    "ChainFormat",
    "LinkProblem",
    "canonical_json",
    "normalise",
]

GENESIS_HASH: Final = "0" * 64
CURRENT_VERSION: Final = 2
VERSIONS: Final = frozenset({1, CURRENT_VERSION})
# The version key inside a version-2 body.
VERSION_KEY: Final = "v"
_MAX_EXACT_INT: Final = 2**53 - 1


def normalise(value: Any) -> Any:
    """A JSON value I-JSON accepts: integers beyond ``2**53 - 1`` become decimal strings,
    tuples lists; anything else that is not JSON raises.

    Raises:
        ValueError: a float that is NaN or infinite, or a key that is not a string.
        TypeError: a value JSON cannot hold.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_EXACT_INT else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number (NaN or infinity)")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"JSON object keys are strings, not {type(key).__name__}")
            out[key] = normalise(item)
        return out
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON of ``value`` after :func:`normalise`."""
    return rfc8785.dumps(normalise(value))


def _legacy_json(value: Any, *, ascii_only: bool) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only,
                      allow_nan=False).encode("utf-8")


class LinkProblem(Enum):
    """Why an entry does not verify."""

    UNKNOWN_VERSION = "unknown format version"
    DOWNGRADE = "an old-format entry after a new-format one"
    BROKEN_LINK = "it does not chain to the entry before it"
    NOT_JSON = "it holds a value that is not valid JSON"
    HASH_MISMATCH = "its content does not match its hash"


@dataclass(frozen=True)
class ChainFormat:
    """One log's chain: version 2 is shared; version 1 is how that log hashed before.

    Attributes:
        name: what the log is, for messages.
        legacy_ascii: version 1 escaped non-ASCII characters.
        legacy_prev_in_body: version 1 hashed ``prev_hash`` as a key of the JSON body
            instead of prefixing it.
    """

    name: str
    legacy_ascii: bool
    legacy_prev_in_body: bool

    def entry_hash(self, *, prev_hash: str, body: Mapping[str, Any],
                   version: int = CURRENT_VERSION) -> str:
        """The hash of an entry with this body (the entry without its two hashes and
        without the version key) whose predecessor's hash is ``prev_hash``.

        Raises:
            ValueError: an unknown version, or a body that is not JSON (NaN, infinity).
        """
        if version == CURRENT_VERSION:
            data = prev_hash.encode("ascii") + canonical_json({**body,
                                                               VERSION_KEY: version})
        elif version == 1:
            if self.legacy_prev_in_body:
                data = _legacy_json({**body, "prev_hash": prev_hash},
                                    ascii_only=self.legacy_ascii)
            else:
                data = prev_hash.encode("ascii") + _legacy_json(
                    dict(body), ascii_only=self.legacy_ascii)
        else:
            raise ValueError(f"unknown audit chain format version {version!r}")
        return hashlib.sha256(data).hexdigest()

    def check_link(self, *, expected_prev: str, prev_hash: str, stored_hash: str,
                   body: Mapping[str, Any], version: int, previous_version: int
                   ) -> LinkProblem | None:
        """Why the entry does not verify after an entry whose hash is ``expected_prev``
        and whose version is ``previous_version`` (1 before the first entry), or None."""
        if version not in VERSIONS:
            return LinkProblem.UNKNOWN_VERSION
        if version < previous_version:
            return LinkProblem.DOWNGRADE
        if prev_hash != expected_prev:
            return LinkProblem.BROKEN_LINK
        try:
            want = self.entry_hash(prev_hash=prev_hash, body=body, version=version)
        except (ValueError, TypeError):
            return LinkProblem.NOT_JSON
        return None if want == stored_hash else LinkProblem.HASH_MISMATCH


# The coordinator's audit table: version 1 hashed prev_hash + JSON (non-ASCII kept).
COORDINATOR_FORMAT: Final = ChainFormat("coordinator audit table", legacy_ascii=False,
                                        legacy_prev_in_body=False)
# A site's audit.log: version 1 hashed the JSON of the entry with prev_hash (ASCII-escaped).
SITE_FORMAT: Final = ChainFormat("site audit log", legacy_ascii=True, legacy_prev_in_body=True)
