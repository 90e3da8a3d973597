"""REST routes of the release workflow (mounted under ``/api/v1`` by ``create_app``).

Model versions and their lineage, project gates, release candidates and their review,
releases, their bundles and revocation, the release public key and the revocation list.
The workflow itself is :mod:`coordinator.releases`; these routes check roles, parse
bodies (:mod:`coordinator.release_schemas`) and map its refusals to HTTP statuses (403 not
allowed for this object, 404, 409 wrong state, 410 revoked, 422 bad value, 500 a stored
bundle that fails its checks; :mod:`coordinator.release_api_common`).

Roles (the full matrix is in docs/ml-team-guide.md): ML engineers and admins propose;
reviewers and admins approve or reject, never their own proposal; reviewers and admins set
a project's gates; only admins revoke; clinicians see approved, unrevoked releases and
nothing else of the workflow. The public key and the revocation list need no token.

Long steps (exports and the sites' parity measurement on ``POST /candidates``, signing on
``approve``) run after the request's own transaction has been committed, so the database
is never held while they run.

This module joins one router per resource, in this order: model versions and lineage
(:mod:`coordinator.release_api_versions`), project gates
(:mod:`coordinator.release_api_gates`), candidates (:mod:`coordinator.release_api_candidates`),
their review (:mod:`coordinator.release_api_reviews`), releases
(:mod:`coordinator.release_api_releases`) and the routes that need no token
(:mod:`coordinator.release_api_public`). Each authenticates through
:mod:`coordinator.auth` (``CurrentUser``, ``require_role``).
"""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.release_api_candidates import router as candidates_router
from coordinator.release_api_gates import router as gates_router
from coordinator.release_api_public import router as public_router
from coordinator.release_api_releases import router as releases_router
from coordinator.release_api_reviews import router as reviews_router
from coordinator.release_api_versions import router as versions_router

__all__ = ["router"]

router = APIRouter()
for _resource in (versions_router, gates_router, candidates_router, reviews_router,
                  releases_router, public_router):
    router.include_router(_resource)
