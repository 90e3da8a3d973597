"""Checks of ``deploy/``: container images, the compose stack, systemd units, the Helm chart.

No container engine and no ``helm`` run here, so nothing is built, started or rendered. What
is checked instead, against the code being deployed:

* every command line in a Dockerfile, the compose file, its one-shot scripts, the systemd
  units and the chart is parsed by the CLI's own parser (click, via typer), so a renamed
  subcommand or flag fails here;
* every ``FEDWARD_*`` variable set anywhere is a field of the coordinator's settings;
* the compose file's topology: three sites, each with its own volume and an internal network
  shared only with the coordinator (and the site's init job, which enrolls over it), a
  token volume per site shared only by its token job and its init job, no published site
  ports; the jobs' order (coordinator-init, healthy coordinator, issue-token-X, X-init, X);
* the one-shot scripts pass ``sh -n`` and ShellCheck (where installed), and run for real
  (paths moved into a temporary folder) against a real coordinator: a site enrolls with
  them, a second run changes nothing, and the enrolled agent connects through the gateway;
* the systemd units' restart back-off against the site's ``reconnect_backoff_s``, their
  hardening (with the user, network and PID namespaces the Flower sandbox needs and
  nothing more), and ``systemd-analyze verify`` where it exists; the images'
  ``FEDWARD_FLOWER_ISOLATION=container``;
* the chart's structure: every ``.Values`` path a template uses exists, control blocks are
  balanced, included templates are defined, and nothing exposes the SuperLink.

YAML is read with PyYAML; ``docker compose config`` (or ``docker-compose config``) runs when
one of them is installed.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import click
import pytest
import typer

from coordinator.settings import Settings
from site_agent.config import SiteConfig
from site_agent.enroll import EnrollmentFiles

from federation import Site, federation
from tests_support import short_tmp

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
SYSTEMD = DEPLOY / "systemd"
CHART = DEPLOY / "helm" / "fedward-coordinator"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
VENV_BIN = Path(sys.executable).parent
SITES = ("hospital-a", "hospital-b", "hospital-c")
IMAGES = {"coordinator.Dockerfile": "fedward-coordinator",
          "site-agent.Dockerfile": "fedward-site"}
IMAGE_UID = 10001
DATA_DIR = "/var/lib/fedward"
EXCHANGE_DIR = "/var/lib/fedward-exchange"


# -- helpers -----------------------------------------------------------------------------


def _yaml() -> ModuleType:
    module: ModuleType = pytest.importorskip(
        "yaml", reason="PyYAML is not installed in this environment: the deploy/ YAML checks "
        "(compose file, Helm chart) need it; install pyyaml to run them")
    return module


def load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text(encoding="utf-8"))


@cache
def cli_group(script: str) -> click.Group:
    """The click group behind a console script of pyproject's ``[project.scripts]``."""
    assert script in SCRIPTS, f"{script!r} is not a console script of pyproject.toml"
    module = importlib.import_module(SCRIPTS[script].split(":")[0])
    group = typer.main.get_command(module.app)
    assert isinstance(group, click.Group)
    return group


def check_cli(argv: list[str], where: str, env: dict[str, str] | None = None) -> None:
    """Parse ``argv`` (console script first) with the CLI's own parser; nothing runs.

    ``env`` holds the variables the command line sets for the command (``VAR=value cmd``):
    click reads an option's ``envvar`` while parsing, so they are in place meanwhile.
    """
    with mock.patch.dict(os.environ, env or {}):
        _parse_cli(argv, where)


def _parse_cli(argv: list[str], where: str) -> None:
    script, *rest = argv
    cmd: click.Command = cli_group(script)
    path = [script]
    while isinstance(cmd, click.Group):
        assert rest, f"{where}: `{' '.join(path)}` without a subcommand"
        sub = cmd.commands.get(rest[0])
        assert sub is not None, (f"{where}: `{' '.join(path)}` has no subcommand {rest[0]!r} "
                                 f"(it has {sorted(cmd.commands)})")
        path.append(rest.pop(0))
        cmd = sub
    try:
        cmd.make_context(path[-1], list(rest))
    except click.ClickException as err:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by the CLI: {err.format_message()}")


def settings_env_names() -> set[str]:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {prefix.upper() + name.upper() for name in Settings.model_fields}


def check_fedward_env(names: Iterable[str], where: str) -> None:
    known = settings_env_names()
    for name in names:
        if name.startswith("FEDWARD_"):
            assert name in known, (f"{where}: {name} is not a coordinator setting "
                                   f"(known: {sorted(known)})")


