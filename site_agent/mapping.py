"""The hospital's mapping of its own table to a study: columns, codes, units, the label.

The ML team's study spec (:mod:`fedward.study`) names features, levels and units; a
hospital's table has its own column names, codes (``M``/``Male``/``1``) and units. Hospital
IT writes a mapping (YAML or JSON, :data:`MAPPING_VERSION` 1)::

    mapping_version: 1
    study: heart_disease
    features:
      - {feature: age, column: age}
      - {feature: sex, column: sex, codes: {Male: male, Female: female}}
      - {feature: chol, column: chol, unit: mg/dL, substance: cholesterol,
         missing_codes: ["0"]}
    label: {column: num, codes: {"0": absent, "1": present, "2": present}}

:func:`check_mapping` applies it to a connector's :class:`~site_agent.data.Table` and
reports every problem at once (the mapping against the study, the columns against the
header, each cell against its feature), with row numbers, in a
:class:`~site_agent.data_report.DataReport` whose ``column`` is always the study's feature or label
name: its :meth:`~site_agent.data_report.DataReport.summary_for_coordinator` holds kinds, counts
and study names only. The site's own messages name local columns and, for category
columns, up to five unmapped codes (category names hospital IT must map).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fedward.hashchain import canonical_json
from fedward.study import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    OrdinalFeature,
    StudyError,
    StudySpec,
    load_spec,
)
from site_agent.data_report import DataProblem
from site_agent.data_table import Table
from site_agent.units import UnitError, conversion

__all__ = [
    "DEFAULT_MISSING_CODES",
    "MAPPING_VERSION",
    "FeatureMap",
    "LabelMap",
    "MappingError",
    "StudyMapping",
    "code_of",
    "load_mapping",
    "parse_mapping",
    "resolve_study",
]

MAPPING_VERSION: Final = 1
DEFAULT_MISSING_CODES: Final = ("", "na", "n/a", "nan", "null", "none", "?")
BOOLEAN_CODES: Final = {"true": "true", "t": "true", "yes": "true", "y": "true", "1": "true",
                        "false": "false", "f": "false", "no": "false", "n": "false",
                        "0": "false"}


def code_of(value: object) -> str | None:
    """A cell as a code: text stripped, whole numbers without ``.0``, booleans as
    ``true``/``false``; None for an empty cell (None or NaN)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


def _codes(raw: object) -> object:
    # YAML reads `1: male` as an int key and `TRUE: true` as booleans: compare as text.
    if isinstance(raw, dict):
        return {code_of(k) or "": code_of(v) or "" for k, v in raw.items()}
    return raw


def _code_list(raw: object) -> object:
    if isinstance(raw, list):
        return [code_of(v) or "" for v in raw]
    return raw


