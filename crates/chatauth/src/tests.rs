use super::*;

const SECRET: &str = "test-secret-0123456789abcdef";
const SERVICE: &str = "service-token-0123456789";

fn settings() -> AuthSettings {
    AuthSettings {
        jwt_secret: SECRET.to_owned(),
        internal_service_token: SERVICE.to_owned(),
        ..AuthSettings::default()
    }
}

fn alice() -> UserId {
    UserId::parse("alice").expect("valid")
}

#[test]
fn a_valid_token_names_its_user() {
    let auth = Authenticator::new(&settings()).expect("configured");
    let token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
    assert_eq!(auth.verify(&token).expect("valid token"), alice());
}

#[test]
fn forged_expired_and_garbage_tokens_are_rejected() {
    let auth = Authenticator::new(&settings()).expect("configured");
    let forged = mint_hs256("another-secret-0123456789", &alice(), Duration::from_secs(60), None, None);
    assert!(matches!(auth.verify(&forged), Err(AuthError::Invalid(_))));
    let expired = mint_hs256_expiring_at(SECRET, "alice", 1_000);
    assert!(matches!(auth.verify(&expired), Err(AuthError::Expired)));
    assert!(matches!(auth.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
    let bad_subject = mint_hs256_expiring_at(SECRET, "al ice", u64::MAX / 2);
    assert!(matches!(auth.verify(&bad_subject), Err(AuthError::BadSubject(_))));
}

#[test]
fn issuer_and_audience_are_enforced_when_configured() {
    let auth =
        Authenticator::new(&AuthSettings { jwt_issuer: "chatfleet".into(), jwt_audience: "web".into(), ..settings() })
            .expect("configured");
    let good = mint_hs256(SECRET, &alice(), Duration::from_secs(60), Some("chatfleet"), Some("web"));
    assert!(auth.verify(&good).is_ok());
    let wrong_iss = mint_hs256(SECRET, &alice(), Duration::from_secs(60), Some("other"), Some("web"));
    assert!(auth.verify(&wrong_iss).is_err());
    let no_aud = mint_hs256(SECRET, &alice(), Duration::from_secs(60), Some("chatfleet"), None);
    assert!(auth.verify(&no_aud).is_err());
}

#[test]
fn weak_or_missing_secrets_are_configuration_errors() {
    let short = AuthSettings { jwt_secret: "short".into(), ..settings() };
    assert!(matches!(Authenticator::new(&short), Err(AuthError::Config(_))));
    let no_service = AuthSettings { internal_service_token: String::new(), ..settings() };
    assert!(matches!(Authenticator::new(&no_service), Err(AuthError::Config(_))));
    let missing_key = AuthSettings {
        jwt_algorithm: JwtAlgorithm::RS256,
        jwt_public_key_file: "/nonexistent.pem".into(),
        ..settings()
    };
    assert!(matches!(Authenticator::new(&missing_key), Err(AuthError::Config(_))));
}

#[test]
fn service_token_comparison() {
    let auth = Authenticator::new(&settings()).expect("configured");
    assert!(auth.is_service_token(SERVICE));
    assert!(!auth.is_service_token("service-token-0123456780"));
    assert!(!auth.is_service_token(""));
}

#[test]
fn query_tokens_are_percent_decoded() {
    assert_eq!(percent_decode("a%2Eb%2ec"), "a.b.c");
    assert_eq!(percent_decode("abc%"), "abc%");
    assert_eq!(percent_decode("%zz"), "%zz");
}

mod extractors {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        let auth = Authenticator::new(&settings()).expect("configured");
        Router::new()
            .route("/me", get(|AuthUser(user): AuthUser| async move { user.to_string() }))
            .route("/internal", get(|_: ServiceCaller| async { "ok" }))
            .with_state(auth)
    }

    async fn status(uri: &str, bearer: Option<&str>) -> StatusCode {
        let mut request = Request::builder().uri(uri);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        app().oneshot(request.body(Body::empty()).expect("request")).await.expect("response").status()
    }

    #[tokio::test]
    async fn header_and_query_tokens_are_accepted() {
        let token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
        assert_eq!(status("/me", Some(&token)).await, StatusCode::OK);
        assert_eq!(status(&format!("/me?x=1&access_token={token}"), None).await, StatusCode::OK);
        assert_eq!(status("/me", None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status("/me", Some("garbage")).await, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn internal_endpoints_demand_the_service_token() {
        let user_token = mint_hs256(SECRET, &alice(), Duration::from_secs(60), None, None);
        assert_eq!(status("/internal", Some(SERVICE)).await, StatusCode::OK);
        assert_eq!(status("/internal", Some(&user_token)).await, StatusCode::FORBIDDEN);
        assert_eq!(status("/internal", None).await, StatusCode::UNAUTHORIZED);
    }
}
