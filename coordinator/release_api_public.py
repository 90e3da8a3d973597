"""The release routes that need no token: the signed revocation list (``GET
/revocations``) and the release public key (``GET /release-key``, ``/release-key.pem``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse

from coordinator import release_store
from coordinator.auth import API_PREFIX
from coordinator.db import SessionDep
from coordinator.release_api_common import refusals, request_home
from coordinator.release_schemas import PublicKeyPublic

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX)


@router.get("/revocations", tags=["releases"],
            responses={404: {"description": "No release has been signed yet"}})
def revocations(request: Request, session: SessionDep) -> dict[str, Any]:
    """The revocation list, signed with the release key (no token needed).

    ``fedward-verify --coordinator URL`` and ``fedward-serve --coordinator URL`` fetch it at
    every check; saved to a file it is what ``--revocations FILE`` reads (for at most 7 days:
    it says when it was issued). Its ``payload`` is base64 JSON naming each revoked release
    and why.
    """
    with refusals():
        signed = release_store.signed_revocation_list(session, request_home(request))
    if signed is None:
        raise HTTPException(404, "no release has been signed yet, so there is no revocation "
                                 "list")
    return signed


@router.get("/release-key", tags=["releases"],
            responses={404: {"description": "No release has been signed yet"}})
def release_key(request: Request) -> PublicKeyPublic:
    """The release public key and its fingerprint (no token needed)."""
    key = release_store.release_public_key(request_home(request))
    if key is None:
        raise HTTPException(404, "no release has been signed yet, so there is no release key")
    return PublicKeyPublic(public_key_pem=key[0].decode("ascii"), fingerprint=key[1])


@router.get("/release-key.pem", tags=["releases"], response_class=PlainTextResponse,
            responses={404: {"description": "No release has been signed yet"}})
def release_key_pem(request: Request) -> PlainTextResponse:
    """The release public key as a PEM file, for ``fedward-verify --public-key``."""
    key = release_store.release_public_key(request_home(request))
    if key is None:
        raise HTTPException(404, "no release has been signed yet, so there is no release key")
    return PlainTextResponse(key[0].decode("ascii"), media_type="application/x-pem-file",
                             headers={"Content-Disposition":
                                      'attachment; filename="release.pub.pem"'})
