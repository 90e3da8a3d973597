"""The privacy of a federated hyperparameter search: its cost, its charge, and its cover.

A search runs a random number of trials (each a short federated DP-SGD run) and publishes
only the best one. Papernot and Steinke ("Hyperparameter tuning with Renyi differential
privacy", ICLR 2022) bound the whole search when the number of trials is itself random
(Poisson or truncated negative binomial, geometric among them) and independent of the
data: dp-accounting's ``RepeatAndSelectDpEvent``, recorded in the ledger as a
:class:`~privacy.mechanisms.TuningSelection` and accounted with RDP.

How a site uses this module:

* The search's terms (:class:`SearchTerms`) travel in every trial's run configuration. From
  them and its own number of training rows the site derives its *reference trial*
  (:meth:`SearchTerms.reference`): the DP-SGD of the most a trial of the search can take
  (the largest batch's sample rate, the smallest batch's steps at the most local epochs,
  over the search's rounds per trial), and the smallest noise multiplier for which the whole
  selection stays within the search's epsilon (:func:`selection_for_budget`). That
  selection is charged once, before the site's first trial (purpose ``tuning``, in the
  ledger run :attr:`SearchTerms.ledger_run`).
* Every trial trains at the reference's noise multiplier, with its own batch size and local
  epochs, so it is under the reference at every RDP order (:func:`dominated`); each trial
  round is recorded as a :class:`~privacy.mechanisms.CoveredTrial` (no further cost), and
  the ledger refuses one that is not under the reference (:func:`check_cover`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Final

from privacy.accounting import new_rdp_accountant
from privacy.mechanisms import CoveredTrial, DpSgd, TuningSelection

__all__ = [
    "NotCoveredError",
    "SearchTerms",
    "check_cover",
    "dominated",
    "selection_epsilon",
    "selection_for_budget",
]

# Noise multipliers searched; a trial that needs more than this learns nothing useful.
_SIGMA_MAX: Final = 500.0
_RTOL: Final = 1e-9


class NotCoveredError(ValueError):
    """A trial's DP-SGD is not under the reference trial its search charged for."""


@dataclass(frozen=True)
class SearchTerms:
    """What the sites agree to for one search: the trial-count distribution and the bounds
    of every trial. Travels as JSON text in each trial's run configuration
    (``tuning-search``).

    Attributes:
        search_id: the coordinator's tuning id.
        mean: the mean number of trials.
        shape: ``inf``: Poisson; ``1``: geometric (truncated negative binomial shape).
        rounds: federated rounds of each trial.
        max_local_epochs: the most local epochs per round a trial may use.
        min_batch_size: the smallest expected batch size a trial may use.
        max_batch_size: the largest.
    """

    search_id: int
    mean: float
    shape: float
    rounds: int
    max_local_epochs: int
    min_batch_size: int
    max_batch_size: int

    def problems(self) -> list[str]:
        """Every out-of-range term, in words."""
        out = []
        if self.search_id < 1:
            out.append(f"search id must be >= 1, got {self.search_id}")
        if not (math.isfinite(self.mean) and 0 < self.mean <= 100):
            out.append(f"mean number of trials must be in (0, 100], got {self.mean}")
        if self.shape == 1.0 and self.mean < 1:
            out.append(f"a geometric number of trials has a mean of at least 1, got {self.mean}")
        if not (self.shape == 1.0 or math.isinf(self.shape)):
            out.append(f"shape must be 1 (geometric) or inf (Poisson), got {self.shape}")
        for name in ("rounds", "max_local_epochs", "min_batch_size", "max_batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_batch_size > self.max_batch_size:
            out.append(f"min_batch_size {self.min_batch_size} is above max_batch_size "
                       f"{self.max_batch_size}")
        return out

    @property
    def ledger_run(self) -> str:
        """The ledger run that holds the search's one charge."""
        return f"tuning-{self.search_id}"

    def reference(self, n_train: int) -> tuple[float, int]:
        """``(sample rate, steps)`` of the reference trial on ``n_train`` training rows:
        the largest sample rate and the most steps any trial of the search may take."""
        from privacy.sampling import expected_steps, sample_rate_for

        q = sample_rate_for(n_examples=n_train, batch_size=self.max_batch_size)
        per_round = expected_steps(n_examples=n_train, batch_size=self.min_batch_size,
                                   epochs=self.max_local_epochs)
        return q, per_round * self.rounds

    def to_wire(self) -> str:
        """The compact JSON text of the run configuration (infinity as ``"inf"``)."""
        doc: dict[str, Any] = asdict(self)
        if math.isinf(self.shape):
            doc["shape"] = "inf"
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_wire(cls, text: object) -> SearchTerms:
        """Parse :meth:`to_wire`'s text.

        Raises:
            ValueError: malformed or out of range, with every problem.
        """
        try:
            doc = json.loads(str(text))
            if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
                raise ValueError(f"fields {sorted(cls.__dataclass_fields__)} expected")
            shape = math.inf if doc["shape"] == "inf" else float(doc["shape"])
            terms = cls(search_id=int(doc["search_id"]), mean=float(doc["mean"]),
                        shape=shape, rounds=int(doc["rounds"]),
                        max_local_epochs=int(doc["max_local_epochs"]),
                        min_batch_size=int(doc["min_batch_size"]),
                        max_batch_size=int(doc["max_batch_size"]))
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"bad tuning-search terms {str(text)[:200]!r}: {err}") from None
        problems = terms.problems()
        if problems:
            raise ValueError("bad tuning-search terms: " + "; ".join(problems))
        return terms


