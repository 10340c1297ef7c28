use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

mod jwks;

const SECRET: &str = "chatauth-unit-test-secret-0123456789";
const SERVICE: &str = "chatauth-unit-test-service-token-0123456789";
const KEY_A: &[u8] = include_bytes!("../testdata/rs256-a.key.pem");
const PUB_A: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/rs256-a.pub.pem");
const KEY_B: &[u8] = include_bytes!("../testdata/rs256-b.key.pem");

fn settings() -> AuthSettings {
    AuthSettings {
        jwt_secret: SECRET.to_owned(),
        internal_service_token: SERVICE.to_owned(),
        ..AuthSettings::default()
    }
}

fn rs256_settings() -> AuthSettings {
    AuthSettings {
        jwt_algorithm: JwtAlgorithm::RS256,
        jwt_secret: String::new(),
        jwt_public_key_file: PUB_A.to_owned(),
        ..settings()
    }
}

fn alice() -> UserId {
    UserId::parse("alice").expect("valid")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// A token with exactly `claims`, signed HS256 with `secret`.
fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("encodes")
}

/// A token with exactly `claims`, signed RS256 with `private_pem`, naming `kid`.
fn rs256(private_pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_rsa_pem(private_pem).expect("test key");
    jsonwebtoken::encode(&header, claims, &key).expect("encodes")
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn valid_claims() -> Value {
    json!({ "sub": "alice", "exp": now() + 600 })
}

fn verify(auth: &Authenticator, token: &str) -> Result<Verified, AuthError> {
    block_on(auth.verify(token))
}

/// Static-key verification never awaits anything, so a one-shot runtime suffices.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
}

#[test]
fn a_valid_token_names_its_user_and_its_expiry() {
    let auth = Authenticator::new(&settings()).expect("configured");
    let exp = now() + 600;
    let verified = verify(&auth, &hs256(SECRET, &json!({ "sub": "alice", "exp": exp }))).expect("valid token");
    assert_eq!(verified.user, alice());
    assert_eq!(verified.expires_at, UNIX_EPOCH + Duration::from_secs(exp));
    let minted = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
    assert_eq!(verify(&auth, &minted).expect("valid token").user, alice());
}

#[test]
fn forged_expired_and_garbage_tokens_are_rejected() {
    let auth = Authenticator::new(&settings()).expect("configured");
    let forged = mint_hs256("another-secret-0123456789-abcdefghij", &alice(), Duration::from_secs(60), None, None);
    assert!(matches!(verify(&auth, &forged), Err(AuthError::Invalid(_))));
    let expired = mint_hs256_expiring_at(SECRET, "alice", 1_000);
    assert!(matches!(verify(&auth, &expired), Err(AuthError::Expired)));
    for garbage in ["not.a.jwt", "", "....", "a.b", "eyJhbGciOiJIUzI1NiJ9.e30", &"x".repeat(10_000)] {
        assert!(matches!(verify(&auth, garbage), Err(AuthError::Invalid(_))), "{garbage:.20}");
    }
    let bad_subject = mint_hs256_expiring_at(SECRET, "al ice", u64::MAX / 2);
    assert!(matches!(verify(&auth, &bad_subject), Err(AuthError::BadSubject(_))));
}

#[test]
fn missing_exp_or_sub_is_refused() {
    let auth = Authenticator::new(&settings()).expect("configured");
    assert!(matches!(verify(&auth, &hs256(SECRET, &json!({ "sub": "alice" }))), Err(AuthError::Invalid(_))));
    assert!(matches!(verify(&auth, &hs256(SECRET, &json!({ "exp": now() + 600 }))), Err(AuthError::Invalid(_))));
    let string_exp = json!({ "sub": "alice", "exp": "tomorrow" });
    assert!(matches!(verify(&auth, &hs256(SECRET, &string_exp)), Err(AuthError::Invalid(_))));
}

#[test]
fn not_yet_valid_tokens_are_refused_beyond_the_leeway() {
    let auth = Authenticator::new(&AuthSettings { jwt_leeway: Duration::from_secs(30), ..settings() }).expect("ok");
    let future = json!({ "sub": "alice", "exp": now() + 3600, "nbf": now() + 600 });
    assert!(matches!(verify(&auth, &hs256(SECRET, &future)), Err(AuthError::NotYetValid)));
    // Within the leeway (clock skew between issuer and service): accepted.
    let skewed = json!({ "sub": "alice", "exp": now() + 3600, "nbf": now() + 10 });
    assert!(verify(&auth, &hs256(SECRET, &skewed)).is_ok());
    let past = json!({ "sub": "alice", "exp": now() + 3600, "nbf": now() - 10 });
    assert!(verify(&auth, &hs256(SECRET, &past)).is_ok());
    let malformed = json!({ "sub": "alice", "exp": now() + 3600, "nbf": "soon" });
    assert!(verify(&auth, &hs256(SECRET, &malformed)).is_err());
}

