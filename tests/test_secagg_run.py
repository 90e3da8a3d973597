"""One real federated run with secure aggregation and distributed DP (3 site agents)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.checkpoints import load_checkpoint
from fedward.models import model_arrays
from fedward.tasks import build_model

from federation import federation
from tests_support import short_tmp


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_secure_run_unmasks_only_the_sum_and_fails_below_its_threshold() -> None:
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

        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=3, round_deadline_s=120, secure_aggregation=True,
                            secagg_threshold=2)
        run = fed.wait_run(run_id, timeout=420)
        assert run["status"] == "completed", run.get("failure_reason")
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [(r["number"], sorted(r["participating_sites"])) for r in rounds] == [
            (1, sorted(names)), (2, sorted(names))]
        # What the coordinator held of each site: a masked vector of the model's size whose
        # entries are spread over the whole field (an unmasked update never reaches 2**24).
        n_params = sum(v.size for v in model_arrays(
            build_model("breast_cancer_mlp", seed=0)).values())
        secure = [e["detail"] for e in fed.audit_events() if e["action"] == "round.secure"
                  and e["subject"] == f"run:{run_id}"]
        assert [d["round"] for d in secure] == [1, 2]
        for detail in secure:
            assert detail["failed"] is None
            assert set(detail["reached"].values()) == {"unmask"}
            held = detail["masked_vectors"]
            assert sorted(held) == sorted(names)
            for figures in held.values():
                assert figures["size"] == n_params
                assert figures["share_at_or_above_2_24"] > 0.9
        ckpts = fed.api("GET", f"/runs/{run_id}/checkpoints").json()
        assert [c["round_number"] for c in ckpts] == [1, 2]
        final = load_checkpoint(fed.home / ckpts[-1]["path"], expected_sha256=ckpts[-1]["sha256"])
        initial = model_arrays(build_model("breast_cancer_mlp", seed=0))
        assert all(np.all(np.isfinite(v)) for v in final.values())
        assert any(not np.array_equal(final[k], initial[k]) for k in initial)
        # Each site charged the distributed mechanism, once per round, and unmasked once.
        for name in names:
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

        # Fewer sites than the threshold: the round fails with the reason, within its deadline.
        fed.kill_site(names[0])
        second = fed.launch(task="breast_cancer_mlp", rounds=1, epsilon=3.0, min_sites=2,
                            round_deadline_s=30, offline_grace_s=2, approval_wait_s=0,
                            secure_aggregation=True, secagg_threshold=3)
        run = fed.wait_run(second, timeout=200)
        assert run["status"] == "failed"
        assert "threshold is 3" in run["failure_reason"], run["failure_reason"]
