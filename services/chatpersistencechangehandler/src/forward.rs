//! Forwarding over HTTP, and what each answer means for the message.
//!
//! The socket pods answer `200` when every local connection took the frame, `206`
//! when only some did and `500` when none did. Anything short of `200`, a timeout or
//! a refused connection is worth retrying: the pod may be restarting, a connection
//! may have been replaced. Any other `4xx` means the request itself is wrong, and no
//! retry will change that.

use std::fmt;
use std::time::Duration;

use kafkawrapper::HandlerError;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;

/// The largest answer read for its JSON (a batch of 1,000 results is about 150 KB).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// The shortest `INTERNAL_SERVICE_TOKEN` accepted (the internal endpoints refuse shorter ones).
pub const MIN_SERVICE_TOKEN_BYTES: usize = 32;

/// The bearer token presented to the internal endpoints, checked at start: without it
/// every forward would be refused with a permanent `401` and the changes silently
/// given up on, so the handler refuses to start instead. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceToken(String);

impl ServiceToken {
    /// Checks `INTERNAL_SERVICE_TOKEN`; the error names the variable and the fix.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.trim().is_empty() {
            return Err(format!(
                "INTERNAL_SERVICE_TOKEN is not set: every call to the socket pods and the notification service \
                 would be refused (401) and the changes given up on; set it to the internal service token the \
                 other services use (at least {MIN_SERVICE_TOKEN_BYTES} bytes)"
            ));
        }
        if raw.len() < MIN_SERVICE_TOKEN_BYTES {
            return Err(format!(
                "INTERNAL_SERVICE_TOKEN is {} bytes long; it must be at least {MIN_SERVICE_TOKEN_BYTES} bytes \
                 (the internal endpoints refuse shorter tokens)",
                raw.len()
            ));
        }
        if raw.trim() != raw || HeaderValue::from_str(&format!("Bearer {raw}")).is_err() {
            return Err("INTERNAL_SERVICE_TOKEN contains whitespace or characters that cannot be sent in an \
                        Authorization header"
                .to_owned());
        }
        Ok(Self(raw.to_owned()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceToken(<redacted>)")
    }
}

/// An HTTP client for internal endpoints, presenting the service token. Each pipeline
/// holds its own copy (sharing the connection pool) so its metrics carry its name.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    token: ServiceToken,
    pipeline: String,
}