#[test]
fn issuer_and_audience_are_enforced_when_configured() {
    let auth =
        Authenticator::new(&AuthSettings { jwt_issuer: "chatfleet".into(), jwt_audience: "web".into(), ..settings() })
            .expect("configured");
    let good = mint_hs256(SECRET, &alice(), Duration::from_secs(60), Some("chatfleet"), Some("web"));
    assert!(verify(&auth, &good).is_ok());
    let listed_audience = json!({ "sub": "alice", "exp": now() + 60, "iss": "chatfleet", "aud": ["other", "web"] });
    assert!(verify(&auth, &hs256(SECRET, &listed_audience)).is_ok(), "aud may be a list containing ours");
    for (what, iss, aud) in [
        ("wrong issuer", Some("other"), Some("web")),
        ("wrong audience", Some("chatfleet"), Some("mobile")),
        ("no issuer", None, Some("web")),
        ("no audience", Some("chatfleet"), None),
    ] {
        let token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), iss, aud);
        assert!(matches!(verify(&auth, &token), Err(AuthError::Invalid(_))), "{what}");
    }
    // Not configured: not checked.
    let open = Authenticator::new(&settings()).expect("configured");
    assert!(verify(&open, &mint_hs256(SECRET, &alice(), Duration::from_secs(60), Some("x"), Some("y"))).is_ok());
}

#[test]
fn unsigned_alg_none_tokens_are_refused() {
    let payload = b64url(valid_claims().to_string().as_bytes());
    for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#, r#"{"alg":"NONE"}"#] {
        let header = b64url(header.as_bytes());
        for token in [format!("{header}.{payload}."), format!("{header}.{payload}")] {
            let hs = Authenticator::new(&settings()).expect("configured");
            assert!(matches!(verify(&hs, &token), Err(AuthError::Invalid(_))), "HS256: {token}");
            let rs = Authenticator::new(&rs256_settings()).expect("configured");
            assert!(matches!(verify(&rs, &token), Err(AuthError::Invalid(_))), "RS256: {token}");
        }
    }
}

#[test]
fn algorithm_confusion_is_refused_both_ways() {
    let rs = Authenticator::new(&rs256_settings()).expect("configured");
    // The classic attack: HS256 "signed" with the RSA public key as the HMAC secret.
    let public_pem = std::fs::read_to_string(PUB_A).expect("test key");
    let confused = hs256(&public_pem, &valid_claims());
    assert!(matches!(verify(&rs, &confused), Err(AuthError::Invalid(_))));
    assert!(verify(&rs, &hs256(SECRET, &valid_claims())).is_err());
    // And an RS256 token against an HS256 configuration.
    let hs = Authenticator::new(&settings()).expect("configured");
    let rs_token = rs256(KEY_A, None, &valid_claims());
    assert!(matches!(verify(&hs, &rs_token), Err(AuthError::Invalid(_))));
    // Sanity: the RS256 token is good for the RS256 configuration, another key's is not.
    assert_eq!(verify(&rs, &rs_token).expect("valid").user, alice());
    assert!(matches!(verify(&rs, &rs256(KEY_B, None, &valid_claims())), Err(AuthError::Invalid(_))));
}

#[test]
fn weak_sample_or_missing_secrets_are_configuration_errors() {
    let config_error = |s: AuthSettings| match Authenticator::new(&s) {
        Err(AuthError::Config(message)) => message,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("expected a configuration error"),
    };
    let short = config_error(AuthSettings { jwt_secret: "0123456789abcdef0123456789abcde".into(), ..settings() });
    assert!(short.contains("JWT_SECRET") && short.contains("31 bytes") && short.contains("32"), "{short}");
    let empty = config_error(AuthSettings { jwt_secret: String::new(), ..settings() });
    assert!(empty.contains("JWT_SECRET is not set"), "{empty}");
    for sample in KNOWN_SAMPLE_SECRETS {
        let message = config_error(AuthSettings { jwt_secret: (*sample).into(), ..settings() });
        assert!(message.contains("sample value"), "{message}");
        assert!(!message.contains(sample), "the message must not repeat the secret: {message}");
        let message = config_error(AuthSettings { internal_service_token: (*sample).into(), ..settings() });
        assert!(message.contains("INTERNAL_SERVICE_TOKEN"), "{message}");
    }
    let short_service =
        config_error(AuthSettings { internal_service_token: "service-token-0123456789".into(), ..settings() });
    assert!(short_service.contains("INTERNAL_SERVICE_TOKEN"), "{short_service}");
    let no_service = config_error(AuthSettings { internal_service_token: String::new(), ..settings() });
    assert!(no_service.contains("INTERNAL_SERVICE_TOKEN"), "{no_service}");
    // Exactly 32 bytes is enough.
    assert!(Authenticator::new(&AuthSettings { jwt_secret: "a".repeat(32), ..settings() }).is_ok());
}