def shell_invocations(script: str) -> list[tuple[dict[str, str], list[str]]]:
    """Every ``fedward-*`` command line in a POSIX shell script: (variables set for it, argv).

    Here-document bodies are skipped (they are another language's text, fed to stdin).
    """
    text = re.sub(r"\\\n", " ", script)
    found: list[tuple[dict[str, str], list[str]]] = []
    heredoc_end: str | None = None
    for line in text.splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if here := re.search(r"<<-?\s*(['\"]?)(\w+)\1", line):
            heredoc_end = here.group(2)
        # A command substitution, $( ... ), is a command line of its own.
        for segment in re.split(r"&&|\|\||;|\||\$\(|\)", line):
            try:
                tokens = shlex.split(segment, comments=True)
            except ValueError:
                continue
            for i, tok in enumerate(tokens):
                if tok.startswith("fedward-"):
                    env = dict(t.split("=", 1) for t in tokens[:i]
                               if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t))
                    # ${VAR:-default} stands for its default; other $VARs stay as text.
                    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", t) for t in tokens[i:]
                            if not re.match(r"\d?[<>]", t)]  # redirections
                    found.append((env, argv))
                    break
    return found


# -- Dockerfiles -------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1]:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_entrypoint(dockerfile_name: str) -> tuple[list[str], list[str]]:
    stage = final_stage(dockerfile(DOCKER / dockerfile_name))
    entry = [exec_form(a) for i, a in stage if i == "ENTRYPOINT"][-1]
    cmd = [exec_form(a) for i, a in stage if i == "CMD"][-1]
    return entry, cmd