_Codes = Annotated[dict[str, str], BeforeValidator(_codes)]
_CodeList = Annotated[list[str], BeforeValidator(_code_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureMap(_Strict):
    """One study feature and the local column it is read from."""

    feature: str = Field(min_length=1)
    column: str = Field(min_length=1)
    codes: _Codes = Field(default_factory=dict, description="local code -> study level")
    unit: str | None = Field(default=None, description="the local unit, if not the study's")
    substance: str | None = Field(default=None, description="for mg/dL <-> mmol/L")
    missing_codes: _CodeList = Field(default_factory=list)


class LabelMap(_Strict):
    """The label's local column and which local code is which class."""

    column: str = Field(min_length=1)
    codes: _Codes = Field(default_factory=dict, description="local code -> class name")


class StudyMapping(_Strict):
    """A validated mapping document (see the module docstring)."""

    mapping_version: Literal[1]
    study: str = Field(min_length=1)
    study_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    features: list[FeatureMap] = Field(min_length=1)
    label: LabelMap
    missing_codes: _CodeList = Field(default_factory=lambda: list(DEFAULT_MISSING_CODES))

    def content_hash(self) -> str:
        """SHA-256 (hex) of the RFC 8785 canonical JSON of the mapping."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()


class MappingError(ValueError):
    """A mapping document that cannot be read or validated; every problem at once."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source} is not a valid mapping ({len(problems)} problem(s)):\n"
                         "  - " + "\n  - ".join(problems))


def parse_mapping(raw: object, *, source: str = "mapping") -> StudyMapping:
    """Validate a parsed document; raise :class:`MappingError` listing every problem."""
    if not isinstance(raw, dict):
        raise MappingError(source, ["(top level): a mapping is one YAML or JSON object"])
    try:
        return StudyMapping.model_validate(raw)
    except ValidationError as err:
        raise MappingError(source, [
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in err.errors(include_url=False, include_input=False)]) from None


def load_mapping(path: Path) -> StudyMapping:
    """Read and validate the mapping file at ``path`` (YAML or JSON)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MappingError(str(path), [f"(file): cannot read it ({err})"]) from None
    try:
        raw = yaml.safe_load(text)  # plain data only, never Python objects
    except yaml.YAMLError as err:
        raise MappingError(str(path), [f"(top level): not valid YAML or JSON ({err})"]
                           ) from None
    return parse_mapping(raw, source=str(path))


def resolve_study(ref: str, *, root: Path | None = None) -> StudySpec:
    """A study spec from a file (relative to ``root``) or an example study's name.

    Raises:
        fedward.study.StudyError: The file is not a valid spec, or there is no such study.
    """
    from fedward.tasks import EXAMPLE_STUDIES, example_spec_path

    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if path.is_file():
        return load_spec(path, check_dp=False)
    if ref in EXAMPLE_STUDIES:
        return load_spec(example_spec_path(ref), check_dp=False)
    raise StudyError(ref, [f"(file): no such file, and no example study of that name "
                           f"(examples: {', '.join(EXAMPLE_STUDIES)})"])


# -- the mapping against the study ---------------------------------------------------------


def _levels(feature: object) -> list[str] | None:
    if isinstance(feature, CategoricalFeature | OrdinalFeature):
        return list(feature.levels)
    if isinstance(feature, BooleanFeature):
        return ["true", "false"]
    return None


def study_problems(mapping: StudyMapping, study: StudySpec
                   ) -> tuple[list[DataProblem], list[DataProblem]]:
    """What is wrong between the mapping and the study, before any data is read.

    Returns:
        (problems, warnings); every ``column`` is a study name.
    """
    from site_agent.data_report import ProblemKind as K

    problems: list[DataProblem] = []
    warnings: list[DataProblem] = []

    def add(kind: K, column: str | None, message: str, *, warn: bool = False) -> None:
        (warnings if warn else problems).append(DataProblem(kind=kind, column=column,
                                                            message=message))

    if mapping.study != study.name:
        add(K.STUDY_MISMATCH, None, f"the mapping is for study {mapping.study!r}, not "
            f"{study.name!r}; write a mapping for this study (`fedward-site mapping template`)")
    if mapping.study_hash is not None and mapping.study_hash != study.content_hash():
        add(K.STUDY_MISMATCH, None, "the mapping was written for another version of the "
            "study (study_hash differs); check it against this version and update study_hash")
    by_name = {f.name: f for f in study.features}
    seen: dict[str, str] = {}
    for i, entry in enumerate(mapping.features):
        where = f"features[{i}] ({entry.feature!r} <- column {entry.column!r})"
        feature = by_name.get(entry.feature)
        if feature is None:
            add(K.UNKNOWN_FEATURE, None, f"{where}: the study has no feature "
                f"{entry.feature!r} (features: {', '.join(by_name)})")
            continue
        if entry.feature in seen:
            add(K.DUPLICATE_MAPPING, entry.feature, f"{where}: feature {entry.feature!r} is "
                f"already read from column {seen[entry.feature]!r}; map each feature from "
                "one column")
            continue
        seen[entry.feature] = entry.column
        levels = _levels(feature)
        if levels is None and entry.codes:
            add(K.UNKNOWN_LEVEL, entry.feature, f"{where}: a numeric feature takes no codes "
                "(use missing_codes for local markers of a missing value)")
        for code, level in sorted(entry.codes.items()):
            if levels is not None and level not in levels:
                add(K.UNKNOWN_LEVEL, entry.feature, f"{where}: code {code!r} maps to "
                    f"{level!r}, which is not a level of the study (levels: "
                    f"{', '.join(levels)})")
        if levels is not None and entry.codes and not isinstance(feature, BooleanFeature):
            for level in levels:
                if level not in entry.codes.values():
                    add(K.LEVEL_UNMAPPED, entry.feature, f"{where}: no local code maps to "
                        f"level {level!r}; no row of this site will have it", warn=True)
        if isinstance(feature, NumericFeature):
            _unit_problem(entry, feature, where, add)
        elif entry.unit is not None:
            add(K.WRONG_UNIT, entry.feature, f"{where}: only a numeric feature has a unit")
    for name in by_name:
        if name not in seen:
            add(K.FEATURE_UNMAPPED, name, f"study feature {name!r} is not mapped: add "
                "{feature: " + name + ", column: YOUR_COLUMN} under features")
    classes = list(study.label.classes)
    label = mapping.label
    for code, cls in sorted(label.codes.items()):
        if cls not in classes:
            add(K.UNKNOWN_LEVEL, study.label.name, f"label: code {code!r} maps to {cls!r}, "
                f"which is not a class of the study (classes: {', '.join(classes)})")
    if label.codes:
        for cls in classes:
            if cls not in label.codes.values():
                add(K.LEVEL_UNMAPPED, study.label.name, f"label: no local code maps to "
                    f"class {cls!r}; every class needs one (the model cannot learn a class "
                    "it never sees)")
    return problems, warnings


def _unit_problem(entry: FeatureMap, feature: NumericFeature, where: str, add: Any) -> None:
    from site_agent.data_report import ProblemKind as K

    if entry.unit is None:
        return
    if feature.unit is None:
        add(K.WRONG_UNIT, entry.feature, f"{where}: the study names no unit for "
            f"{entry.feature!r}; remove 'unit' (values are taken as they are)")
        return
    try:
        conversion(entry.unit, feature.unit, entry.substance)
    except UnitError as err:
        add(K.WRONG_UNIT, entry.feature, f"{where}: {err}")


@dataclass(frozen=True)
class Binding:
    """A study and the hospital's mapping to it, as one thing the site checked."""

    study: StudySpec
    mapping: StudyMapping

    @property
    def binding_hash(self) -> str:
        """SHA-256 (hex) of the study's and the mapping's hashes: the data fingerprint's
        ``schema_hash`` on this path (what the data was checked against)."""
        doc = {"study": self.study.content_hash(), "mapping": self.mapping.content_hash()}
        return hashlib.sha256(canonical_json(doc)).hexdigest()


def column_positions(header: list[str], names: list[str]) -> dict[str, int]:
    """Position of each name in the header (first occurrence)."""
    out: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in names and name not in out:
            out[name] = i
    return out


def read_table_rows(table: Table) -> list[tuple[int, list[object]]]:
    """Every row of a table, materialised (a mapping reads the rows more than once)."""
    return [(n, list(cells)) for n, cells in table.rows]
