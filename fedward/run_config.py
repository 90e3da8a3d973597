"""THE run configuration: one pydantic model for the API, the CLI, the ServerApp and the wire.

* :class:`RunSettings` holds every setting of a run once: its name (the REST API's field
  name), type, default, bounds and description.
* :class:`RunRequest` is what an ML engineer asks for (``POST /runs``, ``fedward-coordinator
  launch``): the settings plus the project, the task and the sites. The CLI's options and
  their defaults are taken from these fields.
* :class:`RunConfig` is the resolved configuration the coordinator stores with the run
  (the task's learning rate and batch size filled in, the sites named).
* :class:`RunPlan` is what the ServerApp runs: the stored configuration with the run's
  identity. Its :meth:`RunPlan.task_config` is the task configuration each round's message
  carries; the wire key of each field is declared on the field (:class:`Wire`), and
  :data:`fedward.wire.CFG` reads them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

__all__ = [
    "ROUND_KEY",
    "SITE_NAME_PATTERN",
    "TRAIN_KEY",
    "RunConfig",
    "RunPlan",
    "RunRequest",
    "RunSettings",
    "SiteName",
    "Wire",
    "wire_keys",
]

SITE_NAME_PATTERN: Final = r"^[a-z0-9-]{3,40}$"
# The statistics phase's share of a run's epsilon: by default, and at most.
DEFAULT_STATISTICS_SHARE: Final = 0.1
MAX_STATISTICS_SHARE: Final = 0.5
# Task-message keys that are not settings: the round's number and whether the site trains.
ROUND_KEY: Final = "round"
TRAIN_KEY: Final = "train"
SiteName = Annotated[str, StringConstraints(pattern=SITE_NAME_PATTERN)]


@dataclass(frozen=True)
class Wire:
    """Field metadata: the key under which a setting travels in a round's task message.

    The spelling is part of the protocol between the coordinator and sites that may run
    another release, so it stays as it is when a field is renamed here.
    """

    key: str


class RunSettings(BaseModel):
    """How a run trains: rounds, privacy budget, deadlines, local optimisation, robustness."""

    rounds: Annotated[int, Wire("total-rounds")] = Field(
        default=5, ge=1, le=100, description="Federated rounds to train.")
    local_epochs: Annotated[int, Wire("local-epochs")] = Field(
        default=1, ge=1, le=50, description="Local epochs each site trains per round.")
    # No default: a run's privacy budget is always a decision someone made.
    epsilon: Annotated[float, Wire("epsilon-budget")] = Field(
        gt=0, le=100, description="Privacy budget (epsilon) per site for the run.")
    delta: Annotated[float, Wire("delta")] = Field(
        default=1e-5, gt=0, lt=1, description="DP delta.")
    min_sites: int = Field(
        default=1, ge=1,
        description="Sites that must take part; checked against the run's sites at launch.")
    round_deadline_s: float = Field(
        default=120.0, ge=5, le=3600, description="Seconds per round.")
    offline_grace_s: float = Field(
        default=10.0, ge=0, le=3600,
        description="How long a round waits for a site of the run that is offline when the "
        "round starts; then it goes on without it (named offline in the round's failed "
        "sites) if at least min_sites are online. Capped at half the round deadline. After "
        "a coordinator restart, the first round of the resumed run waits up to half its "
        "deadline instead, for sites to reconnect.")
    lr: Annotated[float | None, Wire("learning-rate")] = Field(
        default=None, gt=0, description="Local learning rate (default: the task's).")
    batch_size: Annotated[int | None, Wire("batch-size")] = Field(
        default=None, ge=1, le=4096, description="Expected batch size (default: the task's).")
    max_grad_norm: Annotated[float, Wire("max-grad-norm")] = Field(
        default=1.0, gt=0, description="Per-sample gradient clipping bound of DP-SGD.")
    seed: Annotated[int, Wire("seed")] = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed of the initial model.")
    aggregation: str = Field(
        default="fedavg", max_length=64,
        description="How site updates are combined (coordinator.aggregation): fedavg "
        "(weighted mean), median or trimmed-mean (robust, coordinate-wise), the server "
        "optimisers fedavgm, fedadam and fedyogi, or a strategy a plugin registered under "
        "the entry point group fedward.aggregators.")
    # Any JSON value here: each strategy's own options model checks names and types (the
    # coordinator's request model, which knows the registry).
    aggregation_options: dict[str, Any] = Field(
        default_factory=dict, max_length=32,
        description="Options of the aggregation, e.g. {\"server_lr\": 0.1, \"beta1\": 0.9} "
        "for fedadam (see docs/ml-team-guide.md); unknown options are refused.")
    approval_wait_s: float = Field(
        default=3600.0, ge=0, le=86400,
        description="Before round 1, how long the run waits for sites whose policy wants a "
        "local approval (0: ask once, do not wait). Training then starts with the sites "
        "that accepted, if at least min_sites.")
    statistics: Annotated[bool, Wire("statistics")] = Field(
        default=False,
        description="Before round 1, each site releases DP statistics of its data (per "
        "feature: a histogram over the study's plausible range, rows, missing values, "
        "clipped mean and standard deviation), charged to its privacy budget; the "
        "coordinator keeps their sum with the run and a release ships it as "
        "reference_statistics.json.")
    statistics_epsilon: Annotated[float | None, Wire("statistics-epsilon")] = Field(
        default=None, gt=0, le=50,
        description="The part of epsilon the statistics may spend at each site, out of the "
        "run's epsilon (the rest trains). Default with statistics on: a tenth of epsilon; "
        "at most half of it.")
    max_update_norm: float | None = Field(
        default=None, gt=0,
        description="Reject a site's update whose L2 distance from the round's global model "
        "is above this. Default: derived per site from the DP-SGD settings (lr, "
        "max_grad_norm, batch size, local epochs, the site's example count and noise "
        "multiplier), with a safety factor of 2.")
    secure_aggregation: Annotated[bool, Wire("secure-aggregation")] = Field(
        default=False,
        description="Secure aggregation with distributed DP: each site clips its update to "
        "secagg_clip, adds its share of Skellam noise and masks it (SecAgg+); the "
        "coordinator unmasks only the sum of at least secagg_threshold sites, never one "
        "site's update. The sum is DP at the run's epsilon with no DP-SGD noise at the "
        "sites. Only fedavg aggregation; no statistics phase, no max_update_norm.")
    secagg_threshold: Annotated[int | None, Wire("secagg-threshold")] = Field(
        default=None, ge=2, le=1000,
        description="Secure aggregation: the fewest sites whose sum is unmasked (and for "
        "whom each site sizes its noise share); a round with fewer survivors fails. "
        "Default: min_sites, at least 2.")
    secagg_clip: Annotated[float, Wire("secagg-clip")] = Field(
        default=1.0, gt=0, le=1000,
        description="Secure aggregation: the L2 bound each site clips its model update "
        "(trained minus received) to before quantising it.")


    @model_validator(mode="after")
    def _statistics_share(self) -> RunSettings:
        share = self.statistics_epsilon
        if share is None:
            return self
        if not self.statistics:
            raise ValueError("statistics_epsilon is set but statistics is off: turn "
                             "statistics on, or leave statistics_epsilon out")
        if share > MAX_STATISTICS_SHARE * self.epsilon:
            raise ValueError(
                f"statistics_epsilon {share:g} leaves too little of epsilon {self.epsilon:g} "
                f"for training: at most {MAX_STATISTICS_SHARE:g} x epsilon "
                f"({MAX_STATISTICS_SHARE * self.epsilon:g}) may go to statistics")
        return self

    @model_validator(mode="after")
    def _secure_aggregation(self) -> RunSettings:
        if not self.secure_aggregation:
            if self.secagg_threshold is not None:
                raise ValueError("secagg_threshold is set but secure_aggregation is off")
            return self
        # The coordinator holds only the sum: whatever needs one site's update is refused
        # here, with the reason, rather than silently skipped.
        if self.aggregation != "fedavg":
            raise ValueError(
                f"secure_aggregation cannot use aggregation {self.aggregation!r}: the "
                "coordinator sees only the sum of the updates, so only fedavg (their mean) "
                "is possible; robust aggregators and server optimisers need each update")
        if self.max_update_norm is not None:
            raise ValueError(
                "secure_aggregation cannot check max_update_norm at the coordinator (it "
                "never sees one site's update): leave it out; each site clips its own "
                "update to secagg_clip instead")
        return self

    def secagg_threshold_or_default(self) -> int:
        """The secure aggregation threshold: the setting, else min_sites (at least 2)."""
        return self.secagg_threshold or max(2, self.min_sites)

    def statistics_share(self) -> float | None:
        """The epsilon the statistics phase spends at each site (None: no statistics)."""
        if not self.statistics:
            return None
        if self.statistics_epsilon is not None:
            return self.statistics_epsilon
        return round(DEFAULT_STATISTICS_SHARE * self.epsilon, 12)


class RunRequest(RunSettings):
    """A run as an ML engineer asks for it: what to train, how, with which budget, where.

    What to train is a registry ``task`` or a registered ``study`` (one of the two).
    ``lr`` and ``batch_size`` default to the task's or the study's own defaults (a study's
    ``local_epochs`` and ``max_grad_norm`` too, where the request leaves them out);
    ``sites`` defaults to every registered site. Unknown fields, NaN/Inf and wrong JSON
    types (``true`` or ``"5"`` for a number) are refused, not coerced.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    project: str = Field(min_length=1, max_length=64)
    task: str | None = Field(
        default=None, description="A task of the shared registry (fedward.tasks.TASKS).")
    study: str | None = Field(
        default=None, max_length=80,
        description="A registered study, NAME@VERSION (or NAME: its newest version); "
        "instead of task.")
    sites: list[SiteName] | None = Field(
        default=None, min_length=1,
        description="The sites that take part (default: every registered site).")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        from fedward.tasks import TASKS

        if value is not None and value not in TASKS:
            known = ", ".join(sorted(TASKS))
            raise ValueError(f"unknown task {value!r} (known tasks: {known})")
        return value

    @field_validator("study")
    @classmethod
    def _study_ref(cls, value: str | None) -> str | None:
        from fedward.study import parse_study_ref

        if value is not None:
            parse_study_ref(value)  # ValueError says what a reference looks like
        return value

    @model_validator(mode="after")
    def _task_or_study(self) -> RunRequest:
        if (self.task is None) == (self.study is None):
            raise ValueError("name what to train: a task (e.g. breast_cancer_mlp) or a "
                             "registered study (e.g. breast_cancer_mlp@1), not both")
        return self

    @field_validator("sites")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            dupes = sorted({s for s in value if value.count(s) > 1})
            raise ValueError(f"sites listed more than once: {', '.join(dupes)}")
        return value


