//! emailhandler's settings: which topics and group, where users and pending digests
//! live, how to reach the SMTP relay, where the templates are and how digests batch.
//!
//! Why this module exists: every knob of the service is named here once, with its
//! documented environment variable and default, so `docs/email.md` and the code
//! cannot disagree. Sections follow the servicekit pattern (`Default` holds the
//! defaults, `ENV` maps the flat variable names to fields).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatstream::domain::DomainKind;
use eventstore::EventStoreSettings;
use kafkawrapper::{KafkaSettings, RetrySettings};
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;

/// The chat change topic (the domain topics come from [`DomainKind::topic`]).
pub const CHAT_TOPIC: &str = "chat.changes";

/// Where users are looked up and pending digests are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MongoSettings {
    /// `MONGODB_URI`: the connection string.
    pub uri: String,
    /// `MONGODB_DATABASE`: the database holding both collections.
    pub database: String,
    /// `EMAIL_USERS_COLLECTION`: `{user_id, email, display_name, email_opt_in, locale?}`.
    pub users_collection: String,
    /// `EMAIL_DIGESTS_COLLECTION`: pending chat digests, one document per recipient.
    pub digests_collection: String,
    /// `MONGODB_TIMEOUT`: server selection, connect and per-operation bound.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017".to_owned(),
            database: "chat".to_owned(),
            users_collection: "users".to_owned(),
            digests_collection: "email_digests".to_owned(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl MongoSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("MONGODB_URI", "uri"),
        ("MONGODB_DATABASE", "database"),
        ("EMAIL_USERS_COLLECTION", "users_collection"),
        ("EMAIL_DIGESTS_COLLECTION", "digests_collection"),
        ("MONGODB_TIMEOUT", "timeout"),
    ];
}

/// How the connection to the SMTP relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP (local sinks, a relay on the same host or inside a mesh with mTLS).
    #[default]
    None,
    /// Plain connection upgraded with STARTTLS; refuses to go on without it.
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

/// The SMTP relay.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SmtpSettings {
    /// `SMTP_HOST`: the relay's host name (also the name its TLS certificate must carry).
    pub host: String,
    /// `SMTP_PORT`: the relay's port.
    pub port: u16,
    /// `SMTP_SECURITY`: `none`, `starttls` or `tls`.
    pub security: SmtpSecurity,
    /// `SMTP_USERNAME`: empty means no authentication.
    pub username: String,
    /// `SMTP_PASSWORD`: used with `SMTP_USERNAME`.
    pub password: String,
    /// `SMTP_TIMEOUT`: the most one SMTP command may take (a whole send is bounded by
    /// three times this).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `SMTP_POOL_SIZE`: idle SMTP connections kept open for reuse.
    pub pool_size: u32,
    /// `EMAIL_FROM`: the `From` of every email, `Name <address>` or a bare address.
    pub from: String,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 2525,
            security: SmtpSecurity::None,
            username: String::new(),
            password: String::new(),
            timeout: Duration::from_secs(10),
            pool_size: 8,
            from: "chatfleet <no-reply@chatfleet.local>".to_owned(),
        }
    }
}

impl SmtpSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("SMTP_HOST", "host"),
        ("SMTP_PORT", "port"),
        ("SMTP_SECURITY", "security"),
        ("SMTP_USERNAME", "username"),
        ("SMTP_PASSWORD", "password"),
        ("SMTP_TIMEOUT", "timeout"),
        ("SMTP_POOL_SIZE", "pool_size"),
        ("EMAIL_FROM", "from"),
    ];
}

/// Like a derived `Debug`, without the password.
impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "***" })
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("from", &self.from)
            .finish()
    }
}

/// Templates, digests and presence.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EmailSettings {
    /// `EMAIL_TEMPLATES_DIR`: the template folder. Empty: the first of `./templates`,
    /// `./services/emailhandler/templates` and the crate's own `templates/` (the
    /// absolute path of the source tree it was built from) that exists.
    pub templates_dir: String,
    /// `EMAIL_DIGEST_WINDOW`: chat messages to one recipient within this long of the
    /// first pending one go out as one digest.
    #[serde(with = "humantime_serde")]
    pub digest_window: Duration,
    /// `EMAIL_DIGEST_POLL_INTERVAL`: how often the flusher looks for due digests.
    #[serde(with = "humantime_serde")]
    pub digest_poll_interval: Duration,
    /// `EMAIL_DIGEST_MAX_ITEMS`: messages listed in one digest; more are only counted
    /// ("and 12 more").
    pub digest_max_items: usize,
    /// `EMAIL_DIGEST_BATCH`: due digests taken per flusher pass.
    pub digest_batch: i64,
    /// `EMAIL_DIGEST_CONCURRENCY`: digests sent at the same time.
    pub digest_concurrency: usize,
    /// `EMAIL_DIGEST_LEASE`: how long a flusher owns a digest it is sending; another
    /// replica takes it over after that (must be longer than `3 × SMTP_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub digest_lease: Duration,
    /// `PRESENCE_KEY_PREFIX`: a user is online while `{prefix}:{user_id}` exists in Redis.
    pub presence_key_prefix: String,
    /// `KAFKA_TOPIC_PARTITIONS`: partitions of the topics created at start when missing.
    pub topic_partitions: i32,
}

