#!/bin/sh
# One-shot job (compose services issue-token-X), run as the image's non-root user, on the
# `central` network once the coordinator is healthy. What the coordinator team does once per
# site: `fedward-coordinator enroll-token $SITE_NAME` adds the site if it is new and issues
# its one-time enrollment token (`fw1.<site>.<secret>.<CA pin>.<check>`, valid 24 h), with the admin
# token that coordinator-init wrote (coordinator volume, mounted read-only).
#
# The token goes to /var/lib/fedward-exchange/enrollment.token, mode 0600, in a volume
# that only this job and $SITE_NAME's init job mount (one volume per site), and
# nowhere else: not to the log. In a real federation the token travels out of band: read
# over the phone, pasted from a ticket or a message. It is a credential until used, but a
# narrow one: it works once, expires after 24 h, and only for this site's name; so a volume
# on one Docker host is an acceptable courier for this demo.
#
# Idempotent: a site that is enrolled already (status `registered` at the coordinator) gets
# no new token, and a token left from an earlier run is removed. A site that is not
# enrolled yet gets a fresh token on every run, replacing the old file (the old token stays
# valid until it expires or is used). A revoked site is refused with the reason, and this
# job fails, so that site's init job and agent do not start.
set -eu
: "${SITE_NAME:?set SITE_NAME to the site to issue a token for}"
: "${COORDINATOR_API:?set COORDINATOR_API to the coordinator REST API base URL}"
home=/var/lib/fedward/coordinator
token_file=/var/lib/fedward-exchange/enrollment.token

# The site's status at the coordinator (`new` if it does not know the site yet).
status=$(fedward-coordinator sites --json --home "$home" --api "$COORDINATOR_API" |
    python -c 'import json, sys; name = sys.argv[1]
print(next((s["status"] for s in json.load(sys.stdin) if s["name"] == name), "new"))' \
    "$SITE_NAME")
if [ "$status" = registered ]; then
    rm -f "$token_file"
    echo "issue-token: $SITE_NAME is enrolled already; no token issued"
    exit 0
fi

out=$(fedward-coordinator enroll-token "$SITE_NAME" --home "$home" --api "$COORDINATOR_API" \
    --json)
umask 077
printf '%s' "$out" | python -c 'import json, sys; print(json.load(sys.stdin)["token"])' \
    >"$token_file.tmp"
chmod 0600 "$token_file.tmp"
mv -f "$token_file.tmp" "$token_file"
echo "issue-token: one-time enrollment token for $SITE_NAME written to its exchange volume"
