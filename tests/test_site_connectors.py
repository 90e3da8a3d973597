"""Data connectors (site_agent.connectors): CSV parity with the original path, Parquet,
read-only SQL on SQLite and on a real PostgreSQL server, passwords never shown, plugins."""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fedward.tasks import BREAST_CANCER_COLUMNS
from site_agent.cli import app
from site_agent.config import ConfigError, SiteConfig
from site_agent.connectors import (
    ConnectorError,
    connector_class,
    known_connectors,
    open_connector,
)
from site_agent.connectors.sql import SqlConnector, reading_statement_problem
from site_agent.data import load_site_data
from site_agent.data_check import check_data
from site_agent.data_report import DataCheckError, ProblemKind
from site_agent.data_schema import DataSchema

from pg import postgres_server

BC = "breast_cancer_mlp"
HEADER = [*BREAST_CANCER_COLUMNS, "diagnosis"]
PASSWORD = "Pw-never-SHOWN-4711"


@pytest.fixture(scope="module")
def rows() -> list[list[float]]:
    """40 real breast-cancer rows (20 per class): features then the class."""
    data = load_breast_cancer()
    out: list[list[float]] = []
    for cls in (0, 1):
        for i in np.flatnonzero(data.target == cls)[:20]:
            out.append([float(v) for v in data.data[i]] + [float(cls)])
    return out


@pytest.fixture(scope="module")
def schema() -> DataSchema:
    return DataSchema.for_task(BC)


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for r in rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in r[:-1]] + [int(r[-1]) if isinstance(r[-1], float)
                                                  else r[-1]])
    return path


def _write_parquet(path: Path, rows: list[list[object]], label_type: pa.DataType) -> Path:
    cols = {name: [r[i] for r in rows] for i, name in enumerate(HEADER)}
    cols["diagnosis"] = [None if v is None else int(v) for v in cols["diagnosis"]]
    table = pa.table({k: pa.array(v, type=label_type if k == "diagnosis" else None)
                      for k, v in cols.items()})
    pq.write_table(table, path)
    return path


def _write_sqlite(path: Path, rows: list[list[object]]) -> Path:
    con = sqlite3.connect(path)
    cols = ", ".join(f'"{c}" REAL' for c in BREAST_CANCER_COLUMNS)
    con.execute(f'CREATE TABLE patients ({cols}, "diagnosis" INTEGER)')
    marks = ", ".join("?" for _ in HEADER)
    con.executemany(f"INSERT INTO patients VALUES ({marks})", rows)  # noqa: S608 (fixed names)
    con.commit()
    con.close()
    return path


# -- CSV: the original path, unchanged -------------------------------------------------------


def test_csv_connector_gives_what_the_csv_path_gave(tmp_path: Path, rows: list[list[float]],
                                                     schema: DataSchema) -> None:
    clean = _write_csv(tmp_path / "clean.csv", rows)
    bad_rows = [list(r) for r in rows]
    bad_rows[2][0] = -5.0                      # out of range
    bad_rows[4][3] = None                      # missing
    bad_rows[6][-1] = 7.0                      # unknown class
    bad = _write_csv(tmp_path / "bad.csv", bad_rows)
    for path in (clean, bad, tmp_path / "absent.csv"):
        conn = open_connector({"connector": "csv", "path": path.name}, root=tmp_path)
        assert conn.check(schema) == check_data(csv_path=path, schema=schema)
        # The generic table path (what every other connector uses) agrees too.
        from site_agent.connectors.base import Connector

        assert Connector.check(conn, schema) == check_data(csv_path=path, schema=schema)
    a = open_connector({"connector": "csv", "path": str(clean)}, root=tmp_path).load(
        schema, fingerprint_key=b"k" * 32)
    b = load_site_data(csv_path=clean, schema=schema, fingerprint_key=b"k" * 32)
    assert a.fingerprint == b.fingerprint and a.fingerprint.connector == "csv"
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


# -- Parquet ---------------------------------------------------------------------------------


