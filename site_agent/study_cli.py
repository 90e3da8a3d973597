"""``fedward-site policy approve-study`` and ``allow-plugin``: approve a study spec for a
project, by its hash; allow an installed model plugin, by its version and hash.

Hospital IT reviews the study spec the ML team sent (features, label, model) and approves
exactly that content: the command validates the file, computes its content hash the way the
coordinator does (:meth:`fedward.study.StudySpec.content_hash`) and adds the hash to the
project's ``studies`` in ``policy.json``. A changed spec has another hash and needs its own
approval; removing the hash from the file withdraws the approval (the policy is re-read for
every task). ``allow-plugin DIST`` adds the installed distribution's name, version and
the SHA-256 of its dist-info RECORD file to the policy's ``plugins``
(:mod:`site_agent.plugin_policy`).
"""

from __future__ import annotations

import getpass
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated

import typer

from site_agent.cli_common import console, err_console, fail
from site_agent.config import SitePaths

__all__ = ["allow_plugin", "approve_study"]



def approve_study(
    spec_file: Annotated[Path, typer.Argument(help="the study spec (YAML or JSON) you reviewed",
                                              exists=True, dir_okay=False)],
    dir: Annotated[Path, typer.Option("--dir", help="the site's data directory")],
    project: Annotated[str, typer.Option(help="the project the study is approved for")],
    by: Annotated[str | None, typer.Option(help="who approves (default: your user name)")
                  ] = None,
) -> None:
    """Approve a study spec for a project: add its content hash to policy.json."""
    from fedward.study import StudyError, load_spec
    from site_agent.audit import AuditLog, AuditLogError
    from site_agent.policy import PolicyError, SitePolicy

    root = dir.expanduser().resolve()
    paths = SitePaths(root)
    try:
        # The coordinator checks DP-SGD trainability at registration; the site reviews content.
        spec = load_spec(spec_file, check_dp=False)
    except StudyError as err:
        fail(str(err))
    try:
        policy = SitePolicy.load(paths.policy)
    except PolicyError as err:
        fail(str(err))
    accepted = policy.projects.get(project)
    if accepted is None:
        fail(f"project {project!r} is not in {paths.policy} (projects: "
              f"{', '.join(sorted(policy.projects)) or 'none'}); add it first")
    digest = spec.content_hash()
    label = f"{spec.name} ({len(spec.features)} features, label {spec.label.name}: " \
            f"{', '.join(spec.label.classes)}; model {spec.model.family})"
    if digest in accepted.studies:
        console.print(f"study {label} is already approved for project {project}: "
                      f"sha256 {digest}", highlight=False, soft_wrap=True)
        return
    projects = dict(policy.projects)
    projects[project] = replace(accepted, studies=(*accepted.studies, digest))
    updated = replace(policy, projects=MappingProxyType(projects))
    SitePolicy.from_dict(updated.to_dict(), source="the updated policy")  # still valid
    updated.save(paths.policy)
    who = by or getpass.getuser()
    try:
        AuditLog(paths.audit_log).append("study-approved", {
            "project": project, "study": spec.name, "study_hash": digest, "by": who})
    except AuditLogError as err:
        err_console.print(f"[bold yellow]warning:[/] the approval is in the policy but the "
                          f"audit log could not be written: {err}")
    console.print(f"study {label} approved for project {project} by {who}: sha256 {digest}",
                  highlight=False, soft_wrap=True)


def allow_plugin(
    distribution: Annotated[str, typer.Argument(
        help="the model plugin's distribution name, as pip knows it (installed here)")],
    dir: Annotated[Path, typer.Option("--dir", help="the site's data directory")],
    by: Annotated[str | None, typer.Option(help="who allows it (default: your user name)")
                  ] = None,
) -> None:
    """Allow the installed model plugin: add its name, version and RECORD hash to
    policy.json's plugins (runs must pin exactly that)."""
    from fedward.plugins import PluginError, installed_pin
    from site_agent.audit import AuditLog, AuditLogError
    from site_agent.policy import PolicyError, SitePolicy

    paths = SitePaths(dir.expanduser().resolve())
    try:
        pin = installed_pin(distribution)
    except PluginError as err:
        fail(str(err))
    if pin is None:
        fail(f"no distribution named {distribution!r} is installed in this site agent's "
              "environment; install the ML team's wheel first (pip install FILE.whl)")
    try:
        policy = SitePolicy.load(paths.policy)
    except PolicyError as err:
        fail(str(err))
    if any(pin.same(p) for p in policy.plugins):
        console.print(f"model plugin {pin} is already allowed", highlight=False,
                      soft_wrap=True)
        return
    updated = replace(policy, plugins=(*policy.plugins, pin))
    SitePolicy.from_dict(updated.to_dict(), source="the updated policy")  # still valid
    updated.save(paths.policy)
    who = by or getpass.getuser()
    try:
        AuditLog(paths.audit_log).append("plugin-allowed", {
            **pin.to_config(), "by": who})
    except AuditLogError as err:
        err_console.print(f"[bold yellow]warning:[/] the plugin is in the policy but the "
                          f"audit log could not be written: {err}")
    console.print(f"model plugin {pin} allowed by {who}", highlight=False, soft_wrap=True)
