"""The gateway's own requests: enrollment, certificate renewal and drift reports.

Each runs in a worker thread (it writes the database) and answers ``(status, JSON body)``.
Nothing in a body is unpickled or evaluated: ``json.loads`` only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from coordinator.db import session_scope
from coordinator.drift import AlarmRule, DriftReportError, store_report
from coordinator.enrollment import EnrollmentError, redeem_token, renew_certificate
from coordinator.gateway_http import Client
from coordinator.models import utcnow
from coordinator.site_versions import note_versions
from fedward.certs import CAFiles, CSRError
from fedward.flower.control import NodeKeyError, node_public_key_bytes

__all__ = ["Refuse", "Registrar", "SiteRequests"]

# The gateway's logger: an operator reads one log for the whole door.
log = logging.getLogger("fedward.coordinator.gateway")

Registrar = Callable[[str, str], str]
Refuse = Callable[[Client, str, str], None]
"""Logs a refusal: (client, kind, reason)."""


class _RegistrationFailed(RuntimeError):
    """The SuperLink did not take a site's node key during enrollment."""


class SiteRequests:
    """Answers enrollment, renewal and drift requests for the gateway.

    Args:
        engine: The coordinator's database.
        registrar: Registers a site's Flower node key with the SuperLink: (key, site) ->
            node id.
        pki: The site CA.
        drift_rule: When a drift report raises an alarm.
        invalidate: Forgets the gateway's cached site identities (after an enrollment or
            a renewal).
        refuse: Logs a refusal (from the worker thread).
    """

    def __init__(self, *, engine: Engine, registrar: Registrar, pki: CAFiles,
                 drift_rule: AlarmRule, invalidate: Callable[[], None],
                 refuse: Refuse) -> None:
        self.engine = engine
        self.registrar = registrar
        self.pki = pki
        self.drift_rule = drift_rule
        self._invalidate = invalidate
        self._refuse = refuse

    def enroll(self, body: bytes, client: Client | None = None
               ) -> tuple[int, dict[str, Any]]:
        """Redeem an enrollment token: issue the site's certificate, register its node key."""
        client = client or Client(address="?")
        try:
            req = json.loads(body)
            token, csr, node_key = str(req["token"]), str(req["csr_pem"]), str(
                req["node_public_key"])
        except (ValueError, KeyError, TypeError):
            self._refuse(client, "enroll", "enrollment: malformed request")
            return 400, {"detail": "expected JSON with token, csr_pem and node_public_key"}
        try:
            node_public_key_bytes(node_key)
            with session_scope(self.engine) as session:
                site, issued = redeem_token(session, token=token, csr_pem=csr.encode(),
                                            pki=self.pki)
                if site.public_key not in (None, node_key.strip()):
                    raise EnrollmentError(f"site {site.name!r} already has another node key")
                if site.public_key == node_key.strip() and site.flower_node_id:
                    # Re-enrolling with the node key it has (a new TLS certificate, e.g.
                    # after the coordinator rotated its CA): the SuperLink knows the key
                    # already and would refuse to register it twice.
                    node_id = site.flower_node_id
                else:
                    try:
                        node_id = self.registrar(node_key.strip(), site.name)
                    except Exception as err:  # Flower's control API; the token stays unused
                        raise _RegistrationFailed(type(err).__name__) from err
                site.public_key = node_key.strip()
                site.flower_node_id = str(node_id)
                site.status = "registered"
                site.registered_at = utcnow()
                session.add(site)
                note_versions(session, site, req.get("versions"), via="enrollment")
                name = site.name
        except (EnrollmentError, CSRError, NodeKeyError) as err:
            self._refuse(client, "enroll", f"enrollment refused: {err}")
            return 403, {"detail": str(err)}
        except _RegistrationFailed as err:
            log.error("enrollment: registering the node key with the SuperLink failed (%s)",
                      err.__cause__)
            return 503, {"detail": f"the coordinator could not register this site's node key "
                                   f"({err}); the token was not used: try again in a minute, "
                                   "and if it persists ask the coordinator team to check "
                                   "their superlink.log"}
        self._invalidate()
        log.info("site %s enrolled from %s (certificate %s)", name, client.address,
                 issued.serial)
        return 200, {"site": name, "certificate_pem": issued.pem.decode(),
                     "ca_pem": self.pki.ca_cert.read_text(),
                     "not_after": issued.not_after.isoformat()}

    def renew(self, body: bytes, client: Client) -> tuple[int, dict[str, Any]]:
        """Issue a verified site a new certificate; its current one is retired."""
        assert client.site is not None and client.serial is not None
        try:
            req = json.loads(body)
            csr = str(req["csr_pem"])
        except (ValueError, KeyError, TypeError):
            return 400, {"detail": "expected JSON with csr_pem"}
        try:
            with session_scope(self.engine) as session:
                issued = renew_certificate(session, site_name=client.site,
                                           serial=client.serial, csr_pem=csr.encode(),
                                           pki=self.pki)
                note_versions(session, client.site, req.get("versions"), via="renewal")
        except (EnrollmentError, CSRError) as err:
            self._refuse(client, "renew", f"renewal refused: {err}")
            return 403, {"detail": str(err)}
        # The old certificate is retired: the gateway forgets it at once, not when its
        # cache expires.
        self._invalidate()
        log.info("site %s renewed its certificate (%s replaces %s)", client.site,
                 issued.serial, client.serial)
        return 200, {"certificate_pem": issued.pem.decode(),
                     "not_after": issued.not_after.isoformat()}

    def versions(self, body: bytes, client: Client) -> tuple[int, dict[str, Any]]:
        """Store the versions a verified site's agent reports when it starts."""
        assert client.site is not None
        try:
            req = json.loads(body)
            raw = req["versions"]
        except (ValueError, KeyError, TypeError):
            self._refuse(client, "versions", "version report: malformed request")
            return 400, {"detail": "expected JSON with versions"}
        try:
            with session_scope(self.engine) as session:
                stored = note_versions(session, client.site, raw, via="start")
        except SQLAlchemyError as err:
            return 503, {"detail": f"the coordinator cannot store the versions right now "
                                   f"({type(err).__name__})"}
        return 200, {"stored": stored}

    def drift(self, body: bytes, client: Client) -> tuple[int, dict[str, Any]]:
        """Check and store a verified site's drift report."""
        assert client.site is not None
        try:
            doc = _drift_answer(body)
        except (ValueError, UnicodeDecodeError, RecursionError):   # nested past the limit
            self._refuse(client, "drift", "drift report: not JSON")
            return 400, {"detail": "a drift report is one JSON object"}
        try:
            row, new = store_report(self.engine, site=client.site, doc=doc,
                                    rule=self.drift_rule)
        except DriftReportError as err:
            self._refuse(client, "drift", str(err))
            return err.status, {"detail": str(err)}
        except SQLAlchemyError as err:
            return 503, {"detail": f"the coordinator cannot store the report right now "
                                   f"({type(err).__name__}); the site keeps it and retries"}
        if new:
            log.info("site %s reported drift check %s of release %s: %s%s", client.site,
                     row.report_id, row.release_id, row.status,
                     " (alarm)" if row.alarm else "")
        return 200, {"stored": row.report_id, "alarm": row.alarm}


def _drift_answer(body: bytes) -> object:
    """The JSON of a drift report body (json.loads only: never pickle, never eval)."""
    return json.loads(body.decode("utf-8"))

