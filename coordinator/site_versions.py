"""The Fedward and Flower versions each site agent reports, kept per site.

A site reports them with its enrollment and renewal requests (the gateway passes the
request's ``versions`` here), each time its agent starts (``POST /fedward/versions``, an
enrolled site only), and in every admission answer it accepts (the round loop passes the
reply's ``versions`` part here), so an upgraded and restarted agent shows its new versions
at once. Only versions in the fixed format of :mod:`fedward.agent_versions` are
stored; anything else is logged (the site's name and the problem, never the value) and
dropped, and the site's earlier versions stand. A change is audited (``site.versions``).
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import Site, utcnow
from fedward.agent_versions import VersionFormatError, parse_versions

__all__ = ["VIA", "note_reply_versions", "note_versions"]

log = logging.getLogger("fedward.coordinator.site_versions")

# How a report arrived: what the sites page and the API say next to the versions.
VIA: Final = frozenset({"enrollment", "renewal", "start", "admission"})


def note_versions(session: Session, site: Site | str, raw: object, *, via: str) -> bool:
    """Record what a site reported, in the session's transaction (the caller commits).

    Args:
        session: Open session.
        site: The site's row, or its name.
        raw: The reported versions as received (``None``: none sent).
        via: How they arrived, one of :data:`VIA`.

    Returns:
        True if versions were stored (also when unchanged: the time is refreshed).
    """
    assert via in VIA
    row = site if isinstance(site, Site) else session.exec(
        select(Site).where(Site.name == site)).first()
    if row is None:
        return False
    try:
        versions = parse_versions(raw)
    except VersionFormatError as err:
        log.warning("site %s reported versions in the wrong format at %s; ignored: %s",
                    row.name, via, err)
        return False
    if not versions:
        return False
    agent, flower = versions.get("fedward"), versions.get("flower")
    if (agent, flower) != (row.agent_version, row.flower_version):
        append_event(session, actor=f"site:{row.name}", action="site.versions",
                     subject=row.name, detail={
                         "via": via, "fedward": agent, "flower": flower,
                         "previous": {"fedward": row.agent_version,
                                      "flower": row.flower_version}})
    row.agent_version, row.flower_version = agent, flower
    row.versions_at, row.versions_via = utcnow(), via
    session.add(row)
    return True


def note_reply_versions(engine: Engine, site: str, raw: object) -> bool:
    """Record the versions part of a site's admission answer, in a transaction of its own.

    Args:
        engine: Coordinator database engine.
        site: The site that answered.
        raw: The answer's versions part (``None``: it carried none).

    Returns:
        True if versions were stored.
    """
    if raw is None:
        return False
    with session_scope(engine) as session:
        return note_versions(session, site, raw, via="admission")
