#!/usr/bin/env bash
# Why this script exists: purchases, payment reminders and shipping updates are
# written to MongoDB by other parts of the product, which the local stack does
# not have. To see those notifications by hand, a newcomer needs a way to write
# such a document the way those services would. This inserts one into the local
# MongoDB with `outbox_pending: true`, so the outbox relay captures it to its
# topic (purchases.changes, payments.changes, shipments.changes) and the change
# handler's domain pipeline notifies the user. It prints what it inserted.
#
# Usage: deploy/local/create-event.sh KIND USER [STATUS]
#   KIND    purchase | payment (a payment reminder) | shipment
#   USER    the user to notify (1-128 of A-Z a-z 0-9 _ . : @ -)
#   STATUS  purchase: created paid cancelled refunded completed   [paid]
#           payment:  pending overdue paid failed                 [pending]
#           shipment: label_created shipped in_transit out_for_delivery
#                     delivered exception                         [shipped]
#
# Environment (defaults in brackets): MONGODB_URI [from env.sh],
# MONGODB_DATABASE [chat], AMOUNT_MINOR (purchase/payment amount in cents)
# [4599], CURRENCY [EUR], CARRIER (shipment) [DHL].
#
# Watch it arrive: subscribe to the user's notifications, e.g.
#   websocat "ws://127.0.0.1:$GENERALNOTIFICATIONSHANDLER_HTTP_PORT/notifications/subscribe?user_id=bob&access_token=$(deploy/local/token.sh bob)"
# The documents are described in docs/domain-events.md.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

usage() {
  sed -n '/^# Usage:/,/^#   STATUS/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  sed -n '/^#           payment:/,/\[shipped\]/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}
fail() {
  printf 'create-event.sh: %s\n' "$*" >&2
  exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
kind=$1
user=$2
status=${3:-}

case "$kind" in
  purchase | purchases)
    kind=purchase
    statuses="created paid cancelled refunded completed"
    : "${status:=paid}"
    ;;
  payment | payments | payment-reminder | payment_reminder)
    kind=payment
    statuses="pending overdue paid failed"
    : "${status:=pending}"
    ;;
  shipment | shipments | shipping)
    kind=shipment
    statuses="label_created shipped in_transit out_for_delivery delivered exception"
    : "${status:=shipped}"
    ;;
  -h | --help) usage ;;
  *) fail "unknown KIND '$kind' (purchase, payment or shipment)" ;;
esac
[[ "$user" =~ ^[A-Za-z0-9_.:@-]{1,128}$ ]] || fail "invalid user id '$user' (1-128 of A-Z a-z 0-9 _ . : @ -)"
[[ " $statuses " == *" $status "* ]] || fail "invalid $kind status '$status' (one of: $statuses)"

amount="${AMOUNT_MINOR:-4599}"
currency="${CURRENCY:-EUR}"
carrier="${CARRIER:-DHL}"
database="${MONGODB_DATABASE:-chat}"
[[ "$amount" =~ ^-?[0-9]{1,15}$ ]] || fail "AMOUNT_MINOR must be a whole number of minor units (cents), got '$amount'"
[[ "$currency" =~ ^[A-Z]{3}$ ]] || fail "CURRENCY must be three upper-case letters (ISO 4217), got '$currency'"
[[ -n "$carrier" && ${#carrier} -le 64 ]] || fail "CARRIER must be 1-64 characters"
[[ -x "$PYTHON_BIN" ]] || fail "no venv python at $PYTHON_BIN; run deploy/local/install.sh (or up.sh) first"

# Values reach Python as arguments, never as code.
exec "$PYTHON_BIN" - "$MONGODB_URI" "$database" "$kind" "$user" "$status" "$amount" "$currency" "$carrier" <<'PYTHON'
import datetime
import json
import secrets
import sys

import pymongo

uri, database, kind, user, status, amount, currency, carrier = sys.argv[1:]
now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
suffix = now.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)

if kind == "purchase":
    collection, topic, notification = "purchases", "purchases.changes", "purchase"
    doc_id = "pur-" + suffix
    document = {"purchase_id": doc_id, "user_id": user, "status": status,
                "amount_minor": int(amount), "currency": currency, "updated_at": now}
elif kind == "payment":
    collection, topic, notification = "payments", "payments.changes", "payment_reminder"
    doc_id = "pay-" + suffix
    document = {"payment_id": doc_id, "user_id": user, "status": status,
                "amount_minor": int(amount), "currency": currency,
                "due_date": now + datetime.timedelta(days=3)}
else:
    collection, topic, notification = "shipments", "shipments.changes", "shipping"
    doc_id = "shp-" + suffix
    document = {"shipment_id": doc_id, "user_id": user, "status": status, "carrier": carrier,
                "tracking_number": "TRK" + secrets.token_hex(5).upper(),
                "estimated_delivery": now + datetime.timedelta(days=2), "updated_at": now}

# The outbox marker goes in with the document, in one write: the relay publishes
# marked documents and clears the marker once the broker has acknowledged them.
record = {"_id": doc_id, **document, "outbox_pending": True}
try:
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000, tz_aware=True)
    client[database][collection].insert_one(record)
except pymongo.errors.PyMongoError as err:
    sys.exit(f"create-event.sh: cannot insert into {database}.{collection} at {uri}: {err}\n"
             "  is the local stack up? (deploy/local/up.sh)")

shown = {k: (v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime.datetime) else v)
         for k, v in record.items()}
print(f"inserted into {database}.{collection}:")
print(json.dumps(shown, indent=2))
print(f"captured to {topic} (key {user}); {user}'s notification sockets get "
      f'{{"type":"notification","kind":"{notification}",...}}')
PYTHON