def torch_pin() -> str:
    # torch is in the training stack (the `training` extra), never in the clinician's base.
    pins = [d for d in PYPROJECT["project"]["optional-dependencies"]["training"]
            if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, "pyproject.toml must pin torch exactly once, in [training]"
    return str(pins[0]).split("==")[1].strip()


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_base_torch_and_sources(name: str) -> None:
    ins = dockerfile(DOCKER / name)
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    runs = [a for i, a in ins if i == "RUN"]
    torch_runs = [n for n, r in enumerate(runs) if f"torch=={torch_pin()}" in r]
    assert torch_runs, f"{name}: torch=={torch_pin()} (pyproject's pin) is not installed"
    torch_run = runs[torch_runs[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run, (
        f"{name}: torch must come from the CPU wheel index, not PyPI's CUDA build")
    extra = "site" if name.startswith("site") else "coordinator"
    project_runs = [n for n, r in enumerate(runs)
                    if re.search(r'pip install[^&]* "/src\[' + extra + r'\]"', r)]
    assert project_runs and torch_runs[0] < project_runs[0], (
        f"{name}: install torch first, then the project with its [{extra}] extra")
    for run in runs:
        assert not re.search(r"\b(curl|wget|git clone)\b", run), f"{name}: downloads in {run!r}"
        if "--index-url" in run or "--extra-index-url" in run:
            assert run is torch_run, f"{name}: only torch may use another index: {run!r}"
    assert not [a for i, a in ins if i == "ADD"], f"{name}: use COPY, not ADD"
    # Every package the distribution ships is copied in (keeps images in step with setup).
    copied = {a.split()[0] for i, a in ins if i == "COPY" and not a.startswith("--from")}
    assert "pyproject.toml" in copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"{name}: package {package}/ is not copied into the image"
        assert (ROOT / package).is_dir()
    ignore = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8").splitlines()
    for src in copied:
        assert f"!{src}" in ignore, f"{name}.dockerignore excludes {src}, which COPY needs"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_runtime_stage(name: str) -> None:
    stage = final_stage(dockerfile(DOCKER / name))
    kinds = [i for i, _ in stage]
    users = [a for i, a in stage if i == "USER"]
    assert users, f"{name}: the runtime stage never sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == IMAGE_UID, f"{name}: USER {users[-1]} (want {IMAGE_UID})"
    last_user = max(n for n, k in enumerate(kinds) if k == "USER")
    assert all(k != "RUN" for k in kinds[last_user:]), f"{name}: RUN after USER runs as root"
    volumes = [v for i, a in stage if i == "VOLUME" for v in exec_form(a)]
    assert volumes == [DATA_DIR], f"{name}: VOLUME {volumes}"
    entry, cmd = image_entrypoint(name)
    assert entry[-1] == IMAGES[name], f"{name}: ENTRYPOINT {entry}"
    assert Path(entry[0]).name == "tini" or entry == [IMAGES[name]]
    check_cli([entry[-1], *cmd], f"{name} CMD")
    env: dict[str, str] = {}
    for i, a in stage:
        if i == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(a))  # type: ignore[misc]
    check_fedward_env(env, name)
    assert env.get("FLWR_TELEMETRY_ENABLED") == "0" and env.get("FLWR_DISABLE_UPDATE_CHECK") == "1"
    assert env.get("HOME", "").startswith(DATA_DIR)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_keeps_flower_in_the_containers_own_namespace(name: str) -> None:
    """Each image sets ``FEDWARD_FLOWER_ISOLATION=container``: Docker's default seccomp
    profile forbids ``unshare``, so without it the coordinator refuses to start and the site
    agent exits 5; the container's own network namespace holds only this service."""
    env: dict[str, str] = {}
    for i, a in final_stage(dockerfile(DOCKER / name)):
        if i == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(a))  # type: ignore[misc]
    assert env.get("FEDWARD_FLOWER_ISOLATION") == "container", (
        f"{name}: FEDWARD_FLOWER_ISOLATION={env.get('FEDWARD_FLOWER_ISOLATION')}")


def test_coordinator_image_health_and_ports() -> None:
    from coordinator.api import router

    stage = final_stage(dockerfile(DOCKER / "coordinator.Dockerfile"))
    health = [a for i, a in stage if i == "HEALTHCHECK"]
    assert len(health) == 1
    path = re.search(r"(/api/v\d+/health)", health[0])
    assert path, health[0]
    assert path.group(1) in {getattr(r, "path", None) for r in router.routes}, (
        f"the HEALTHCHECK path {path.group(1)} is not a route of the coordinator API")
    exposed = {int(p.split("/")[0]) for i, a in stage if i == "EXPOSE" for p in a.split()}
    defaults = Settings.model_fields
    # The REST API and the site gateway; never the SuperLink, which is loopback-only.
    assert exposed == {defaults["api_port"].default, defaults["fleet_port"].default}, exposed


def test_site_image_exposes_nothing() -> None:
    stage = final_stage(dockerfile(DOCKER / "site-agent.Dockerfile"))
    assert not [a for i, a in stage if i == "EXPOSE"], "the site agent listens on nothing"


# -- compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def service_argv(svc: dict[str, Any]) -> list[str]:
    """What a service runs: its entrypoint (or the image's) plus its command (or CMD)."""
    dockerfile_name = Path(svc["build"]["dockerfile"]).name
    image_entry, image_cmd = image_entrypoint(dockerfile_name)
    entry = svc.get("entrypoint", image_entry)
    cmd = svc.get("command", image_cmd if "entrypoint" not in svc else [])
    assert isinstance(entry, list) and isinstance(cmd, list), "use exec-form lists"
    return [*entry, *cmd]


def script_of(svc: dict[str, Any], container_path: str) -> Path:
    for volume in svc.get("volumes", []):
        src, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == container_path:
            return (COMPOSE_DIR / src).resolve()
    raise AssertionError(f"no bind mount provides {container_path}")


def long_running(services: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in services.items() if s.get("restart") not in ("no", None)}


def test_compose_commands_use_known_clis_and_flags() -> None:
    services = compose()["services"]
    seen_scripts = set()
    for name, svc in services.items():
        argv = service_argv(svc)
        if Path(argv[0]).name == "tini":
            argv = argv[argv.index("--") + 1:]
        if argv[0] in SCRIPTS:
            check_cli(argv, f"compose service {name}")
            continue
        assert argv[0] == "/bin/sh" and len(argv) == 2, f"{name}: runs {argv}"
        script = script_of(svc, argv[1])
        assert script.is_file(), f"{name}: {script} is missing"
        calls = shell_invocations(script.read_text(encoding="utf-8"))
        assert calls, f"{script} runs no fedward CLI"
        for env, call in calls:
            check_cli(call, f"{script.name} (service {name})", env)
        seen_scripts.add(script.name)
    assert seen_scripts == {p.name for p in (COMPOSE_DIR / "scripts").glob("*.sh")}


def test_compose_scripts_lint() -> None:
    """``sh -n`` always; ShellCheck (POSIX sh dialect) where it is installed."""
    scripts = sorted((COMPOSE_DIR / "scripts").glob("*.sh"))
    assert scripts
    for script in scripts:
        assert script.read_text(encoding="utf-8").startswith("#!/bin/sh\n"), script.name
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True,
                             check=False, timeout=30)
        assert res.returncode == 0, f"{script.name}: {res.stderr}"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (`apt-get install shellcheck`); `sh -n` passed")
    res = subprocess.run([shellcheck, "--shell=sh", "--severity=style",
                          *map(str, scripts)], capture_output=True, text=True, check=False,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_topology_sites_isolated() -> None:
    data = compose()
    services = data["services"]
    networks = data.get("networks", {})
    sites = {n for n, s in services.items()
             if "fedward-site" in (argv := service_argv(s))
             and argv[argv.index("fedward-site") + 1] == "start"}
    assert sites == set(SITES)
    coordinator = services["coordinator"]
    assert "fedward-coordinator" in service_argv(coordinator)
    running = long_running(services)
    volumes_of: dict[str, set[str]] = {}
    for name, svc in services.items():
        volumes_of[name] = {v.split(":")[0] for v in svc.get("volumes", [])}
    for site in SITES:
        svc = services[site]
        argv = service_argv(svc)
        assert argv[argv.index("fedward-site") + 1] == "start", f"{site}: {argv}"
        assert not svc.get("ports") and not svc.get("expose"), f"{site} publishes ports"
        assert svc.get("network_mode") is None, f"{site}: network_mode"
        assert str(svc.get("restart", "")).startswith("on-failure"), f"{site}: restart"
        mounts = svc.get("volumes", [])
        assert len(mounts) == 1 and mounts[0].split(":")[1] == DATA_DIR, mounts
        vol = mounts[0].split(":")[0]
        assert vol in data["volumes"], f"{site}: {vol} is not a named volume"
        users = {n for n, v in volumes_of.items() if vol in v}
        assert users == {site, f"{site}-init"}, f"{site}'s volume is mounted by {users}"
        for net in svc.get("networks", []):
            assert networks.get(net, {}).get("internal") is True, f"{net} must be internal"
            members = {n for n, s in running.items() if net in (s.get("networks") or [])}
            assert members == {site, "coordinator"}, f"network {net} joins {members}"
            # One-shot jobs too: only the site's own init job, which enrolls through it.
            everyone = {n for n, s in services.items() if net in (s.get("networks") or [])}
            assert everyone == {site, f"{site}-init", "coordinator"}, (
                f"network {net} joins {everyone}")
        assert svc.get("networks"), f"{site} is on no network"
        init = services[f"{site}-init"]
        assert init.get("network_mode") is None and init.get("networks") == svc["networks"], (
            f"{site}-init must enroll over {site}'s own network, and only it")
        # The site's enrollment token: a volume of its own, shared by the job that writes
        # the token and the site's init job that uses it; never the agent nor the coordinator.
        token_volume = f"token-{site}"
        assert token_volume in data["volumes"]
        users = {n for n, v in volumes_of.items() if token_volume in v}
        assert users == {f"issue-token-{site}", f"{site}-init"}, (
            f"{token_volume} is mounted by {users}")
        for user in users:
            mounts = [m for m in services[user]["volumes"] if m.split(":")[0] == token_volume]
            assert mounts == [f"{token_volume}:/var/lib/fedward-exchange"], mounts
    # No site-side service sees the coordinator's volume (CA key, admin token, database);
    # the token-issuing jobs see it read-only.
    for name, vols in volumes_of.items():
        if "coordinator-data" in vols and name not in ("coordinator", "coordinator-init"):
            assert name.startswith("issue-token-"), f"{name} mounts coordinator-data"
            assert "coordinator-data:/var/lib/fedward:ro" in services[name]["volumes"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert name == "coordinator" and str(port).startswith("127.0.0.1:"), (
                f"{name} publishes {port}")


def test_compose_sites_dial_the_gateway_the_coordinator_serves() -> None:
    services = compose()["services"]
    env = services["coordinator"]["environment"]
    check_fedward_env(env, "compose coordinator")
    check_fedward_env(services["coordinator-init"]["environment"], "compose coordinator-init")
    assert services["coordinator-init"]["environment"] == env, (
        "coordinator-init makes the gateway certificate the coordinator serves: same settings")
    hostnames = {h.strip() for h in env["FEDWARD_FLEET_HOSTNAMES"].split(",")}
    assert env["FEDWARD_FLEET_HOST"] == "0.0.0.0"
    issuers = sorted(n for n in services if n.startswith("issue-token-"))
    assert issuers == [f"issue-token-{s}" for s in SITES]
    for site in SITES:
        issuer = services[f"issue-token-{site}"]
        assert issuer["environment"]["SITE_NAME"] == site
        api = issuer["environment"]["COORDINATOR_API"]
        assert api == f"http://coordinator:{env['FEDWARD_API_PORT']}", api
        assert issuer.get("networks") == ["central"], "the API is reached over `central`"
        init_env = services[f"{site}-init"]["environment"]
        assert init_env["SITE_NAME"] == site
        host, _, port = init_env["FLEET_ADDRESS"].rpartition(":")
        assert host in hostnames, f"{site} dials {host}, not in the gateway certificate"
        assert port == str(env["FEDWARD_FLEET_PORT"])


def _depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on must name a condition for each service"
    return {name: str(spec.get("condition")) for name, spec in deps.items()}


def test_compose_jobs_run_in_order_non_root() -> None:
    """coordinator-init -> coordinator (healthy) -> issue-token-X -> X-init -> X."""
    services = compose()["services"]
    done, healthy = "service_completed_successfully", "service_healthy"
    assert _depends(services["coordinator-init"]) == {}
    assert _depends(services["coordinator"]) == {"coordinator-init": done}
    for site in SITES:
        assert _depends(services[f"issue-token-{site}"]) == {"coordinator": healthy}
        assert _depends(services[f"{site}-init"]) == {"coordinator": healthy,
                                                      f"issue-token-{site}": done}
        assert _depends(services[site]) == {f"{site}-init": done}
    # service_healthy needs a health check: the coordinator image's, or the service's own.
    coordinator_stage = final_stage(dockerfile(DOCKER / "coordinator.Dockerfile"))
    assert services["coordinator"].get("healthcheck") or [
        a for i, a in coordinator_stage if i == "HEALTHCHECK"]
    for name, svc in services.items():
        one_shot = name.endswith("-init") or name.startswith("issue-token-")
        assert (svc.get("restart") == "no") == one_shot, f"{name}: restart {svc.get('restart')}"
        # Every service runs as the image's unprivileged user (10001): none overrides it.
        assert "user" not in svc and "privileged" not in svc and "cap_add" not in svc, name
        for dep in _depends(svc):
            assert dep in services, f"{name} depends on unknown service {dep}"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    res = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                         text=True, check=False, cwd=COMPOSE_DIR, timeout=60)
    assert res.returncode == 0, res.stderr


def _moved_script(script: str, out: Path, *, data_dir: Path, exchange: Path) -> Path:
    """A compose script with its container paths moved to folders on this machine."""
    text = (COMPOSE_DIR / "scripts" / script).read_text(encoding="utf-8")
    text = text.replace(EXCHANGE_DIR, str(exchange)).replace(DATA_DIR, str(data_dir))
    out.write_text(text, encoding="utf-8")
    return out


def _sh(script: Path, env: dict[str, str], timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_compose_scripts_enroll_a_site_with_a_real_coordinator() -> None:
    """The compose jobs, run for real outside containers against a real coordinator.

    Folders stand in for the volumes: ``c`` for coordinator-data, ``t`` for
    token-hospital-a, ``s`` for hospital-a-data. coordinator-init.sh, then (coordinator
    serving) issue-token.sh and site-init.sh for hospital-a, each twice as a repeated
    ``docker compose up`` runs them; then the enrolled agent connects through the gateway.
    """
    if not (VENV_BIN / "fedward-site").exists():
        pytest.skip("the fedward console scripts are not installed next to this Python")
    services = compose()["services"]
    base = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    base.pop("FEDWARD_DATABASE_URL", None)
    base.pop("FEDWARD_ENROLLMENT_TOKEN", None)
    site = "hospital-a"
    with short_tmp() as tmp:
        central, tokens, site_vol = tmp / "c", tmp / "t", tmp / "s"
        for d in (central, tokens, site_vol):
            d.mkdir()
        token_file = tokens / "enrollment.token"
        coordinator_init = _moved_script("coordinator-init.sh", tmp / "coordinator-init.sh",
                                         data_dir=central, exchange=tokens)
        issue = _moved_script("issue-token.sh", tmp / "issue-token.sh", data_dir=central,
                              exchange=tokens)
        site_init = _moved_script("site-init.sh", tmp / "site-init.sh", data_dir=site_vol,
                                  exchange=tokens)
        site_env = {**base, **{k: str(v) for k, v in
                               services[f"{site}-init"]["environment"].items()}}

        # Before any token: the site's job refuses, and says where the token should come from.
        res = _sh(site_init, site_env)
        assert res.returncode != 0 and "no enrollment token" in res.stderr, res.stderr
        assert not (site_vol / "site" / "keys").exists()

        env = {**base, **{k: str(v).replace(DATA_DIR, str(central)) for k, v in
                          services["coordinator-init"]["environment"].items()}}
        res = _sh(coordinator_init, env)
        assert res.returncode == 0, res.stdout + res.stderr
        home = central / "coordinator"
        assert (home / "admin.token").exists() and (home / "pki" / "ca.pem").exists()
        assert not list(tokens.iterdir()), "coordinator-init hands nothing to the sites"

        # The harness re-runs `init` (idempotent) in the same home and serves it.
        with federation(central, n_sites=2) as fed:
            assert fed.home == home
            issue_env = {**base, **{k: str(v) for k, v in
                                    services[f"issue-token-{site}"]["environment"].items()},
                         "COORDINATOR_API": f"http://127.0.0.1:{fed.api_port}"}
            res = _sh(issue, issue_env)
            assert res.returncode == 0, res.stdout + res.stderr
            token = token_file.read_text(encoding="utf-8").strip()
            assert token.startswith(f"fw1.{site}."), token[:12]
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert token not in res.stdout + res.stderr, "the token must not reach the log"
            assert sorted(p.name for p in tokens.iterdir()) == ["enrollment.token"]
            assert fed.api("GET", f"/sites/{site}").json()["status"] == "added"

            site_env["FLEET_ADDRESS"] = fed.fleet  # `coordinator:9092` inside compose
            res = _sh(site_init, site_env, timeout=180)
            assert res.returncode == 0, res.stdout + res.stderr
            assert token not in res.stdout + res.stderr
            root = site_vol / "site"
            files = EnrollmentFiles(root)
            assert files.enrolled
            assert files.coordinator_ca.read_bytes() == (home / "pki/ca.pem").read_bytes()
            cfg = SiteConfig.load(root)
            assert (cfg.name, cfg.superlink) == (site, fed.fleet)
            backoff = SiteConfig.__dataclass_fields__["reconnect_backoff_s"].default
            assert cfg.reconnect_backoff_s == backoff
            assert (root / "policy.json").exists()
            assert not list(tokens.iterdir()), "the used token is removed"
            registered = fed.api("GET", f"/sites/{site}").json()
            assert registered["status"] == "registered", registered
            kept = {p: p.read_bytes() for p in (files.site_key, files.site_cert,
                                                 files.node_key, files.node_public_key)}

            # A second `docker compose up`: no new token for an enrolled site, and the site
            # keeps its keys and certificate instead of failing on a used token.
            res = _sh(issue, issue_env)
            assert res.returncode == 0 and "enrolled already" in res.stdout, res.stdout
            assert not list(tokens.iterdir())
            res = _sh(site_init, site_env, timeout=180)
            assert res.returncode == 0 and "enrolled already" in res.stdout, (
                res.stdout + res.stderr)
            assert {p: p.read_bytes() for p in kept} == kept

            # The agent the compose service starts reaches the SuperLink through the gateway.
            fed.sites[site] = Site(name=site, root=root)
            fed.start_site(site)
            fed.wait_online(1, timeout=120)


# -- systemd -----------------------------------------------------------------------------


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text(encoding="utf-8"))
    return parser


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value.strip())
    assert m, f"cannot read a time span from {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


