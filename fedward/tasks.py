"""The task registry shared by the coordinator, the site agent and the exporters.

A *task* is what a study spec (:mod:`fedward.study`) trains; the registry's tasks are the
example studies shipped in ``fedward/studies/``. A task names a model family
(:mod:`fedward.models`) and its parameters together with the shape of the data it reads.
The coordinator uses it to build the initial global model, the site agent to train it, the
exporters to trace it. Keeping it in one module means the shapes a site is allowed to send
back (see the egress checks) and the shapes the coordinator expects cannot drift apart.

This module imports no torch: reading a task (its columns, defaults, label space) is cheap,
and only :meth:`TaskSpec.build` loads the model family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedward.study import StudySpec, load_spec

if TYPE_CHECKING:
    from torch import nn

    from fedward.preprocessing import Preprocessing

__all__ = [
    "BREAST_CANCER_COLUMNS",
    "BREAST_CANCER_RANGES",
    "DIGITS_COLUMNS",
    "EXAMPLE_STUDIES",
    "STUDIES_DIR",
    "TASKS",
    "TaskRef",
    "TaskSpec",
    "UnknownTaskError",
    "UntrainableStudyError",
    "build_model",
    "example_spec_path",
    "get_task",
    "plausible_ranges",
    "study_task",
    "task_from_spec",
]

# The example studies shipped with fedward (fedward/studies/*.yaml): each is a task of the
# registry, built from its spec (fedward.study). The Breast Cancer spec holds the published
# reference ranges of the data set's features (min and max of each attribute): the model
# normalises with these fixed constants, so every site and every exported model scale
# inputs the same way without any site having to share statistics of its own data.
STUDIES_DIR: Final = Path(__file__).resolve().parent / "studies"
EXAMPLE_STUDIES: Final = ("breast_cancer_mlp", "digits_cnn")


def example_spec_path(name: str) -> Path:
    """The file of the example study ``name`` shipped with fedward."""
    return STUDIES_DIR / f"{name}.yaml"


def _example_specs() -> dict[str, StudySpec]:
    # No DP check here: that builds the models (torch); tests/test_study.py runs it on
    # every shipped spec.
    return {name: load_spec(example_spec_path(name), check_dp=False)
            for name in EXAMPLE_STUDIES}


_SPECS: Final = _example_specs()
BREAST_CANCER_RANGES: dict[str, tuple[float, float]] = {
    c: (lo, hi) for c, lo, hi in _SPECS["breast_cancer_mlp"].input_columns()}
BREAST_CANCER_COLUMNS: tuple[str, ...] = tuple(BREAST_CANCER_RANGES)
DIGITS_COLUMNS: tuple[str, ...] = tuple(c for c, _, _ in _SPECS["digits_cnn"].input_columns())


class UnknownTaskError(KeyError):
    """Raised when a task name is not in the registry."""


@dataclass(frozen=True)
class TaskSpec:
    """One trainable task: the model, its input and its label space.

    Attributes:
        model: the model family's name (:func:`fedward.models.get_family`).
        model_params: keyword parameters of that family's factory.
        class_names: the label's classes in the model's output order (from the study).
    """

    name: str
    description: str
    feature_columns: tuple[str, ...]
    label_column: str
    n_classes: int
    default_lr: float
    default_batch_size: int
    model: str
    model_params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    class_names: tuple[str, ...] = ()
    # Per input column, the study's plausible [low, high] (what serving warns outside of).
    input_ranges: tuple[tuple[float, float], ...] = ()

    def same_model(self, other: TaskSpec) -> bool:
        """Whether ``other`` reads the same columns and label into the same model (what a
        site holding data for this task can train)."""
        return ((self.feature_columns, self.label_column, self.n_classes, self.model,
                 dict(self.model_params))
                == (other.feature_columns, other.label_column, other.n_classes, other.model,
                    dict(other.model_params)))

    @property
    def n_features(self) -> int:
        return len(self.feature_columns)

    def build(self, *, seed: int | None = None) -> nn.Module:
        """Build a fresh model; with ``seed`` its initial weights are reproducible."""
        from fedward.models import build

        return build(self.model, self.model_params, seed=seed)


def task_from_spec(spec: StudySpec) -> TaskSpec:
    """The task a study trains: its model, encoded input columns and label."""
    family, params = spec.model_family()
    return TaskSpec(name=spec.name, description=spec.description,
                    feature_columns=tuple(c[0] for c in spec.input_columns()),
                    label_column=spec.label.name, n_classes=len(spec.label.classes),
                    default_lr=spec.training.lr, default_batch_size=spec.training.batch_size,
                    model=family, model_params=params, class_names=tuple(spec.label.classes),
                    input_ranges=tuple((lo, hi) for _, lo, hi in spec.input_columns()))


TASKS: dict[str, TaskSpec] = {name: task_from_spec(spec) for name, spec in _SPECS.items()}


# A task by its registry name, or a task built from a study spec (:func:`study_task`):
# functions that build or export a model take either, so a registered study's model goes
# through the same code as a shipped task's.
TaskRef = str | TaskSpec


class UntrainableStudyError(ValueError):
    """A valid study that this release cannot train; the message says why and what to do."""


def study_task(spec: StudySpec, preprocessing: Preprocessing | None = None) -> TaskSpec:
    """The task a run of ``spec`` trains: its model built from the spec itself.

    The model is a function of the spec alone: a built-in family (logistic regression,
    MLP, the small CNN) parameterised by it, or the plugin family it names with its
    ``params`` (installed at the coordinator and at each site as an ordinary package,
    :mod:`fedward.plugins`). So the coordinator (from its registered copy) and each site
    (from its own approved copy, same content hash) build the same model without code or
    objects travelling.

    With ``preprocessing`` (a run's, composed from its DP statistics,
    :mod:`fedward.preprocessing`), the tabular model imputes and scales with it.

    Raises:
        UntrainableStudyError: a study that takes a shipped task's name with another
            model.
    """
    task = task_from_spec(spec)
    shipped = TASKS.get(spec.name)
    if shipped is not None and not shipped.same_model(task):
        raise UntrainableStudyError(
            f"study {spec.name!r} takes the name of the shipped task {spec.name} but changes "
            "its features, label or model; give the study a name of its own")
    if preprocessing is None or task.model != "tabular_mlp":
        return task
    from dataclasses import replace

    from fedward.preprocessing import model_params

    return replace(task, model_params=model_params(spec, preprocessing, task.model_params))


def get_task(name: TaskRef) -> TaskSpec:
    """Return the task called ``name`` or raise :class:`UnknownTaskError` listing the known
    ones; a :class:`TaskSpec` (e.g. a study's, :func:`study_task`) is returned as it is."""
    if isinstance(name, TaskSpec):
        return name
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None


def build_model(task: TaskRef, *, seed: int | None = None) -> nn.Module:
    """Build the model of ``task`` (see :meth:`TaskSpec.build`)."""
    return get_task(task).build(seed=seed)


_DIGITS_PIXEL_MAX: Final = 16.0


def plausible_ranges(task_name: TaskRef) -> dict[str, tuple[float, float]]:
    """Feature -> the range a real value lies in, for the tasks that publish one.

    The same limits as a site's default data check: breast cancer features from 0 to twice
    the published maximum, digit pixels from 0 to 16. A task without published ranges has
    none (an empty mapping); so does an unknown task. A study's task: its spec's ranges.
    """
    if isinstance(task_name, TaskSpec):
        if task_name.name not in TASKS and task_name.input_ranges:
            return dict(zip(task_name.feature_columns, task_name.input_ranges, strict=True))
        task_name = task_name.name
    if task_name == "breast_cancer_mlp":
        return {name: (0.0, 2.0 * high) for name, (_, high) in BREAST_CANCER_RANGES.items()}
    if task_name == "digits_cnn":
        return dict.fromkeys(DIGITS_COLUMNS, (0.0, _DIGITS_PIXEL_MAX))
    return {}
