//! Sending one email through the SMTP relay, and what a failure means.
//!
//! Why this module exists: the rest of the service only needs "sent", "try again
//! later" or "never going to work". SMTP says so itself: a 4xx reply is transient, a
//! 5xx reply permanent (RFC 5321 §4.2.1). A refused connection, a timeout, a TLS or
//! protocol problem is transient too: the relay may come back. Each message carries a
//! `Message-ID` derived from the event it reports, so a duplicate that slips through
//! (a crash between "accepted" and "recorded") is recognisable downstream.
//!
//! The SMTP protocol is lettre's (`AsyncSmtpConnection`); the TCP connection and the
//! pool are ours, because lettre 0.11 does not set `TCP_NODELAY`: it writes the message
//! and the final `.` in two writes, and Nagle's algorithm holds the second until the
//! relay's delayed ACK (40 ms on Linux), which capped a connection at ~20 mails/s.
//! With `none` and `starttls` security the socket is ours and has `TCP_NODELAY`; with
//! `tls` (implicit TLS) lettre opens the socket itself. Idle connections (at most
//! `SMTP_POOL_SIZE`, at most a minute old) are checked with `NOOP` before reuse; a
//! connection that saw any error is closed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::Message;
use sha2::{Digest, Sha256};

use crate::metrics as m;
use crate::settings::{SmtpSecurity, SmtpSettings};
use crate::templates::Rendered;

/// Idle connections older than this are closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: 4xx, connection refused or reset, timeout, TLS trouble.
    #[error("transient SMTP failure: {0}")]
    Transient(String),
    /// Will not work however often it is tried: 5xx, or a message that cannot be built.
    #[error("permanent SMTP failure: {0}")]
    Permanent(String),
}

impl SendError {
    /// The `class` label of `email_send_failures_total`.
    pub fn class(&self) -> &'static str {
        match self {
            SendError::Transient(_) => "transient",
            SendError::Permanent(_) => "permanent",
        }
    }
}

/// Sorts a lettre SMTP error into transient or permanent.
pub fn classify(err: &lettre::transport::smtp::Error) -> SendError {
    let text = err.to_string();
    let code = err.status().map(|code| code.to_string());
    let text = match code {
        Some(code) if !text.contains(&code) => format!("{code} {text}"),
        _ => text,
    };
    if err.is_permanent() {
        SendError::Permanent(text)
    } else {
        SendError::Transient(text)
    }
}

/// One email to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `chat_digest`, `purchase`, `payment_reminder` or `shipping`.
    pub kind: &'static str,
    pub to: Mailbox,
    pub rendered: Rendered,
    /// What the email reports (the event's dedup key): gives the Message-ID.
    pub key: String,
}

struct Idle {
    connection: AsyncSmtpConnection,
    since: Instant,
}

/// The SMTP client.
pub struct Mailer {
    host: String,
    port: u16,
    security: SmtpSecurity,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    pool_size: usize,
    idle: Mutex<Vec<Idle>>,
    from: Mailbox,
    id_domain: String,
    send_timeout: Duration,
}

impl Mailer {
    /// Prepares the client. Does not connect (connections are made on the first send
    /// and kept), so a relay that is down at start is not an error.
    pub fn new(settings: &SmtpSettings) -> Result<Self, String> {
        let from: Mailbox =
            settings.from.parse().map_err(|err| format!("EMAIL_FROM {:?} is not a mailbox: {err}", settings.from))?;
        let tls = match settings.security {
            SmtpSecurity::None => None,
            SmtpSecurity::Starttls | SmtpSecurity::Tls => Some(
                TlsParameters::new(settings.host.clone())
                    .map_err(|err| format!("SMTP TLS for {}: {err}", settings.host))?,
            ),
        };
        let credentials = (!settings.username.is_empty())
            .then(|| Credentials::new(settings.username.clone(), settings.password.clone()));
        let id_domain = from.email.domain().to_owned();
        Ok(Self {
            host: settings.host.clone(),
            port: settings.port,
            security: settings.security,
            tls,
            credentials,
            hello: ClientId::default(),
            timeout: settings.timeout,
            pool_size: settings.pool_size as usize,
            idle: Mutex::new(Vec::new()),
            from,
            id_domain,
            send_timeout: settings.timeout.saturating_mul(3),
        })
    }

