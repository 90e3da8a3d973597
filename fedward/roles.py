"""The coordinator's roles and what each may do: one table.

Every permission check of the REST API, the release portal and the CLI reads this table,
and ``docs/ml-team-guide.md``'s role matrix is checked against the API's answers
(``tests/test_role_matrix.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "ADMIN",
    "ALL_ROLES",
    "AUDIT_ROLES",
    "CERTIFICATE_ROLES",
    "CLINICIAN",
    "GATE_ROLES",
    "ML_ENGINEER",
    "PERMISSIONS",
    "PROPOSE_ROLES",
    "REVIEWER",
    "REVIEW_ROLES",
    "REVOKE_ROLES",
    "ROLES",
    "STAFF_ROLES",
    "USER_ADMIN_ROLES",
    "WRITE_ROLES",
    "Permission",
    "may",
    "roles_that",
]

ADMIN: Final = "admin"
ML_ENGINEER: Final = "ml_engineer"
REVIEWER: Final = "reviewer"
CLINICIAN: Final = "clinician"
ROLES: Final = frozenset({ADMIN, ML_ENGINEER, REVIEWER, CLINICIAN})


class Permission(StrEnum):
    """What a request may do."""

    READ = "read"                  # list and download releases, read one's own account
    WRITE = "write"                # create projects, sites and runs; the MLflow hand-off
    AUDIT = "audit"                # read and verify the audit log
    USER_ADMIN = "user-admin"      # create, disable and delete accounts, reset passwords
    CERTIFICATES = "certificates"  # enrollment tokens; revoking a site and its certificates
    STAFF = "staff"                # see candidates and the lineage of any version
    PROPOSE = "propose"            # propose a checkpoint as a release candidate
    REVIEW = "review"              # approve or reject a candidate (never one's own)
    GATES = "gates"                # set a project's release gates
    REVOKE = "revoke"              # revoke a release


# Role -> what it may do. Reviewing is a second person's job: an admin may review too, but
# never their own proposal (checked where a review is recorded). The ML engineers whose
# models must meet a project's gates do not set them. Clinicians see releases only.
_TABLE: Final[Mapping[str, frozenset[Permission]]] = MappingProxyType({
    ADMIN: frozenset(Permission),
    ML_ENGINEER: frozenset({Permission.READ, Permission.WRITE, Permission.AUDIT,
                            Permission.STAFF, Permission.PROPOSE}),
    REVIEWER: frozenset({Permission.READ, Permission.AUDIT, Permission.STAFF,
                         Permission.REVIEW, Permission.GATES}),
    CLINICIAN: frozenset({Permission.READ}),
})


def roles_that(permission: Permission) -> frozenset[str]:
    """The roles that have ``permission``."""
    return frozenset(role for role, allowed in _TABLE.items() if permission in allowed)


def may(role: str, permission: Permission) -> bool:
    """Whether ``role`` has ``permission`` (an unknown role has none)."""
    return permission in _TABLE.get(role, frozenset())


PERMISSIONS: Final[Mapping[Permission, frozenset[str]]] = MappingProxyType(
    {p: roles_that(p) for p in Permission})

ALL_ROLES: Final = PERMISSIONS[Permission.READ]
WRITE_ROLES: Final = PERMISSIONS[Permission.WRITE]
AUDIT_ROLES: Final = PERMISSIONS[Permission.AUDIT]
USER_ADMIN_ROLES: Final = PERMISSIONS[Permission.USER_ADMIN]
CERTIFICATE_ROLES: Final = PERMISSIONS[Permission.CERTIFICATES]
STAFF_ROLES: Final = PERMISSIONS[Permission.STAFF]
PROPOSE_ROLES: Final = PERMISSIONS[Permission.PROPOSE]
REVIEW_ROLES: Final = PERMISSIONS[Permission.REVIEW]
GATE_ROLES: Final = PERMISSIONS[Permission.GATES]
REVOKE_ROLES: Final = PERMISSIONS[Permission.REVOKE]