class RunConfig(RunSettings):
    """The resolved configuration of a run, as stored with it (``Run.config_json``)."""

    @model_validator(mode="before")
    @classmethod
    def _resolve_statistics_share(cls, data: Any) -> Any:
        # Stored and sent resolved: the site charges exactly what the run was launched with.
        if isinstance(data, dict) and data.get("statistics") is True \
                and data.get("statistics_epsilon") is None:
            epsilon = data.get("epsilon")
            if isinstance(epsilon, int | float) and not isinstance(epsilon, bool):
                data = {**data, "statistics_epsilon": round(
                    DEFAULT_STATISTICS_SHARE * float(epsilon), 12)}
        return data

    @model_validator(mode="before")
    @classmethod
    def _resolve_secagg_threshold(cls, data: Any) -> Any:
        # Stored and sent resolved: each site sizes its noise share for this number.
        if isinstance(data, dict) and data.get("secure_aggregation") is True \
                and data.get("secagg_threshold") is None:
            min_sites = data.get("min_sites", 1)
            if isinstance(min_sites, int) and not isinstance(min_sites, bool):
                data = {**data, "secagg_threshold": max(2, min_sites)}
        return data

    @model_validator(mode="after")
    def _secagg_sites(self) -> RunConfig:
        if self.secure_aggregation:
            threshold = self.secagg_threshold_or_default()
            if len(self.sites) < threshold:
                raise ValueError(
                    f"secure_aggregation needs at least {threshold} sites (its threshold); "
                    f"the run has {len(self.sites)}: add sites or lower secagg_threshold "
                    "(at least 2)")
        return self

    lr: Annotated[float, Wire("learning-rate")] = Field(
        gt=0, description="Local learning rate.")
    batch_size: Annotated[int, Wire("batch-size")] = Field(
        ge=1, le=4096, description="Expected batch size.")
    sites: list[str] = Field(description="The sites that take part.")
    # A run of a registered study pins its version and content hash: the spec cannot change
    # under a run, and each site's policy approves the study by this hash.
    study: Annotated[str | None, Wire("study")] = Field(
        default=None, description="The study the run trains, NAME@VERSION.")
    study_hash: Annotated[str | None, Wire("study-hash")] = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the study spec's canonical form.")
    # A run of a study whose model is a plugin pins the distribution that provides it
    # (fedward.plugins.PluginPin): each site trains only with exactly that one installed
    # and allowed by its policy. No code travels; only these three strings.
    model_plugin: Annotated[str | None, Wire("model-plugin")] = Field(
        default=None, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The distribution that provides the study's plugin model.")
    model_plugin_version: Annotated[str | None, Wire("model-plugin-version")] = Field(
        default=None, max_length=64, description="Its version.")
    model_plugin_sha256: Annotated[str | None, Wire("model-plugin-sha256")] = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of its installed dist-info RECORD file.")
    # Set only by the coordinator's tuning engine (never by POST /runs): the run is a trial
    # of this search, whose one charge at each site covers it (privacy.tuning.SearchTerms).
    tuning_search: Annotated[str | None, Wire("tuning-search")] = Field(
        default=None, max_length=400,
        description="The terms of the tuning search this run is a trial of (JSON).")


class RunPlan(RunConfig):
    """What the ServerApp runs: the stored configuration with the run's identity."""

    model_config = ConfigDict(frozen=True)

    run_id: Annotated[int, Wire("run-id")]
    project: Annotated[str, Wire("project")]
    task: Annotated[str, Wire("task-name")]
    sites: tuple[str, ...] = Field(description="The sites that take part.")  # type: ignore[assignment]
    # Not a setting of the API: the imputation and scaling the coordinator composed from
    # the run's DP statistics (fedward.preprocessing), set once the statistics phase of a
    # run of a study is done, so every later message carries it to the sites.
    preprocessing: Annotated[str | None, Wire("preprocessing")] = Field(
        default=None, max_length=200_000,
        description="The run's preprocessing (JSON, fedward.preprocessing).")
    # Not a setting of the API: tests of the round loop turn the final evaluation off.
    final_evaluate: bool = True

    def task_config(self, round_number: int, *, train: bool) -> dict[str, Any]:
        """The task configuration of round ``round_number``'s message to each site.

        Every field with a :class:`Wire` key, under that key (the run id as text), plus
        the round, and whether the site trains or only evaluates: values are ``bool``,
        ``int``, ``float`` or ``str``, what a Flower ConfigRecord holds; a field that is
        None (a run without a study) is left out.
        """
        out: dict[str, Any] = {}
        for name, key in wire_keys(type(self)).items():
            value = getattr(self, name)
            if value is None:
                continue
            out[key] = str(value) if name == "run_id" else value
        out[ROUND_KEY] = round_number
        out[TRAIN_KEY] = train
        return out


def wire_keys(model: type[BaseModel] = RunPlan) -> Mapping[str, str]:
    """Field name -> wire key, for every field of ``model`` that travels in a task message."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, Wire):
                out[name] = meta.key
    return MappingProxyType(out)

