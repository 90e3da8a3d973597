# syntax=docker/dockerfile:1
#
# Fedward site agent: what a hospital runs. One long-lived process that supervises a Flower
# SuperNode (outbound only), runs the warm DP trainer, and keeps the site's ledger, keys
# and configuration in its data directory. It listens on no non-loopback address: the
# image exposes no port.
#
# Build from the repository root (the build context):
#   docker build -f deploy/docker/site-agent.Dockerfile -t fedward-site:0.1.0 .
# site-agent.Dockerfile.dockerignore next to this file keeps the context to the sources.
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
RUN /opt/fedward/venv/bin/pip install "/src[site]" \
 && /opt/fedward/venv/bin/pip check

FROM python:3.11-slim
LABEL org.opencontainers.image.title="fedward-site" \
      org.opencontainers.image.description="Fedward site agent (hospital side)" \
      org.opencontainers.image.version="0.1.0"
# tini as PID 1: forwards SIGTERM to the agent, which then stops its SuperNode cleanly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged UID/GID (10001) so volume ownership is the same on every host.
# /var/lib/fedward-exchange is only a mount point for the compose demo's enrollment-token
# volume (deploy/compose/README.md); made here so that a new volume mounted on it belongs
# to 10001.
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
    FEDWARD_FLOWER_ISOLATION=container
# The site's own state: site.json, keys (the private halves never leave), the privacy
# ledger, replies, logs. Back it up; never reset the ledger.
VOLUME ["/var/lib/fedward"]
USER 10001:10001
# Healthy once the agent's warm trainer is listening on its local socket (the agent makes
# it at start, before connecting out). Assumes the default data directory below.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["test", "-S", "/var/lib/fedward/site/run/trainer.sock"]
ENTRYPOINT ["/usr/bin/tini", "--", "fedward-site"]
CMD ["start", "--dir", "/var/lib/fedward/site"]