UNITS = {"fedward-site.service": ("fedward-site", "start"),
         "fedward-coordinator.service": ("fedward-coordinator", "serve")}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit(name: str) -> None:
    script, sub = UNITS[name]
    u = unit(name)
    svc = u["Service"]
    assert svc.get("User") and svc["User"] != "root"
    assert svc.get("Group") and svc["Group"] != "root"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == f"/opt/fedward/venv/bin/{script}", argv[0]
    check_cli([script, *argv[1:]], f"{name} ExecStart")
    assert argv[1] == sub
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert seconds(svc["TimeoutStopSec"]) == 30
    restart_sec = seconds(svc["RestartSec"])
    interval = seconds(u["Unit"]["StartLimitIntervalSec"])
    burst = int(u["Unit"]["StartLimitBurst"])
    assert 3 <= burst <= 10
    # Otherwise the start limit can never trip: restarts come too slowly to fill the window.
    assert interval >= burst * restart_sec, (interval, burst, restart_sec)
    for key, want in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                      "ProtectHome": "yes"}.items():
        assert svc.get(key) == want, f"{name}: {key}={svc.get(key)}"
    assert DATA_DIR in svc["ReadWritePaths"].split()
    for arg in argv:
        if arg.startswith("/var/"):
            assert arg.startswith(DATA_DIR + "/"), f"{name}: {arg} is not writable"
    envs = [tok.split("=", 1)[0] for line in (SYSTEMD / name).read_text().splitlines()
            if line.startswith("Environment=") for tok in shlex.split(line.split("=", 1)[1])]
    check_fedward_env(envs, name)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_lets_the_flower_sandbox_make_its_namespaces(name: str) -> None:
    """The unit runs as an unprivileged account, so the sandbox (fedward/sandbox/netns.py)
    unshares a user, a network and a PID namespace: the unit must allow exactly those three
    (``RestrictNamespaces=yes`` or a missing type makes the agent exit 5 and the coordinator
    refuse to start; more types would loosen the hardening), grant no capability, and never
    turn the sandbox off with ``FEDWARD_FLOWER_ISOLATION=container``, which is for
    containers only and would leave Flower's unauthenticated APIs on the host's loopback."""
    svc = unit(name)["Service"]
    assert set(svc.get("RestrictNamespaces", "").split()) == {"user", "net", "pid"}, (
        f"{name}: RestrictNamespaces={svc.get('RestrictNamespaces')}")
    assert svc.get("CapabilityBoundingSet") == "" and svc.get("AmbientCapabilities") == "", (
        f"{name}: the sandbox needs no capability and must be given none")
    assert svc.get("NoNewPrivileges") == "yes"
    settings = {tok.split("=", 1)[0]: tok.split("=", 1)[1]
                for line in (SYSTEMD / name).read_text().splitlines()
                if line.startswith("Environment=")
                for tok in shlex.split(line.split("=", 1)[1]) if "=" in tok}
    assert settings.get("FEDWARD_FLOWER_ISOLATION", "namespace") == "namespace", (
        f"{name}: FEDWARD_FLOWER_ISOLATION={settings['FEDWARD_FLOWER_ISOLATION']}")


