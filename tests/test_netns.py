"""Sites in their own network namespaces with all inbound traffic dropped: runs still work.

Each site lives in a namespace this test creates, joined to the host by a veth pair; an
nftables rule inside the namespace drops every inbound connection. The site agent only
dials out (to the coordinator's gateway on the host side of its veth), so enrollment and a
whole federated run must still work. Then one site is partitioned (every packet in or
out of its namespace dropped): the rounds go on without it and name it, and once the
partition heals it is back in a later round without anyone restarting it. Everything the
test creates is deleted at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from federation import BIN, LIFETIME_S, Federation, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

_NFT_RULES = """
table inet fedward_site {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
  }
}
"""


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


@contextmanager
def _site_namespace(index: int) -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side IP, site-side IP) of a new namespace with inbound dropped."""
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"fw{tag}{index}", f"fwh{tag}{index}", f"fwn{tag}{index}"
    host_ip, site_ip = f"10.231.{index}.1", f"10.231.{index}.2"
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{site_ip}/30", "dev", ns_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=_NFT_RULES.encode(),
                       check=True, capture_output=True, timeout=30)
        yield ns, host_ip, site_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _tools_present() -> None:
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"this test needs root and {missing or 'ip, nft'}: "
                    "apt-get install iproute2 nftables (.ci/run does)")


def test_sites_behind_an_inbound_drop_rule_train_and_a_partitioned_site_comes_back() -> None:
    _tools_present()
    with short_tmp() as work, _site_namespace(1) as ns1, _site_namespace(2) as ns2, \
            federation(work, n_sites=2, extra_env={
                "FEDWARD_FLEET_HOST": "0.0.0.0",
                "FEDWARD_FLEET_HOSTNAMES": f"{ns1[1]},{ns2[1]},127.0.0.1"}) as fed:
        port = int(fed.fleet.rpartition(":")[2])
        for s, (ns, host_ip, site_ip) in zip(fed.data["sites"], (ns1, ns2), strict=True):
            token = json.loads(fed.coord_cli("enroll-token", s["name"], "--json").stdout)["token"]
            root = work / "sites" / s["name"]
            run_cli(["ip", "netns", "exec", ns, str(BIN / "fedward-site"), "enroll", "--dir",
                     str(root), "--gateway", f"{host_ip}:{port}", "--token", token,
                     "--data", s["csv"], "--schema", s["schema"], "--project", "test"])
            log = work / f"site-{s['name']}.log"
            site = Site(name=s["name"], root=root, log=log)
            with log.open("ab") as fh:
                site.proc = subprocess.Popen(
                    ["ip", "netns", "exec", ns, "timeout", "-k", "5", str(LIFETIME_S),
                     str(BIN / "fedward-site"), "start", "--dir", str(root)],
                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            fed.sites[s["name"]] = site
            fed._procs.append(site.proc)
            # Inbound is dropped: a connection to the site's address gets no answer at all.
            with socket.socket() as probe:
                probe.settimeout(1.0)
                with pytest.raises(TimeoutError):
                    probe.connect((site_ip, 22))
        fed.wait_online(2, timeout=90)
        # min_sites 1: the run goes on while one site is cut off, and must take it back.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=12, local_epochs=1, epsilon=3.0,
                            min_sites=1, round_deadline_s=8)
        cut_site, (cut_ns, _, _) = fed.data["sites"][1]["name"], ns2
        _wait_rounds(fed, run_id, lambda rs: any(len(r["participating_sites"]) == 2
                                                 for r in rs), "a round with both sites")
        # A network partition: every packet in or out of the second site's namespace is
        # dropped (its processes keep running and keep trying).
        subprocess.run(["ip", "netns", "exec", cut_ns, "nft", "-f", "-"],
                       input=_PARTITION.encode(), check=True, capture_output=True, timeout=30)
        try:
            cut_off = _wait_rounds(
                fed, run_id, lambda rs: any(cut_site in r["late_sites"] for r in rs),
                "a round that names the partitioned site late")
        finally:
            _sh("ip", "netns", "exec", cut_ns, "nft", "delete", "table", "inet",
                "fedward_partition")
        # Healed: the site is taken back into a later round without anyone restarting it.
        first_late = min(r["number"] for r in cut_off if cut_site in r["late_sites"])
        _wait_rounds(fed, run_id, lambda rs: any(
            r["number"] > first_late and cut_site in r["participating_sites"] for r in rs),
            "the healed site back in a round", timeout=150)
        run = fed.wait_run(run_id, timeout=200)
        assert run["status"] == "completed", run
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        for rnd in rounds:
            if cut_site not in rnd["participating_sites"]:
                named = {f["site"]: f["reason"] for f in rnd["failed_sites"]}
                assert cut_site in named, rnd   # never silently dropped


_PARTITION = """
table inet fedward_partition {
  chain input { type filter hook input priority -10; policy drop; iif "lo" accept; }
  chain output { type filter hook output priority -10; policy drop; oif "lo" accept; }
}
"""


def _wait_rounds(fed: Federation, run_id: int, done: Callable[[list[dict[str, Any]]], bool],
                 what: str, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rounds = [r for r in fed.api("GET", f"/runs/{run_id}/rounds").json()
                  if r["status"] == "completed"]
        if done(rounds):
            return rounds
        run = fed.api("GET", f"/runs/{run_id}").json()
        assert run["status"] in ("pending", "running"), run
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {timeout} s")
