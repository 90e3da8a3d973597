"""Offline demo data: a small federation of hospitals cut from scikit-learn's data sets.

Nothing is downloaded: ``load_breast_cancer`` and ``load_digits`` ship with scikit-learn.
The split is deliberately non-IID, as real hospitals are: each site gets its own mix of
classes (a Dirichlet draw per class) and its own size, yet every site still has at least
two cases of every class and enough rows for differentially private training to mean
something.

:func:`read_labeled_csv` is for the coordinator's side of a demo (the global test set and
the pooled baseline). It uses the connector's own parser, so the demo files are read
exactly as a site reads them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

from fedward.tasks import TASKS
from site_agent.data_check import read_checked
from site_agent.data_schema import DataSchema

__all__ = [
    "DemoFederation",
    "DemoSite",
    "read_labeled_csv",
    "write_demo_federation",
]


_MIN_PER_CLASS = 2
_MIN_ROWS_PER_SITE = 30
_SITE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class DemoSite:
    """One demo hospital's files.

    Attributes:
        name: The site's name, ``hospital-a``, ``hospital-b``, ...
        csv_path: Its data file.
        schema_path: Its schema file (the task's default schema).
        n_rows: Rows in its data file.
        label_counts: Rows per class (demo bookkeeping; a real site never shares this).
    """

    name: str
    csv_path: Path
    schema_path: Path
    n_rows: int
    label_counts: dict[int, int]


@dataclass(frozen=True)
class DemoFederation:
    """What :func:`write_demo_federation` wrote.

    Attributes:
        task: The registry task the data is for.
        sites: The sites, in order.
        test_csv: The global held-out test set (no site has any of its rows).
        pooled_csv: Every site's rows together, for the centralised baseline.
    """

    task: str
    sites: list[DemoSite]
    test_csv: Path
    pooled_csv: Path


def _load_task_data(task: str) -> tuple[np.ndarray, np.ndarray]:
    """The full scikit-learn data set of a task, features in the task's column order."""
    if task == "breast_cancer_mlp":
        bunch = load_breast_cancer()
        names = tuple(str(n).replace(" ", "_") for n in bunch.feature_names)
    elif task == "digits_cnn":
        bunch = load_digits()
        # scikit-learn names pixels "pixel_<row>_<col>", flattened row by row.
        names = tuple(f"pixel_{i}" for i in range(bunch.data.shape[1]))
    else:
        raise ValueError(f"no demo data for task {task!r}; demo tasks: breast_cancer_mlp, "
                         f"digits_cnn")
    if names != TASKS[task].feature_columns:
        raise RuntimeError(f"scikit-learn's {task} columns do not match the task registry")
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _split_non_iid(
    y: np.ndarray,
    *,
    n_sites: int,
    alpha: float,
    min_rows: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split positions 0..len(y)-1 across sites, non-IID, with per-site guarantees.

    Every site first gets ``_MIN_PER_CLASS`` rows of every class; the rest of each class
    is shared by a Dirichlet(alpha) draw. Sites below ``min_rows`` then take rows from the
    largest site, never leaving it under the per-class minimum.
    """
    classes = np.unique(y)
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        reserved = _MIN_PER_CLASS * n_sites
        if len(members) < reserved:
            raise ValueError(f"class {c} has {len(members)} training rows; {n_sites} sites "
                             f"need {reserved}")
        for s in range(n_sites):
            sites[s].extend(members[_MIN_PER_CLASS * s:_MIN_PER_CLASS * (s + 1)].tolist())
        rest = members[reserved:]
        counts = rng.multinomial(len(rest), rng.dirichlet(np.full(n_sites, alpha)))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for s in range(n_sites):
            sites[s].extend(rest[bounds[s]:bounds[s + 1]].tolist())

    while True:
        sizes = [len(s) for s in sites]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_rows:
            break
        donor = int(np.argmax(sizes))
        donor_labels = y[sites[donor]]
        values, counts = np.unique(donor_labels, return_counts=True)
        give = values[int(np.argmax(counts))]  # the donor's most common class
        pos = max(i for i, row in enumerate(sites[donor]) if y[row] == give)
        sites[small].append(sites[donor].pop(pos))
    return [rng.permutation(np.asarray(s, dtype=np.int64)) for s in sites]


def _write_csv(path: Path, *, schema: DataSchema, x: np.ndarray, y: np.ndarray) -> None:
    """Write rows as the connector expects them: task columns, then the label."""
    is_int = [c.type == "int" for c in schema.columns]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*schema.feature_columns, schema.label_name])
        for row, label in zip(x, y, strict=True):
            # repr keeps every digit of a float, so the file round-trips exactly.
            cells = [str(int(v)) if as_int else repr(float(v))
                     for v, as_int in zip(row, is_int, strict=True)]
            writer.writerow([*cells, str(int(label))])


def _site_names(n_sites: int) -> Sequence[str]:
    return [f"hospital-{_SITE_LETTERS[i]}" for i in range(n_sites)]


def write_demo_federation(
    *,
    task: str,
    out_dir: Path,
    n_sites: int = 3,
    seed: int = 0,
    test_fraction: float = 0.2,
    alpha: float = 0.5,
) -> DemoFederation:
    """Write a demo federation: one folder per site, a global test set and a pooled file.

    Layout: ``out_dir/site-1/data.csv`` and ``out_dir/site-1/schema.json`` (and so on for
    every site), ``out_dir/global_test.csv``, ``out_dir/pooled_train.csv``. Existing files
    of the same names are overwritten. The result depends only on the arguments.

    Args:
        task: ``breast_cancer_mlp`` or ``digits_cnn``.
        out_dir: Folder to write into (created if needed).
        n_sites: Number of sites, 1 to 26.
        seed: Seed of the test split and the site split.
        test_fraction: Share of all rows held out as the global test set (stratified).
        alpha: Dirichlet concentration; smaller means more skewed label mixes.

    Returns:
        The paths written and each site's size and label counts.

    Raises:
        ValueError: If the arguments are out of range, or the data cannot give every site
            its guaranteed minimum.
    """
    if not 1 <= n_sites <= len(_SITE_LETTERS):
        raise ValueError(f"n_sites must be between 1 and {len(_SITE_LETTERS)}, got {n_sites}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    x, y = _load_task_data(task)
    schema = DataSchema.for_task(task)
    train_pos, test_pos = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    train_pos = np.sort(train_pos)
    test_pos = np.sort(test_pos)
    n_classes = len(np.unique(y))
    min_rows = max(_MIN_ROWS_PER_SITE, _MIN_PER_CLASS * n_classes)
    if n_sites * min_rows > len(train_pos):
        raise ValueError(f"{len(train_pos)} training rows cannot give {n_sites} sites "
                         f"{min_rows} rows each; use fewer sites or a smaller test_fraction")
    rng = np.random.default_rng(seed)
    parts = _split_non_iid(y[train_pos], n_sites=n_sites, alpha=alpha, min_rows=min_rows,
                           rng=rng)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites: list[DemoSite] = []
    for i, (name, part) in enumerate(zip(_site_names(n_sites), parts, strict=True), start=1):
        site_dir = out_dir / f"site-{i}"
        site_dir.mkdir(exist_ok=True)
        rows = train_pos[part]
        csv_path = site_dir / "data.csv"
        schema_path = site_dir / "schema.json"
        _write_csv(csv_path, schema=schema, x=x[rows], y=y[rows])
        schema_path.write_text(schema.to_json(), encoding="utf-8")
        labels, counts = np.unique(y[rows], return_counts=True)
        sites.append(DemoSite(
            name=name, csv_path=csv_path, schema_path=schema_path, n_rows=len(rows),
            label_counts={int(c): int(n) for c, n in zip(labels, counts, strict=True)},
        ))
    pooled_rows = np.concatenate([train_pos[p] for p in parts])
    test_csv = out_dir / "global_test.csv"
    pooled_csv = out_dir / "pooled_train.csv"
    _write_csv(test_csv, schema=schema, x=x[test_pos], y=y[test_pos])
    _write_csv(pooled_csv, schema=schema, x=x[pooled_rows], y=y[pooled_rows])
    return DemoFederation(task=task, sites=sites, test_csv=test_csv, pooled_csv=pooled_csv)


def read_labeled_csv(*, csv_path: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a labelled CSV of a task with the connector's parser and checks.

    For the coordinator's side of a demo: the global test set and the pooled baseline.

    Args:
        csv_path: A file with the task's feature columns (any order) and its label column.
        task: The registry task.

    Returns:
        ``(x, y)``: float32 features in the task's column order and int64 labels.

    Raises:
        SchemaError: If the task is not in the registry.
        DataCheckError: If the file fails the connector's checks.
    """
    scan = read_checked(csv_path, DataSchema.for_task(task))
    return scan.x, scan.y
