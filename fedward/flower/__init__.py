"""Every touch of Flower's internals, in one place.

flwr 1.42 has no public API for what the appliance needs around its processes (starting
runs, registering nodes, a warm task executor, short polling); the modules here reach into
its internals, so the appliance pins flwr to one exact version and this package refuses to
load with any other. Outside this package only Flower's public API is imported
(``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``, ``flwr.common`` records); the
contracts in ``pyproject.toml`` check that, and ``tests/test_flower_canaries.py`` holds one
test per patch that fails when Flower changes what is patched.

The check reads the installed distribution's version (the same value as
``flwr.__version__``, which Flower reads from its own metadata) without importing flwr, so
the light modules here (:mod:`fedward.flower.env`, :mod:`fedward.flower.exit_codes`) stay
light.
"""

from __future__ import annotations

from importlib import metadata
from typing import Final

__all__ = ["FLWR_VERSION", "check_flower_version"]

FLWR_VERSION: Final = "1.42.0"


def check_flower_version(found: str | None) -> None:
    """Raise ImportError unless ``found`` is the pinned Flower version.

    Args:
        found: the installed flwr version, or None when flwr is not installed.
    """
    if found == FLWR_VERSION:
        return
    what = "flwr is not installed" if found is None else f"flwr {found} is installed"
    raise ImportError(
        f"fedward needs flwr {FLWR_VERSION} exactly, but {what}: its Flower integration "
        f"(fedward.flower) relies on Flower internals of that version. Install it with "
        f"`pip install flwr=={FLWR_VERSION}` (or reinstall fedward, which pins it); to move "
        "to another Flower version, update fedward.flower and run "
        "tests/test_flower_canaries.py first")


def _installed() -> str | None:
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


check_flower_version(_installed())
