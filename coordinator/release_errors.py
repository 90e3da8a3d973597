"""The release workflow's errors: each a refusal fit for a person, with its HTTP status."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["Conflict", "Forbidden", "Gone", "IntegrityFailure", "InvalidRequest", "NotFound",
           "ReleaseError"]


class ReleaseError(Exception):
    """A refused release-workflow request; the message is the reason, fit for a person.

    Attributes:
        status_code: The HTTP status the API answers with.
    """

    status_code: ClassVar[int] = 400


class NotFound(ReleaseError):
    """No such run, version, candidate or release."""

    status_code = 404


class Forbidden(ReleaseError):
    """The user may not do this to this object (for example approve their own proposal)."""

    status_code = 403


class Conflict(ReleaseError):
    """The object is not in a state that allows this (approved twice, revoked, ...)."""

    status_code = 409


class Gone(ReleaseError):
    """The release was revoked."""

    status_code = 410


class InvalidRequest(ReleaseError):
    """A request value that cannot be used (an unknown threshold name, ...)."""

    status_code = 422


class IntegrityFailure(ReleaseError):
    """A stored bundle or key fails its checks: the coordinator refuses to serve it."""

    status_code = 500