def test_systemd_site_backoff_covers_flower_active_window() -> None:
    svc = unit("fedward-site.service")["Service"]
    backoff = SiteConfig.__dataclass_fields__["reconnect_backoff_s"].default
    assert isinstance(backoff, float)
    assert seconds(svc["RestartSec"]) >= max(65.0, backoff)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_execstart_help_runs(name: str) -> None:
    script, sub = UNITS[name]
    exe = VENV_BIN / script
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    res = subprocess.run([str(exe), sub, "--help"], capture_output=True, text=True,
                         check=False, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    flags = [a for a in shlex.split(unit(name)["Service"]["ExecStart"]) if a.startswith("--")]
    for flag in flags:
        assert flag in res.stdout, f"`{script} {sub} --help` does not list {flag}"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        # Point ExecStart at this checkout's console scripts so the binary check is real.
        (tmp_path / name).write_text(text.replace("/opt/fedward/venv/bin", str(VENV_BIN)))
    res = subprocess.run([tool, "verify", *[str(tmp_path / n) for n in UNITS]],
                         capture_output=True, text=True, check=False, timeout=60)
    complaints = [line for line in (res.stdout + res.stderr).splitlines()
                  if str(tmp_path) in line or ".service" in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


def test_sysusers_entry() -> None:
    lines = [ln for ln in (SYSTEMD / "fedward.sysusers.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    users = {unit(n)["Service"]["User"] for n in UNITS}
    assert [shlex.split(ln)[:2] for ln in lines] == [["u", u] for u in sorted(users)]


# -- Helm chart --------------------------------------------------------------------------


TEMPLATES = CHART / "templates"


def template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.is_file())


def values() -> dict[str, Any]:
    data = load_yaml(CHART / "values.yaml")
    assert isinstance(data, dict)
    return data


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f".Values.{dotted} is not in values.yaml"
        node = node[part]
    return node


def test_chart_metadata() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(chart["version"]))
    # The version is dynamic (setuptools-scm); an image is built from a context without
    # .git, so the fedward it installs has the fallback version: the tag must follow it.
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert str(chart["appVersion"]) == PYPROJECT["tool"]["setuptools_scm"]["fallback_version"], (
        "Chart appVersion must follow the version images are built with (the image tag "
        "defaults to it)")
    for name in ("_helpers.tpl", "deployment.yaml", "service.yaml", "pvc.yaml", "secret.yaml"):
        assert (TEMPLATES / name).is_file(), name


def test_chart_values_referenced_exist() -> None:
    vals = values()
    refs = set()
    for path in template_files():
        refs |= set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)",
                               path.read_text(encoding="utf-8")))
    assert refs, "no template uses .Values"
    for ref in sorted(refs):
        lookup(vals, ref.lstrip("."))