def test_parquet_loads_the_same_arrays_and_reports_typed_problems(
        tmp_path: Path, rows: list[list[float]], schema: DataSchema) -> None:
    csv_data = load_site_data(csv_path=_write_csv(tmp_path / "d.csv", rows), schema=schema)
    path = _write_parquet(tmp_path / "d.parquet", rows, pa.int64())
    conn = open_connector({"connector": "parquet", "path": "d.parquet"}, root=tmp_path)
    data = conn.load(schema, fingerprint_key=b"k" * 32)
    assert np.array_equal(data.train_x, csv_data.train_x)
    assert np.array_equal(data.test_y, csv_data.test_y)
    assert data.fingerprint.connector == "parquet"
    assert data.fingerprint.content_hmac is not None
    assert data.fingerprint.content_sha256 != csv_data.fingerprint.content_sha256

    bad = [list(r) for r in rows]
    bad[0][1] = None            # a null: missing value, row 1
    bad[9][1] = float("nan")    # NaN: missing too, row 10
    bad[3][2] = float("inf")    # row 4
    bad[5][-1] = 3.0            # not a class, row 6
    _write_parquet(path, bad, pa.int64())
    report = conn.check(schema)
    found = {(p.kind, p.column): (p.count, p.rows) for p in report.problems}
    assert found[(ProblemKind.MISSING_VALUE, BREAST_CANCER_COLUMNS[1])] == (2, [1, 10])
    assert found[(ProblemKind.NON_FINITE, BREAST_CANCER_COLUMNS[2])] == (1, [4])
    assert found[(ProblemKind.UNKNOWN_LABEL, "diagnosis")] == (1, [6])
    assert "(row 1, 10)" in " ".join(p.message for p in report.problems)
    with pytest.raises(DataCheckError):
        conn.load(schema)

    # Text in a number column is a wrong type, not a crash.
    table = pq.read_table(path).set_column(0, HEADER[0], pa.array(["x"] * len(rows)))
    pq.write_table(table, path)
    kinds = {p.kind for p in conn.check(schema).problems}
    assert ProblemKind.WRONG_TYPE in kinds

    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    assert [p.kind for p in conn.check(schema).problems] == [ProblemKind.FILE_UNREADABLE]
    (tmp_path / "d.parquet").unlink()
    assert [p.kind for p in conn.check(schema).problems] == [ProblemKind.FILE_MISSING]


# -- SQL ---------------------------------------------------------------------------------------


def test_sql_options_refuse_writes_and_unknown_backends_all_at_once(tmp_path: Path) -> None:
    for query in ("DELETE FROM patients", "SELECT 1; DROP TABLE patients",
                  "-- a comment\nUPDATE patients SET diagnosis = 1", "   "):
        assert reading_statement_problem(query) is not None, query
    for query in ("SELECT * FROM patients", "with x as (select 1) select * from x",
                  "/* c */ SELECT ';' AS semi;"):
        assert reading_statement_problem(query) is None, query
    with pytest.raises(ConnectorError) as err:
        open_connector({"connector": "sql", "url": f"mysql://u:{PASSWORD}@h/db",
                        "query": "DELETE FROM patients", "colour": "red"}, root=tmp_path)
    text_ = str(err.value)
    assert len(err.value.problems) == 3
    assert "mysql" in text_ and "only reads" in text_ and "colour" in text_
    assert PASSWORD not in text_


def test_sqlite_is_read_only_and_loads_the_same_arrays(
        tmp_path: Path, rows: list[list[float]], schema: DataSchema) -> None:
    csv_data = load_site_data(csv_path=_write_csv(tmp_path / "d.csv", rows), schema=schema)
    db = _write_sqlite(tmp_path / "ehr.sqlite", rows)
    conn = open_connector({"connector": "sql", "url": "sqlite:///ehr.sqlite",
                           "query": "SELECT * FROM patients"}, root=tmp_path)
    data = conn.load(schema)
    assert np.array_equal(data.train_x, csv_data.train_x)
    assert data.fingerprint.connector == "sql"
    assert isinstance(conn, SqlConnector)
    with conn.engine().connect() as connection, pytest.raises(Exception,
                                                              match=r"readonly|read-only"):
        connection.exec_driver_sql("DELETE FROM patients")
    assert sqlite3.connect(db).execute("SELECT count(*) FROM patients").fetchone() == (40,)
    missing = open_connector({"connector": "sql", "url": "sqlite:///nope.sqlite",
                              "query": "SELECT 1"}, root=tmp_path)
    assert [p.kind for p in missing.check(schema).problems] == [ProblemKind.SOURCE_UNREACHABLE]
    assert not (tmp_path / "nope.sqlite").exists()   # mode=ro never creates a file
    broken = open_connector({"connector": "sql", "url": "sqlite:///ehr.sqlite",
                             "query": "SELECT * FROM no_such_table"}, root=tmp_path)
    assert [p.kind for p in broken.check(schema).problems] == [ProblemKind.QUERY_REFUSED]


