"""One real federated run with secure aggregation and distributed DP (3 site agents), one of
which is killed in the middle of a round."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.checkpoints import load_checkpoint
from fedward.models import model_arrays
from fedward.tasks import build_model
from site_agent.audit import read_entries

from federation import federation
from tests_support import short_tmp, wait_until


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_secure_run_survives_a_site_killed_mid_round_and_fails_below_its_threshold(
) -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        names = fed.join_all_sites()
        # Bad input at launch: a threshold above the run's sites is refused with the reason.
        r = fed.api("POST", "/projects", {"name": "test"})
        r = fed.api("POST", "/runs", {"project": "test", "task": "breast_cancer_mlp",
                                      "epsilon": 3.0, "secure_aggregation": True,
                                      "secagg_threshold": 4})
        assert r.status_code == 422 and "at least 4" in r.text, r.text
        r = fed.api("POST", "/runs", {"project": "test", "task": "breast_cancer_mlp",
                                      "epsilon": 3.0, "secure_aggregation": True,
                                      "aggregation": "median"})
        assert r.status_code == 422 and "only fedavg" in r.text, r.text

        # With a statistics phase: each site's release and its secure rounds share the
        # run's epsilon 3.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=150, secure_aggregation=True,
                            secagg_threshold=2, statistics=True)
        # A site dies mid-round: once it has reserved round 2 in its ledger (the mask stage),
        # it is killed. The SuperLink then answers its pending message with an error (after
        # its heartbeat runs out, about 60 s), the site drops out, and the two others, at
        # least the threshold, finish the round: the sum is unmasked without it.
        victim = names[2]

        def reserved_round_2() -> bool:
            entries, _ = read_entries(fed.sites[victim].root / "audit.log")
            return any(e.action == "round-reserved" and e.detail.get("run") == str(run_id)
                       and e.detail.get("round") == 2 for e in entries)

        wait_until(reserved_round_2, timeout=300, what=f"{victim} reserving round 2")
        fed.kill_site(victim)
        run = fed.wait_run(run_id, timeout=420)
        assert run["status"] == "completed", run.get("failure_reason")
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [r["number"] for r in rounds] == [1, 2]
        assert sorted(rounds[0]["participating_sites"]) == sorted(names)
        dropped = {f["site"]: f for f in rounds[1]["failed_sites"]}
        assert set(dropped) == {victim}, rounds[1]
        assert dropped[victim]["phase"].startswith("secagg-"), dropped
        survivors = sorted(names[:2])
        assert set(survivors) <= set(rounds[1]["participating_sites"]), rounds[1]
        # What the coordinator held of each site: a masked vector of the model's size whose
        # entries are spread over the whole field (an unmasked update never reaches 2**24).
        n_params = sum(v.size for v in model_arrays(
            build_model("breast_cancer_mlp", seed=0)).values())
        secure = [e["detail"] for e in fed.audit_events() if e["action"] == "round.secure"
                  and e["subject"] == f"run:{run_id}"]
        assert [d["round"] for d in secure] == [1, 2]
        for detail in secure:
            assert detail["failed"] is None
            held = detail["masked_vectors"]
            assert set(survivors) <= set(held)
            for figures in held.values():
                assert figures["size"] == n_params
                assert figures["share_at_or_above_2_24"] > 0.9
        assert set(secure[0]["reached"].values()) == {"unmask"}
        assert {secure[1]["reached"][s] for s in survivors} == {"unmask"}
        assert secure[1]["reached"][victim] != "unmask", secure[1]["reached"]
        ckpts = fed.api("GET", f"/runs/{run_id}/checkpoints").json()
        assert [c["round_number"] for c in ckpts] == [1, 2]
        final = load_checkpoint(fed.home / ckpts[-1]["path"], expected_sha256=ckpts[-1]["sha256"])
        initial = model_arrays(build_model("breast_cancer_mlp", seed=0))
        assert all(np.all(np.isfinite(v)) for v in final.values())
        assert any(not np.array_equal(final[k], initial[k]) for k in initial)
        # Each survivor charged the distributed mechanism, once per round, and unmasked once
        # per round; the victim had reserved round 2 before it died (its budget counts it).
        for name in survivors:
            entries = fed.site_audit(name)
            trained = [e.detail for e in entries if e.action == "round-trained"
                       and e.detail.get("run") == str(run_id)]
            assert [d["round"] for d in trained] == [1, 2]
            assert all(d["secure_aggregation"] is True for d in trained)
            reserved = [e.detail for e in entries if e.action == "round-reserved"
                        and e.detail.get("run") == str(run_id)]
            assert {d["mechanism"] for d in reserved} == {"DistributedSkellam"}
            assert reserved[-1]["epsilon_after"] <= 3.0 + 1e-9
            assert len([e for e in entries if e.action == "secagg-unmask"
                        and e.detail.get("run") == str(run_id)]) == 2

            # One budget: the statistics release first, then the rounds, sized for what
            # it left (the noise search stops within 0.1% of the budget).
            released = [e.detail for e in entries if e.action == "statistics-reserved"
                        and e.detail.get("run") == str(run_id)]
            assert len(released) == 1
            assert released[0]["epsilon_after"] < reserved[0]["epsilon_after"]
            assert 2.9 <= reserved[-1]["epsilon_after"] <= 3.0 + 1e-9
        stats = fed.api("GET", f"/runs/{run_id}/statistics").json()
        assert sorted(stats["sites"]) == sorted(names), stats

        victim_entries, _ = read_entries(fed.sites[victim].root / "audit.log")
        assert [e.detail["round"] for e in victim_entries if e.action == "round-reserved"
                and e.detail.get("run") == str(run_id)] == [1, 2]

        # Fewer sites than the threshold (the victim stays down): the round fails with the
        # reason, within its deadline.
        second = fed.launch(task="breast_cancer_mlp", rounds=1, epsilon=3.0, min_sites=2,
                            round_deadline_s=30, offline_grace_s=2, approval_wait_s=0,
                            secure_aggregation=True, secagg_threshold=3)
        run = fed.wait_run(second, timeout=200)
        assert run["status"] == "failed"
        assert "threshold is 3" in run["failure_reason"], run["failure_reason"]
