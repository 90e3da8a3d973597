"""The aggregation strategies built into the coordinator, and their common interface.

:class:`Aggregator` is what the round loop calls each round (see ``coordinator.aggregation``
for the registry that names them, and plugins). Stateless: ``fedavg``, ``median``,
``trimmed-mean``. Server optimisers (Reddi et al., "Adaptive Federated Optimization", ICLR
2021): ``fedavgm``, ``fedadam``, ``fedyogi``, whose pseudo-gradient is the example-weighted
mean of ``site model - global model``; with DP-SGD at the sites it carries the sites' noise.
All arithmetic is float64; the models returned are float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdaptiveOptions",
    "AggregationError",
    "Aggregator",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgMOptions",
    "FedYogi",
    "Median",
    "NoOptions",
    "SiteUpdate",
    "TrimmedMean",
    "pseudo_gradient",
    "weighted_mean",
]


class AggregationError(ValueError):
    """An unknown strategy, options it does not take, or state that does not fit the model."""


@dataclass(frozen=True)
class SiteUpdate:
    """One site's validated update of a round.

    Attributes:
        site: the site's name.
        arrays: the site's model after local training (names and shapes of the model).
        weight: its weight, the number of training examples it reported.
    """

    site: str
    arrays: dict[str, np.ndarray]
    weight: float


class NoOptions(BaseModel):
    """A strategy that takes no options."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Aggregator(ABC):
    """A named aggregation strategy.

    Subclasses set ``name`` (how runs ask for it) and ``Options`` (a pydantic model of its
    options: unknown options and out-of-range values are refused when the run is created).
    A stateful strategy overrides :meth:`state_dict` and :meth:`load_state_dict`.

    Args:
        options: validated options (an instance of ``Options``).
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    stateful: ClassVar[bool] = False

    def __init__(self, options: BaseModel) -> None:
        self.options = options

    @abstractmethod
    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        """The next global model (float32 arrays, names and shapes of ``global_arrays``).

        Args:
            global_arrays: the model the sites were sent this round.
            updates: the round's validated site updates (at least one).
        """

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state to carry to the next round and across a restart (arrays only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a saved :meth:`state_dict` (a resumed run)."""
        if state:
            raise AggregationError(f"aggregation {self.name!r} keeps no state, but a saved "
                                   f"state with {len(state)} array(s) was given")


# -- shared arithmetic ---------------------------------------------------------------------


def _weights(updates: Sequence[SiteUpdate]) -> np.ndarray:
    """Normalised weights; a site-reported weight that is NaN, infinite or <= 0 counts 0."""
    # max(nan, 0.0) is nan, and one such weight would turn the whole model into NaN.
    w = np.array([u.weight if math.isfinite(u.weight) and u.weight > 0 else 0.0
                  for u in updates], dtype=np.float64)
    if w.max() <= 0:
        w = np.ones_like(w)
    w = w / w.max()  # huge counts must not overflow the sum
    out: np.ndarray = w / w.sum()
    return out


def _stack(updates: Sequence[SiteUpdate], name: str) -> np.ndarray:
    return np.stack([u.arrays[name].astype(np.float64) for u in updates])