impl Default for EmailSettings {
    fn default() -> Self {
        Self {
            templates_dir: String::new(),
            digest_window: Duration::from_secs(60),
            digest_poll_interval: Duration::from_secs(1),
            digest_max_items: 50,
            digest_batch: 100,
            digest_concurrency: 4,
            digest_lease: Duration::from_secs(60),
            presence_key_prefix: "presence".to_owned(),
            topic_partitions: 6,
        }
    }
}

impl EmailSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("EMAIL_TEMPLATES_DIR", "templates_dir"),
        ("EMAIL_DIGEST_WINDOW", "digest_window"),
        ("EMAIL_DIGEST_POLL_INTERVAL", "digest_poll_interval"),
        ("EMAIL_DIGEST_MAX_ITEMS", "digest_max_items"),
        ("EMAIL_DIGEST_BATCH", "digest_batch"),
        ("EMAIL_DIGEST_CONCURRENCY", "digest_concurrency"),
        ("EMAIL_DIGEST_LEASE", "digest_lease"),
        ("PRESENCE_KEY_PREFIX", "presence_key_prefix"),
        ("KAFKA_TOPIC_PARTITIONS", "topic_partitions"),
    ];

    /// The template folder to use: `EMAIL_TEMPLATES_DIR` when set (it must exist),
    /// else the first default candidate that exists.
    pub fn resolve_templates_dir(&self) -> Result<PathBuf, String> {
        if !self.templates_dir.trim().is_empty() {
            let dir = PathBuf::from(self.templates_dir.trim());
            return if dir.is_dir() {
                Ok(dir)
            } else {
                Err(format!("EMAIL_TEMPLATES_DIR {} is not a directory", dir.display()))
            };
        }
        let candidates = default_template_dirs();
        candidates.iter().find(|dir| dir.is_dir()).cloned().ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
            format!("no template folder found (tried {}); set EMAIL_TEMPLATES_DIR", tried.join(", "))
        })
    }
}

