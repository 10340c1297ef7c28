//! Metric names, in one place so dashboards and alerts have one source of truth.
//!
//! Why this module exists: the consumer, the retry loop and the statistics callback
//! all record metrics; naming them here keeps the names and labels consistent and
//! documented (`docs/kafkawrapper.md` lists them with their labels).

/// Counter `{topic, outcome}`: messages finished, by how. `outcome` is one of
/// `ok` (first attempt), `retried_ok` (after one or more retries), `exhausted`
/// (retries used up), `permanent`, `malformed`.
pub const MESSAGES_TOTAL: &str = "kafka_messages_total";
/// Counter `{topic}`: retries scheduled after a retryable failure.
pub const RETRIES_TOTAL: &str = "kafka_retries_total";
/// Counter `{topic, kind}`: messages published to the dead-letter topic; `topic` is
/// the original topic, `kind` the `x-error-kind`.
pub const DEAD_LETTERS_TOTAL: &str = "kafka_dead_letters_total";
/// Counter `{topic}`: failed attempts to publish a dead letter (each is retried).
pub const DEAD_LETTER_FAILURES_TOTAL: &str = "kafka_dead_letter_failures_total";
/// Histogram `{topic}`: duration of one handler call, in seconds.
pub const HANDLE_DURATION_SECONDS: &str = "kafka_handle_duration_seconds";
/// Histogram `{topic}`: how old a record is when the consumer receives it (now minus
/// the record's timestamp, normally the producer's send time), in seconds: the time
/// the message spent in the producer, the broker and the fetch.
pub const RECORD_AGE_SECONDS: &str = "kafka_record_age_seconds";
/// Gauge `{group}`: messages fetched and not yet finished (queued, in a handler or
/// held while their partition is paused).
pub const IN_FLIGHT: &str = "kafka_in_flight";
/// Gauge `{group}`: partitions paused because their share of `max_in_flight` is full.
pub const PAUSED_PARTITIONS: &str = "kafka_paused_partitions";
/// Gauge `{group}`: partitions currently assigned to this member.
pub const ASSIGNED_PARTITIONS: &str = "kafka_assigned_partitions";
/// Gauge `{group, topic, partition}`: end offset minus committed offset, from
/// librdkafka statistics (every `statistics.interval.ms`).
pub const CONSUMER_LAG: &str = "kafka_consumer_lag";
/// Counter `{group}`: offset commits the broker refused (they are retried).
pub const COMMIT_FAILURES_TOTAL: &str = "kafka_commit_failures_total";
/// Counter `{group}`: consumer errors reported by librdkafka (not fatal).
pub const CONSUMER_ERRORS_TOTAL: &str = "kafka_consumer_errors_total";
/// Counter `{group}`: rebalances seen by this member, `{kind=assign|revoke}`.
pub const REBALANCES_TOTAL: &str = "kafka_rebalances_total";
