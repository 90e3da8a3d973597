"""The enrollment token: the one-time secret a site's IT pastes to join a coordinator.

The coordinator formats it (``fedward-coordinator enroll-token``); the site parses it
(``fedward-site enroll``). A typo is told apart from a wrong token by its check digits.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

__all__ = [
    "EnrollmentTokenParts",
    "TokenFormatError",
    "format_enrollment_token",
    "parse_enrollment_token",
]

_TOKEN_RE = re.compile(r"^fw1\.([a-z0-9][a-z0-9-]{1,38}[a-z0-9])\.([A-Za-z0-9_-]{32,64})\."
                       r"([0-9a-f]{32})\.([0-9a-f]{8})$")


def _token_check(site: str, secret: str, ca_pin: str) -> str:
    return hashlib.sha256(f"{site}.{secret}.{ca_pin}".encode()).hexdigest()[:8]


class TokenFormatError(ValueError):
    """The text is not an enrollment token."""


@dataclass(frozen=True)
class EnrollmentTokenParts:
    """``fw1.<site>.<secret>.<ca-pin>.<check>``: the site name, the one-time secret, the
    first 32 hex digits of the SHA-256 of the coordinator CA certificate (DER), and 8 check
    digits over the rest (so a token mistyped or cut short is told apart from a wrong one)."""

    site: str
    secret: str
    ca_pin: str


def format_enrollment_token(*, site: str, secret: str, ca_pin: str) -> str:
    """The text of a token (see :class:`EnrollmentTokenParts`)."""
    return f"fw1.{site}.{secret}.{ca_pin}.{_token_check(site, secret, ca_pin)}"


def parse_enrollment_token(token: str) -> EnrollmentTokenParts:
    """Split a token; a typo gives an error that says what a token looks like."""
    m = _TOKEN_RE.match(token.strip())
    if m is None:
        raise TokenFormatError(
            "this is not a Fedward enrollment token (expected "
            "fw1.<site>.<secret>.<pin>.<check>, one line, no spaces); copy it again, whole, "
            "from the coordinator team's message")
    parts = EnrollmentTokenParts(site=m.group(1), secret=m.group(2), ca_pin=m.group(3))
    if not hmac.compare_digest(m.group(4), _token_check(parts.site, parts.secret,
                                                        parts.ca_pin)):
        raise TokenFormatError(
            "this enrollment token has a typo (its check digits do not match the rest); copy "
            "it again, whole, from the coordinator team's message (nothing was sent)")
    return parts
