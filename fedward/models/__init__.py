"""Model families (torch) and their registry.

A *model family* is a name and a factory that builds a fresh ``torch.nn.Module`` from
keyword parameters (the task says which family and which parameters, see
:mod:`fedward.tasks`). The built-in families are registered here in code; other packages
add families through the entry-point group ``fedward.models``::

    [project.entry-points."fedward.models"]
    my_family = "my_package.models:build_my_model"

An entry point names a callable ``(**params) -> nn.Module``. It is looked up when a name is
not built in, so a plugin installed after start-up is found; a plugin may not take a
built-in's name, and two plugins may not share one. Building runs the plugin's code: only
packages installed on this host are loaded, never code that came over the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import nn

from fedward.models.digits import DigitsCNN
from fedward.models.tabular import TabularMLP
from fedward.plugins import ENTRY_POINT_GROUP

__all__ = [
    "BUILTIN_FAMILIES",
    "ENTRY_POINT_GROUP",
    "ModelFactory",
    "UnknownModelError",
    "array_shapes",
    "build",
    "get_family",
    "known_families",
    "model_arrays",
    "set_model_arrays",
]

ModelFactory = Callable[..., nn.Module]

# The families shipped with fedward. Mutable on purpose: a test (or an embedding
# application) may add one in code; plugins use the entry-point group instead.
BUILTIN_FAMILIES: dict[str, ModelFactory] = {
    "tabular_mlp": TabularMLP,
    "digits_cnn": DigitsCNN,
}


class UnknownModelError(KeyError):
    """A model family name that is neither built in nor installed as a plugin."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


def _plugins() -> dict[str, metadata.EntryPoint]:
    """The installed ``fedward.models`` entry points by name (read fresh each time)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_FAMILIES:
            raise UnknownModelError(
                f"the model plugin {ep.value!r} takes the built-in family name {ep.name!r}; "
                "rename it in that package's entry points")
        if ep.name in found and found[ep.name].value != ep.value:
            raise UnknownModelError(
                f"two model plugins are named {ep.name!r} ({found[ep.name].value!r} and "
                f"{ep.value!r}); uninstall one of them")
        found[ep.name] = ep
    return found


def known_families() -> list[str]:
    """Every family name that :func:`get_family` accepts, sorted."""
    return sorted({*BUILTIN_FAMILIES, *_plugins()})


def get_family(name: str) -> ModelFactory:
    """The factory of the family ``name``.

    Raises:
        UnknownModelError: no such family; the message lists the known ones.
    """
    if name in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[name]
    plugins = _plugins()
    if name not in plugins:
        known = ", ".join(sorted({*BUILTIN_FAMILIES, *plugins}))
        raise UnknownModelError(
            f"unknown model family {name!r}; known families: {known} (a plugin adds one "
            f"through the entry-point group {ENTRY_POINT_GROUP!r})")
    factory = plugins[name].load()
    if not callable(factory):
        raise UnknownModelError(
            f"the model plugin {plugins[name].value!r} is not callable; it must name a "
            "function or class that builds a torch.nn.Module")
    return factory  # type: ignore[no-any-return]


def build(family: str, params: Mapping[str, Any] | None = None, *,
          seed: int | None = None) -> nn.Module:
    """A fresh model of ``family``; with ``seed`` its initial weights are reproducible
    (the global torch generator is left as it was)."""
    factory = get_family(family)
    kwargs = dict(params or {})
    if seed is None:
        return _checked(factory(**kwargs), family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _checked(factory(**kwargs), family)


def _checked(model: object, family: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model family {family!r} built a {type(model).__name__}, "
                        "not a torch.nn.Module")
    return model


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's trainable state as named float32 numpy arrays, in state_dict order."""
    # Opacus wraps a model in GradSampleModule whose keys gain a "_module." prefix: always
    # pass the plain module, never the wrapper.
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in model.state_dict().items()}


def set_model_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load named arrays into ``model``; names and shapes must match exactly."""
    expected = array_shapes(model)
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    if got != expected:
        raise ValueError(f"parameter names/shapes do not match the model: expected {expected}, "
                         f"got {got}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                           for k, v in arrays.items()})


def array_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the arrays that describe ``model`` on the wire."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