def dominated(trial: DpSgd, reference: DpSgd) -> bool:
    """Whether ``trial`` leaks at most what ``reference`` does, by construction.

    The RDP of Poisson-sampled Gaussian steps grows with the sample rate and the number of
    steps and falls with the noise multiplier, at every order; so a trial with no more
    steps, no larger sample rate and no less noise than the reference is under it at every
    order, which is what the selection's bound needs. (Comparing dp-accounting's per-order
    values directly is not reliable: its fractional orders are not monotone for some rates.)
    """
    return (trial.noise_multiplier >= reference.noise_multiplier * (1.0 - _RTOL)
            and trial.sample_rate <= reference.sample_rate * (1.0 + _RTOL)
            and trial.steps <= reference.steps)


def selection_epsilon(selection: TuningSelection, *, delta: float) -> float:
    """The epsilon of one whole search at ``delta`` (RDP, as the ledger accounts it)."""
    accountant = new_rdp_accountant()
    accountant.compose(selection.dp_event())
    return float(accountant.get_epsilon(delta))


def selection_for_budget(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                         mean: float, shape: float) -> TuningSelection:
    """The search a site charges: the reference trial (``steps`` DP-SGD steps at
    ``sample_rate``) at the smallest noise multiplier for which the selection's epsilon is
    at most ``epsilon``.

    Raises:
        ValueError: no noise multiplier up to 500 fits (an epsilon far too small).
    """
    def fits(sigma: float) -> bool:
        sel = TuningSelection(DpSgd(sigma, sample_rate, steps), mean, shape)
        return selection_epsilon(sel, delta=delta) <= epsilon

    if not fits(_SIGMA_MAX):
        raise ValueError(f"a search of mean {mean:g} trials of {steps} DP-SGD step(s) at "
                         f"sample rate {sample_rate:.4g} cannot fit epsilon {epsilon:g} "
                         f"at delta {delta:g}: give it a larger epsilon or fewer trials")
    low, high = 0.05, _SIGMA_MAX
    if fits(low):
        high = low
    for _ in range(40):
        if high - low <= 1e-3 * high:
            break
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return TuningSelection(DpSgd(high, sample_rate, steps), mean, shape)


def check_cover(selection: TuningSelection, recorded: list[CoveredTrial],
                new: CoveredTrial) -> None:
    """Check that a trial round, with the trial's rounds already recorded, stays under the
    search's reference trial.

    Raises:
        NotCoveredError: with the figures, when it does not.
    """
    reference = selection.trial
    if not isinstance(reference, DpSgd):
        raise NotCoveredError(f"the search's trial is {reference.describe()}, not DP-SGD")
    rounds = [*recorded, new]
    trials = {(r.trial.noise_multiplier, r.trial.sample_rate) for r in rounds
              if isinstance(r.trial, DpSgd)}
    if len(trials) != 1 or not all(isinstance(r.trial, DpSgd) for r in rounds):
        raise NotCoveredError("a trial's rounds must all be DP-SGD at one noise multiplier "
                              "and sample rate")
    sigma, q = trials.pop()
    steps = sum(r.trial.steps for r in rounds if isinstance(r.trial, DpSgd))
    whole = DpSgd(sigma, q, steps)
    if not dominated(whole, reference):
        raise NotCoveredError(
            f"this trial would reach {whole.describe()}, more than the reference trial "
            f"search {new.search} charged for ({reference.describe()}); refused")