@pytest.fixture(scope="module")
def pg_url(rows: list[list[float]]) -> Iterator[str]:
    with postgres_server() as url:
        engine = create_engine(url)
        cols = ", ".join(f'"{c}" double precision' for c in BREAST_CANCER_COLUMNS)
        with engine.begin() as c:
            c.execute(text(f'CREATE TABLE patients ({cols}, "diagnosis" integer)'))
            names = ", ".join(f'"{h}"' for h in HEADER)
            marks = ", ".join(f":p{i}" for i in range(len(HEADER)))
            c.execute(text(f"INSERT INTO patients ({names}) VALUES ({marks})"),  # noqa: S608
                      [{f"p{i}": v for i, v in enumerate(r)} for r in rows])
        engine.dispose()
        yield url


def _with_password(url: str) -> str:
    return url.replace("fedward@", f"fedward:{PASSWORD}@")


@pytest.mark.postgres
def test_postgresql_reads_through_a_read_only_transaction(
        pg_url: str, tmp_path: Path, rows: list[list[float]], schema: DataSchema,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    csv_data = load_site_data(csv_path=_write_csv(tmp_path / "d.csv", rows), schema=schema)
    conn = open_connector({"connector": "sql", "url": _with_password(pg_url),
                           # A literal % reaches the server as written (psycopg2
                           # formats statements: the connector escapes it).
                           "query": "SELECT * FROM patients WHERE 'a%' LIKE 'a%' "
                                    "ORDER BY diagnosis"},
                          root=tmp_path)
    data = conn.load(schema, fingerprint_key=b"k" * 32)
    assert data.fingerprint.connector == "sql"
    assert sorted(map(tuple, np.vstack([data.train_x, data.test_x]).tolist())) == sorted(
        map(tuple, np.vstack([csv_data.train_x, csv_data.test_x]).tolist()))
    # A statement that passes the lexical check but writes: the server refuses it.
    sneaky = open_connector({"connector": "sql", "url": _with_password(pg_url),
                             "query": "WITH gone AS (DELETE FROM patients RETURNING 1) "
                                      "SELECT count(*) AS n FROM gone"}, root=tmp_path)
    report = sneaky.check(schema)
    assert [p.kind for p in report.problems] == [ProblemKind.QUERY_REFUSED]
    assert "writes" in report.problems[0].message
    with conn.engine().connect() as connection:  # the session itself is read-only
        assert connection.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        with pytest.raises(Exception, match="read-only transaction"):
            connection.exec_driver_sql("INSERT INTO patients (diagnosis) VALUES (1)")
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM patients")).scalar() == 40
    engine.dispose()
    # The password appears nowhere: not in what the connector says, its options, its
    # reports (also of a failed connection), nor the logs (SQLAlchemy's included).
    unreachable = open_connector({"connector": "sql",
                                  "url": _with_password(pg_url).replace("/postgres",
                                                                        "/no_such_db"),
                                  "query": "SELECT 1"}, root=tmp_path)
    failed = unreachable.check(schema)
    assert [p.kind for p in failed.problems] == [ProblemKind.SOURCE_UNREACHABLE]
    shown = [conn.describe(), repr(conn), str(conn.options), repr(conn.options),
             conn.options.model_dump_json(), json.dumps(failed.summary_for_coordinator()),
             *(p.message for p in [*failed.problems, *report.problems]), caplog.text]
    assert "no_such_db" in failed.problems[0].message and "***" in conn.describe()
    assert not [s for s in shown if PASSWORD in s]


@pytest.mark.postgres
def test_postgresql_password_from_a_file(pg_url: str, tmp_path: Path, schema: DataSchema
                                         ) -> None:
    (tmp_path / "db.password").write_text(PASSWORD + "\n")
    conn = open_connector({"connector": "sql", "url": pg_url, "password_file": "db.password",
                           "query": "SELECT * FROM patients"}, root=tmp_path)
    assert conn.check(schema).ok
    assert PASSWORD not in conn.describe() + repr(conn)
    assert conn._url().password == PASSWORD   # it is used, not shown


@pytest.mark.postgres
def test_postgresql_rows_of_a_drift_check_are_the_csv_rows(
        pg_url: str, tmp_path: Path, rows: list[list[float]], schema: DataSchema,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The drift check's recent rows (site_agent.drift_rows) from this server, the password
    # from the agent's environment (password_env): the arrays the same rows in CSV give.
    from site_agent.drift_rows import read_recent, recent_data

    monkeypatch.setenv("FEDWARD_TEST_PG_PASSWORD", PASSWORD)
    block = {"connector": "sql", "url": pg_url, "password_env": "FEDWARD_TEST_PG_PASSWORD",
             "query": "SELECT * FROM patients"}
    recent = recent_data(block, root=tmp_path, schema=schema)
    assert recent.kind == "sql" and recent.connectors[0]._url().password == PASSWORD
    x, y = read_recent(recent)
    csv_x, csv_y = read_recent(recent_data(_write_csv(tmp_path / "d.csv", rows),
                                           root=tmp_path, schema=schema))
    assert y is not None and csv_y is not None
    assert sorted(zip(map(tuple, x.tolist()), y.tolist(), strict=True)) == sorted(
        zip(map(tuple, csv_x.tolist()), csv_y.tolist(), strict=True))
    assert PASSWORD not in recent.connectors[0].describe()


# -- the registry and the site's configuration -------------------------------------------------


def test_a_connector_plugin_is_one_module_and_one_entry_point(
        tmp_path: Path, rows: list[list[float]], schema: DataSchema,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site-packages"
    pkg.mkdir()
    (pkg / "jsonl_connector.py").write_text(
        "from site_agent.connectors import Connector\n"
        "from site_agent.connectors.files import FileOptions\n"
        "from site_agent.data import Table\n"
        "import json\n"
        "class JsonLines(Connector):\n"
        "    kind = 'jsonl'\n"
        "    Options = FileOptions\n"
        "    def describe(self):\n"
        "        return f'json lines {self.options.path}'\n"
        "    def read(self):\n"
        "        raw = self.resolve(self.options.path).read_bytes()\n"
        "        recs = [json.loads(line) for line in raw.splitlines()]\n"
        "        header = list(recs[0])\n"
        "        return Table(source=self.describe(), header=header, content=raw,\n"
        "                     rows=((i + 1, [r[h] for h in header]) for i, r in "
        "enumerate(recs)))\n")
    info = pkg / "jsonl_connector-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jsonl-connector\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedward.connectors]\njsonl = jsonl_connector:JsonLines\n")
    with pytest.raises(ConnectorError, match="no data connector named 'jsonl'"):
        connector_class("jsonl")
    monkeypatch.syspath_prepend(str(pkg))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(dict(zip(HEADER, r, strict=True)))
                                                for r in rows))
    assert "jsonl" in known_connectors()
    conn = open_connector({"connector": "jsonl", "path": "d.jsonl"}, root=tmp_path)
    data = conn.load(schema)
    assert data.fingerprint.connector == "jsonl" and len(data.train_y) == 30
    (info / "entry_points.txt").write_text("[fedward.connectors]\ncsv = jsonl_connector:X\n")
    with pytest.raises(ConnectorError, match="takes the built-in name 'csv'"):
        connector_class("jsonl")
    sys.modules.pop("jsonl_connector", None)


