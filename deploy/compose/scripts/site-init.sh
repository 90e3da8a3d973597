#!/bin/sh
# One-shot job (compose services hospital-X-init), run as the image's non-root user, with
# only this site's volume and the exchange volume mounted, and no network.
#
# What hospital IT does once per site (docs/operator-guide.md), scripted:
#   1. data: $SITE_DATA and $SITE_SCHEMA if set (mount your own data read-only and point
#      these at it), else partition $DEMO_PARTITION of the bundled demo federation
#      (scikit-learn's breast-cancer data; nothing is downloaded);
#   2. `fedward-site init`: writes site.json, copies the coordinator's CA certificate in;
#   3. `fedward-site check`: reports data problems (the agent still starts on bad data and
#      tells the coordinator why it refuses runs, so this does not stop the job);
#   4. `fedward-site keygen`: the Flower node key; the private half stays in this volume;
#   5. publishes the node PUBLIC key to the exchange volume for register-sites.
# Idempotent: an existing site.json and node key are kept.
set -eu
: "${SITE_NAME:?set SITE_NAME to the site name the coordinator knows}"
: "${FLEET_ADDRESS:?set FLEET_ADDRESS to the coordinator gateway host:port}"
site_dir=/var/lib/fedward/site
exchange=/var/lib/fedward-exchange

if [ ! -f "$site_dir/site.json" ]; then
    if [ -n "${SITE_DATA:-}" ]; then
        data=$SITE_DATA
        schema=${SITE_SCHEMA:?set SITE_SCHEMA together with SITE_DATA}
    else
        : "${DEMO_PARTITION:?set DEMO_PARTITION (1-3) or SITE_DATA and SITE_SCHEMA}"
        tmp=$(mktemp -d)
        fedward-site demo-data --out "$tmp" --sites 3 >/dev/null
        mkdir -p "$site_dir/demo-data"
        cp "$tmp/site-$DEMO_PARTITION/data.csv" "$tmp/site-$DEMO_PARTITION/schema.json" \
            "$site_dir/demo-data/"
        rm -rf "$tmp"
        data=$site_dir/demo-data/data.csv
        schema=$site_dir/demo-data/schema.json
    fi
    fedward-site init --dir "$site_dir" --name "$SITE_NAME" --superlink "$FLEET_ADDRESS" \
        --ca-cert "$exchange/ca.pem" --data "$data" --schema "$schema" \
        --reconnect-backoff "${RECONNECT_BACKOFF_S:-65}"
fi
fedward-site check --dir "$site_dir" || echo "site-init: $SITE_NAME's data has problems (above)"
fedward-site keygen --dir "$site_dir"
mkdir -p "$exchange/node-keys"
install -m 0644 "$site_dir/keys/node_key.pub" "$exchange/node-keys/$SITE_NAME.pub"
echo "site-init: $SITE_NAME ready; node public key published"