impl Forwarder {
    pub fn new(timeout: Duration, token: ServiceToken) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| format!("cannot build the HTTP client: {err}"))?;
        Ok(Self { client, token, pipeline: String::new() })
    }

    /// The service token it presents (for the bot adapter's own calls).
    pub fn token(&self) -> ServiceToken {
        self.token.clone()
    }

    /// The same client, labelling its metrics with `pipeline`.
    pub fn for_pipeline(&self, pipeline: &str) -> Self {
        Self { pipeline: pipeline.to_owned(), ..self.clone() }
    }

    /// POSTs `body` to `url`; maps the outcome to the handler's error kinds.
    pub async fn post(&self, target: &'static str, url: &str, body: &serde_json::Value) -> Result<(), HandlerError> {
        match self.send(target, url, body).await {
            Ok(response) => classify(target, response.status(), response.text().await.unwrap_or_default()),
            Err(err) => Err(err),
        }
    }

    /// POSTs `body` to `url` and reads the answer's status and JSON body (`Null` when
    /// it has none); only a request that got no answer at all is an error (retryable).
    pub async fn post_for_json(
        &self,
        target: &'static str,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value), HandlerError> {
        let response = self.send(target, url, body).await?;
        Self::read_json(target, response).await
    }

    /// POSTs a body serialized already (`application/json`) and reads the answer's
    /// status and JSON body, as [`Forwarder::post_for_json`] does.
    pub async fn post_raw_for_json(
        &self,
        target: &'static str,
        url: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, serde_json::Value), HandlerError> {
        let request = self.client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        let response = self.dispatch(target, request).await?;
        Self::read_json(target, response).await
    }

    /// Reads an answer's status and JSON body (`Null` when it has none), at most
    /// `MAX_ANSWER_BYTES` of it.
    async fn read_json(
        target: &'static str,
        mut response: reqwest::Response,
    ) -> Result<(StatusCode, serde_json::Value), HandlerError> {
        let status = response.status();
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if bytes.len() + chunk.len() <= MAX_ANSWER_BYTES => bytes.extend_from_slice(&chunk),
                Ok(Some(_)) => {
                    return Err(HandlerError::retryable(format!("{target}: an answer over {MAX_ANSWER_BYTES} bytes")))
                }
                Ok(None) => break,
                Err(err) => return Err(HandlerError::retryable(format!("{target}: reading the answer: {err}"))),
            }
        }
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
    }

    /// One POST with the token and trace headers, counted and timed by target.
    async fn send(
        &self,
        target: &'static str,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, HandlerError> {
        self.dispatch(target, self.client.post(url).json(body)).await
    }

    /// Sends `request` with the token and trace headers, counted and timed by target.
    async fn dispatch(
        &self,
        target: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HandlerError> {
        let started = std::time::Instant::now();
        let result = request.headers(servicekit::trace::outgoing()).bearer_auth(self.token.expose()).send().await;
        let outcome = match &result {
            Ok(response) => response.status().as_u16().to_string(),
            Err(err) if err.is_timeout() => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        };
        let pipeline = self.pipeline.clone();
        metrics::histogram!("forward_duration_seconds", "pipeline" => pipeline.clone(), "target" => target)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("forward_requests_total", "pipeline" => pipeline, "target" => target, "outcome" => outcome)
            .increment(1);
        result.map_err(|err| HandlerError::retryable(format!("{target}: {err}")))
    }
}

/// What an answer means: done, try again, or give up.
pub fn classify(target: &str, status: StatusCode, body: String) -> Result<(), HandlerError> {
    let body: String = body.chars().take(300).collect();
    match status.as_u16() {
        200..=205 | 207..=299 => Ok(()),
        206 => Err(HandlerError::retryable(format!("{target}: partial delivery: {body}"))),
        408 | 429 => Err(HandlerError::retryable(format!("{target}: {status}: {body}"))),
        400..=499 => Err(HandlerError::permanent(format!("{target}: {status}: {body}"))),
        _ => Err(HandlerError::retryable(format!("{target}: {status}: {body}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_short_or_unsendable_service_token_is_refused() {
        let missing = ServiceToken::parse("").expect_err("empty");
        assert!(missing.contains("INTERNAL_SERVICE_TOKEN is not set"), "{missing}");
        assert!(ServiceToken::parse("   ").expect_err("blank").contains("is not set"));
        let short = ServiceToken::parse("sixteen-bytes-xx").expect_err("short");
        assert!(short.contains("INTERNAL_SERVICE_TOKEN is 16 bytes long"), "{short}");
        assert!(short.contains("at least 32 bytes"), "{short}");
        let spaced = ServiceToken::parse(" 0123456789abcdef0123456789abcdef").expect_err("whitespace");
        assert!(spaced.contains("INTERNAL_SERVICE_TOKEN contains whitespace"), "{spaced}");
        let ok = ServiceToken::parse("0123456789abcdef0123456789abcdef").expect("32 bytes");
        assert_eq!(format!("{ok:?}"), "ServiceToken(<redacted>)", "never printed");
    }

    #[test]
    fn answers_map_to_done_retry_or_give_up() {
        assert!(classify("ws", StatusCode::OK, String::new()).is_ok());
        for retry in [206, 500, 502, 503, 504, 408, 429] {
            let status = StatusCode::from_u16(retry).expect("valid");
            assert!(matches!(classify("ws", status, String::new()), Err(HandlerError::Retryable(_))), "{retry}");
        }
        for permanent in [400, 401, 403, 404, 422] {
            let status = StatusCode::from_u16(permanent).expect("valid");
            assert!(matches!(classify("ws", status, String::new()), Err(HandlerError::Permanent(_))), "{permanent}");
        }
    }
}
