"""What a site discloses, as privacy mechanisms the ledger records and the accountant composes.

The ledger records *mechanisms*, never epsilons: an epsilon depends on everything else a
site has released (composition) and on the accountant, whereas a mechanism's parameters are
facts of the release. Each mechanism is a frozen dataclass registered by its type name, and
is stored as ``{"type": <name>, <field>: <value>, ...}``. Decoding goes only through the
registry below (an allow-list of these classes): a stored type name is never imported or
evaluated, unlike dp-accounting's ``from_named_tuple``, which imports whatever module the
data names.

Adding a mechanism (a distributed discrete Gaussian or Skellam round, say) is one class
here: its fields, :meth:`Mechanism.problems`, :meth:`Mechanism.dp_event` (what RDP composes)
and, where dp-accounting has a privacy loss distribution for it, :meth:`Mechanism.pld`;
decorated with :func:`register`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar, get_type_hints

if TYPE_CHECKING:
    from dp_accounting import dp_event
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution as PLD


def _events() -> ModuleType:
    """dp-accounting's event module, imported on first use: importing dp-accounting costs
    about a second of CPU (it loads SciPy's signal package), which every process importing
    :mod:`privacy` would otherwise pay, composing or not."""
    from dp_accounting import dp_event as events

    module: ModuleType = events
    return module


def _pld_lib() -> ModuleType:
    """dp-accounting's PLD module, imported on first use (see :func:`_events`)."""
    from dp_accounting.pld import privacy_loss_distribution

    module: ModuleType = privacy_loss_distribution
    return module

__all__ = [
    "MECHANISMS",
    "CoveredTrial",
    "DistributedSkellam",
    "DpSgd",
    "GaussianRelease",
    "LaplaceRelease",
    "Mechanism",
    "MechanismFormatError",
    "TuningSelection",
    "UnknownMechanismType",
    "decode_mechanism",
    "gaussian_equivalent_std",
    "register",
]

class MechanismFormatError(ValueError):
    """A stored mechanism is malformed (missing or extra fields, values out of range)."""


class UnknownMechanismType(MechanismFormatError):
    """A stored mechanism names a type this version does not know (a newer version wrote it).

    Attributes:
        type_name: the type the record names.
    """

    def __init__(self, type_name: object) -> None:
        self.type_name = type_name
        super().__init__(
            f"unknown mechanism type {type_name!r} (known: {', '.join(sorted(MECHANISMS))})")


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Mechanism(abc.ABC):
    """One disclosure's privacy mechanism: the parameters that decide its privacy loss.

    Subclasses are frozen dataclasses whose fields are ``int``, ``float`` or ``Mechanism``;
    they are hashable, so that equal mechanisms group and their compositions cache.
    """

    TYPE: ClassVar[str] = ""

    @abc.abstractmethod
    def problems(self) -> list[str]:
        """Every out-of-range parameter, in words (empty when the mechanism is sound)."""

    @abc.abstractmethod
    def dp_event(self) -> dp_event.DpEvent:
        """The dp-accounting event of one occurrence (what the RDP accountant composes)."""

    def unit(self) -> tuple[Mechanism, int]:
        """``(u, n)`` such that this mechanism is ``u`` composed ``n`` times.

        Grouping on ``u`` is exact (composition does not depend on order) and lets the
        accountant compose ``n`` identical events at once (``self_compose``), which is what
        keeps a long ledger cheap to account.
        """
        return self, 1

    def pld(self, count: int, interval: float) -> PLD | None:
        """The privacy loss distribution of this mechanism composed ``count`` times, or
        None where dp-accounting has none for it (then the RDP figure is reported).

        Built exactly as dp-accounting's ``PLDAccountant`` builds it for ``dp_event()``
        composed ``count`` times (add-or-remove-one neighbours, pessimistic estimate).
        """
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for people (``fedward-site ledger show``)."""

    def to_dict(self) -> dict[str, Any]:
        """The stored form ``{"type": name, field: value, ...}`` (JSON-ready)."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mechanism):
                out[f.name] = value.to_dict()
            elif isinstance(value, float) and math.isinf(value):
                out[f.name] = "inf"  # JSON has no infinity (a Poisson-distributed trial count)
            else:
                out[f.name] = value
        return out


M = TypeVar("M", bound=type[Mechanism])

_REGISTRY: dict[str, type[Mechanism]] = {}
MECHANISMS: Final[Mapping[str, type[Mechanism]]] = MappingProxyType(_REGISTRY)
"""Type name -> class: the allow-list the ledger decodes through."""

# Type name -> {field: int, float or Mechanism}, read once at registration.
_FIELDS: dict[str, dict[str, object]] = {}


def register(cls: M) -> M:
    """Class decorator: add a mechanism class to the allow-list under its ``TYPE``."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise ValueError(f"mechanism type {cls.TYPE!r} is empty or registered twice")
    fields = {f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    for name, hint in fields.items():
        if hint not in (int, float, Mechanism):
            raise TypeError(f"{cls.__name__}.{name}: fields are int, float or Mechanism")
    _REGISTRY[cls.TYPE] = cls
    _FIELDS[cls.TYPE] = fields
    return cls


def _field_value(name: str, hint: object, value: object) -> object:
    if hint is Mechanism:
        if not isinstance(value, dict):
            raise MechanismFormatError(f"{name} must be a mechanism object, got {value!r}")
        return decode_mechanism(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MechanismFormatError(f"{name} must be an integer, got {value!r}")
        return value
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MechanismFormatError(f"{name} must be a number, got {value!r}")
    return float(value)


def decode_mechanism(doc: Mapping[str, Any]) -> Mechanism:
    """The mechanism a stored ``{"type": name, ...}`` record describes.

    Raises:
        UnknownMechanismType: the type is not in :data:`MECHANISMS`.
        MechanismFormatError: fields are missing, extra, of the wrong kind or out of range.
    """
    type_name = doc.get("type")
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise UnknownMechanismType(type_name)
    hints = _FIELDS[cls.TYPE]
    given = set(doc) - {"type"}
    if given != set(hints):
        raise MechanismFormatError(
            f"{cls.TYPE}: fields {sorted(given)} given, {sorted(hints)} expected")
    mechanism = cls(**{name: _field_value(name, hint, doc[name])
                       for name, hint in hints.items()})
    problems = mechanism.problems()
    if problems:
        raise MechanismFormatError(f"{cls.TYPE}: " + "; ".join(problems))
    return mechanism


def _gaussian_pld(standard_deviation: float, interval: float,
                  sampling_prob: float = 1.0) -> PLD:
    return _pld_lib().from_gaussian_mechanism(
        standard_deviation=standard_deviation, sampling_prob=sampling_prob,
        value_discretization_interval=interval)


@register
@dataclass(frozen=True)
class DpSgd(Mechanism):
    """DP-SGD: ``steps`` Poisson-sampled Gaussian steps (Opacus's accounting model).

    Attributes:
        noise_multiplier: Gaussian noise std over the clipping norm (sigma).
        sample_rate: Poisson sampling probability per step (q).
        steps: optimizer steps.
    """

    TYPE: ClassVar[str] = "DpSgd"
    noise_multiplier: float
    sample_rate: float
    steps: int

    def problems(self) -> list[str]:
        out = []
        if not _positive(self.noise_multiplier):
            out.append(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not (0 < self.sample_rate <= 1):
            out.append(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.steps < 1:
            out.append(f"steps must be >= 1, got {self.steps!r}")
        return out

    def dp_event(self) -> dp_event.DpEvent:
        step = _events().PoissonSampledDpEvent(
            self.sample_rate, _events().GaussianDpEvent(self.noise_multiplier))
        return _events().SelfComposedDpEvent(step, self.steps)

    def unit(self) -> tuple[Mechanism, int]:
        return DpSgd(self.noise_multiplier, self.sample_rate, 1), self.steps

    def pld(self, count: int, interval: float) -> PLD | None:
        return _unit_pld(self.noise_multiplier, self.sample_rate, interval).self_compose(
            self.steps * count)

    def describe(self) -> str:
        return (f"DP-SGD: {self.steps} step(s), noise multiplier {self.noise_multiplier:.4g}, "
                f"sample rate {self.sample_rate:.4g}")


@register
@dataclass(frozen=True)
class GaussianRelease(Mechanism):
    """``count`` releases with Gaussian noise (a noised count, mean or histogram).

    Attributes:
        noise_std: standard deviation of the noise added to each coordinate.
        l2_sensitivity: the most one person changes the released vector, in L2 norm.
        count: how many such releases.
    """

    TYPE: ClassVar[str] = "GaussianRelease"
    noise_std: float
    l2_sensitivity: float
    count: int

    def problems(self) -> list[str]:
        out = []
        if not _positive(self.noise_std):
            out.append(f"noise_std must be > 0, got {self.noise_std!r}")
        if not _positive(self.l2_sensitivity):
            out.append(f"l2_sensitivity must be > 0, got {self.l2_sensitivity!r}")
        if self.count < 1:
            out.append(f"count must be >= 1, got {self.count!r}")
        return out

    @property
    def noise_multiplier(self) -> float:
        """Noise std over sensitivity: what decides the privacy loss."""
        return self.noise_std / self.l2_sensitivity

    def dp_event(self) -> dp_event.DpEvent:
        return _events().SelfComposedDpEvent(
            _events().GaussianDpEvent(self.noise_multiplier), self.count)

    def unit(self) -> tuple[Mechanism, int]:
        return GaussianRelease(self.noise_std, self.l2_sensitivity, 1), self.count

    def pld(self, count: int, interval: float) -> PLD | None:
        # k Gaussian releases compose exactly into one with std / sqrt(k), as the
        # accountant computes it.
        return _gaussian_pld(self.noise_multiplier / math.sqrt(self.count * count), interval)

    def describe(self) -> str:
        return (f"Gaussian release x{self.count}: noise std {self.noise_std:.4g}, "
                f"L2 sensitivity {self.l2_sensitivity:.4g}")


@register
@dataclass(frozen=True)
class LaplaceRelease(Mechanism):
    """``count`` releases with Laplace noise.

    Attributes:
        scale: the Laplace noise's scale parameter b.
        l1_sensitivity: the most one person changes the released vector, in L1 norm.
        count: how many such releases.
    """

    TYPE: ClassVar[str] = "LaplaceRelease"
    scale: float
    l1_sensitivity: float
    count: int

    def problems(self) -> list[str]:
        out = []
        if not _positive(self.scale):
            out.append(f"scale must be > 0, got {self.scale!r}")
        if not _positive(self.l1_sensitivity):
            out.append(f"l1_sensitivity must be > 0, got {self.l1_sensitivity!r}")
        if self.count < 1:
            out.append(f"count must be >= 1, got {self.count!r}")
        return out

    @property
    def noise_multiplier(self) -> float:
        """Scale over sensitivity (a pure epsilon of its reciprocal per release)."""
        return self.scale / self.l1_sensitivity

    def dp_event(self) -> dp_event.DpEvent:
        return _events().SelfComposedDpEvent(
            _events().LaplaceDpEvent(self.noise_multiplier), self.count)

    def unit(self) -> tuple[Mechanism, int]:
        return LaplaceRelease(self.scale, self.l1_sensitivity, 1), self.count

    def pld(self, count: int, interval: float) -> PLD | None:
        return _pld_lib().from_laplace_mechanism(
            parameter=self.noise_multiplier,
            value_discretization_interval=interval).self_compose(self.count * count)

    def describe(self) -> str:
        return (f"Laplace release x{self.count}: scale {self.scale:.4g}, "
                f"L1 sensitivity {self.l1_sensitivity:.4g}")


@register
@dataclass(frozen=True)
class TuningSelection(Mechanism):
    """A hyperparameter search that releases only its best trial (Papernot and Steinke's
    random stopping, dp-accounting's ``RepeatAndSelectDpEvent``).

    The number of trials is random with the given mean; ``trial`` is one whole trial.
    Accounted with RDP only (dp-accounting has no privacy loss distribution for it).

    Attributes:
        trial: the mechanism of one trial (e.g. a :class:`DpSgd` of the trial's steps).
        mean: the mean number of trials.
        shape: the trial-count distribution: ``inf`` Poisson, ``1`` geometric, ``0``
            logarithmic, otherwise truncated negative binomial with this shape.
    """

    TYPE: ClassVar[str] = "TuningSelection"
    trial: Mechanism
    mean: float
    shape: float

    def problems(self) -> list[str]:
        out = [f"trial: {p}" for p in self.trial.problems()]
        if not _positive(self.mean):
            out.append(f"mean must be > 0, got {self.mean!r}")
        if not (self.shape >= 0):
            out.append(f"shape must be >= 0 (inf: Poisson), got {self.shape!r}")
        return out

    def dp_event(self) -> dp_event.DpEvent:
        return _events().RepeatAndSelectDpEvent(self.trial.dp_event(), self.mean, self.shape)

    def describe(self) -> str:
        kind = {math.inf: "Poisson", 1.0: "geometric", 0.0: "logarithmic"}.get(
            self.shape, f"negative binomial, shape {self.shape:g}")
        return (f"tuning selection: best of a random number of trials (mean {self.mean:g}, "
                f"{kind}), each trial {self.trial.describe()}")


@register
@dataclass(frozen=True)
class CoveredTrial(Mechanism):
    """One round of a tuning trial, already paid for by its search's :class:`TuningSelection`.

    It records what the round trained with (so the site's ledger shows every trial round)
    and adds nothing to any figure: the search's selection entry bounds every trial. The
    ledger records one only after checking that the trial stays under the reference trial
    its search charged for (``privacy.tuning.check_cover``).

    Attributes:
        trial: the round's own DP-SGD.
        search: the coordinator's id of the tuning search that covers it.
    """

    TYPE: ClassVar[str] = "CoveredTrial"
    trial: Mechanism
    search: int

    def problems(self) -> list[str]:
        out = [f"trial: {p}" for p in self.trial.problems()]
        if self.search < 1:
            out.append(f"search must be >= 1, got {self.search!r}")
        return out

    def dp_event(self) -> dp_event.DpEvent:
        return _events().NoOpDpEvent()

    def pld(self, count: int, interval: float) -> PLD | None:
        return _pld_lib().identity(value_discretization_interval=interval)

    def describe(self) -> str:
        return f"tuning trial round, covered by tuning search {self.search}: " \
               f"{self.trial.describe()}"


# The costly part of a DP-SGD distribution is its single step; a site reuses few (sigma, q)
# pairs, and every further round only self-composes the same step again.
@functools.lru_cache(maxsize=64)
def _unit_pld(sigma: float, q: float, interval: float) -> PLD:
    return _gaussian_pld(sigma, interval, sampling_prob=q)


def gaussian_equivalent_std(*, variance: float, l1: float, l2: float) -> float:
    """The std of a Gaussian whose RDP bounds the Skellam mechanism's at every order > 1.

    The correction term of the Skellam RDP (:func:`privacy.distributed.skellam_rdp`) is at
    most ``3 l1 / (4 mu)``, which for ``alpha > 1`` is below ``alpha * 3 l1 / (4 mu)``: the
    Skellam RDP is then at most ``alpha l2^2 / (2 s^2)`` with
    ``1 / s^2 = (1 + 1.5 l1 / l2^2) / mu``, the RDP of a Gaussian of std ``s`` at
    sensitivity ``l2``.
    """
    return math.sqrt(variance / (1.0 + 1.5 * l1 / l2 ** 2))


@register
@dataclass(frozen=True)
class DistributedSkellam(Mechanism):
    """``count`` secure-aggregation rounds whose sum carries Skellam noise added in shares
    by the sites (``privacy.distributed``), charged for the worst case: the fewest sites
    the protocol unmasks (its threshold), each adding ``variance / threshold``.

    dp-accounting has no Skellam event. Its RDP (Agarwal et al. 2021) is bounded at every
    order above 1 by that of a Gaussian of std
    :func:`gaussian_equivalent_std`, which is what :meth:`dp_event`
    hands the RDP accountant; there is no PLD (an RDP bound does not bound the privacy
    loss distribution), so a composition that holds one is accounted with RDP.

    Attributes:
        variance: Skellam variance per coordinate of the sum at ``threshold`` sites.
        l2_sensitivity: the most one patient changes a site's integer vector (L2).
        l1_sensitivity: the same in L1 norm.
        count: rounds.
    """

    TYPE: ClassVar[str] = "DistributedSkellam"
    variance: float
    l2_sensitivity: float
    l1_sensitivity: float
    count: int

    def problems(self) -> list[str]:
        out = []
        for name in ("variance", "l2_sensitivity", "l1_sensitivity"):
            if not _positive(getattr(self, name)):
                out.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.count < 1:
            out.append(f"count must be >= 1, got {self.count!r}")
        return out

    @property
    def noise_multiplier(self) -> float:
        """The RDP-equivalent Gaussian's std over the L2 sensitivity."""
        return gaussian_equivalent_std(variance=self.variance, l1=self.l1_sensitivity,
                                       l2=self.l2_sensitivity) / self.l2_sensitivity

    def dp_event(self) -> dp_event.DpEvent:
        return _events().SelfComposedDpEvent(
            _events().GaussianDpEvent(self.noise_multiplier), self.count)

    def unit(self) -> tuple[Mechanism, int]:
        return DistributedSkellam(self.variance, self.l2_sensitivity, self.l1_sensitivity,
                                  1), self.count

    def describe(self) -> str:
        return (f"distributed Skellam (secure aggregation) x{self.count}: variance of the "
                f"sum {self.variance:.4g}, L2 sensitivity {self.l2_sensitivity:.4g}")