    /// `<hex@domain>`: the same event always gets the same Message-ID.
    pub fn message_id(&self, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        format!("<{}@{}>", hex::encode(&digest[..16]), self.id_domain)
    }

    /// The MIME message: `multipart/alternative` with the text and the HTML part.
    pub fn build(&self, mail: &Outgoing) -> Result<Message, SendError> {
        Message::builder()
            .from(self.from.clone())
            .to(mail.to.clone())
            .subject(mail.rendered.subject.clone())
            .message_id(Some(self.message_id(&mail.key)))
            .raw_header(HeaderValue::new(HeaderName::new_from_ascii_str("X-Chatfleet-Kind"), mail.kind.to_owned()))
            .raw_header(HeaderValue::new(HeaderName::new_from_ascii_str("X-Chatfleet-Event"), mail.key.clone()))
            .multipart(MultiPart::alternative_plain_html(mail.rendered.text.clone(), mail.rendered.html.clone()))
            .map_err(|err| SendError::Permanent(format!("cannot build the message: {err}")))
    }

    /// Sends one email, bounded by three times `SMTP_TIMEOUT`.
    pub async fn send(&self, mail: &Outgoing) -> Result<(), SendError> {
        let message = self.build(mail)?;
        let started = Instant::now();
        let result = match tokio::time::timeout(self.send_timeout, self.transmit(&message)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Transient(format!("no answer within {:?}", self.send_timeout))),
        };
        let outcome = match &result {
            Ok(()) => "ok",
            Err(err) => err.class(),
        };
        metrics::histogram!(m::SMTP_SEND_DURATION, "outcome" => outcome).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => metrics::counter!(m::EMAILS_SENT, "kind" => mail.kind).increment(1),
            Err(err) => metrics::counter!(m::SEND_FAILURES, "kind" => mail.kind, "class" => err.class()).increment(1),
        }
        result
    }

    async fn transmit(&self, message: &Message) -> Result<(), SendError> {
        let mut connection = self.checkout().await?;
        match connection.send(message.envelope(), &message.formatted()).await {
            Ok(_) => {
                self.checkin(connection);
                Ok(())
            }
            // lettre has closed the connection already.
            Err(err) => Err(classify(&err)),
        }
    }

    /// An idle connection that still answers `NOOP`, or a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, SendError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
            let Some(mut idle) = idle else { return self.connect().await };
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.connection.test_connected().await {
                return Ok(idle.connection);
            }
            idle.connection.abort().await;
        }
    }

    fn checkin(&self, connection: AsyncSmtpConnection) {
        if connection.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.pool_size {
            idle.push(Idle { connection, since: Instant::now() });
        }
    }

    /// Opens, greets, secures and authenticates a connection.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let mut connection = match (self.security, &self.tls) {
            (SmtpSecurity::Tls, Some(tls)) => AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                Some(tls.clone()),
                None,
            )
            .await
            .map_err(|err| classify(&err))?,
            _ => {
                let address = format!("{}:{}", self.host, self.port);
                let socket = match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&address)).await {
                    Ok(Ok(socket)) => socket,
                    Ok(Err(err)) => return Err(SendError::Transient(format!("cannot connect to {address}: {err}"))),
                    Err(_) => {
                        return Err(SendError::Transient(format!(
                            "cannot connect to {address} within {:?}",
                            self.timeout
                        )))
                    }
                };
                socket
                    .set_nodelay(true)
                    .map_err(|err| SendError::Transient(format!("cannot set TCP_NODELAY: {err}")))?;
                let mut connection = AsyncSmtpConnection::connect_with_transport(Box::new(socket), &self.hello)
                    .await
                    .map_err(|err| classify(&err))?;
                if let (SmtpSecurity::Starttls, Some(tls)) = (self.security, &self.tls) {
                    connection.starttls(tls.clone(), &self.hello).await.map_err(|err| classify(&err))?;
                }
                connection
            }
        };
        if let Some(credentials) = &self.credentials {
            connection.auth(DEFAULT_MECHANISMS, credentials).await.map_err(|err| classify(&err))?;
        }
        Ok(connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailer() -> Mailer {
        Mailer::new(&SmtpSettings::default()).expect("default settings build")
    }

    fn outgoing() -> Outgoing {
        Outgoing {
            kind: "purchase",
            to: "Bob <bob@example.com>".parse().expect("mailbox"),
            rendered: Rendered { subject: "Order p-1".into(), text: "text <b>".into(), html: "<p>html</p>".into() },
            key: "eventstore:email:p-1.paid.1:purchase".into(),
        }
    }

    #[tokio::test]
    async fn message_ids_are_stable_per_event() {
        let mailer = mailer();
        assert_eq!(mailer.message_id("a"), mailer.message_id("a"));
        assert_ne!(mailer.message_id("a"), mailer.message_id("b"));
        assert!(mailer.message_id("a").ends_with("@chatfleet.local>"));
    }

    #[tokio::test]
    async fn messages_are_multipart_alternative_with_headers() {
        let mailer = mailer();
        let raw = String::from_utf8(mailer.build(&outgoing()).expect("builds").formatted()).expect("utf-8");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("Subject: Order p-1"), "{raw}");
        assert!(raw.contains("X-Chatfleet-Kind: purchase"), "{raw}");
        assert!(raw.contains("To: Bob <bob@example.com>"), "{raw}");
        assert!(raw.contains("From: chatfleet <no-reply@chatfleet.local>"), "{raw}");
    }

    #[tokio::test]
    async fn a_bad_sender_is_refused_at_start() {
        let settings = SmtpSettings { from: "not a mailbox".into(), ..SmtpSettings::default() };
        assert!(Mailer::new(&settings).err().is_some_and(|e| e.contains("EMAIL_FROM")));
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        let port = testkit::free_port();
        let settings = SmtpSettings { port, timeout: Duration::from_secs(1), ..SmtpSettings::default() };
        let err = Mailer::new(&settings).expect("builds").send(&outgoing()).await.expect_err("nothing listens");
        assert_eq!(err.class(), "transient", "{err}");
    }

    #[tokio::test]
    async fn connections_are_reused_and_a_dead_one_is_replaced() {
        let mut sink = testkit::SmtpSink::start();
        let settings = SmtpSettings { port: sink.port(), ..SmtpSettings::default() };
        let mailer = Mailer::new(&settings).expect("builds");
        let started = Instant::now();
        for _ in 0..20 {
            mailer.send(&outgoing()).await.expect("accepted");
        }
        assert!(started.elapsed() < Duration::from_millis(800), "no Nagle stall per mail: {:?}", started.elapsed());
        assert_eq!(mailer.idle.lock().expect("lock").len(), 1, "one connection, kept");
        sink.restart();
        mailer.send(&outgoing()).await.expect("a fresh connection replaces the dead one");
        assert_eq!(sink.messages().len(), 21);
    }

    #[tokio::test]
    async fn sink_replies_are_classified() {
        let sink = testkit::SmtpSink::start();
        let settings = SmtpSettings { port: sink.port(), ..SmtpSettings::default() };
        let mailer = Mailer::new(&settings).expect("builds");
        mailer.send(&outgoing()).await.expect("accepted");
        assert_eq!(sink.messages().len(), 1);

        std::fs::write(sink.mail_dir().join(".reject-temporary"), "").expect("flag");
        let err = mailer.send(&outgoing()).await.expect_err("451");
        assert_eq!(err.class(), "transient", "{err}");
        assert!(err.to_string().contains("451"), "{err}");

        std::fs::write(sink.mail_dir().join(".reject-permanent"), "").expect("flag");
        let err = mailer.send(&outgoing()).await.expect_err("550");
        assert_eq!(err.class(), "permanent", "{err}");
        assert!(err.to_string().contains("550"), "{err}");
        assert_eq!(sink.messages().len(), 1, "rejected mail is not stored");
    }
}
