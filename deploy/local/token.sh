#!/usr/bin/env bash
# Why this script exists: every public endpoint and socket wants a JWT, and a
# newcomer should not need a JWT library to try chatfleet. It prints an HS256
# token for a user, signed with the local stack's development secret
# ($CHATFLEET_DEV_SECRETS, made by up.sh), valid for TTL seconds.
#
# Usage: deploy/local/token.sh USER_ID [TTL_SECONDS]   (default TTL 86400)
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

user="${1:?usage: token.sh USER_ID [TTL_SECONDS]}"
ttl="${2:-86400}"
[[ "$user" =~ ^[A-Za-z0-9_.:@-]{1,128}$ ]] || { echo "token.sh: invalid user id: $user" >&2; exit 2; }
[[ "$ttl" =~ ^[0-9]+$ ]] || { echo "token.sh: TTL must be a number of seconds" >&2; exit 2; }
[[ -n "${JWT_SECRET:-}" ]] || { echo "token.sh: no JWT_SECRET; run deploy/local/up.sh first" >&2; exit 1; }

b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","iat":%d,"exp":%d}' "$user" "$now" "$((now + ttl))" | b64url)
signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$JWT_SECRET" -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$signature"
