"""A release end to end with real processes: parity is measured AT the sites, over Flower."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from federation import Federation, federation
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_parity_gate_figures_come_from_the_sites_and_the_release_is_signed() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        sites = sorted(fed.join_all_sites())
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        assert fed.wait_run(run_id)["status"] == "completed"
        api = f"http://127.0.0.1:{fed.api_port}/api/v1"

        def user(name: str, role: str) -> httpx.Client:
            r = fed.api("POST", "/users", {"name": name, "role": role})
            assert r.status_code == 201, r.text
            return httpx.Client(base_url=api, timeout=60,
                                headers={"Authorization": f"Bearer {r.json()['token']}"})

        ml, reviewer = user("ml", "ml_engineer"), user("rev", "reviewer")
        with ml, reviewer:
            figures = _propose_and_approve(ml, reviewer, run_id=run_id, sites=sites, fed=fed)
            # The same checkpoint proposed again: each site refuses to measure it a second
            # time, and the gate uses what they measured for the first candidate.
            again = _gates(ml, run_id)
            assert again["export_parity"]["passed"], again["export_parity"]
            assert again["export_parity"]["figures"]["per_site"] == figures
            for name in sites:
                log = (fed.sites[name].root / "audit.log").read_text().replace(" ", "")
                assert log.count('"action":"parity-measured"') == 1
                assert "wasmeasuredherealready" in log


def _gates(ml: httpx.Client, run_id: int) -> dict[str, Any]:
    r = ml.post("/candidates", params={"wait": "false"},
                json={"run_id": run_id, "intended_use": "integration test, not for care"})
    assert r.status_code == 202, r.text
    cand = r.json()
    deadline = time.monotonic() + 300
    while cand["status"] == "evaluating" and time.monotonic() < deadline:
        time.sleep(1)
        cand = ml.get(f"/candidates/{cand['id']}").json()
    gates = {g["name"]: g for g in cand["gates"]}
    assert cand["status"] == "awaiting_review", {n: g["reason"] for n, g in gates.items()
                                                 if not g["passed"]}
    return {**gates, "_candidate": cand}


def _propose_and_approve(ml: httpx.Client, reviewer: httpx.Client, *, run_id: int,
                         sites: list[str], fed: Federation) -> dict[str, Any]:
    gates = _gates(ml, run_id)
    cand = gates.pop("_candidate")
    per_site = gates["export_parity"]["figures"]["per_site"]
    assert sorted(per_site) == sites          # every site measured, on its own data
    for figures in per_site.values():
        assert set(figures) == {"onnx", "onnx-int8", "openvino"}
        assert figures["onnx"]["agreement"] == 1.0
        assert figures["onnx"]["max_abs_diff"] < 1e-4
        assert figures["onnx"]["n"] > 0
    # The sites' audit logs record the parity task, and only figures left them.
    for name in sites:
        log = (fed.sites[name].root / "audit.log").read_text()
        assert '"action":"parity-measured"' in log.replace(" ", "")
    r = reviewer.post(f"/candidates/{cand['id']}/approve", json={"reason": "gates pass"})
    assert r.status_code == 201, r.text
    assert r.json()["release_id"]
    return dict(per_site)
