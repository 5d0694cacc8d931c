#!/bin/sh
# Entry point of the site image: `uharmony-fed client` for $SITE; extra arguments pass through.
set -eu
: "${SITE:?set SITE to this site's name, e.g. -e SITE=hospitalA}"
exec uharmony-fed client \
    --config "${CONFIG:-/config/fed.yaml}" \
    --site "$SITE" \
    --server "${SERVER:-server:9092}" \
    --ca "${CA:-/certs/ca.crt}" \
    --key "${KEY:-/certs/sites/$SITE.key}" \
    --site-config "${SITE_CONFIG:-/data/$SITE/site.yaml}" \
    "$@"
