"""Aggregation strategies: how the round loop turns the sites' updates into the next model.

A strategy is an :class:`Aggregator` subclass (``coordinator.aggregators``, re-exported
here) registered under a name. The round loop builds one per run
(``make_aggregator(plan.aggregation, plan.aggregation_options)``) and calls
:meth:`Aggregator.aggregate` once per round with the round's global model and the
validated site updates. A stateful strategy (a server optimiser) keeps its state between
rounds; :meth:`Aggregator.state_dict` is written next to each checkpoint
(``coordinator.checkpoints``) and loaded again when a run resumes, so a restart continues
the optimiser where it stopped instead of starting it from zero.

Built in:

* ``fedavg``: the weighted mean of the site models (weights: training examples).
* ``median`` / ``trimmed-mean``: robust coordinate-wise median or trimmed mean over sites.
* ``fedavgm``, ``fedadam``, ``fedyogi``: server optimisers (Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021). Their pseudo-gradient is the weighted mean of
  ``site model - global model``; the server then takes a momentum, Adam or Yogi step
  along it. With DP-SGD at the sites each round's pseudo-gradient is noisy; momentum
  smooths the step's direction over rounds, but the noise stays summed in the model
  (benchmark 4 found no gain over FedAvg on the demo at epsilon 3).

Plugins: an installed distribution can add a strategy through the entry point group
``fedward.aggregators``; each entry point's name is the strategy's name and its object an
:class:`Aggregator` subclass with the same ``name``::

    [project.entry-points."fedward.aggregators"]
    fedprox-server = "my_package.aggregators:FedProxServer"

Entry points reach every process of the coordinator (the API that validates a run's options
and the ServerApp that aggregates); :func:`register_aggregator` registers only in the
calling process. A plugin cannot replace a built-in strategy.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
from pydantic import BaseModel, ValidationError

from coordinator.aggregators import (
    AdaptiveOptions,
    AggregationError,
    Aggregator,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Median,
    NoOptions,
    SiteUpdate,
    TrimmedMean,
    pseudo_gradient,
    weighted_mean,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdaptiveOptions",
    "AggregationError",
    "Aggregator",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "NoOptions",
    "SiteUpdate",
    "aggregate",
    "aggregator_class",
    "known_aggregations",
    "make_aggregator",
    "pseudo_gradient",
    "register_aggregator",
    "reload_plugins",
    "validate_options",
    "weighted_mean",
]

log = logging.getLogger("fedward.coordinator.aggregation")

ENTRY_POINT_GROUP: Final = "fedward.aggregators"

# -- the registry ----------------------------------------------------------------------------

_BUILTIN: Final[tuple[type[Aggregator], ...]] = (FedAvg, Median, TrimmedMean, FedAvgM, FedAdam,
                                                 FedYogi)
_registry: dict[str, type[Aggregator]] = {cls.name: cls for cls in _BUILTIN}
_plugins_loaded = False
_plugin_problems: dict[str, str] = {}


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Register a strategy under ``cls.name`` in this process (usable as a decorator).

    Raises:
        AggregationError: if the class is not an :class:`Aggregator` or the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise AggregationError(f"{cls!r} is not an Aggregator subclass")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise AggregationError(f"{cls.__qualname__} has no name")
    if name in _registry and _registry[name] is not cls:
        raise AggregationError(f"an aggregation named {name!r} is already registered "
                               f"({_registry[name].__module__}.{_registry[name].__qualname__})")
    _registry[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise AggregationError(f"its class is named {getattr(cls, 'name', None)!r}, "
                                       f"not {ep.name!r}")
            register_aggregator(cls)
        except Exception as exc:  # a broken plugin must not take the coordinator down
            _plugin_problems[ep.name] = f"{ep.value}: {exc}"
            log.error("aggregation plugin %r (%s) not loaded: %s", ep.name, ep.value, exc)


def reload_plugins() -> None:
    """Forget every plugin and discover the ``fedward.aggregators`` entry points again."""
    global _plugins_loaded
    for name in [n for n, cls in _registry.items() if cls not in _BUILTIN]:
        del _registry[name]
    _plugin_problems.clear()
    _plugins_loaded = False
    _load_plugins()


def known_aggregations() -> list[str]:
    """Every registered strategy name: the built-ins first, then plugins by name."""
    _load_plugins()
    builtin = [cls.name for cls in _BUILTIN]
    return builtin + sorted(n for n in _registry if n not in builtin)


def aggregator_class(name: str) -> type[Aggregator]:
    """The strategy registered as ``name``.

    Raises:
        AggregationError: naming the known strategies (and any plugin that failed to load).
    """
    _load_plugins()
    cls = _registry.get(name)
    if cls is not None:
        return cls
    known = known_aggregations()
    msg = f"unknown aggregation {name!r}: use {', '.join(known[:-1])} or {known[-1]}"
    if name in _plugin_problems:
        msg += f" (the plugin {name!r} failed to load: {_plugin_problems[name]})"
    raise AggregationError(msg)


def _validated(cls: type[Aggregator], options: Mapping[str, Any] | None) -> BaseModel:
    try:
        return cls.Options.model_validate(dict(options or {}))
    except ValidationError as err:
        takes = ", ".join(cls.Options.model_fields) or "no options"
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "options"
            what = "unknown option" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{where}: {what}")
        raise AggregationError(f"aggregation {cls.name!r} (takes {takes}): "
                               + "; ".join(problems)) from None


def validate_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a run's aggregation options; returns them complete, defaults filled in.

    Raises:
        AggregationError: for an unknown strategy, or listing every bad or unknown option.
    """
    return _validated(aggregator_class(name), options).model_dump()


def make_aggregator(name: str, options: Mapping[str, Any] | None = None) -> Aggregator:
    """A fresh strategy for one run (see :func:`validate_options` for the errors)."""
    cls = aggregator_class(name)
    return cls(_validated(cls, options))


def aggregate(updates: list[tuple[dict[str, np.ndarray], float]], *,
              method: str = "fedavg") -> dict[str, np.ndarray]:
    """Combine ``(site model, weight)`` pairs with a stateless strategy, default options.

    The one-call form for the strategies that need neither the global model nor state
    (``fedavg``, ``median``, ``trimmed-mean``); the round loop uses :func:`make_aggregator`.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    agg = make_aggregator(method)
    if agg.stateful:
        raise AggregationError(f"aggregation {method!r} needs the global model and keeps "
                               "state: use make_aggregator(...).aggregate(global, updates)")
    site_updates = [SiteUpdate(f"site-{i}", u, w) for i, (u, w) in enumerate(updates)]
    return agg.aggregate(updates[0][0], site_updates)
