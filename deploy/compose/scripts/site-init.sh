#!/bin/sh
# One-shot job (compose services hospital-X-init), run as the image's non-root user, with
# only this site's volume and its token volume mounted, on this site's own network (which
# reaches the coordinator's gateway and nothing else).
#
# What hospital IT does once per site (docs/operator-guide.md, "Set up the site"), scripted:
#   1. data: $SITE_DATA and $SITE_SCHEMA if set (mount your own data read-only and point
#      these at it), else partition $DEMO_PARTITION of the bundled demo federation
#      (scikit-learn's breast-cancer data; nothing is downloaded);
#   2. `fedward-site enroll` with the one-time token from the token volume (written there by
#      issue-token-X; in a real hospital it arrives out of band and is pasted) and the
#      gateway address $FLEET_ADDRESS: fetches the coordinator's CA and checks it against
#      the token's pin, makes the site's TLS key and Flower node key HERE (private halves
#      never leave this volume), sends a CSR and the node public key, stores the certificate,
#      and writes site.json and a starter policy.json;
#   3. removes the token file (a used token is worthless, but nothing should lie about);
#   4. `fedward-site check`: reports data problems (the agent still starts on bad data and
#      tells the coordinator why it refuses runs, so this does not stop the job).
# Idempotent: a site that is enrolled already (its certificate and key exist) keeps its keys,
# certificate and configuration, and needs no token: a second `up` does not fail on a used
# token. The token is handed over in the environment, not as an argument, so that it does
# not show in the host's process list.
set -eu
: "${SITE_NAME:?set SITE_NAME to the site name the coordinator knows}"
: "${FLEET_ADDRESS:?set FLEET_ADDRESS to the coordinator gateway host:port}"
site_dir=/var/lib/fedward/site
token_file=/var/lib/fedward-exchange/enrollment.token

if [ -f "$site_dir/keys/site-tls.pem" ] && [ -f "$site_dir/keys/site-tls.key" ]; then
    echo "site-init: $SITE_NAME is enrolled already; its keys and certificate are kept"
else
    if [ ! -s "$token_file" ]; then
        echo "site-init: no enrollment token for $SITE_NAME in $token_file: see the log of" \
            "issue-token-$SITE_NAME" >&2
        exit 1
    fi
    if [ -n "${SITE_DATA:-}" ]; then
        data=$SITE_DATA
        schema=${SITE_SCHEMA:?set SITE_SCHEMA together with SITE_DATA}
    else
        : "${DEMO_PARTITION:?set DEMO_PARTITION (1-3) or SITE_DATA and SITE_SCHEMA}"
        data=$site_dir/demo-data/data.csv
        schema=$site_dir/demo-data/schema.json
        if [ ! -f "$data" ] || [ ! -f "$schema" ]; then
            tmp=$(mktemp -d)
            fedward-site demo-data --out "$tmp" --sites 3 >/dev/null
            mkdir -p "$site_dir/demo-data"
            cp "$tmp/site-$DEMO_PARTITION/data.csv" "$tmp/site-$DEMO_PARTITION/schema.json" \
                "$site_dir/demo-data/"
            rm -rf "$tmp"
        fi
    fi
    token=$(cat "$token_file")
    FEDWARD_ENROLLMENT_TOKEN=$token fedward-site enroll --dir "$site_dir" \
        --gateway "$FLEET_ADDRESS" --data "$data" --schema "$schema"
    rm -f "$token_file"
fi
fedward-site check --dir "$site_dir" || echo "site-init: $SITE_NAME's data has problems (above)"
echo "site-init: $SITE_NAME ready"
