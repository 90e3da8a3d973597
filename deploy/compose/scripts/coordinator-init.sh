#!/bin/sh
# One-shot job (compose service coordinator-init), run as the image's non-root user, with
# no network. Initialises the coordinator's data directory: site CA, gateway certificate for
# $FEDWARD_FLEET_HOSTNAMES, database schema, first admin (API token in admin.token, mode
# 0600, which the issue-token-X jobs read). Idempotent: what exists is kept; the gateway
# certificate is reissued only if the host names changed.
#
# Nothing is handed to the sites from here: each site's enrollment token pins the CA (a
# prefix of its SHA-256), and `fedward-site enroll` fetches the CA from the gateway and
# checks it against that pin.
set -eu
fedward-coordinator init --home /var/lib/fedward/coordinator
