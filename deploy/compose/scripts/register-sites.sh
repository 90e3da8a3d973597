#!/bin/sh
# One-shot job (compose service register-sites): what the ML team does once per site.
# Adds each site and registers its Flower node public key through the coordinator's REST
# API, with the admin token that coordinator-init wrote (read from the coordinator volume,
# mounted read-only). Idempotent: the same key again is a no-op; a different key for a
# registered site is refused (revoke it first).
set -eu
: "${SITES:?set SITES to the site names, space-separated}"
: "${COORDINATOR_API:?set COORDINATOR_API to the coordinator REST API base URL}"
for site in $SITES; do
    fedward-coordinator add-site "$site" \
        --node-key "/var/lib/fedward-exchange/node-keys/$site.pub" \
        --home /var/lib/fedward/coordinator --api "$COORDINATOR_API"
done
