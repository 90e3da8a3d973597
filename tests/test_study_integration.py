"""A run of a registered study, end to end: coordinator, SuperLink and two site agents as
processes on 127.0.0.1; one site approved the study's hash, the other waits until its IT
approves it."""

from __future__ import annotations

import json

import httpx
import pytest

from fedward.study import load_spec
from fedward.tasks import example_spec_path

from federation import BIN, edit_site_policy, federation, run_cli
from tests_support import short_tmp, wait_until

# More steps than one run of tests/test_integration.py: two approvals at one site.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SPEC = example_spec_path("breast_cancer_mlp")


def test_a_study_run_waits_for_the_site_that_has_not_approved_its_hash() -> None:
    from site_agent.approvals import ApprovalBook
    from site_agent.audit import read_entries

    digest = load_spec(SPEC, check_dp=False).content_hash()
    site_cli = str(BIN / "fedward-site")
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        # Under heavy load the SuperLink may still be starting when the API first answers.
        wait_until((fed.home / "superlink.address").exists, timeout=180,
                   what="the SuperLink's address written", interval=0.5)
        sites = fed.data["sites"]
        for s in sites:
            fed.add_site(s["name"], s["csv"], s["schema"])
        ready, careful = sites[0]["name"], sites[1]["name"]
        run_cli([site_cli, "policy", "approve-study", str(SPEC), "--project", "test", "--dir",
                 str(fed.sites[ready].root), "--by", "it-a"])
        edit_site_policy(fed.sites[careful], require_approval=True)
        for s in sites:
            fed.start_site(s["name"])

        # The first registration builds the model and loads torch and Opacus into the
        # API process for the DP-SGD check: seconds, but over a minute on a loaded test
        # machine, longer than the CLI waits. So the first one goes through the API here
        # with a longer timeout; the CLI then registers the same file again.
        first = httpx.post(f"http://127.0.0.1:{fed.api_port}/api/v1/studies",
                           json={"text": SPEC.read_text(), "source": SPEC.name},
                           headers={"Authorization": f"Bearer {fed.token}"}, timeout=300)
        assert first.status_code == 201, first.text
        assert (first.json()["ref"], first.json()["hash"]) == ("breast_cancer_mlp@1", digest)
        again = fed.coord_cli("study", "register", str(SPEC))
        assert f"breast_cancer_mlp@1 already registered (same content): sha256 {digest}" in \
            " ".join(again.stdout.split()), again.stdout
        shown = json.loads(fed.coord_cli("study", "show", "breast_cancer_mlp@1").stdout)
        assert shown["hash"] == digest and shown["n_features"] == 30
        fed.wait_online(2)
        launched = fed.coord_cli("launch", "--project", "test", "--study", "breast_cancer_mlp@1",
                                 "--epsilon", "3", "--rounds", "2", "--min-sites", "1",
                                 "--round-deadline", "30", "--json")
        run_id = int(json.loads(launched.stdout)["id"])

        run = fed.wait_admission(run_id)
        assert run["waiting_for_approval"] == [careful], run
        config = run["config"]
        assert isinstance(config, dict)
        assert (config["study"], config["study_hash"]) == ("breast_cancer_mlp@1", digest)
        admission = run["admission"]
        assert isinstance(admission, dict) and admission["accepted"] == [ready]
        (waiting,) = admission["waiting"]
        assert waiting["reason"] == (
            f"pending-approval: study breast_cancer_mlp@1 (sha256 {digest}) is not approved "
            f"for project test at site {careful}; its IT reviews the spec and approves it "
            "(fedward-site policy approve-study FILE --project test)")

        # The careful site's IT reviews the spec, approves it by hash, then the run.
        careful_root = str(fed.sites[careful].root)
        run_cli([site_cli, "policy", "approve-study", str(SPEC), "--project", "test", "--dir",
                 careful_root, "--by", "it-b"])
        # The site now waits only for its approval of the run itself (the coordinator's
        # view keeps the first waiting reason while the site still waits).
        book = ApprovalBook(fed.sites[careful].root / "approvals.json")
        def run_refusal() -> str | None:
            record = book.get(str(run_id))
            refusal = None if record is None else record.last_refusal
            ok = refusal is not None and refusal.startswith(f"pending-approval: run {run_id}")
            return refusal if ok else None

        refusal = wait_until(run_refusal, timeout=120, interval=0.5,
                             what="the site waiting only for its approval of the run")
        assert refusal == (f"pending-approval: run {run_id} waits for approval at site "
                           f"{careful} (fedward-site approve {run_id})"), refusal
        run_cli([site_cli, "approve", str(run_id), "--dir", careful_root, "--by", "it-b"])

        done = fed.wait_run(run_id)
        assert done["status"] == "completed", done
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [sorted(r["participating_sites"]) for r in rounds] == [
            sorted([ready, careful])] * 2
        lineage = fed.api("GET", f"/versions/{run_id}/2/lineage").json()
        assert lineage["run"]["config"]["study_hash"] == digest
        for name in (ready, careful):
            entries = fed.site_audit(name)
            seen = [e.detail for e in entries if e.action == "run-seen"]
            assert seen and seen[0]["study_hash"] == digest, seen
        entries, verdict = read_entries(fed.sites[careful].root / "audit.log")
        assert verdict.intact
        assert [e.detail["by"] for e in entries if e.action == "study-approved"] == ["it-b"]