def _site_json(root: Path, **over: object) -> Path:
    raw: dict[str, object] = {"name": "site-a", "superlink": "127.0.0.1:9092",
                              "ca_cert": "ca.pem", "data_path": "d.csv",
                              "schema_path": "schema.json"}
    raw.update(over)
    (root / "site.json").write_text(json.dumps({k: v for k, v in raw.items()
                                                if v is not None}))
    return root


def test_site_config_names_a_connector_and_check_uses_it(
        tmp_path: Path, rows: list[list[float]], schema: DataSchema) -> None:
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_dict({"name": "site-a", "superlink": "h:1", "ca_cert": "c",
                              "data_path": "d.csv", "data": {"connector": "csv", "path": "x"},
                              "study": "breast_cancer_mlp"})
    assert "not both" in str(err.value) and "go together" in str(err.value)
    (tmp_path / "schema.json").write_text(schema.to_json())
    _write_parquet(tmp_path / "d.parquet", [list(r) for r in rows], pa.int64())
    _site_json(tmp_path, data_path=None, data={"connector": "parquet", "path": "d.parquet"})
    cfg = SiteConfig.load(tmp_path)
    assert cfg.connector(tmp_path).kind == "parquet"
    cfg.save(tmp_path)   # round trip keeps the block
    assert SiteConfig.load(tmp_path).data == {"connector": "parquet", "path": "d.parquet"}
    runner = CliRunner()
    result = runner.invoke(app, ["check", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "40 rows match the schema" in result.output
    bad = [list(r) for r in rows]
    bad[0][0] = None
    _write_parquet(tmp_path / "d.parquet", bad, pa.int64())
    result = runner.invoke(app, ["check", "--dir", str(tmp_path)])
    assert result.exit_code == 3 and "row 1" in result.output
    # The original site.json (data_path, no data block) still reads CSV.
    _write_csv(tmp_path / "d.csv", rows)
    _site_json(tmp_path)
    assert SiteConfig.load(tmp_path).connector(tmp_path).kind == "csv"
    assert runner.invoke(app, ["check", "--dir", str(tmp_path)]).exit_code == 0
