"""A study as data: the spec the ML team writes, validated, hashed and turned into a task.

A *study spec* (YAML or JSON, :data:`SPEC_VERSION` 1) declares what is learnt from which
fields: each feature with its type (numeric with a unit and a plausible range, categorical
with its levels, boolean, ordinal with its ordered levels) and its missing-value rule, the
label with its class names, the model (a built-in family parameterised here, or a model
family installed as a plugin through the entry-point group ``fedward.models``), the training
defaults and the metrics to report. See ``docs/ml-team-guide.md`` ("Writing a study spec").

:func:`load_spec` / :func:`parse_spec` report every problem of a document at once, each
with its path (``features.3.levels: ...``), or return a :class:`StudySpec`. Its
:meth:`StudySpec.content_hash` is the SHA-256 of the RFC 8785 canonical JSON of the
validated spec (defaults filled in), so whitespace, comments, key order and YAML vs JSON do
not change it, and any change of meaning does. :func:`dp_problems` builds the model and
names each layer DP-SGD cannot train.

The model's input is the *encoded* feature vector, one column per numeric, boolean or
ordinal feature (the level's index), one per level of a categorical feature (one-hot),
plus one ``NAME__missing`` column per feature whose rule is ``indicator``
(:meth:`StudySpec.input_columns`). This module imports no torch (only
:func:`dp_problems` does).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from fedward.hashchain import canonical_json

__all__ = [
    "METRICS",
    "SPEC_VERSION",
    "STUDY_NAME_PATTERN",
    "BooleanFeature",
    "CategoricalFeature",
    "Label",
    "ModelSpec",
    "NumericFeature",
    "OrdinalFeature",
    "StudyError",
    "StudySpec",
    "Training",
    "dp_problems",
    "dumps",
    "load_spec",
    "parse_spec",
    "parse_study_ref",
    "spec_from_text",
]

SPEC_VERSION: Final = 1
# A release of a study ships the spec it was trained on under this name (its canonical
# JSON, whose SHA-256 is the study's content hash): what fedward-serve reads records by.
STUDY_FILE: Final = "study.json"
STUDY_NAME_PATTERN: Final = r"^[a-z][a-z0-9_-]{1,62}$"
# What the site's evaluation computes today; a study may ask only for these.
METRICS: Final = ("accuracy", "auc", "loss")
_Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]
_Level = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class StudyError(ValueError):
    """A study spec that cannot be used; ``problems`` lists every one, with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source} is not a valid study spec ({len(problems)} problem(s)):\n"
                         "  - " + "\n  - ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _distinct_levels(levels: list[str]) -> list[str]:
    dupes = sorted({lv for lv in levels if levels.count(lv) > 1})
    if dupes:
        raise ValueError(f"levels listed more than once: {', '.join(dupes)}")
    return levels


class NumericFeature(_Strict):
    """A number measured in ``unit``; values outside ``range`` are implausible."""

    name: _Name
    type: Literal["numeric"]
    unit: str | None = Field(default=None, max_length=32)
    range: tuple[float, float] = Field(description="plausible [low, high], also the scaling")
    missing: Literal["impute-mean", "impute-median", "indicator", "drop-row"] = "drop-row"
    description: str = Field(default="", max_length=500)

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"range low {value[0]} must be below high {value[1]}")
        return value


class CategoricalFeature(_Strict):
    """One of ``levels`` (no order); encoded one-hot."""

    name: _Name
    type: Literal["categorical"]
    levels: list[_Level] = Field(min_length=2, max_length=256)
    missing: Literal["impute-mode", "indicator", "drop-row"] = "drop-row"
    description: str = Field(default="", max_length=500)

    _levels = field_validator("levels")(_distinct_levels)


class BooleanFeature(_Strict):
    """True or false; encoded 1 or 0."""

    name: _Name
    type: Literal["boolean"]
    missing: Literal["impute-mode", "indicator", "drop-row"] = "drop-row"
    description: str = Field(default="", max_length=500)


