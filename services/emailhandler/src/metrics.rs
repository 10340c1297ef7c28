//! Metric names, in one place so dashboards, alerts and `docs/email.md` have one
//! source of truth.

/// Counter `{kind}`: emails the SMTP relay accepted. `kind` is `chat_digest`,
/// `purchase`, `payment_reminder` or `shipping`.
pub const EMAILS_SENT: &str = "emails_sent_total";
/// Counter `{reason}`: events (chat messages, domain changes) that did not become an
/// email or part of one. `reason`: `duplicate`, `online`, `opted_out`, `unknown_user`,
/// `no_email`, `invalid_email`, `not_new` (a chat edit or delete), `deleted` (a domain
/// document was deleted).
pub const EMAILS_SKIPPED: &str = "emails_skipped_total";
/// Counter `{kind, class}`: failed SMTP sends; `class` is `transient` (retried) or
/// `permanent` (dead-lettered at once).
pub const SEND_FAILURES: &str = "email_send_failures_total";
/// Gauge: chat digests (recipients) waiting to be sent.
pub const DIGEST_PENDING: &str = "email_digest_pending";
/// Counter: chat messages counted but not listed because their digest was full.
pub const DIGEST_OVERFLOW: &str = "email_digest_overflow_total";
/// Counter `{reason}`: digests given up on and dead-lettered (`permanent`,
/// `retries_exhausted`, `render`).
pub const DIGEST_DEAD_LETTERS: &str = "email_digest_dead_letters_total";
/// Histogram `{outcome}`: one SMTP send (`ok`, `transient`, `permanent`), seconds.
pub const SMTP_SEND_DURATION: &str = "smtp_send_duration_seconds";
/// Counter: presence checks that failed (Redis down or slow); the user counts as offline.
pub const PRESENCE_FAILURES: &str = "email_presence_check_failures_total";

/// Counts one event that will not be emailed.
pub fn skipped(reason: &'static str, events: u64) {
    metrics::counter!(EMAILS_SKIPPED, "reason" => reason).increment(events);
}
