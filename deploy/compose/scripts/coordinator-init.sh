#!/bin/sh
# One-shot job (compose service coordinator-init), run as the image's non-root user.
# Initialises the coordinator's data directory: site CA, gateway certificate for
# $FEDWARD_FLEET_HOSTNAMES, database schema, first admin (token in admin.token, mode 0600).
# Idempotent: what exists is kept. Then publishes the CA CERTIFICATE (public; never the
# key) to the exchange volume, for the demo sites' init jobs.
set -eu
home=/var/lib/fedward/coordinator
exchange=/var/lib/fedward-exchange

fedward-coordinator init --home "$home"
install -m 0644 "$home/pki/ca.pem" "$exchange/ca.pem"
echo "coordinator-init: CA certificate published to the exchange volume"
