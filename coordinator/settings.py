"""Coordinator settings: one ``BaseSettings`` class, read from ``FEDWARD_*`` variables.

Every knob has a default that works on a single machine: the data directory holds a SQLite
database, and the REST API listens on loopback only. PostgreSQL is chosen by setting
``FEDWARD_DATABASE_URL`` (``postgresql+psycopg2://user@host:port/db``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.mlflow_names import check_alias, check_name_template, check_tracking_uri
from fedward.drift_psi import PSI_ALARM

__all__ = ["DEFAULT_HOME", "Settings", "SettingsError", "load_settings"]

DEFAULT_HOME = Path("~/.fedward/coordinator")


class SettingsError(ValueError):
    """A ``FEDWARD_*`` variable holds a value the coordinator cannot use; the message names
    each such variable and what it must be."""


class Settings(BaseSettings):
    """Settings of one coordinator installation.

    Attributes:
        home: The coordinator's data directory (database file, checkpoints, PKI). Relative
            paths and ``~`` are resolved to an absolute path.
        database_url: SQLAlchemy URL of the database; ``None`` means the SQLite file
            ``coordinator.db`` inside ``home``.
        api_host: Address the REST API binds to. Loopback by default: expose it through a
            reverse proxy with TLS, never directly.
        api_port: TCP port of the REST API.
        fleet_host: Address the site gateway binds to: the one port sites connect to
            (``0.0.0.0`` to accept sites from other hosts).
        fleet_port: TCP port of the site gateway (0: pick a free one, for tests).
        fleet_hostnames: Comma-separated names and IPs sites use to reach the gateway; they
            go into the gateway's TLS certificate.
        token_ttl_days: How long a user's API token works after it is issued (a login
            session lasts 12 hours).
        flower_isolation: ``namespace`` (default) runs the SuperLink, its SuperExec and
            ServerApps in a private network and PID namespace that no other local account
            can reach; ``container`` only in a container whose network namespace holds
            nothing but the coordinator (the appliance's images set it). The site agent
            reads the same variable, ``FEDWARD_FLOWER_ISOLATION``.
        mlflow_tracking_uri: The MLflow tracking server (``http(s)://host:port``) that
            completed runs and approved releases are handed to; ``None``: no automatic
            hand-off (``fedward-coordinator mlflow export`` still works with a URI).
        mlflow_experiment: MLflow experiment of a project's runs; ``{project}`` is replaced
            by the project name.
        mlflow_model_name: Registered model that a project's approved releases become
            versions of; ``{project}`` is replaced by the project name.
        mlflow_alias: Alias set on the newest approved (unrevoked) release's version.
        mlflow_retry_s: How often pending hand-offs are looked for, and the first retry's
            delay after a failure (it doubles per failure, up to 15 minutes).
        metrics_host: Address of the Prometheus metrics listener (``GET /metrics``, apart
            from the API). Loopback by default; any other address needs
            ``metrics_token_file``.
        metrics_port: Its TCP port (0: pick a free one; -1: no metrics listener).
        metrics_token_file: A file holding the bearer token Prometheus must present.
        max_concurrent_runs: How many runs may be pending or running at once on this
            coordinator; a launch beyond it is refused (429) naming the runs that hold it.
        max_concurrent_runs_per_project: The same limit per project.
        drift_psi_alarm: A drift report's feature is in alarm above this PSI (0.25).
        drift_alpha: ... or below this p-value, Bonferroni-corrected over the report's
            features (0.01).
    """

    model_config = SettingsConfigDict(env_prefix="FEDWARD_", extra="ignore")

    home: Path = Field(default=DEFAULT_HOME)
    database_url: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8600, ge=1, le=65535)
    fleet_host: str = "127.0.0.1"
    fleet_port: int = Field(default=9092, ge=0, le=65535)
    fleet_hostnames: str = "127.0.0.1,localhost"
    token_ttl_days: int = Field(default=90, ge=1, le=3650)
    flower_isolation: Literal["namespace", "container"] = "namespace"
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "fedward-{project}"
    mlflow_model_name: str = "fedward-{project}"
    mlflow_alias: str = "approved"
    mlflow_retry_s: float = Field(default=30.0, gt=0, le=3600)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=8601, ge=-1, le=65535)
    metrics_token_file: Path | None = None
    # Every run holds a ServerApp process (about 150 MiB) and its sites' attention.
    max_concurrent_runs: int = Field(default=4, ge=1, le=1000)
    max_concurrent_runs_per_project: int = Field(default=2, ge=1, le=1000)
    # The drift alarm (coordinator.drift): a feature is in alarm when its PSI is above
    # drift_psi_alarm or its test's p-value below drift_alpha / (features in the report).
    drift_psi_alarm: float = Field(default=PSI_ALARM, gt=0, le=100)
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        # An empty FEDWARD_DATABASE_URL= in a unit file means "not set", not "invalid URL".
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return check_tracking_uri(value)

    @field_validator("mlflow_experiment", "mlflow_model_name")
    @classmethod
    def _project_template(cls, value: str) -> str:
        return check_name_template(value)

    @field_validator("mlflow_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return check_alias(value)

    @property
    def effective_database_url(self) -> str:
        """The database URL to use: ``database_url`` or the SQLite file in ``home``."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{self.home / 'coordinator.db'}"


def load_settings(home: Path | None = None) -> Settings:
    """Read the settings from the environment, optionally overriding the data directory.

    Args:
        home: Data directory to use instead of ``FEDWARD_HOME`` (for example from a
            ``--home`` command-line option).

    Returns:
        The settings. Nothing is created on disk.

    Raises:
        SettingsError: a variable holds a bad value (its value is not repeated: a database
            URL may hold a password).
    """
    try:
        return Settings() if home is None else Settings(home=home)
    except ValidationError as err:
        problems = "; ".join(
            f"FEDWARD_{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            for e in err.errors())
        raise SettingsError(
            f"bad coordinator setting: {problems}. Correct or unset it in the environment "
            "(for the coordinator service: its systemd unit or container) and start "
            "again") from None
