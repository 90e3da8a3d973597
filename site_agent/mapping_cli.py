"""``fedward-site mapping``: write, check and show the hospital's mapping to a study.

Every command reads the data where the site reads it (its configured connector, with
``--dir``) or from a file given with ``--data`` (CSV, or Parquet by its suffix); nothing is
sent anywhere. What they print stays on this screen: ``check`` names rows and unmapped
category codes, ``show`` counts and ranges per feature.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from site_agent.cli_common import fail

if TYPE_CHECKING:
    from fedward.study import StudySpec
    from site_agent.connectors import Connector
    from site_agent.mapping import Binding

__all__ = ["mapping_app", "site_binding", "template_text"]

mapping_app = typer.Typer(help="The mapping of this site's table to a study: write a "
                               "template, check it, show what would be trained on.",
                          no_args_is_help=True, add_completion=False)
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

DirOpt = Annotated[Path | None, typer.Option("--dir", help="the site's data directory (its "
                                             "site.json names the data, study and mapping)")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="a data file instead of the site's connector (CSV; Parquet by its "
                   ".parquet suffix)")]
StudyOpt = Annotated[str | None, typer.Option(
    "--study", help="the study spec: a file, or the name of an example study")]
MappingOpt = Annotated[Path | None, typer.Option("--mapping", help="the mapping file")]


def _file_connector(data: Path) -> Connector:
    from site_agent.connectors import open_connector

    kind = "parquet" if data.suffix.lower() in (".parquet", ".pq") else "csv"
    return open_connector({"connector": kind, "path": str(data.expanduser().resolve())},
                          root=Path.cwd())


def _sources(dir: Path | None, data: Path | None, study: str | None, mapping: Path | None,
             *, need_mapping: bool) -> tuple[StudySpec, Connector, Path | None]:
    """The study, the connector and the mapping file the options name (else site.json's)."""
    from fedward.study import StudyError
    from site_agent.config import ConfigError, SiteConfig
    from site_agent.connectors import ConnectorError
    from site_agent.mapping import resolve_study

    root = dir.expanduser().resolve() if dir is not None else None
    cfg: SiteConfig | None = None
    if root is not None:
        try:
            cfg = SiteConfig.load(root)
        except ConfigError as err:
            fail(str(err))
    study_ref = study or (cfg.study if cfg is not None else None)
    if study_ref is None:
        fail("name the study with --study (a file or an example study), or give --dir of "
              "a site whose site.json names one")
    mapping_path = mapping
    if mapping_path is None and cfg is not None and cfg.mapping is not None and root:
        mapping_path = cfg.resolve(root, cfg.mapping)
    if need_mapping and mapping_path is None:
        fail("name the mapping with --mapping, or give --dir of a site whose site.json "
              "names one")
    try:
        spec = resolve_study(study_ref, root=root)
        if data is not None:
            connector = _file_connector(data)
        elif cfg is not None and root is not None:
            connector = cfg.connector(root)
        else:
            fail("name the data with --data FILE, or give --dir of a configured site")
    except (StudyError, ConnectorError) as err:
        fail(str(err))
    return spec, connector, mapping_path


def site_binding(spec: StudySpec, mapping_path: Path) -> Binding:
    """The study with the mapping read from ``mapping_path``, or exit naming every
    problem of the file."""
    from site_agent.mapping import Binding, MappingError, load_mapping

    try:
        return Binding(study=spec, mapping=load_mapping(mapping_path))
    except MappingError as err:
        fail(str(err), 3)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def template_text(spec: StudySpec, header: list[str], rows: list[list[object]]) -> str:
    """A mapping template: columns and codes guessed where the names agree, ``""`` where
    hospital IT must fill in (``mapping check`` names each one)."""
    import yaml

    from fedward.study import BooleanFeature, CategoricalFeature, NumericFeature
    from site_agent.mapping import BOOLEAN_CODES, code_of

    by_norm = {_norm(h): h for h in reversed(header)}

    def distinct(column: str) -> list[str]:
        if column not in header:
            return []
        i = header.index(column)
        codes = {code_of(r[i]) for r in rows if i < len(r)}
        return sorted(c for c in codes if c)[:50]

    def guess(code: str, levels: list[str]) -> str:
        return next((lv for lv in levels if _norm(lv) == _norm(code)), "")

    features: list[dict[str, Any]] = []
    notes: list[str] = []
    for f in spec.features:
        column = by_norm.get(_norm(f.name), "")
        entry: dict[str, Any] = {"feature": f.name, "column": column}
        if isinstance(f, NumericFeature):
            if f.unit is not None:
                entry["unit"] = f.unit
            notes.append(f"{f.name}: numeric, {f.unit or 'no unit'}, plausible "
                         f"{f.range[0]:g} to {f.range[1]:g}")
        elif isinstance(f, BooleanFeature):
            entry["codes"] = {c: BOOLEAN_CODES.get(c.lower(), "") for c in distinct(column)}
            notes.append(f"{f.name}: boolean (true, false)")
        else:
            levels = list(f.levels)
            entry["codes"] = {c: guess(c, levels) for c in distinct(column)}
            kind = "categorical" if isinstance(f, CategoricalFeature) else "ordinal"
            notes.append(f"{f.name}: {kind}, levels {', '.join(levels)}")
        features.append(entry)
    label_col = by_norm.get(_norm(spec.label.name), "")
    classes = list(spec.label.classes)
    doc = {"mapping_version": 1, "study": spec.name, "study_hash": spec.content_hash(),
           "features": features,
           "label": {"column": label_col,
                     "codes": {c: guess(c, classes) for c in distinct(label_col)}}}
    head = [f"# Mapping of this site's table to study {spec.name!r}.",
            "# Fill in every empty column or code below (local code -> the study's level),",
            "# add local markers of a missing value under missing_codes, set 'unit' to the",
            "# unit your column is in, then run `fedward-site mapping check`.",
            "# The study's features:",
            *(f"#   {n}" for n in notes),
            f"#   label {spec.label.name}: classes {', '.join(classes)}", ""]
    body: str = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return "\n".join(head) + body


@mapping_app.command("template")
def template(
    out: Annotated[Path, typer.Option("--out", help="where to write the template")],
    study: StudyOpt = None, data: DataOpt = None, dir: DirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
) -> None:
    """Write a mapping template from the study and the data's header and codes."""
    from fedward.files import atomic_write
    from site_agent.data_table import TableReadError

    spec, connector, _ = _sources(dir, data, study, None, need_mapping=False)
    if out.exists() and not force:
        fail(f"{out} exists; edit it, or replace it with --force")
    try:
        table = connector.read()
        rows = [list(cells) for _n, cells in table.rows]
    except TableReadError as err:
        fail(err.problem.message)
    text = template_text(spec, table.header, rows)
    atomic_write(out, text, mode=0o600)
    blanks = text.count("''")
    _out.print(f"mapping template for study {spec.name} written to {escape(str(out))}: "
               f"{blanks} blank(s) to fill in; then run `fedward-site mapping check`")


@mapping_app.command("check")
def check(
    study: StudyOpt = None, mapping: MappingOpt = None, data: DataOpt = None,
    dir: DirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Check the mapping against the study and the data: every problem at once, with row
    numbers and counts. Exit 3 if there is any."""
    from site_agent.mapping_apply import check_mapping

    spec, connector, mapping_path = _sources(dir, data, study, mapping, need_mapping=True)
    assert mapping_path is not None
    report = check_mapping(site_binding(spec, mapping_path), connector).report
    if as_json:
        print(json.dumps({"ok": report.ok, "rows": report.n_rows,
                          "problems": [{"kind": str(p.kind), "feature": p.column,
                                        "count": p.count, "rows": p.rows,
                                        "message": p.message} for p in report.problems],
                          "warnings": [{"kind": str(w.kind), "feature": w.column,
                                        "count": w.count, "message": w.message}
                                       for w in report.warnings],
                          "for_coordinator": report.summary_for_coordinator()}))
    else:
        for w in report.warnings:
            _out.print(f"[yellow]warning[/] {w.kind}: {escape(w.message)}")
        if report.ok:
            _out.print(f"[green]mapping OK[/]: {report.n_rows} rows of "
                       f"{escape(connector.describe())} map to study {spec.name}")
        else:
            _err.print(f"[bold red]{len(report.problems)} problem(s)[/] mapping "
                       f"{escape(connector.describe())} to study {spec.name}:")
            for p in report.problems:
                _err.print(f"  - {p.kind}: {escape(p.message)}")
    if not report.ok:
        raise typer.Exit(3)


@mapping_app.command("show")
def show(
    study: StudyOpt = None, mapping: MappingOpt = None, data: DataOpt = None,
    dir: DirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Show what would be trained on: per feature, counts and levels after the mapping."""
    from site_agent.mapping_apply import check_mapping, summarise

    spec, connector, mapping_path = _sources(dir, data, study, mapping, need_mapping=True)
    assert mapping_path is not None
    mapped = check_mapping(site_binding(spec, mapping_path), connector)
    summary = summarise(spec, mapped)
    summary["problems"] = len(mapped.report.problems)
    if as_json:
        print(json.dumps(summary))
        return
    _out.print(f"study {spec.name}: {summary['rows_read']} rows read from "
               f"{escape(connector.describe())}")
    for f in summary["features"]:
        if not f["mapped"]:
            _out.print(f"  {f['feature']}: not mapped")
            continue
        if "levels" in f:
            what = ", ".join(f"{k} {v}" for k, v in f["levels"].items())
        else:
            unit = f" {f['unit']}" if f["unit"] else ""
            what = f"min {f['min']}, mean {f['mean']}, max {f['max']}{unit}"
        _out.print(f"  {f['feature']} ({f['type']}): {what}; missing {f['missing']} "
                   f"({f['missing_rule']})")
    label = summary["label"]
    _out.print(f"  label {label['name']}: " + ", ".join(
        f"{k} {v}" for k, v in label["classes"].items()) + f"; unusable {label['unusable']}")
    trained = summary["trained_on"]
    if trained.get("rows") is None:
        _out.print(f"trained on: nothing yet ({escape(str(trained.get('why')))})")
    else:
        _out.print(f"trained on: {trained['rows']} rows ({trained['dropped']} dropped by the "
                   f"study's missing-value rules or an unusable label), "
                   f"{trained['input_columns']} model inputs")
    if summary["problems"]:
        _out.print(f"[bold red]{summary['problems']} problem(s)[/]: run `fedward-site mapping "
                   "check` to see them")
        raise typer.Exit(3)
