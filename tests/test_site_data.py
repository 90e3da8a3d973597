"""Tests of the site data connector (site_agent.data) and the demo data (site_agent.datasets)."""

from __future__ import annotations

import csv
import hashlib
import hmac
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_breast_cancer

from fedward.tasks import BREAST_CANCER_COLUMNS, TASKS
from site_agent.data import keyed_fingerprint, load_site_data
from site_agent.data_check import check_data
from site_agent.data_report import DataCheckError, ProblemKind
from site_agent.data_schema import DataSchema, SchemaError, load_schema
from site_agent.datasets import DemoFederation, read_labeled_csv, write_demo_federation
from site_agent.keys import FINGERPRINT_KEY_FILE, ensure_fingerprint_key

BC = "breast_cancer_mlp"
LABEL = "diagnosis"
HEADER = [*BREAST_CANCER_COLUMNS, LABEL]
SECRET = "987654.321"

WriteCsv = Callable[..., Path]


@pytest.fixture(scope="module")
def bc_table() -> list[list[str]]:
    """40 real breast-cancer rows (20 per class) as CSV cells, task column order + label."""
    data = load_breast_cancer()
    rows: list[list[str]] = []
    for cls in (0, 1):
        for i in np.flatnonzero(data.target == cls)[:20]:
            rows.append([repr(float(v)) for v in data.data[i]] + [str(cls)])
    return rows


