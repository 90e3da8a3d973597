"""A site's checked data, loaded and split, and its fingerprint.

CSV files keep their own path (:func:`site_agent.data_check.check_data`,
:func:`load_site_data`), which the CSV connector calls. The schema is in
:mod:`site_agent.data_schema`, the reader in :mod:`site_agent.data_table`, the check in
:mod:`site_agent.data_check` and what it reports in :mod:`site_agent.data_report`.

:meth:`DataFingerprint.to_dict` is meant to cross the wire: hashes and counts, never a
value. A connector plugin's surface is this module: it re-exports :class:`Table`,
:class:`TableReadError`, :class:`DataProblem`, :class:`ProblemKind` and :class:`DataSchema`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from site_agent.data_check import read_checked
from site_agent.data_report import DataProblem, ProblemKind
from site_agent.data_schema import DataSchema
from site_agent.data_table import Table, TableReadError

# DataSchema, DataProblem, ProblemKind, Table and TableReadError are re-exported: the
# operator guide's connector plugins and schema command import them from here.
__all__ = [
    "DataFingerprint",
    "DataProblem",
    "DataSchema",
    "ProblemKind",
    "SiteData",
    "Table",
    "TableReadError",
    "keyed_fingerprint",
    "load_site_data",
    "split_site_data",
]


def keyed_fingerprint(key: bytes, content: bytes) -> str:
    """HMAC-SHA256 (hex) of a data file's bytes under the site's fingerprint key.

    Unlike a plain SHA-256, nobody without the key can confirm a guess of the file, and two
    sites holding the same file send different fingerprints. Anyone given the key recomputes
    it with standard tools: ``openssl dgst -sha256 -mac HMAC -macopt hexkey:KEY FILE``.

    Args:
        key: The site's fingerprint key (``site_agent.keys.ensure_fingerprint_key``).
        content: The file's bytes.

    Returns:
        64 lowercase hex characters.
    """
    if len(key) < 16:
        raise ValueError("a fingerprint key has at least 16 bytes")
    return hmac.new(key, content, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DataFingerprint:
    """What the coordinator may learn about a site's data: hashes and counts, no values.

    Per-class counts are deliberately left out: they reveal the site's case mix.

    Attributes:
        schema_hash: :attr:`DataSchema.schema_hash` of the schema used.
        n_rows: Data rows in the file.
        n_train: Rows used for training.
        n_test: Rows held out for local evaluation.
        content_sha256: SHA-256 (hex) of the file's bytes. It stays at the site: anyone
            with a copy of a candidate file could confirm it.
        content_hmac: :func:`keyed_fingerprint` of the file under the site's key, what may
            leave the site; None when no key was given.
        connector: The kind of connector that read the data (``csv``, ``parquet``,
            ``sql``...): it names how, never what. Shown at the site; the wire's fingerprint
            (:meth:`to_dict`, ``fedward.wire.FINGERPRINT_KEYS``) holds hashes and counts only.
    """

    schema_hash: str
    n_rows: int
    n_train: int
    n_test: int
    content_sha256: str
    content_hmac: str | None = None
    connector: str = "csv"

    def to_dict(self) -> dict[str, str | int | None]:
        """The fingerprint as a JSON-ready dict."""
        return {
            "schema_hash": self.schema_hash,
            "n_rows": self.n_rows,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "content_sha256": self.content_sha256,
            "content_hmac": self.content_hmac,
        }


@dataclass(frozen=True)
class SiteData:
    """A site's checked data, split for local training and held-out evaluation.

    Attributes:
        train_x: float32 features, shape (n_train, n_features), in the task's column order.
        train_y: int64 class labels, shape (n_train,).
        test_x: float32 held-out features.
        test_y: int64 held-out labels.
        fingerprint: Hashes and counts that may be sent to the coordinator.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    fingerprint: DataFingerprint


def load_site_data(
    *,
    csv_path: Path,
    schema: DataSchema,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    fingerprint_key: bytes | None = None,
) -> SiteData:
    """Check a site's CSV file and load it as train and held-out arrays.

    The split is deterministic for a seed, and stratified by class when every class has at
    least two rows (and both parts can hold one of each class).

    Args:
        csv_path: The site's CSV file.
        schema: The schema the site declared for it.
        holdout_fraction: Share of rows held out for local evaluation, in (0, 1).
        seed: Seed of the split.
        fingerprint_key: The site's fingerprint key; without it the fingerprint has no
            ``content_hmac`` and no digest of the file may leave the site.

    Returns:
        The arrays and the data fingerprint.

    Raises:
        ValueError: If ``holdout_fraction`` is not strictly between 0 and 1.
        DataCheckError: If the check finds any problem (all of them are in its report).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    scan = read_checked(csv_path, schema)
    return split_site_data(x=scan.x, y=scan.y, n_rows=scan.report.n_rows,
                           content=scan.content, schema_hash=schema.schema_hash,
                           holdout_fraction=holdout_fraction, seed=seed,
                           fingerprint_key=fingerprint_key)


def split_site_data(
    *,
    x: np.ndarray,
    y: np.ndarray,
    n_rows: int,
    content: bytes,
    schema_hash: str,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    fingerprint_key: bytes | None = None,
    connector: str = "csv",
) -> SiteData:
    """Split checked arrays into train and held-out parts and fingerprint them.

    The split is deterministic for a seed, and stratified by class when every class has at
    least two rows (and both parts can hold one of each class). Every connector and the
    study mapping end here, so every source splits and fingerprints the same way.

    Args:
        x: float32 features of the rows that passed the check.
        y: int64 labels of those rows.
        n_rows: Data rows read (the fingerprint's ``n_rows``).
        content: The bytes the fingerprint digests (:attr:`Table.content`).
        schema_hash: The hash of what the data was checked against.
        holdout_fraction: Share of rows held out for local evaluation, in (0, 1).
        seed: Seed of the split.
        fingerprint_key: The site's fingerprint key; without it no keyed digest is made.
        connector: The connector's kind, named in the fingerprint.

    Returns:
        The arrays and the data fingerprint.

    Raises:
        ValueError: If ``holdout_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    n = len(y)
    n_test = math.ceil(holdout_fraction * n)
    classes, counts = np.unique(y, return_counts=True)
    stratify = (
        y
        if counts.min() >= 2 and n_test >= len(classes) and n - n_test >= len(classes)
        else None
    )
    # scikit-learn costs a second to import: only the processes that split pay for it.
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=n_test, random_state=seed, shuffle=True, stratify=stratify
    )
    fingerprint = DataFingerprint(
        schema_hash=schema_hash,
        n_rows=n_rows,
        n_train=len(train_y),
        n_test=len(test_y),
        content_sha256=hashlib.sha256(content).hexdigest(),
        content_hmac=(None if fingerprint_key is None
                      else keyed_fingerprint(fingerprint_key, content)),
        connector=connector,
    )
    return SiteData(
        train_x=np.ascontiguousarray(train_x, dtype=np.float32),
        train_y=np.ascontiguousarray(train_y, dtype=np.int64),
        test_x=np.ascontiguousarray(test_x, dtype=np.float32),
        test_y=np.ascontiguousarray(test_y, dtype=np.int64),
        fingerprint=fingerprint,
    )
