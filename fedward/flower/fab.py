"""The appliance's Flower app bundle (FAB): built by the coordinator, checked by every site.

The bundle a run ships is a thin pointer to modules installed with fedward; a site refuses
any bundle whose publisher or components differ (sites run only installed code). No code
travels with a run.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Final

from flwr.cli.build import build_fab_from_files
from flwr.common.config import get_fab_config

if TYPE_CHECKING:
    from flwr.supercore.fab import Fab

__all__ = [
    "APP_COMPONENTS",
    "APP_NAME",
    "APP_PUBLISHER",
    "APP_VERSION",
    "UnknownBundleError",
    "app_bundle",
    "check_bundle",
]

APP_PUBLISHER: Final = "fedward"
APP_NAME: Final = "fedward-app"
APP_VERSION: Final = "1.0.0"
APP_COMPONENTS: Final = {
    "serverapp": "coordinator.server_app:app",
    "clientapp": "site_agent.clientapp:app",
}


def _pyproject() -> bytes:
    return (
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        f'name = "{APP_NAME}"\n'
        f'version = "{APP_VERSION}"\n'
        'description = "Fedward appliance app: a pointer to installed modules"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        f'publisher = "{APP_PUBLISHER}"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{APP_COMPONENTS["serverapp"]}"\n'
        f'clientapp = "{APP_COMPONENTS["clientapp"]}"\n\n'
        "[tool.flwr.app.config]\n"
        'fedward-run-id = "0"\n'
        'fedward-parity-candidate = "0"\n'
        'fedward-evaluation = "0"\n'
    ).encode()


def app_bundle() -> tuple[bytes, str]:
    """The appliance's FAB and its SHA-256 (the same bytes for every run)."""
    fab, _meta = build_fab_from_files({"pyproject.toml": _pyproject()})
    return fab, hashlib.sha256(fab).hexdigest()


class UnknownBundleError(ValueError):
    """The run's app bundle is not the appliance's own."""


def check_bundle(fab: Fab) -> None:
    """Accept only the appliance's own bundle: a pointer to modules installed here."""
    try:
        config = get_fab_config(fab.content)
    except Exception as err:
        raise UnknownBundleError(f"unreadable app bundle ({type(err).__name__})") from None
    app_cfg = config.get("tool", {}).get("flwr", {}).get("app", {})
    publisher = app_cfg.get("publisher")
    components = app_cfg.get("components", {})
    if publisher != APP_PUBLISHER or components != APP_COMPONENTS:
        raise UnknownBundleError(
            f"app bundle from publisher {publisher!r} with components {components!r} is not "
            "the appliance's own; this site runs only code installed with its site agent"
        )