@pytest.fixture
def write_csv(tmp_path: Path) -> WriteCsv:
    """Factory: write rows (and a header) to a fresh CSV file and return its path."""
    counter = iter(range(1_000))

    def _write(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> Path:
        path = tmp_path / f"data-{next(counter)}.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER if header is None else header)
            writer.writerows(rows)
        return path

    return _write


@pytest.fixture(scope="module")
def schema() -> DataSchema:
    return DataSchema.for_task(BC)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> DemoFederation:
    return write_demo_federation(task=BC, out_dir=tmp_path_factory.mktemp("fed"), n_sites=3,
                                 seed=0)


def _read_rows(path: Path) -> list[tuple[str, ...]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [tuple(r) for r in list(csv.reader(fh))[1:]]


def _kinds(problems: Sequence[object]) -> set[tuple[str, str | None]]:
    return {(str(p.kind), p.column) for p in problems}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- data check


def test_valid_data_passes(write_csv: WriteCsv, bc_table: list[list[str]],
                           schema: DataSchema) -> None:
    report = check_data(csv_path=write_csv(bc_table), schema=schema)
    assert report.ok, report.problems
    assert report.problems == [] and report.warnings == []
    assert report.n_rows == 40
    assert report.summary_for_coordinator() == {"ok": True, "n_rows": 40, "problems": [],
                                                "warnings": []}


def test_four_problems_reported_at_once(write_csv: WriteCsv, bc_table: list[list[str]],
                                        schema: DataSchema) -> None:
    drop = HEADER.index("mean_area")
    header = [h for i, h in enumerate(HEADER) if i != drop]
    rows = [[c for i, c in enumerate(r) if i != drop] for r in bc_table]
    radius, texture, label = (header.index(n) for n in ("mean_radius", "mean_texture", LABEL))
    rows[2][radius] = "NaN"          # file line 4 (the header is line 1)
    rows[4][texture] = "twelve"      # line 6
    rows[7][label] = "7"             # line 9
    report = check_data(csv_path=write_csv(rows, header), schema=schema)

    assert not report.ok
    assert _kinds(report.problems) == {
        ("missing-column", "mean_area"),
        ("missing-value", "mean_radius"),
        ("wrong-type", "mean_texture"),
        ("unknown-label", LABEL),
    }
    by_kind = {str(p.kind): p for p in report.problems}
    assert by_kind["missing-value"].rows == [4]
    assert by_kind["wrong-type"].rows == [6]
    assert by_kind["unknown-label"].rows == [9]
    assert "twelve" not in " ".join(p.message for p in report.problems)
    with pytest.raises(DataCheckError) as err:
        load_site_data(csv_path=write_csv(rows, header), schema=schema)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 + 4  # a title line, then one line per problem
    assert err.value.report.problems == report.problems


def test_bad_rows_listed_by_number_at_most_five(write_csv: WriteCsv,
                                                bc_table: list[list[str]],
                                                schema: DataSchema) -> None:
    rows = [list(r) for r in bc_table]
    for r in rows[:8]:
        r[0] = "1,5"  # a decimal comma
    report = check_data(csv_path=write_csv(rows), schema=schema)
    (problem,) = report.problems
    assert (problem.kind, problem.column, problem.count) == ("wrong-type", "mean_radius", 8)
    assert problem.rows == [2, 3, 4, 5, 6]
    assert "8 row(s)" in problem.message and "..." in problem.message


def test_out_of_range_infinite_and_int_type(write_csv: WriteCsv, bc_table: list[list[str]],
                                            schema: DataSchema, tmp_path: Path) -> None:
    rows = [list(r) for r in bc_table]
    rows[0][0] = "-1.0"       # below min 0
    rows[1][0] = "1e3"        # above 2 x 28.11
    rows[2][1] = "inf"
    rows[3][1] = "1e999"
    report = check_data(csv_path=write_csv(rows), schema=schema)
    by_kind = {(str(p.kind), p.column): p for p in report.problems}
    assert set(by_kind) == {("out-of-range", "mean_radius"), ("non-finite", "mean_texture")}
    assert by_kind[("out-of-range", "mean_radius")].rows == [2, 3]
    assert by_kind[("non-finite", "mean_texture")].count == 2

    digits = DataSchema.for_task("digits_cnn")
    header = [*digits.feature_columns, "digit"]
    drows = [["0"] * 64 + [str(i % 10)] for i in range(20)]
    drows[0][5] = "3.5"   # not a whole pixel value
    drows[1][6] = "17"    # above 16
    drows[2][7] = "4.0"   # a whole number written as a float is fine
    report = check_data(csv_path=write_csv(drows, header), schema=digits)
    assert _kinds(report.problems) == {("wrong-type", "pixel_5"), ("out-of-range", "pixel_6")}


def test_summary_for_coordinator_has_no_values(write_csv: WriteCsv, bc_table: list[list[str]],
                                               schema: DataSchema) -> None:
    rows = [list(r) for r in bc_table]
    rows[3][0] = SECRET                  # out of range
    rows[4][1] = "patient-" + SECRET     # wrong type
    rows[5][-1] = SECRET                 # not a whole number
    rows[6][-1] = "987654321"            # not a class
    header = [*HEADER, "mrn_" + SECRET]  # an extra column named after a value
    rows = [[*r, SECRET] for r in rows]
    report = check_data(csv_path=write_csv(rows, header), schema=schema)
    summary = report.summary_for_coordinator()

    text = json.dumps(summary)
    assert SECRET not in text and "987654" not in text
    assert summary["ok"] is False
    assert {p["kind"] for p in summary["problems"]} == {"out-of-range", "wrong-type",
                                                        "unknown-label"}
    by_kind = {p["kind"]: p for p in summary["problems"]}
    assert by_kind["wrong-type"] == {"kind": "wrong-type", "count": 2,
                                     "columns": ["diagnosis", "mean_texture"]}
    for entry in summary["problems"]:
        assert set(entry) == {"kind", "count", "columns"}
    assert summary["warnings"] == [{"kind": "extra-column", "count": 1}]
    # Row numbers stay at the site too.
    assert "line" not in text and "[2" not in text
    # The site's own messages never hold a cell value either.
    assert SECRET not in " ".join(p.message for p in report.problems)


def test_headerless_file_leaks_no_data_as_column_names(write_csv: WriteCsv,
                                                       bc_table: list[list[str]],
                                                       schema: DataSchema) -> None:
    rows = [list(r) for r in bc_table]
    rows[0][0] = SECRET
    path = write_csv(rows[1:], header=rows[0])  # first data row where the header belongs
    report = check_data(csv_path=path, schema=schema)
    assert [str(p.kind) for p in report.problems] == ["no-header"]
    assert "header" in report.problems[0].message
    assert SECRET not in json.dumps(report.summary_for_coordinator())


@pytest.mark.parametrize(
    ("make", "kind", "words"),
    [
        (lambda d: d / "nope.csv", "file-missing", "does not exist"),
        (lambda d: d, "file-unreadable", "directory"),
        (lambda d: (d / "e.csv", (d / "e.csv").write_bytes(b""))[0], "file-empty", "empty"),
        (lambda d: (d / "b.csv", (d / "b.csv").write_bytes(b"a,b\n1,\xff\n"))[0], "not-utf8",
         "line 2"),
    ],
)
def test_file_level_problems_are_clear(tmp_path: Path, schema: DataSchema,
                                       make: Callable[[Path], Path], kind: str,
                                       words: str) -> None:
    path = make(tmp_path)
    report = check_data(csv_path=path, schema=schema)
    (problem,) = report.problems
    assert str(problem.kind) == kind
    assert words in problem.message
    with pytest.raises(DataCheckError, match=f"- {kind}: "):
        load_site_data(csv_path=path, schema=schema)


_CHECK_UNPRIVILEGED = """
import json, sys
from site_agent.data_check import check_data
from site_agent.data_schema import DataSchema
schema = DataSchema.from_dict(json.loads(sys.argv[2]))
report = check_data(csv_path=__import__("pathlib").Path(sys.argv[1]), schema=schema)
print(json.dumps([[str(p.kind), p.message] for p in report.problems]))
"""


def test_permission_denied_is_unreadable(bc_table: list[list[str]], schema: DataSchema) -> None:
    """A file the agent's user may not read. Root reads any file whatever its mode through
    its capabilities, so as root (CI) the check runs in a child process without them."""
    import subprocess
    import sys

    folder = Path(tempfile.mkdtemp(prefix="fw-perm-"))
    try:
        folder.chmod(0o755)     # traversable by anyone: only the file's own mode refuses
        path = folder / "site.csv"
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([HEADER, *bc_table])
        path.chmod(0)
        if os.geteuid() != 0:
            report = check_data(csv_path=path, schema=schema)
            problems = [[str(p.kind), p.message] for p in report.problems]
        else:
            out = subprocess.run(
                ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
                 sys.executable, "-c", _CHECK_UNPRIVILEGED, str(path), schema.to_json()],
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                cwd=folder, check=True)
            problems = json.loads(out.stdout)
        assert [kind for kind, _ in problems] == ["file-unreadable"]
        assert "permission" in problems[0][1]
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_too_few_rows_single_class_and_extra_column(write_csv: WriteCsv,
                                                    bc_table: list[list[str]],
                                                    schema: DataSchema) -> None:
    few = check_data(csv_path=write_csv(bc_table[:5]), schema=schema)
    assert [str(p.kind) for p in few.problems] == ["too-few-rows"]
    one_class = check_data(csv_path=write_csv(bc_table[:20]), schema=schema)
    assert [str(p.kind) for p in one_class.problems] == ["single-class"]

    extra = check_data(csv_path=write_csv([[*r, "x"] for r in bc_table], [*HEADER, "ward"]),
                       schema=schema)
    assert extra.ok
    assert [str(w.kind) for w in extra.warnings] == ["extra-column"]
    assert "'ward'" in extra.warnings[0].message


def test_ragged_rows_and_blank_lines(write_csv: WriteCsv, bc_table: list[list[str]],
                                     schema: DataSchema) -> None:
    rows: list[list[str]] = [list(r) for r in bc_table]
    rows.insert(3, [])                # a blank line is skipped, not a row
    rows[6] = rows[6][:-2]            # two fields short
    report = check_data(csv_path=write_csv(rows), schema=schema)
    (problem,) = report.problems
    assert problem.kind == ProblemKind.RAGGED_ROW and problem.rows == [8]
    assert report.n_rows == 40


# --------------------------------------------------------------------------- schema


def _schema_doc() -> dict[str, object]:
    return DataSchema.for_task(BC).to_dict()


def test_schema_round_trip_and_hash(tmp_path: Path) -> None:
    schema = DataSchema.for_task(BC)
    path = tmp_path / "schema.json"
    path.write_text(schema.to_json(), encoding="utf-8")
    assert load_schema(path) == schema == DataSchema.load(path)

    doc = _schema_doc()
    doc["columns"] = list(reversed(doc["columns"]))  # type: ignore[call-overload]
    path.write_text(json.dumps(doc), encoding="utf-8")
    reordered = DataSchema.load(path)
    assert reordered.schema_hash == schema.schema_hash
    assert reordered.feature_columns == BREAST_CANCER_COLUMNS

    doc["columns"][0]["max"] = 1000.0  # type: ignore[index]
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert DataSchema.load(path).schema_hash != schema.schema_hash


def test_default_schemas_have_the_declared_limits() -> None:
    bc = DataSchema.for_task(BC)
    radius = bc.columns[0]
    assert (radius.name, radius.type, radius.min, radius.max) == ("mean_radius", "float", 0.0,
                                                                  2 * 28.11)
    assert bc.label_values == (0, 1)
    digits = DataSchema.for_task("digits_cnn")
    assert {(c.type, c.min, c.max) for c in digits.columns} == {("int", 0.0, 16.0)}
    assert digits.label_values == tuple(range(10))
    assert digits.feature_columns == TASKS["digits_cnn"].feature_columns


def test_schema_errors_listed_all_at_once(tmp_path: Path) -> None:
    doc = _schema_doc()
    doc["colour"] = "blue"                                   # unknown key
    doc["task"] = "lung_cancer_mlp"                          # not in the registry
    doc["columns"].append({"name": "mean_radius", "type": "float"})  # type: ignore[attr-defined]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(SchemaError) as err:
        DataSchema.load(path)
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert any("unknown key 'colour'" in p for p in problems)
    assert any("'mean_radius'" in p and "more than once" in p for p in problems)
    assert any("'lung_cancer_mlp' is not in the registry" in p for p in problems)
    assert all(p in str(err.value) for p in problems)


def test_schema_columns_must_match_the_task(tmp_path: Path) -> None:
    doc = _schema_doc()
    cols = doc["columns"]
    assert isinstance(cols, list)
    cols.pop(0)                                               # mean_radius missing
    cols.append({"name": "age", "type": "int", "min": 0})     # not a task column
    cols[0]["type"] = "string"
    cols[1]["min"], cols[1]["max"] = 5, 1
    cols[2]["unit"] = "mm"
    doc["label"] = {"name": "outcome", "values": [0, 1, 2]}
    del doc["version"]
    with pytest.raises(SchemaError) as err:
        DataSchema.from_dict(doc)
    text = str(err.value)
    for needle in ("mean_radius", "'age'", "'type' must be", "'min' is greater", "'unit'",
                   "'diagnosis'", "[2]", "missing required key 'version'"):
        assert needle in text, needle
    assert len(err.value.problems) == 8


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"version": 1, "version": 1}', "appears twice"),
        ('{"version": NaN}', "not allowed"),
        ("[]", "JSON object"),
    ],
)
def test_schema_file_that_is_not_a_schema(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "schema.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SchemaError, match=needle):
        DataSchema.load(path)
    with pytest.raises(SchemaError, match="not found"):
        DataSchema.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- loading


def test_split_is_deterministic_and_stratified(write_csv: WriteCsv,
                                               bc_table: list[list[str]],
                                               schema: DataSchema) -> None:
    path = write_csv(bc_table)
    a = load_site_data(csv_path=path, schema=schema, seed=3)
    b = load_site_data(csv_path=path, schema=schema, seed=3)
    c = load_site_data(csv_path=path, schema=schema, seed=4)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test_x, c.test_x)
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.train_x.dtype == np.float32 and a.train_y.dtype == np.int64
    assert (a.fingerprint.n_train, a.fingerprint.n_test, a.fingerprint.n_rows) == (30, 10, 40)
    # 20 + 20 rows, 10 held out: stratified means exactly 5 of each class.
    assert Counter(a.test_y.tolist()) == {0: 5, 1: 5}
    assert Counter(c.test_y.tolist()) == {0: 5, 1: 5}
    with pytest.raises(ValueError, match="holdout_fraction"):
        load_site_data(csv_path=path, schema=schema, holdout_fraction=1.0)