class OrdinalFeature(_Strict):
    """One of ``levels``, listed from lowest to highest; encoded as the level's index."""

    name: _Name
    type: Literal["ordinal"]
    levels: list[_Level] = Field(min_length=2, max_length=256)
    missing: Literal["impute-median", "impute-mode", "indicator", "drop-row"] = "drop-row"
    description: str = Field(default="", max_length=500)

    _levels = field_validator("levels")(_distinct_levels)


Feature = Annotated[NumericFeature | CategoricalFeature | BooleanFeature | OrdinalFeature,
                    Field(discriminator="type")]


class Label(_Strict):
    """What is predicted: a column and its class names, in the model's output order."""

    name: _Name
    kind: Literal["binary", "multiclass"]
    classes: list[_Level] = Field(min_length=2, max_length=1000)

    _classes = field_validator("classes")(_distinct_levels)


class ModelSpec(_Strict):
    """The model: ``logistic_regression``, ``mlp`` (``hidden`` layer sizes), ``cnn`` (the
    small CNN over a ``height`` x ``width`` grey image given as its pixels) or ``plugin``
    (the model family ``name``, built with ``params``)."""

    family: Literal["logistic_regression", "mlp", "cnn", "plugin"]
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(default=None,
                                                                        max_length=8)
    height: int | None = Field(default=None, ge=2, le=256)
    width: int | None = Field(default=None, ge=2, le=256)
    name: str | None = Field(default=None, min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, max_length=64)

    def problems(self) -> list[str]:
        """What the family needs and does not have, or has and does not take."""
        wants = {"logistic_regression": set(), "mlp": {"hidden"},
                 "cnn": {"height", "width"}, "plugin": {"name"}}[self.family]
        out = [f"model.{key}: the {self.family} family needs it" for key in sorted(wants)
               if getattr(self, key) is None]
        for key in ("hidden", "height", "width", "name"):
            if key not in wants and getattr(self, key) is not None:
                out.append(f"model.{key}: the {self.family} family does not take it")
        if self.params and self.family != "plugin":
            out.append("model.params: only a plugin family takes params")
        if self.family == "mlp" and self.hidden == []:
            out.append("model.hidden: list at least one layer size (no hidden layer is "
                       "the logistic_regression family)")
        return out


class Training(_Strict):
    """Training defaults of a run of this study (a launch may override each)."""

    lr: float = Field(gt=0, le=100)
    batch_size: int = Field(ge=1, le=4096)
    local_epochs: int = Field(default=1, ge=1, le=50)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000)


_Metric = Literal["accuracy", "auc", "loss"]


def _default_metrics() -> list[_Metric]:
    return ["accuracy", "auc"]