def test_chart_templates_well_formed() -> None:
    defined: set[str] = set()
    included: set[str] = set()
    for path in template_files():
        text = path.read_text(encoding="utf-8")
        assert text.count("{{") == text.count("}}"), f"{path.name}: unbalanced braces"
        depth = 0
        for action in re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, flags=re.S):
            word = action.split()[0] if action.split() else ""
            if word in ("if", "range", "with", "define", "block"):
                depth += 1
            elif word == "end":
                depth -= 1
                assert depth >= 0, f"{path.name}: `end` without an opening block"
        assert depth == 0, f"{path.name}: {depth} block(s) never closed"
        defined |= set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', text))
        included |= set(re.findall(r'(?:include|template)\s+"([^"]+)"', text))
    assert included <= defined, f"undefined templates: {sorted(included - defined)}"


def _uncommented(text: str) -> str:
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)
    return "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))


def test_chart_never_exposes_the_superlink() -> None:
    vals = values()
    assert not re.search(r"superlink", json.dumps(vals), re.I), (
        "values.yaml names a SuperLink setting: it binds to 127.0.0.1 in the pod, unexposed")
    allowed_ports = {".Values.api.port", ".Values.fleet.port", ".Values.service.port"}
    for path in template_files():
        text = _uncommented(path.read_text(encoding="utf-8"))
        if path.name != "NOTES.txt":  # NOTES.txt is prose for the operator
            assert not re.search(r"superlink", text, re.I), f"{path.name} names the SuperLink"
        assert not re.search(r"hostNetwork|hostPort", text), f"{path.name}: host networking"
        for m in re.finditer(r"^\s*-?\s*(containerPort|port|targetPort|nodePort):\s*(.+)$",
                             text, flags=re.M):
            value = m.group(2).strip()
            ref = re.search(r"\.Values(?:\.[A-Za-z_]+)+", value)
            assert (ref and ref.group(0) in allowed_ports) or value in ("http", "fleet"), (
                f"{path.name}: {m.group(0).strip()} exposes something other than the API "
                "or the site gateway")
    assert int(lookup(vals, "api.port")) == Settings.model_fields["api_port"].default
    assert int(lookup(vals, "fleet.port")) == Settings.model_fields["fleet_port"].default


