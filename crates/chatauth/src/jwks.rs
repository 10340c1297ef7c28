//! RS256 public keys from the issuer's JWKS endpoint, kept current.
//!
//! Why this module exists: identity providers rotate their signing keys and publish
//! the current ones as a JWKS; a fleet that read the key once would reject every
//! token after a rotation. The set is fetched at start (a service with no keys
//! refuses to start), fetched again every `JWT_JWKS_REFRESH_INTERVAL` in the
//! background, and fetched early when a token names a key id the set does not have,
//! at most once per [`UNKNOWN_KID_MIN_GAP`] so forged key ids cannot make the fleet
//! hammer the issuer. A failed fetch keeps the keys already known.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::DecodingKey;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::AuthError;

/// The shortest time between two fetches caused by unknown key ids.
pub const UNKNOWN_KID_MIN_GAP: Duration = Duration::from_secs(30);
/// Bound on one fetch (connect and read).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS larger than this is refused (a real one is a few kilobytes).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The usable keys of one fetch: by key id, plus the keys without one.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    without_kid: Vec<DecodingKey>,
}

impl KeySet {
    fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    /// The key for a token's `kid`. A token without `kid` is accepted only when the
    /// set holds exactly one key, so there is nothing to choose.
    fn find(&self, kid: Option<&str>) -> Option<DecodingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.len() == 1 => self.by_kid.values().chain(&self.without_kid).next().cloned(),
            None => None,
        }
    }
}

/// The JWKS keys of one authenticator.
pub(crate) struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch started; held during a fetch so concurrent callers share it.
    last_fetch: Mutex<Option<Instant>>,
    unknown_kid_min_gap: Duration,
}

impl Jwks {
    /// Fetches the set once; fails when it cannot be read or holds no usable key.
    pub(crate) async fn start(url: &str, unknown_kid_min_gap: Duration) -> Result<Arc<Self>, AuthError> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|err| AuthError::Config(format!("JWT_JWKS_URL: cannot build an HTTP client: {err}")))?;
        let keys = fetch(&client, url).await.map_err(|err| AuthError::Config(format!("JWT_JWKS_URL {url}: {err}")))?;
        tracing::info!(url, keys = keys.len(), "JWKS loaded");
        Ok(Arc::new(Self {
            url: url.to_owned(),
            client,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(Some(Instant::now())),
            unknown_kid_min_gap,
        }))
    }

    /// Refreshes `jwks` every `interval` until the authenticator is dropped.
    pub(crate) fn spawn_refresh(jwks: &Arc<Self>, interval: Duration) {
        let weak: Weak<Self> = Arc::downgrade(jwks);
        let interval = interval.max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(jwks) = weak.upgrade() else { return };
                let mut last = jwks.last_fetch.lock().await;
                *last = Some(Instant::now());
                jwks.refresh().await;
            }
        });
    }

    /// The key for a token's `kid`, fetching the set again (rate-limited) when unknown.
    pub(crate) async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.current().find(kid) {
            return Ok(key);
        }
        {
            let mut last = self.last_fetch.lock().await;
            let recent = last.is_some_and(|at| at.elapsed() < self.unknown_kid_min_gap);
            // Another caller may have fetched while this one waited for the lock.
            if !recent && self.current().find(kid).is_none() {
                *last = Some(Instant::now());
                self.refresh().await;
            }
        }
        self.current().find(kid).ok_or_else(|| match kid {
            Some(_) => AuthError::Invalid("unknown signing key id (kid)".into()),
            None => AuthError::Invalid("the token names no key id (kid) and the JWKS has several keys".into()),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// One fetch; on failure the keys already known stay.
    async fn refresh(&self) {
        match fetch(&self.client, &self.url).await {
            Ok(keys) => {
                metrics_refresh("ok");
                tracing::debug!(url = %self.url, keys = keys.len(), "JWKS refreshed");
                let keys = Arc::new(keys);
                match self.keys.write() {
                    Ok(mut current) => *current = keys,
                    Err(poisoned) => *poisoned.into_inner() = keys,
                }
            }
            Err(err) => {
                metrics_refresh("error");
                tracing::warn!(url = %self.url, error = %err, "JWKS refresh failed; keeping the keys already known");
            }
        }
    }
}

/// Counts fetches after the first: `jwt_jwks_refreshes_total{outcome="ok"|"error"}`.
fn metrics_refresh(outcome: &'static str) {
    metrics::counter!("jwt_jwks_refreshes_total", "outcome" => outcome).increment(1);
}

/// Reads the set at `url` and keeps its RSA signature keys.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<KeySet, String> {
    let response = client.get(url).send().await.map_err(|err| format!("cannot fetch: {err}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    let body = response.bytes().await.map_err(|err| format!("cannot read the answer: {err}"))?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(format!("the answer is larger than {MAX_JWKS_BYTES} bytes"));
    }
    let set: JwkSet = serde_json::from_slice(&body).map_err(|err| format!("is not a JWKS: {err}"))?;
    let keys = usable_keys(&set);
    if keys.len() == 0 {
        return Err("holds no RSA signature key usable for RS256".into());
    }
    Ok(keys)
}

/// The keys of `set` that may verify an RS256 signature: RSA, meant for signatures
/// (or unspecified), and for RS256 (or unspecified). Anything else (HMAC secrets,
/// EC keys, encryption keys) is skipped: a JWKS must never turn into an HS256 secret.
fn usable_keys(set: &JwkSet) -> KeySet {
    let mut keys = KeySet::default();
    for jwk in &set.keys {
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else { continue };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        if jwk.common.key_algorithm.is_some_and(|alg| alg != KeyAlgorithm::RS256) {
            continue;
        }
        let key = match DecodingKey::from_rsa_components(&rsa.n, &rsa.e) {
            Ok(key) => key,
            Err(err) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %err, "JWKS key skipped: not a valid RSA key");
                continue;
            }
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), key);
            }
            None => keys.without_kid.push(key),
        }
    }
    keys
}