class StudySpec(_Strict):
    """A validated study spec (see the module docstring)."""

    spec_version: Literal[1]
    name: Annotated[str, StringConstraints(pattern=STUDY_NAME_PATTERN)]
    description: str = Field(default="", max_length=2000)
    features: list[Feature] = Field(min_length=1, max_length=4096)
    label: Label
    model: ModelSpec
    training: Training
    metrics: list[_Metric] = Field(default_factory=_default_metrics, min_length=1)

    def canonical(self) -> bytes:
        """The canonical form that is hashed (RFC 8785 JSON of every field)."""
        return canonical_json(self.model_dump(mode="json"))

    def content_hash(self) -> str:
        """SHA-256 (hex) of :meth:`canonical`: what registries and site policies name."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def input_columns(self) -> list[tuple[str, float, float]]:
        """The encoded input: (column name, low, high) per model input, in order."""
        cols: list[tuple[str, float, float]] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                cols.append((f.name, f.range[0], f.range[1]))
            elif isinstance(f, CategoricalFeature):
                cols.extend((f"{f.name}={lv}", 0.0, 1.0) for lv in f.levels)
            elif isinstance(f, OrdinalFeature):
                cols.append((f.name, 0.0, float(len(f.levels) - 1)))
            else:
                cols.append((f.name, 0.0, 1.0))
            if f.missing == "indicator":
                cols.append((f"{f.name}__missing", 0.0, 1.0))
        return cols

    def model_family(self) -> tuple[str, dict[str, Any]]:
        """The model family (:func:`fedward.models.build`) and its parameters."""
        n_classes = len(self.label.classes)
        m = self.model
        if m.family == "plugin":
            assert m.name is not None
            return m.name, dict(m.params)
        if m.family == "cnn":
            high = max(hi for _, _, hi in self.input_columns())
            return "digits_cnn", {"n_classes": n_classes, "height": m.height,
                                  "width": m.width, "max_value": high}
        cols = self.input_columns()
        return "tabular_mlp", {"low": [c[1] for c in cols], "high": [c[2] for c in cols],
                               "hidden": list(m.hidden or []), "n_classes": n_classes}



def _path(loc: tuple[int | str, ...]) -> str:
    # Drop pydantic's discriminator tags ("features.0.numeric.range" -> "features.0.range").
    parts = [str(p) for p in loc if p not in ("numeric", "categorical", "boolean", "ordinal")]
    return ".".join(parts) or "(top level)"


_TYPES: Final = "numeric, categorical, boolean, ordinal"


def _message(error: Any) -> str:
    """Pydantic's message, said for a spec's author."""
    if error["type"] == "union_tag_invalid":
        return f"unknown type {error['ctx']['tag']!r} (known: {_TYPES})"
    if error["type"] == "union_tag_not_found":
        return f"a feature needs a type ({_TYPES})"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _cross_problems(raw: dict[str, Any]) -> list[str]:
    """Problems between sections, found on the raw document so they are reported together
    with the field problems pydantic finds."""
    out: list[str] = []
    feats = raw.get("features")
    names = ([f.get("name") for f in feats if isinstance(f, dict)]
             if isinstance(feats, list) else [])
    for name in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
        out.append(f"features: {name!r} is declared more than once")
    label = raw.get("label")
    if isinstance(label, dict) and isinstance(label.get("name"), str):
        if label["name"] in names:
            out.append(f"label.name: {label['name']!r} is also a feature; a study cannot "
                       "learn a value from itself")
        classes = label.get("classes")
        if label.get("kind") == "binary" and isinstance(classes, list) and len(classes) != 2:
            out.append(f"label.classes: a binary label has 2 classes, not {len(classes)}")
    return out


def _shape_problems(spec: StudySpec) -> list[str]:
    out = spec.model.problems()
    if spec.model.family == "cnn" and not out:
        assert spec.model.height is not None and spec.model.width is not None
        pixels = spec.model.height * spec.model.width
        if any(not isinstance(f, NumericFeature) or f.missing == "indicator"
               for f in spec.features):
            out.append("model.family: the cnn family reads numeric pixel features only")
        elif len(spec.features) != pixels:
            out.append(f"model: a {spec.model.height}x{spec.model.width} image has {pixels} "
                       f"pixels but the study has {len(spec.features)} features")
    return out


def parse_spec(raw: object, *, source: str = "study spec", check_dp: bool = True
               ) -> StudySpec:
    """Validate a parsed document; raise :class:`StudyError` listing every problem.

    Args:
        raw: the document (a mapping).
        source: how to name it in the message (its file name).
        check_dp: also build the model and check DP-SGD can train it (:func:`dp_problems`;
            imports torch and Opacus).
    """
    if not isinstance(raw, dict):
        raise StudyError(source, ["(top level): a study spec is one mapping (YAML or JSON)"])
    problems: list[str] = []
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            problems.append(f"{_path(e['loc'])}: {_message(e)}")
    problems.extend(_cross_problems(raw))
    model: ModelSpec | None = spec.model if spec is not None else None
    if spec is not None:
        problems.extend(_shape_problems(spec))
    elif isinstance(raw.get("model"), dict):
        try:  # a plugin's problems do not depend on the features: report them too
            model = ModelSpec.model_validate(raw["model"])
        except ValidationError:
            model = None
    if check_dp and model is not None and not model.problems():
        if spec is not None and not problems:
            family, params = spec.model_family()
            problems.extend(dp_problems(family, params, n_inputs=len(spec.input_columns()),
                                        n_classes=len(spec.label.classes)))
        elif model.family == "plugin":
            assert model.name is not None
            problems.extend(dp_problems(model.name, dict(model.params)))
    if problems:
        raise StudyError(source, problems)
    assert spec is not None
    return spec


def spec_from_text(text: str, *, source: str = "study spec", check_dp: bool = True
                   ) -> StudySpec:
    """Parse YAML or JSON text (JSON is YAML) and validate it (:func:`parse_spec`)."""
    import yaml

    try:
        raw = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as err:
        raise StudyError(source, [f"(top level): not valid YAML or JSON ({err})"]) from None
    return parse_spec(raw, source=source, check_dp=check_dp)


def load_spec(path: Path, *, check_dp: bool = True) -> StudySpec:
    """Read and validate the study spec at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StudyError(str(path), [f"(file): cannot read it ({err})"]) from None
    return spec_from_text(text, source=str(path), check_dp=check_dp)