def _args_blocks(text: str) -> list[list[str]]:
    blocks = []
    for m in re.finditer(r"^(\s*)args:\s*\n((?:\1\s+-.*\n)+)", text, flags=re.M):
        blocks.append([ln.strip()[1:].strip() for ln in m.group(2).splitlines()])
    return blocks


def test_chart_commands_and_env() -> None:
    vals = values()
    text = (TEMPLATES / "deployment.yaml").read_text(encoding="utf-8")
    blocks = _args_blocks(text)
    assert len(blocks) == 2, "an init container and the coordinator, each with args"
    for block in blocks:
        argv = ["fedward-coordinator"]
        for item in block:
            m = re.fullmatch(r"\{\{\s*\.Values\.([\w.]+)\s*(?:\|\s*quote\s*)?\}\}", item)
            argv.append(str(lookup(vals, m.group(1))) if m else item.strip("\"'"))
            assert m or "{{" not in item, f"args item too clever for this check: {item}"
        check_cli(argv, "chart deployment args")
    assert [b[0] for b in blocks] == ["init", "serve"]
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    check_fedward_env(re.findall(r"-\s*name:\s*(FEDWARD_\w+)", helpers), "chart env")
    assert "FEDWARD_DATABASE_URL" in helpers and "secretKeyRef" in helpers
    assert ".Values.postgresql.url" in (TEMPLATES / "secret.yaml").read_text()
    assert len(re.findall(r"path:\s*/api/v1/health", text)) >= 2
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in text
    pod = vals["podSecurityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_UID
    assert pod["fsGroup"] == IMAGE_UID
    assert vals["securityContext"]["allowPrivilegeEscalation"] is False
    assert re.search(r"mountPath:\s*" + re.escape(DATA_DIR) + r"\s*$", text, flags=re.M)
    assert str(lookup(vals, "home")).startswith(DATA_DIR + "/")


# -- every YAML file, and the README -----------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")
             and TEMPLATES not in p.parents]
    assert len(files) >= 3
    for path in files:
        assert load_yaml(path) is not None, path


def test_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md" and TEMPLATES not in path.parents:
            assert path.name in readme, f"deploy/README.md does not mention {path.name}"
