"""Site enrollment: one-time tokens, certificate issuance, renewal and revocation.

A token is ``fw1.<site>.<secret>.<ca-fingerprint-prefix>.<check>``. It carries nothing secret
beyond the random part, which the coordinator stores only as a SHA-256. The CA fingerprint
prefix lets a site pin the coordinator's CA on first contact (as kubeadm's discovery hash
does), so a token typed into the wrong host cannot be used to impersonate the coordinator.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.models import EnrollmentToken, Site, SiteCertificate, utcnow
from fedward.certs import CAFiles, IssuedCert, ca_fingerprint, issue_site_cert
from fedward.tokens import TokenFormatError, format_enrollment_token, parse_enrollment_token

__all__ = [
    "TOKEN_TTL",
    "EnrollmentError",
    "create_token",
    "redeem_token",
    "renew_certificate",
    "revoke_site",
    "revoked_serials",
    "superseded_serials",
]

TOKEN_TTL = dt.timedelta(hours=24)


class EnrollmentError(ValueError):
    """An enrollment or renewal the coordinator refuses; the message says what to do."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, *, site: Site, pki: CAFiles, actor: str,
                 ttl: dt.timedelta = TOKEN_TTL) -> tuple[str, dt.datetime]:
    """Issue a one-time token for ``site``; returns (token, expiry). Caller commits."""
    if site.status == "revoked":
        raise EnrollmentError(f"site {site.name!r} is revoked; add it again under a new name")
    assert site.id is not None
    secret = secrets.token_urlsafe(32)
    expires = utcnow() + ttl
    session.add(EnrollmentToken(site_id=site.id, token_hash=_hash(secret), created_by=actor,
                                expires_at=expires))
    append_event(session, actor=actor, action="site.enrollment_token", subject=site.name,
                 detail={"expires_at": expires.isoformat()})
    return format_enrollment_token(site=site.name, secret=secret,
                                   ca_pin=ca_fingerprint(pki)[:32]), expires


def redeem_token(session: Session, *, token: str, csr_pem: bytes, pki: CAFiles
                 ) -> tuple[Site, IssuedCert]:
    """Check a token (one use, unexpired, this site) and sign the site's CSR. Caller commits.

    Registering the node key with the SuperLink is the caller's next step.
    """
    try:
        parsed = parse_enrollment_token(token)
    except TokenFormatError as err:
        raise EnrollmentError(str(err)) from None
    row = session.exec(select(EnrollmentToken).where(
        EnrollmentToken.token_hash == _hash(parsed.secret))).first()
    site = session.exec(select(Site).where(Site.name == parsed.site)).first()
    if row is None or site is None or row.site_id != site.id:
        raise EnrollmentError("unknown enrollment token: ask the coordinator team for a new "
                              "one (`fedward-coordinator enroll-token SITE`)")
    if row.used_at is not None:
        raise EnrollmentError("this enrollment token was already used; tokens work once. Ask "
                              "the coordinator team for a new one")
    if row.expires_at <= utcnow():
        raise EnrollmentError(f"this enrollment token expired at "
                              f"{row.expires_at:%Y-%m-%d %H:%M} UTC; ask the coordinator team "
                              "for a new one")
    if site.status == "revoked":
        raise EnrollmentError(f"site {site.name!r} is revoked")
    issued = issue_site_cert(pki, csr_pem=csr_pem, site_name=site.name)
    row.used_at = utcnow()
    assert site.id is not None
    # Enrolling again (a reinstalled site, a rotated CA) replaces whatever the site held.
    retired = _retire(session, site_id=site.id, new_serial=issued.serial)
    session.add(SiteCertificate(site_id=site.id, serial=issued.serial,
                                not_after=issued.not_after))
    append_event(session, actor=f"site:{site.name}", action="site.enrolled", subject=site.name,
                 detail={"serial": issued.serial, "not_after": issued.not_after.isoformat(),
                         "retired_serials": retired})
    return site, issued


def renew_certificate(session: Session, *, site_name: str, serial: str, csr_pem: bytes,
                      pki: CAFiles) -> IssuedCert:
    """Issue a fresh certificate to a site that presents its current, valid one.

    The presented certificate (and any other the site still held) is revoked in the same
    transaction, marked as superseded by the new serial: a site holds one valid
    certificate at a time.
    """
    site = session.exec(select(Site).where(Site.name == site_name)).first()
    if site is None or site.status == "revoked":
        raise EnrollmentError(f"site {site_name!r} is not enrolled or is revoked")
    current = session.exec(select(SiteCertificate).where(
        SiteCertificate.serial == serial)).first()
    if current is None or current.site_id != site.id or current.revoked_at is not None:
        raise EnrollmentError("the presented certificate is not a valid certificate of this site")
    issued = issue_site_cert(pki, csr_pem=csr_pem, site_name=site_name)
    assert site.id is not None
    retired = _retire(session, site_id=site.id, new_serial=issued.serial)
    session.add(SiteCertificate(site_id=site.id, serial=issued.serial,
                                not_after=issued.not_after))
    append_event(session, actor=f"site:{site_name}", action="site.cert_renewed",
                 subject=site_name, detail={"old_serial": serial, "serial": issued.serial,
                                            "retired_serials": retired})
    return issued


def _retire(session: Session, *, site_id: int, new_serial: str) -> list[str]:
    """Revoke every valid certificate of a site as superseded by ``new_serial``."""
    now = utcnow()
    certs = session.exec(select(SiteCertificate).where(
        SiteCertificate.site_id == site_id, col(SiteCertificate.revoked_at).is_(None))).all()
    for cert in certs:
        cert.revoked_at = now
        cert.revoke_reason = f"superseded by certificate {new_serial}"
        cert.superseded_by = new_serial
        session.add(cert)
    return sorted(c.serial for c in certs)


def revoke_site(session: Session, *, site: Site, actor: str, reason: str) -> list[str]:
    """Revoke a site and every certificate it holds; returns the revoked serials."""
    now = utcnow()
    certs = session.exec(select(SiteCertificate).where(
        SiteCertificate.site_id == site.id, col(SiteCertificate.revoked_at).is_(None))).all()
    for cert in certs:
        cert.revoked_at = now
        cert.revoke_reason = reason
        session.add(cert)
    site.status = "revoked"
    session.add(site)
    serials = [c.serial for c in certs]
    append_event(session, actor=actor, action="site.revoked", subject=site.name,
                 detail={"reason": reason, "serials": serials})
    return serials


def revoked_serials(session: Session) -> frozenset[str]:
    """Serials of every revoked site certificate (superseded ones included)."""
    rows = session.exec(select(SiteCertificate.serial).where(
        col(SiteCertificate.revoked_at).is_not(None))).all()
    return frozenset(rows)


def superseded_serials(session: Session) -> frozenset[str]:
    """Serials of the site certificates retired by a renewal or a new enrollment."""
    rows = session.exec(select(SiteCertificate.serial).where(
        col(SiteCertificate.superseded_by).is_not(None))).all()
    return frozenset(rows)