def test_split_without_stratification_when_a_class_has_one_row(
        write_csv: WriteCsv, bc_table: list[list[str]], schema: DataSchema) -> None:
    rows = bc_table[:1] + bc_table[20:]  # one malignant case
    data = load_site_data(csv_path=write_csv(rows), schema=schema)
    assert data.fingerprint.n_train + data.fingerprint.n_test == 21


def test_feature_order_follows_the_task_not_the_csv(write_csv: WriteCsv,
                                                    bc_table: list[list[str]],
                                                    schema: DataSchema) -> None:
    perm = list(reversed(range(len(HEADER))))  # label first, then features backwards
    shuffled = write_csv([[r[i] for i in perm] for r in bc_table], [HEADER[i] for i in perm])
    plain = load_site_data(csv_path=write_csv(bc_table), schema=schema)
    moved = load_site_data(csv_path=shuffled, schema=schema)
    assert np.array_equal(plain.train_x, moved.train_x)
    assert np.array_equal(plain.test_y, moved.test_y)
    x, y = read_labeled_csv(csv_path=shuffled, task=BC)
    expected = np.asarray([[float(c) for c in r[:-1]] for r in bc_table], dtype=np.float32)
    assert np.array_equal(x, expected)
    assert y.tolist() == [int(r[-1]) for r in bc_table]