def parse_study_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` -> (name, version or None for the newest).

    Raises:
        ValueError: naming what a reference looks like.
    """
    name, sep, version = ref.partition("@")
    if not re.match(STUDY_NAME_PATTERN, name) or (sep and not version.isdigit()):
        raise ValueError(f"{ref!r} is not a study reference; write NAME or NAME@VERSION, "
                         "e.g. breast_cancer_mlp@2")
    return name, int(version) if sep else None


def dp_problems(family: str, params: dict[str, Any], *, n_inputs: int | None = None,
                n_classes: int | None = None) -> list[str]:
    """Build the model and name every layer DP-SGD (Opacus) cannot train.

    Each trainable layer goes through Opacus's ``ModuleValidator`` validators on its own,
    so the message names it (``ModuleValidator.validate(model, strict=False)`` does not
    say which layer failed); when no layer explains a refusal, what ``validate`` returns
    is reported as it is. With ``n_inputs`` and ``n_classes`` (the study's encoded input
    width and its classes), a batch of two zero rows must come out as two rows of
    ``n_classes`` scores: a plugin built for another input or label is named here, not in
    round 1.
    """
    import torch
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    from fedward.models import UnknownModelError, build

    try:
        model = build(family, params, seed=0)
    except UnknownModelError as err:
        return [f"model: {err}"]
    except Exception as err:  # a family's own check of its parameters
        return [f"model: the {family} family cannot be built with these parameters "
                f"({type(err).__name__}: {err})"]
    out: list[str] = []
    n_params = 0
    for name, module in trainable_modules(model.train()):
        n_params += 1
        kind = type(module).__name__
        for problem in ModuleValidator.VALIDATORS.get(type(module), lambda _m: [])(module):
            out.append(f"model: layer {name!r} ({kind}) cannot be trained with DP-SGD: "
                       f"{problem}")
        if any(True for _ in module.buffers(recurse=False)) and not any(
                f"layer {name!r}" in p for p in out):
            out.append(f"model: layer {name!r} ({kind}) keeps buffers that DP-SGD does not "
                       "protect (use a layer without running statistics, e.g. GroupNorm)")
    if not out:  # anything Opacus refuses that no single layer explained
        out.extend(f"model: cannot be trained with DP-SGD: {e}"
                   for e in ModuleValidator.validate(model, strict=False))
    if n_params == 0:
        out.append("model: it has no trainable parameters")
    if out or n_inputs is None or n_classes is None:
        return out
    try:
        with torch.no_grad():
            scores = model(torch.zeros(2, n_inputs))
    except Exception as err:
        return [f"model: the {family} family cannot read the study's {n_inputs} encoded "
                f"input columns ({type(err).__name__}: {err}); build it for that width"]
    if tuple(scores.shape) != (2, n_classes):
        return [f"model: the {family} family answers a batch of 2 rows with shape "
                f"{tuple(scores.shape)}, the study needs (2, {n_classes}): one score per "
                "class"]
    return out


def dumps(spec: StudySpec) -> str:
    """The spec as indented JSON (what ``study show`` prints)."""
    return json.dumps(spec.model_dump(mode="json"), indent=2)