#[test]
fn the_compose_sample_values_are_refused() {
    // Keep in step with deploy/compose/chatfleet.env: these were committed there.
    assert!(check_secret("JWT_SECRET", "compose-dev-jwt-secret-change-me-0123456789").is_err());
    assert!(check_secret("INTERNAL_SERVICE_TOKEN", "compose-dev-service-token-change-me-0123456789").is_err());
}

#[test]
fn the_test_suites_secrets_pass_the_checks() {
    // tests/src/lib.rs JWT_SECRET and SERVICE_TOKEN: the black-box fleets start with them.
    assert!(check_secret("JWT_SECRET", "chatfleet-test-secret-0123456789").is_ok());
    assert!(check_secret("INTERNAL_SERVICE_TOKEN", "chatfleet-test-service-token-0123456789").is_ok());
}

#[test]
fn rs256_needs_exactly_one_usable_key_source() {
    let config_error = |s: AuthSettings| matches!(Authenticator::new(&s), Err(AuthError::Config(_)));
    assert!(config_error(AuthSettings { jwt_public_key_file: "/nonexistent.pem".into(), ..rs256_settings() }));
    assert!(config_error(AuthSettings { jwt_public_key_file: String::new(), ..rs256_settings() }));
    let not_a_key = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    assert!(config_error(AuthSettings { jwt_public_key_file: not_a_key.into(), ..rs256_settings() }));
    // RS256 does not need JWT_SECRET (Helm may still provide one: ignored).
    assert!(Authenticator::new(&rs256_settings()).is_ok());
    let both = AuthSettings { jwt_jwks_url: "http://127.0.0.1:9/jwks".into(), ..rs256_settings() };
    assert!(matches!(block_on(Authenticator::start(&both)), Err(AuthError::Config(_))));
}

#[test]
fn service_token_comparison() {
    let auth = Authenticator::new(&settings()).expect("configured");
    assert!(auth.is_service_token(SERVICE));
    assert!(!auth.is_service_token(&SERVICE.replace('9', "0")));
    assert!(!auth.is_service_token(""));
}

#[test]
fn query_tokens_are_percent_decoded() {
    use crate::extract::percent_decode;
    assert_eq!(percent_decode("a%2Eb%2ec"), "a.b.c");
    assert_eq!(percent_decode("abc%"), "abc%");
    assert_eq!(percent_decode("%zz"), "%zz");
}

mod extractors {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        let auth = Authenticator::new(&settings()).expect("configured");
        Router::new()
            .route("/me", get(|AuthUser(user): AuthUser| async move { user.to_string() }))
            .route(
                "/subscribe",
                get(|socket: SocketUser| async move {
                    let exp = socket.expires_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    format!("{} {exp}", socket.user)
                }),
            )
            .route("/internal", get(|_: ServiceCaller| async { "ok" }))
            .with_state(auth)
    }

    async fn call(uri: &str, bearer: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::builder().uri(uri);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = app().oneshot(request.body(Body::empty()).expect("request")).await.expect("response");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn status(uri: &str, bearer: Option<&str>) -> StatusCode {
        call(uri, bearer).await.0
    }

    #[tokio::test]
    async fn ordinary_routes_take_the_header_only() {
        let token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
        assert_eq!(status("/me", Some(&token)).await, StatusCode::OK);
        assert_eq!(status("/me", None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status("/me", Some("garbage")).await, StatusCode::UNAUTHORIZED);
        // A valid token in the query is refused, alone or next to a valid header.
        let (code, body) = call(&format!("/me?x=1&access_token={token}"), None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(body.contains("subscribe"), "{body}");
        assert!(!body.contains(&token), "the answer must not echo the token: {body}");
        assert_eq!(status(&format!("/me?access_token={token}"), Some(&token)).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(&format!("/me?access%5Ftoken={token}"), Some(&token)).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status("/me?access_token", Some(&token)).await, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn socket_routes_take_the_header_or_the_query_and_expose_the_expiry() {
        let exp = now() + 120;
        let token = hs256(SECRET, &json!({ "sub": "alice", "exp": exp }));
        let expected = format!("alice {exp}");
        assert_eq!(call("/subscribe", Some(&token)).await, (StatusCode::OK, expected.clone()));
        assert_eq!(call(&format!("/subscribe?x=1&access_token={token}"), None).await, (StatusCode::OK, expected));
        assert_eq!(status("/subscribe", None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status("/subscribe?access_token=garbage", None).await, StatusCode::UNAUTHORIZED);
        let expired = mint_hs256_expiring_at(SECRET, "alice", 1_000);
        assert_eq!(status(&format!("/subscribe?access_token={expired}"), None).await, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn internal_endpoints_demand_the_service_token() {
        let user_token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
        assert_eq!(status("/internal", Some(SERVICE)).await, StatusCode::OK);
        assert_eq!(status("/internal", Some(&user_token)).await, StatusCode::FORBIDDEN);
        assert_eq!(status("/internal", None).await, StatusCode::UNAUTHORIZED);
    }
}
