//! Forwarding over HTTP, and what each answer means for the message.
//!
//! The socket pods answer `200` when every local connection took the frame, `206`
//! when only some did and `500` when none did. Anything short of `200`, a timeout or
//! a refused connection is worth retrying: the pod may be restarting, a connection
//! may have been replaced. Any other `4xx` means the request itself is wrong, and no
//! retry will change that.

use std::time::Duration;

use kafkawrapper::HandlerError;
use reqwest::StatusCode;

/// An HTTP client for internal endpoints, presenting the service token. Each pipeline
/// holds its own copy (sharing the connection pool) so its metrics carry its name.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    token: String,
    pipeline: String,
}

impl Forwarder {
    pub fn new(timeout: Duration, token: String) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| format!("cannot build the HTTP client: {err}"))?;
        Ok(Self { client, token, pipeline: String::new() })
    }

    /// The same client, labelling its metrics with `pipeline`.
    pub fn for_pipeline(&self, pipeline: &str) -> Self {
        Self { pipeline: pipeline.to_owned(), ..self.clone() }
    }

    /// POSTs `body` to `url`; maps the outcome to the handler's error kinds.
    pub async fn post(&self, target: &'static str, url: &str, body: &serde_json::Value) -> Result<(), HandlerError> {
        let started = std::time::Instant::now();
        let result = self.client.post(url).bearer_auth(&self.token).json(body).send().await;
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
        match result {
            Ok(response) => classify(target, response.status(), response.text().await.unwrap_or_default()),
            Err(err) => Err(HandlerError::retryable(format!("{target}: {err}"))),
        }
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
