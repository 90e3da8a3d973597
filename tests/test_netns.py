"""Sites in their own network namespaces with all inbound traffic dropped: runs still work.

Each site lives in a namespace this test creates, joined to the host by a veth pair; an
nftables rule inside the namespace drops every inbound connection. The site agent only
dials out (to the coordinator's gateway on the host side of its veth), so enrollment and a
whole federated run must still work. Everything the test creates is deleted at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from federation import BIN, LIFETIME_S, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

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


def test_sites_behind_an_inbound_drop_rule_enroll_and_complete_a_run() -> None:
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
            site = Site(name=s["name"], root=root, log=work / f"site-{s['name']}.log")
            with site.log.open("ab") as fh:
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
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert all(len(r["participating_sites"]) == 2 for r in rounds)