/// Where templates are looked for when `EMAIL_TEMPLATES_DIR` is empty, in order.
pub fn default_template_dirs() -> Vec<PathBuf> {
    vec![
        PathBuf::from("templates"),
        PathBuf::from("services/emailhandler/templates"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("templates"),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub retry: RetrySettings,
    pub eventstore: EventStoreSettings,
    pub mongo: MongoSettings,
    pub smtp: SmtpSettings,
    pub email: EmailSettings,
}

impl Default for Settings {
    fn default() -> Self {
        let mut topics = vec![CHAT_TOPIC.to_owned()];
        topics.extend(DomainKind::ALL.iter().map(|k| k.topic().to_owned()));
        Self {
            kafka: KafkaSettings {
                group_id: "email".to_owned(),
                topics,
                dead_letter_topic: Some("email.dlq".to_owned()),
                ..KafkaSettings::default()
            },
            // An email is worth waiting for: 10 retries reach the 30 s cap and take
            // about 80 s in all before the event is dead-lettered.
            retry: RetrySettings { max_retries: 10, ..RetrySettings::default() },
            eventstore: EventStoreSettings {
                key_prefix: "email".to_owned(),
                ttl: Duration::from_secs(24 * 3600),
                // Longer than one send can take (3 × SMTP_TIMEOUT), so a slow relay
                // never lets a second replica claim the same event meanwhile.
                processing_lease: Duration::from_secs(60),
                ..EventStoreSettings::default()
            },
            mongo: MongoSettings::default(),
            smtp: SmtpSettings::default(),
            email: EmailSettings::default(),
        }
    }
}

impl Settings {
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("kafka", KafkaSettings::ENV)
            .section("retry", RetrySettings::ENV)
            .section("eventstore", EventStoreSettings::ENV)
            .section("mongo", MongoSettings::ENV)
            .section("smtp", SmtpSettings::ENV)
            .section("email", EmailSettings::ENV)
    }

    /// Refuses values the service cannot work with, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 7] = [
            (self.email.digest_window.is_zero(), "EMAIL_DIGEST_WINDOW must be above 0"),
            (self.email.digest_poll_interval.is_zero(), "EMAIL_DIGEST_POLL_INTERVAL must be above 0"),
            (self.email.digest_max_items == 0, "EMAIL_DIGEST_MAX_ITEMS must be at least 1"),
            (self.email.digest_batch < 1, "EMAIL_DIGEST_BATCH must be at least 1"),
            (self.email.digest_concurrency == 0, "EMAIL_DIGEST_CONCURRENCY must be at least 1"),
            (self.email.digest_lease.is_zero(), "EMAIL_DIGEST_LEASE must be above 0"),
            (self.smtp.timeout.is_zero(), "SMTP_TIMEOUT must be above 0"),
        ];
        if let Some((_, message)) = checks.iter().find(|(bad, _)| *bad) {
            return Err((*message).to_owned());
        }
        // A lease shorter than one send lets a second owner start while the first is
        // still sending: the same email twice.
        let send_bound = self.smtp.timeout.saturating_mul(3);
        if self.email.digest_lease <= send_bound {
            return Err(format!("EMAIL_DIGEST_LEASE must be longer than 3 × SMTP_TIMEOUT ({send_bound:?})"));
        }
        if self.eventstore.processing_lease <= send_bound {
            return Err(format!("EVENT_STORE_PROCESSING_LEASE must be longer than 3 × SMTP_TIMEOUT ({send_bound:?})"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use servicekit::config::lookup;

    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s: Settings = servicekit::config::load_from(&Settings::env_map(), lookup(&[])).expect("defaults load");
        assert_eq!(s.kafka.group_id, "email");
        assert_eq!(s.kafka.topics, ["chat.changes", "purchases.changes", "payments.changes", "shipments.changes"]);
        assert_eq!(s.kafka.dead_letter_topic(), Some("email.dlq"));
        assert_eq!(s.retry.max_retries, 10);
        assert_eq!(s.eventstore.key_prefix, "email");
        assert_eq!(s.eventstore.ttl, Duration::from_secs(86_400));
        assert_eq!(s.mongo.users_collection, "users");
        assert_eq!(s.mongo.digests_collection, "email_digests");
        assert_eq!(s.smtp.security, SmtpSecurity::None);
        assert_eq!(s.smtp.from, "chatfleet <no-reply@chatfleet.local>");
        assert_eq!(s.email.digest_window, Duration::from_secs(60));
        assert_eq!(s.email.presence_key_prefix, "presence");
        assert!(s.validate().is_ok());
    }

    #[test]
    fn documented_variables_override() {
        let s: Settings = servicekit::config::load_from(
            &Settings::env_map(),
            lookup(&[
                ("MESSAGE_RETRY_MAX_RETRIES", "3"),
                ("SMTP_SECURITY", "starttls"),
                ("SMTP_PASSWORD", "hunter2"),
                ("EMAIL_DIGEST_WINDOW", "1s"),
                ("KAFKA_TOPICS", "chat.changes"),
                ("DEDUPLICATION_TTL", "12h"),
                ("EMAIL_USERS_COLLECTION", "people"),
            ]),
        )
        .expect("overrides load");
        assert_eq!(s.retry.max_retries, 3);
        assert_eq!(s.smtp.security, SmtpSecurity::Starttls);
        assert_eq!(s.email.digest_window, Duration::from_secs(1));
        assert_eq!(s.kafka.topics, ["chat.changes"]);
        assert_eq!(s.eventstore.ttl, Duration::from_secs(12 * 3600));
        assert_eq!(s.mongo.users_collection, "people");
        assert!(!format!("{:?}", s.smtp).contains("hunter2"), "the password is not printed");
    }

    #[test]
    fn leases_must_outlast_a_send() {
        let mut s = Settings::default();
        s.smtp.timeout = Duration::from_secs(30);
        assert!(s.validate().expect_err("90 s sends, 60 s leases").contains("EMAIL_DIGEST_LEASE"));
        s.email.digest_lease = Duration::from_secs(120);
        assert!(s.validate().expect_err("event store lease").contains("EVENT_STORE_PROCESSING_LEASE"));
        s.eventstore.processing_lease = Duration::from_secs(120);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_bad_security_mode_names_its_variable() {
        let err =
            servicekit::config::load_from::<Settings, _>(&Settings::env_map(), lookup(&[("SMTP_SECURITY", "ssl")]))
                .expect_err("not a mode");
        assert!(err.to_string().contains("SMTP_SECURITY"), "{err}");
    }

    #[test]
    fn every_field_has_a_variable() {
        for (json, env) in [
            (serde_json::to_value(MongoSettings::default()), MongoSettings::ENV),
            (serde_json::to_value(SmtpSettings::default()), SmtpSettings::ENV),
            (serde_json::to_value(EmailSettings::default()), EmailSettings::ENV),
        ] {
            let json = json.expect("serializes");
            for field in json.as_object().expect("object").keys() {
                assert!(env.iter().any(|(_, f)| f == field), "no variable for {field}");
            }
        }
    }

    #[test]
    fn the_default_template_folder_resolves_from_anywhere() {
        let dir = EmailSettings::default().resolve_templates_dir().expect("the crate's templates exist");
        assert!(dir.join("chat_digest/subject.txt").is_file(), "{}", dir.display());
        let bad = EmailSettings { templates_dir: "/nonexistent/templates".into(), ..EmailSettings::default() };
        assert!(bad.resolve_templates_dir().expect_err("missing").contains("EMAIL_TEMPLATES_DIR"));
    }
}
