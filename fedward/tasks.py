"""The task registry shared by the coordinator, the site agent and the exporters.

A *task* names a model family (:mod:`fedward.models`) and its parameters together with the
shape of the data it reads. The coordinator uses it to build the initial global model, the
site agent to train it, the exporters to trace it. Keeping it in one module means the
shapes a site is allowed to send back (see the egress checks) and the shapes the
coordinator expects cannot drift apart.

This module imports no torch: reading a task (its columns, defaults, label space) is cheap,
and only :meth:`TaskSpec.build` loads the model family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BREAST_CANCER_COLUMNS",
    "BREAST_CANCER_RANGES",
    "DIGITS_COLUMNS",
    "TASKS",
    "TaskSpec",
    "UnknownTaskError",
    "build_model",
    "get_task",
    "plausible_ranges",
]

# Published reference ranges of the Breast Cancer Wisconsin (Diagnostic) features, as
# documented with the data set (min and max of each attribute). The model normalises with
# these fixed constants, so every site and every exported model scale inputs the same way
# without any site having to share statistics of its own data.
_BC_RANGES: dict[str, tuple[float, float]] = {
    "mean_radius": (6.981, 28.11),
    "mean_texture": (9.71, 39.28),
    "mean_perimeter": (43.79, 188.5),
    "mean_area": (143.5, 2501.0),
    "mean_smoothness": (0.0526, 0.1634),
    "mean_compactness": (0.0194, 0.3454),
    "mean_concavity": (0.0, 0.4268),
    "mean_concave_points": (0.0, 0.2012),
    "mean_symmetry": (0.106, 0.304),
    "mean_fractal_dimension": (0.05, 0.0974),
    "radius_error": (0.1115, 2.873),
    "texture_error": (0.3602, 4.885),
    "perimeter_error": (0.757, 21.98),
    "area_error": (6.802, 542.2),
    "smoothness_error": (0.0017, 0.0311),
    "compactness_error": (0.0023, 0.1354),
    "concavity_error": (0.0, 0.396),
    "concave_points_error": (0.0, 0.0528),
    "symmetry_error": (0.0079, 0.079),
    "fractal_dimension_error": (0.0009, 0.0298),
    "worst_radius": (7.93, 36.04),
    "worst_texture": (12.02, 49.54),
    "worst_perimeter": (50.41, 251.2),
    "worst_area": (185.2, 4254.0),
    "worst_smoothness": (0.0712, 0.2226),
    "worst_compactness": (0.0273, 1.058),
    "worst_concavity": (0.0, 1.252),
    "worst_concave_points": (0.0, 0.291),
    "worst_symmetry": (0.1565, 0.6638),
    "worst_fractal_dimension": (0.055, 0.2075),
}
BREAST_CANCER_COLUMNS: tuple[str, ...] = tuple(_BC_RANGES)
BREAST_CANCER_RANGES: dict[str, tuple[float, float]] = dict(_BC_RANGES)
DIGITS_COLUMNS: tuple[str, ...] = tuple(f"pixel_{i}" for i in range(64))
_DIGITS_PIXEL_MAX = 16.0


def plausible_ranges(task_name: str) -> dict[str, tuple[float, float]]:
    """Feature -> the range a real value lies in, for the tasks that publish one.

    The same limits as a site's default data check: breast cancer features from 0 to twice
    the published maximum, digit pixels from 0 to 16. A task without published ranges has
    none (an empty mapping); so does an unknown task.
    """
    if task_name == "breast_cancer_mlp":
        return {name: (0.0, 2.0 * high) for name, (_, high) in _BC_RANGES.items()}
    if task_name == "digits_cnn":
        return dict.fromkeys(DIGITS_COLUMNS, (0.0, _DIGITS_PIXEL_MAX))
    return {}


class UnknownTaskError(KeyError):
    """Raised when a task name is not in the registry."""


@dataclass(frozen=True)
class TaskSpec:
    """One trainable task: the model, its input and its label space.

    Attributes:
        model: the model family's name (:func:`fedward.models.get_family`).
        model_params: keyword parameters of that family's factory.
        class_names: a name per class index, for people (empty: the index is the answer).
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

    @property
    def n_features(self) -> int:
        return len(self.feature_columns)

    def build(self, *, seed: int | None = None) -> nn.Module:
        """Build a fresh model; with ``seed`` its initial weights are reproducible."""
        from fedward.models import build

        return build(self.model, self.model_params, seed=seed)


TASKS: dict[str, TaskSpec] = {
    "breast_cancer_mlp": TaskSpec(
        name="breast_cancer_mlp",
        description=(
            "Breast Cancer Wisconsin (Diagnostic): 30 features, malignant (0) or benign (1)"
        ),
        feature_columns=BREAST_CANCER_COLUMNS,
        label_column="diagnosis",
        n_classes=2,
        # Tuned for DP-SGD at epsilon 3 on 60-200 rows per site, 5 rounds x 3 local epochs
        # (docs/ml-team-guide.md): a narrow hidden layer keeps the noise per useful
        # parameter low, and plain SGD with a large step beat Adam under clipping and noise.
        default_lr=1.0,
        default_batch_size=32,
        model="tabular_mlp",
        model_params={"low": [r[0] for r in _BC_RANGES.values()],
                      "high": [r[1] for r in _BC_RANGES.values()],
                      "hidden": 8, "n_classes": 2},
        class_names=("malignant", "benign"),
    ),
    "digits_cnn": TaskSpec(
        name="digits_cnn",
        description="Handwritten digits, 8x8 grey images as 64 pixels 0-16, classes 0-9",
        feature_columns=DIGITS_COLUMNS,
        label_column="digit",
        n_classes=10,
        default_lr=0.003,
        default_batch_size=64,
        model="digits_cnn",
        model_params={"n_classes": 10},
    ),
}


def get_task(name: str) -> TaskSpec:
    """Return the task called ``name`` or raise :class:`UnknownTaskError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None


def build_model(task: str, *, seed: int | None = None) -> nn.Module:
    """Build the model of ``task`` (see :meth:`TaskSpec.build`)."""
    return get_task(task).build(seed=seed)