def weighted_mean(updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the site models, in float64 (FedAvg before rounding)."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    w = _weights(updates)
    return {name: np.tensordot(w, _stack(updates, name), axes=1) for name in updates[0].arrays}


def pseudo_gradient(global_arrays: Mapping[str, np.ndarray],
                    updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
    """Reddi et al.'s Delta_t: the weighted mean of ``site model - global model`` (float64)."""
    mean = weighted_mean(updates)
    return {k: v - np.asarray(global_arrays[k], dtype=np.float64) for k, v in mean.items()}


def _f32(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(np.float32) for k, v in arrays.items()}


# -- stateless strategies ------------------------------------------------------------------


class FedAvg(Aggregator):
    """The weighted mean of the site models (McMahan et al.)."""

    name = "fedavg"

    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        return _f32(weighted_mean(updates))


class Median(Aggregator):
    """Coordinate-wise median over sites: one outlier site cannot move it far."""

    name = "median"

    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        if not updates:
            raise AggregationError("no updates to aggregate")
        return _f32({n: np.median(_stack(updates, n), axis=0) for n in updates[0].arrays})


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the highest and lowest 20% of sites."""

    name = "trimmed-mean"

    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        if not updates:
            raise AggregationError("no updates to aggregate")
        # At least one of each end as soon as there are 3 sites: hospital federations are
        # small, and int(0.2 * n) would trim nothing below 5 sites.
        n = len(updates)
        k = max(1, int(n * 0.2)) if n >= 3 else 0
        out = {}
        for name in updates[0].arrays:
            srt = np.sort(_stack(updates, name), axis=0)
            out[name] = srt[k:n - k].mean(axis=0) if n > 2 * k else srt.mean(axis=0)
        return _f32(out)


# -- server optimisers -------------------------------------------------------------------


class _Stateful(Aggregator):
    """A server optimiser: named float64 state arrays per model array, plus a step count."""

    stateful = True
    _slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: BaseModel) -> None:
        super().__init__(options)
        self.step = 0
        self.slots: dict[str, dict[str, np.ndarray]] = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"step": np.array([self.step], dtype=np.int64)}
        for slot, arrays in self.slots.items():
            out.update({f"{slot}/{k}": v.astype(np.float64) for k, v in arrays.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if "step" not in state:
            raise AggregationError(f"the saved {self.name} state has no step count")
        slots: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key == "step":
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in self._slots:
                raise AggregationError(f"the saved {self.name} state has an unknown array "
                                       f"{key!r} (expected {', '.join(self._slots)} slots)")
            arr = np.asarray(value, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise AggregationError(f"the saved {self.name} state {key!r} is not finite")
            slots.setdefault(slot, {})[name] = arr
        self.step = int(np.asarray(state["step"]).reshape(-1)[0])
        self.slots = slots

    def _slot(self, slot: str, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A state slot, zero on the first round; it must fit the model's arrays."""
        current = self.slots.get(slot)
        if current is None:
            return {k: np.zeros(np.shape(v), np.float64) for k, v in global_arrays.items()}
        shapes = {k: np.shape(v) for k, v in global_arrays.items()}
        if {k: v.shape for k, v in current.items()} != shapes:
            raise AggregationError(f"the {self.name} state {slot!r} does not fit the model "
                                   f"(a state of another task or model width?)")
        return current


class FedAvgMOptions(NoOptions):
    """Options of ``fedavgm``."""

    server_lr: float = Field(default=1.0, gt=0, le=10,
                                     description="server learning rate (eta)")
    momentum: float = Field(default=0.9, ge=0, lt=1,
                                    description="server momentum (beta); 0 with server_lr 1 "
                                    "is FedAvg")


class FedAvgM(_Stateful):
    """Server momentum (Hsu et al. 2019; Reddi et al.'s FedAvgM).

    ``v_t = momentum * v_{t-1} + Delta_t``; ``x_{t+1} = x_t + server_lr * v_t``.
    """

    name = "fedavgm"
    Options = FedAvgMOptions
    _slots = ("momentum",)

    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        opts = self.options
        assert isinstance(opts, FedAvgMOptions)
        delta = pseudo_gradient(global_arrays, updates)
        velocity = self._slot("momentum", global_arrays)
        velocity = {k: opts.momentum * velocity[k] + delta[k] for k in delta}
        self.slots["momentum"] = velocity
        self.step += 1
        return _f32({k: np.asarray(global_arrays[k], np.float64) + opts.server_lr * velocity[k]
                     for k in delta})


class AdaptiveOptions(NoOptions):
    """Options of ``fedadam`` and ``fedyogi``."""

    server_lr: float = Field(default=0.1, gt=0, le=10,
                                     description="server learning rate (eta)")
    beta1: float = Field(default=0.9, ge=0, lt=1,
                                 description="first-moment decay (momentum)")
    beta2: float = Field(default=0.99, ge=0, lt=1,
                                 description="second-moment decay")
    tau: float = Field(default=1e-3, gt=0, le=10,
                               description="adaptivity: added to sqrt(v); larger is closer "
                               "to server momentum SGD")
    bias_correction: bool = Field(
        default=False, description="divide the moments by 1 - beta^t as Adam does (Reddi "
        "et al. do not); helps when a run has few rounds")


class _Adaptive(_Stateful):
    """Reddi et al.'s adaptive server optimisers (their Algorithm 2)::

        m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
        v_t = (Adam)  beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
              (Yogi)  v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
        x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)

    m and v start at zero. With ``bias_correction`` the step uses ``m_t / (1 - beta1^t)``
    and ``v_t / (1 - beta2^t)``.
    """

    Options = AdaptiveOptions
    _slots = ("m", "v")

    @staticmethod
    @abstractmethod
    def _second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
        """The new second moment from the old one and Delta_t squared."""

    def aggregate(self, global_arrays: dict[str, np.ndarray],
                  updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        opts = self.options
        assert isinstance(opts, AdaptiveOptions)
        delta = pseudo_gradient(global_arrays, updates)
        m_old, v_old = self._slot("m", global_arrays), self._slot("v", global_arrays)
        m = {k: opts.beta1 * m_old[k] + (1 - opts.beta1) * delta[k] for k in delta}
        v = {k: self._second_moment(v_old[k], delta[k] ** 2, opts.beta2) for k in delta}
        self.slots["m"], self.slots["v"] = m, v
        self.step += 1
        c1 = 1 - opts.beta1 ** self.step if opts.bias_correction else 1.0
        c2 = 1 - opts.beta2 ** self.step if opts.bias_correction else 1.0
        out = {}
        for k in delta:
            # v >= 0 always for Adam; Yogi's v stays >= 0 too (it moves towards Delta^2),
            # the clip only guards sqrt against a -0.0 from rounding.
            denom = np.sqrt(np.maximum(v[k] / c2, 0.0)) + opts.tau
            out[k] = np.asarray(global_arrays[k], np.float64) + opts.server_lr * (m[k] / c1) / denom
        return _f32(out)


class FedAdam(_Adaptive):
    """FedAdam: Adam's second moment on the server."""

    name = "fedadam"

    @staticmethod
    def _second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
        return beta2 * v + (1 - beta2) * d2


class FedYogi(_Adaptive):
    """FedYogi: Yogi's additive second moment, which grows and shrinks more slowly."""

    name = "fedyogi"

    @staticmethod
    def _second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
        out: np.ndarray = v - (1 - beta2) * d2 * np.sign(v - d2)
        return out
