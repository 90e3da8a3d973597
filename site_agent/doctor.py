"""``fedward-site doctor``: check a site and say, in plain words, how to fix what is wrong.

Each check returns a :class:`Check`: a name, a status (``ok``, ``warn``, ``fail``, or
``skip`` when a check cannot run because an earlier one failed) and a message that says
what was found and what to do. Nothing here sends data anywhere: the only network traffic
is a TLS connection and one ``GET /health`` to the coordinator (for reachability and the
clock), verified against the coordinator's CA.

The checks live in :mod:`site_agent.doctor_site` (the site itself) and
:mod:`site_agent.doctor_coordinator` (the link to the coordinator); this module runs them all
in order and sums them up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from site_agent.config import SitePaths
from site_agent.doctor_check import Check, skip
from site_agent.doctor_coordinator import (
    check_ca_cert,
    check_clock_skew,
    check_gateway_identity,
    check_reachability,
    check_registration,
    check_site_cert,
)
from site_agent.doctor_site import (
    check_config,
    check_data,
    check_disk,
    check_ledger,
    check_node_key,
    check_packages,
    check_policy,
)

__all__ = ["run_doctor", "summary"]


def run_doctor(root: Path, *, timeout: float = 3.0) -> list[Check]:
    """Run every check for the site at ``root``, in an order that reads top to bottom."""
    paths = SitePaths(root)
    checks: list[Check] = []
    config_check, cfg = check_config(root)
    checks.append(config_check)
    data_check, task = check_data(root, cfg)
    checks.append(data_check)
    checks.append(check_policy(root, task))
    checks.append(check_node_key(paths))
    if cfg is None:
        for name in ("coordinator CA certificate", "clock skew", "coordinator reachable"):
            checks.append(skip(name, "site.json is missing or invalid"))
    else:
        ca = cfg.resolve(root, cfg.ca_cert)
        ca_check = check_ca_cert(ca)
        checks.append(ca_check)
        checks.append(check_site_cert(paths))
        client = ((paths.site_cert, paths.site_key)
                  if paths.site_cert.exists() and paths.site_key.exists() else None)
        if ca_check.status == "fail" and not ca.exists():
            checks.append(skip("clock skew", "no coordinator CA certificate"))
            checks.append(skip("coordinator reachable", "no coordinator CA certificate"))
        else:
            checks.append(skip("clock skew", "the coordinator runs on this host")
                          if cfg.superlink.startswith("unix:") else
                          check_clock_skew(cfg.superlink, ca, client_cert=client,
                                           timeout=timeout))
            checks.append(check_reachability(cfg.superlink, ca, timeout=timeout))
            if client is not None:
                checks.append(check_gateway_identity(cfg.superlink, ca, client,
                                                     timeout=timeout))
    checks.append(check_registration(paths, config_name=cfg.name if cfg else None))
    checks.append(check_ledger(paths))
    checks.append(check_disk(root))
    checks.append(check_packages())
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    """``{"ok": no check failed, "checks": [...]}`` for ``--json``."""
    return {"ok": all(c.status != "fail" for c in checks),
            "checks": [c.to_dict() for c in checks]}
