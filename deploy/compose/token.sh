#!/usr/bin/env bash
# Why this script exists: trying the compose system needs a user token signed
# with the generated JWT_SECRET and carrying the issuer and audience the
# services check (JWT_ISSUER, JWT_AUDIENCE in chatfleet.env). Prints one.
#
# Usage: deploy/compose/token.sh USER_ID [TTL_SECONDS]   (default TTL 3600)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secrets="${CHATFLEET_SECRETS_FILE:-$here/secrets.env}"
user="${1:?usage: token.sh USER_ID [TTL_SECONDS]}"
ttl="${2:-3600}"
[[ "$user" =~ ^[A-Za-z0-9_.:@-]{1,128}$ ]] || { echo "token.sh: invalid user id: $user" >&2; exit 2; }
[[ "$ttl" =~ ^[0-9]+$ ]] || { echo "token.sh: TTL must be a number of seconds" >&2; exit 2; }
[[ -f "$secrets" ]] || { echo "token.sh: $secrets is missing; run deploy/compose/init-secrets.sh" >&2; exit 1; }
value() { sed -n "s/^$1=//p" "$2" | tail -n 1; }
secret="$(value JWT_SECRET "$secrets")"
issuer="$(value JWT_ISSUER "$here/chatfleet.env")"
audience="$(value JWT_AUDIENCE "$here/chatfleet.env")"
[[ -n "$secret" ]] || { echo "token.sh: no JWT_SECRET in $secrets" >&2; exit 1; }
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","iss":"%s","aud":"%s","iat":%d,"nbf":%d,"exp":%d}' \
  "$user" "$issuer" "$audience" "$now" "$now" "$((now + ttl))" | b64url)
signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$signature"
