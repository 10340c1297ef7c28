//! The JWKS path against a real HTTP server on 127.0.0.1, serving keys made from the
//! checked-in test key pairs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};

use super::*;

/// What the test issuer serves, and how often it was asked.
#[derive(Clone)]
struct Issuer {
    answer: Arc<Mutex<(StatusCode, String)>>,
    hits: Arc<AtomicUsize>,
    url: String,
}

impl Issuer {
    async fn start(keys: &[(&[u8], Option<&str>)]) -> Self {
        let issuer = Issuer {
            answer: Arc::new(Mutex::new((StatusCode::OK, jwks(keys).to_string()))),
            hits: Arc::new(AtomicUsize::new(0)),
            url: String::new(),
        };
        async fn serve(State(issuer): State<Issuer>) -> Response {
            issuer.hits.fetch_add(1, Ordering::SeqCst);
            let (status, body) = issuer.answer.lock().expect("lock").clone();
            (status, [("content-type", "application/json")], body).into_response()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().expect("addr"));
        let app = Router::new().route("/.well-known/jwks.json", get(serve)).with_state(issuer.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Issuer { url, ..issuer }
    }

    fn publish(&self, keys: &[(&[u8], Option<&str>)]) {
        *self.answer.lock().expect("lock") = (StatusCode::OK, jwks(keys).to_string());
    }

    fn answer(&self, status: StatusCode, body: &str) {
        *self.answer.lock().expect("lock") = (status, body.to_owned());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn settings(&self) -> AuthSettings {
        AuthSettings { jwt_public_key_file: String::new(), jwt_jwks_url: self.url.clone(), ..rs256_settings() }
    }
}

/// A JWKS holding the public halves of `keys`, each with its `kid`.
fn jwks(keys: &[(&[u8], Option<&str>)]) -> Value {
    let keys: Vec<Jwk> = keys
        .iter()
        .map(|(pem, kid)| {
            let key = EncodingKey::from_rsa_pem(pem).expect("test key");
            let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("jwk");
            jwk.common.key_id = kid.map(str::to_owned);
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            jwk
        })
        .collect();
    json!({ "keys": keys })
}

fn token(pem: &[u8], kid: Option<&str>) -> String {
    rs256(pem, kid, &valid_claims())
}

#[tokio::test]
async fn keys_are_picked_by_kid_and_an_unknown_kid_fetches_the_set_again() {
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let auth = Authenticator::start_with(&issuer.settings(), Duration::ZERO).await.expect("started");
    assert_eq!(issuer.hits(), 1, "fetched once at start");
    assert_eq!(auth.verify(&token(KEY_A, Some("a"))).await.expect("key a").user, alice());
    // One key in the set: a token without kid may use it.
    assert!(auth.verify(&token(KEY_A, None)).await.is_ok());
    // Key b signs before the issuer publishes it: refused, after one more fetch.
    assert!(matches!(auth.verify(&token(KEY_B, Some("b"))).await, Err(AuthError::Invalid(_))));
    assert_eq!(issuer.hits(), 2);
    issuer.publish(&[(KEY_A, Some("a")), (KEY_B, Some("b"))]);
    assert!(auth.verify(&token(KEY_B, Some("b"))).await.is_ok(), "rotated in");
    assert_eq!(issuer.hits(), 3);
    // A known kid costs no fetch; a kid naming the wrong key is a bad signature.
    assert!(auth.verify(&token(KEY_A, Some("a"))).await.is_ok());
    assert!(matches!(auth.verify(&token(KEY_B, Some("a"))).await, Err(AuthError::Invalid(_))));
    // Two keys: a token without kid is ambiguous.
    assert!(auth.verify(&token(KEY_A, None)).await.is_err());
    assert_eq!(issuer.hits(), 3 + 1, "the kid-less token asked once more");
}

#[tokio::test]
async fn unknown_kids_fetch_at_most_once_per_gap() {
    let gap = Duration::from_millis(700);
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let auth = Authenticator::start_with(&issuer.settings(), gap).await.expect("started");
    issuer.publish(&[(KEY_A, Some("a")), (KEY_B, Some("b"))]);
    // Right after the start fetch: no new fetch, so b is still unknown.
    assert!(auth.verify(&token(KEY_B, Some("b"))).await.is_err());
    assert_eq!(issuer.hits(), 1);
    tokio::time::sleep(gap + Duration::from_millis(100)).await;
    // A burst of forged kids and one real one: a single fetch serves them all.
    let forged: Vec<_> = (0..20).map(|i| token(KEY_A, Some(&format!("forged-{i}")))).collect();
    let results = futures::future::join_all(forged.iter().map(|t| auth.verify(t))).await;
    assert!(results.iter().all(Result::is_err));
    assert!(auth.verify(&token(KEY_B, Some("b"))).await.is_ok());
    assert_eq!(issuer.hits(), 2, "one fetch for the whole burst");
    assert!(auth.verify(&token(KEY_A, Some("forged-again"))).await.is_err());
    assert_eq!(issuer.hits(), 2, "still within the gap");
    // The production gap is 30 s.
    assert_eq!(UNKNOWN_KID_MIN_GAP, Duration::from_secs(30));
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_keys_already_known() {
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let auth = Authenticator::start_with(&issuer.settings(), Duration::ZERO).await.expect("started");
    for (status, body) in [
        (StatusCode::INTERNAL_SERVER_ERROR, "oops"),
        (StatusCode::OK, "not json"),
        (StatusCode::OK, r#"{"keys":[]}"#),
        (StatusCode::OK, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#),
    ] {
        issuer.answer(status, body);
        let before = issuer.hits();
        assert!(auth.verify(&token(KEY_B, Some("unknown"))).await.is_err());
        assert_eq!(issuer.hits(), before + 1, "a refresh was tried ({status} {body})");
        assert!(auth.verify(&token(KEY_A, Some("a"))).await.is_ok(), "key a survives {status} {body}");
    }
}

#[tokio::test]
async fn the_set_is_refreshed_in_the_background() {
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let settings = AuthSettings { jwt_jwks_refresh_interval: Duration::from_secs(1), ..issuer.settings() };
    let auth = Authenticator::start(&settings).await.expect("started");
    issuer.publish(&[(KEY_B, Some("b"))]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while issuer.hits() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no background refresh within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(auth.verify(&token(KEY_B, Some("b"))).await.is_ok(), "rotated in by the background refresh");
    assert!(auth.verify(&token(KEY_A, Some("a"))).await.is_err(), "rotated out");
    // Dropping the authenticator ends the refresh task.
    drop(auth);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after_drop = issuer.hits();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(issuer.hits(), after_drop, "no refresh after the authenticator is gone");
}

#[tokio::test]
async fn a_service_does_not_start_without_a_usable_jwks() {
    let start_error = |settings: AuthSettings| async move {
        match Authenticator::start(&settings).await {
            Err(AuthError::Config(message)) => message,
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected a configuration error"),
        }
    };
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let unreachable = AuthSettings { jwt_jwks_url: "http://127.0.0.1:9/jwks".into(), ..issuer.settings() };
    assert!(start_error(unreachable).await.contains("JWT_JWKS_URL"));
    issuer.answer(StatusCode::NOT_FOUND, "");
    assert!(start_error(issuer.settings()).await.contains("404"));
    issuer.answer(StatusCode::OK, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#);
    assert!(start_error(issuer.settings()).await.contains("no RSA"));
    let not_http = AuthSettings { jwt_jwks_url: "file:///etc/passwd".into(), ..issuer.settings() };
    assert!(start_error(not_http).await.contains("http"));
}

#[tokio::test]
async fn an_hs256_token_is_refused_whatever_the_jwks_holds() {
    // An HMAC key published next to the RSA one must not become an HS256 secret.
    let issuer = Issuer::start(&[(KEY_A, Some("a"))]).await;
    let mut set = jwks(&[(KEY_A, Some("a"))]);
    set["keys"].as_array_mut().expect("keys").push(json!({ "kty": "oct", "k": b64url(SECRET.as_bytes()), "kid": "h" }));
    issuer.answer(StatusCode::OK, &set.to_string());
    let auth = Authenticator::start_with(&issuer.settings(), Duration::ZERO).await.expect("started");
    for kid in ["h", "a"] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        let forged = jsonwebtoken::encode(&header, &valid_claims(), &EncodingKey::from_secret(SECRET.as_bytes()))
            .expect("encodes");
        assert!(matches!(auth.verify(&forged).await, Err(AuthError::Invalid(_))), "kid {kid}");
    }
    assert!(auth.verify(&token(KEY_A, Some("a"))).await.is_ok());
}
