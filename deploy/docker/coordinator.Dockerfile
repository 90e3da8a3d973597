# syntax=docker/dockerfile:1
#
# Fedward coordinator: REST API, registry, site gateway (mutual TLS, the one port sites
# dial) and the Flower SuperLink, which binds to 127.0.0.1 inside the container only.
#
# Build from the repository root (the build context):
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedward-coordinator:0.1.0 .
# coordinator.Dockerfile.dockerignore next to this file keeps the context to the sources.
#
# Network use at build time: package registries only (Debian for tini, the PyTorch CPU
# wheel index for torch, PyPI for everything else). Nothing else is downloaded.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedward/venv
# torch first, pinned, from the CPU index: a plain or open-range torch pulls a multi-GB CUDA
# build. The project pins the same version, so the next step keeps this wheel.
RUN /opt/fedward/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0
COPY pyproject.toml /src/
COPY fedward /src/fedward
COPY coordinator /src/coordinator
COPY site_agent /src/site_agent
COPY privacy /src/privacy
COPY export /src/export
RUN /opt/fedward/venv/bin/pip install "/src[coordinator]" \
 && /opt/fedward/venv/bin/pip check

FROM python:3.11-slim
LABEL org.opencontainers.image.title="fedward-coordinator" \
      org.opencontainers.image.description="Fedward federated-learning coordinator" \
      org.opencontainers.image.version="0.1.0"
# tini as PID 1: forwards SIGTERM to the CLI and reaps the SuperLink's ServerApp children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged UID/GID (10001) so volume ownership is the same on every host and
# Kubernetes' runAsUser/fsGroup can name it. /var/lib/fedward-exchange is only a mount
# point for the compose demo's enrollment-token volumes (deploy/compose/README.md); made
# here so that a new volume mounted on it belongs to 10001.
RUN groupadd --system --gid 10001 fedward \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedward --no-create-home \
        --shell /usr/sbin/nologin fedward \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/fedward /var/lib/fedward-exchange
COPY --from=build /opt/fedward/venv /opt/fedward/venv
# Flower's APIs have no authentication, so they must be out of other local accounts'
# reach. On a host the appliance makes a private network namespace for them; a container
# already has one of its own, holding only this service (no other process, no other user),
# and the default seccomp profile forbids making another: "container" uses it as is.
ENV PATH=/opt/fedward/venv/bin:$PATH \
    HOME=/var/lib/fedward \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDWARD_HOME=/var/lib/fedward/coordinator \
    FEDWARD_API_HOST=0.0.0.0 \
    FEDWARD_API_PORT=8600 \
    FEDWARD_FLEET_HOST=0.0.0.0 \
    FEDWARD_FLEET_PORT=9092 \
    FEDWARD_FLOWER_ISOLATION=container
# The coordinator's state: database (SQLite by default), site CA and its key, checkpoints,
# the SuperLink's state. Back it up; losing the CA key means re-enrolling every site.
VOLUME ["/var/lib/fedward"]
USER 10001:10001
# 8600: REST API (plain HTTP; put a TLS reverse proxy in front). 9092: site gateway (mutual
# TLS, terminated by the coordinator itself: pass it through as TCP). The SuperLink's own
# port is loopback-only and deliberately not listed.
EXPOSE 8600 9092
# FEDWARD_FLEET_HOSTNAMES (names/IPs sites dial; they go into the gateway certificate) has
# no useful default inside a container: set it at run time.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/health' % os.environ.get('FEDWARD_API_PORT', '8600'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "fedward-coordinator"]
CMD ["serve"]