def test_fingerprint_changes_with_one_byte(write_csv: WriteCsv, bc_table: list[list[str]],
                                           schema: DataSchema) -> None:
    path = write_csv(bc_table)
    before = load_site_data(csv_path=path, schema=schema).fingerprint
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"1", len(",".join(HEADER)))  # a digit in the first data row
    raw[pos] = ord("2")
    path.write_bytes(bytes(raw))
    after = load_site_data(csv_path=path, schema=schema).fingerprint
    assert after.content_sha256 != before.content_sha256
    assert (after.schema_hash, after.n_rows) == (before.schema_hash, before.n_rows)
    # Hashes and counts only: no label counts (they would reveal the case mix).
    assert set(before.to_dict()) == {"schema_hash", "n_rows", "n_train", "n_test",
                                     "content_sha256", "content_hmac"}


def test_the_fingerprint_that_leaves_is_keyed_per_site(
        write_csv: WriteCsv, bc_table: list[list[str]], schema: DataSchema,
        tmp_path: Path) -> None:
    path = write_csv(bc_table)
    plain = hashlib.sha256(path.read_bytes()).hexdigest()
    # Two sites holding the same file, each with its own key made at first use.
    key_a = ensure_fingerprint_key(tmp_path / "a" / "keys" / FINGERPRINT_KEY_FILE)
    key_b = ensure_fingerprint_key(tmp_path / "b" / "keys" / FINGERPRINT_KEY_FILE)
    a = load_site_data(csv_path=path, schema=schema, fingerprint_key=key_a).fingerprint
    b = load_site_data(csv_path=path, schema=schema, fingerprint_key=key_b).fingerprint
    assert a.content_hmac is not None and b.content_hmac is not None
    assert a.content_hmac != b.content_hmac
    assert plain not in (a.content_hmac, b.content_hmac)
    # The site (or an auditor given the key) recomputes it from the file.
    assert a.content_hmac == hmac.new(key_a, path.read_bytes(), hashlib.sha256).hexdigest()
    assert keyed_fingerprint(key_a, path.read_bytes()) == a.content_hmac
    # The key is made once, private, and kept.
    key_file = tmp_path / "a" / "keys" / FINGERPRINT_KEY_FILE
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert ensure_fingerprint_key(key_file) == key_a
    # Without a key nothing of the file's digest is meant to leave.
    assert load_site_data(csv_path=path, schema=schema).fingerprint.content_hmac is None


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=0.0, max_value=56.0, allow_nan=False, allow_infinity=False))
def test_any_float_written_with_repr_reads_back(value: float) -> None:
    rows = [[repr(value)] + ["0.01"] * 29 + [str(i % 2)] for i in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows([HEADER, *rows])
        x, _ = read_labeled_csv(csv_path=path, task=BC)
    assert x[0, 0] == np.float32(value)


# --------------------------------------------------------------------------- demo data


def test_demo_federation_is_non_iid_and_complete(federation: DemoFederation) -> None:
    sites = federation.sites
    assert [s.name for s in sites] == ["hospital-a", "hospital-b", "hospital-c"]
    sizes = [s.n_rows for s in sites]
    assert len(set(sizes)) == 3 and min(sizes) >= 30
    for site in sites:
        assert set(site.label_counts) == {0, 1} and min(site.label_counts.values()) >= 2
        assert sum(site.label_counts.values()) == site.n_rows
        report = check_data(csv_path=site.csv_path, schema=DataSchema.load(site.schema_path))
        assert report.ok and report.n_rows == site.n_rows
    shares = sorted(s.label_counts[1] / s.n_rows for s in sites)
    assert min(b - a for a, b in itertools.pairwise(shares)) > 0.1  # label mixes differ


def test_demo_pooled_is_union_and_test_is_disjoint(federation: DemoFederation) -> None:
    site_rows = [row for s in federation.sites for row in _read_rows(s.csv_path)]
    pooled = _read_rows(federation.pooled_csv)
    test = _read_rows(federation.test_csv)
    assert Counter(pooled) == Counter(site_rows)
    assert not set(test) & set(site_rows)
    assert len(test) + len(pooled) == 569
    x, y = read_labeled_csv(csv_path=federation.test_csv, task=BC)
    assert x.shape == (len(test), 30) and set(y.tolist()) == {0, 1}
    # Stratified: the test set keeps the data set's class balance (212 / 357).
    assert abs(float(np.mean(y)) - 357 / 569) < 0.01


def test_demo_federation_is_deterministic(tmp_path: Path, federation: DemoFederation) -> None:
    again = write_demo_federation(task=BC, out_dir=tmp_path, n_sites=3, seed=0)
    for a, b in zip(again.sites, federation.sites, strict=True):
        assert a.csv_path.read_bytes() == b.csv_path.read_bytes()
        assert a.label_counts == b.label_counts
    other = write_demo_federation(task=BC, out_dir=tmp_path / "other", n_sites=3, seed=1)
    assert [s.label_counts for s in other.sites] != [s.label_counts for s in federation.sites]


def test_demo_digits_gives_every_site_every_digit(tmp_path: Path) -> None:
    fed = write_demo_federation(task="digits_cnn", out_dir=tmp_path, n_sites=4, seed=2)
    assert len(fed.sites) == 4
    for site in fed.sites:
        assert set(site.label_counts) == set(range(10))
        assert min(site.label_counts.values()) >= 2
        data = load_site_data(csv_path=site.csv_path, schema=DataSchema.load(site.schema_path))
        assert data.train_x.shape[1] == 64


def test_demo_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_sites"):
        write_demo_federation(task=BC, out_dir=tmp_path, n_sites=0)
    with pytest.raises(ValueError, match="30 rows each"):
        write_demo_federation(task=BC, out_dir=tmp_path, n_sites=20)
    with pytest.raises(ValueError, match="no demo data"):
        write_demo_federation(task="nope", out_dir=tmp_path)


def test_byte_order_mark_is_accepted_and_duplicate_header_is_not(
        write_csv: WriteCsv, bc_table: list[list[str]], schema: DataSchema) -> None:
    path = write_csv(bc_table)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as spreadsheet programs save it
    assert check_data(csv_path=path, schema=schema).ok
    dup = write_csv([[*r, r[0]] for r in bc_table], [*HEADER, "mean_radius"])
    report = check_data(csv_path=dup, schema=schema)
    assert _kinds(report.problems) == {("duplicate-column", "mean_radius")}
