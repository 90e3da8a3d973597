"""The study walkthrough, followed literally: a new study from an empty coordinator to its
first trained rounds at three hospitals.

The ML team guide's "Walkthrough: a new study at three hospitals" and the operator's guide's
"Walkthrough: joining a new study" are read as their readers would: the ML team on the
coordinator's host, three hospitals' IT at the same time, each in a shell of its own with
its own home, against a real coordinator and three real site agents on 127.0.0.1. What the
test does that the guides do not say is what a reader brings: each hospital's table
(``fedward-site demo-data``), free ports instead of 8600 and 9092, and the spec file the ML
team sends each hospital (copied, as an e-mail attachment would be).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from guide_reading import (
    TOTAL_TIMEOUT_S,
    WALKTHROUGH_ORDER,
    Reader,
    Reading,
    all_blocks,
    follow,
    hospital_readers,
    reader_env,
)

from privacy import PrivacyLedger

SITES = ("hospital-a", "hospital-b", "hospital-c")
EPSILON = 3.0   # the walkthrough's `launch --epsilon`


def _send_spec(ml: Reader, hospitals: list[Reader]) -> None:
    """The ML team sends each hospital the spec file it registered."""
    spec = ml.cwd / "tumour_shape.yaml"
    assert spec.is_file(), "the walkthrough wrote no tumour_shape.yaml for the hospitals"
    for reader in hospitals:
        shutil.copyfile(spec, reader.values["STUDY_PATH"])


@pytest.mark.integration
@pytest.mark.timeout(TOTAL_TIMEOUT_S + 240)
def test_the_study_walkthrough_trains_its_first_rounds_at_three_hospitals(
        reading: Reading) -> None:
    blocks = all_blocks()
    env, common = reader_env(reading.work)
    readers = {"ml": Reader("ml", reading.work / "ml" / "desk",
                            {**env, "HOME": str(reading.work / "ml")}, common),
               **hospital_readers(reading.work, SITES, env, common)}
    for index, (who, _guide, _sections) in enumerate(WALKTHROUGH_ORDER):
        if who == "site":
            _send_spec(readers["ml"], [readers[s] for s in SITES])
        follow(reading, readers, WALKTHROUGH_ORDER, index, blocks, SITES)
    took = time.monotonic() - reading.started
    print(f"the walkthrough's {reading.ran} command blocks took {took:.0f} s")

    # What the walkthrough promises: run 1 of the study completed its rounds with all three
    # hospitals, each within its epsilon, and each hospital's ledger agrees.
    home = Path(common["COORDINATOR_HOME"])
    api = common["PORTAL_URL"] + "/api/v1"
    headers = {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}
    run = httpx.get(f"{api}/runs/1", headers=headers, timeout=30).json()
    assert run["status"] == "completed", run
    study = httpx.get(f"{api}/studies/tumour_shape@1", headers=headers, timeout=30).json()
    assert (run["config"]["study"], run["config"]["study_hash"]) == (
        "tumour_shape@1", study["hash"])
    rounds = httpx.get(f"{api}/runs/1/rounds", headers=headers, timeout=30).json()
    assert [r["number"] for r in rounds] == [1, 2, 3, 4, 5]
    for rnd in rounds:
        assert sorted(rnd["participating_sites"]) == list(SITES), rnd
    metrics = httpx.get(f"{api}/runs/1/metrics", headers=headers, timeout=30).json()
    last = {m["round"]: m["sites"] for m in metrics["rounds"]}[5]
    for site in SITES:
        eps = last[site]["epsilon-spent"]
        assert 0 < eps <= EPSILON
        ledger = PrivacyLedger(Path(readers[site].values["SITE_DIR"]) / "privacy-ledger.sqlite")
        (site_run,) = ledger.all_runs().values()
        assert ledger.epsilon_spent(site_run.run_id) == pytest.approx(eps, rel=1e-9)
        # Each site trained through its own mapping of its own table to the study.
        config_at_site = json.loads(
            (Path(readers[site].values["SITE_DIR"]) / "site.json").read_text())
        assert config_at_site["study"] == readers[site].values["STUDY_PATH"]
        assert config_at_site["mapping"] == readers[site].values["MAPPING_PATH"]
