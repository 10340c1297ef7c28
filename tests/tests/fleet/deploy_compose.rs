//! `docker-compose.yml` and `deploy/compose/*.env`, checked without a Docker engine:
//! Debian's `docker-compose config` resolves the file (syntax, anchors, env files,
//! interpolation), then the resolved model is held to what the fleet needs, the env
//! files to the variables the services really read, and the compose health checks
//! are run for real against a real service and a real Envoy.
//!
//! No secret is committed: the services' secrets come from the ignored
//! `deploy/compose/secrets.env` that `deploy/compose/init-secrets.sh` generates, compose
//! refuses to start without it, and every published port binds to 127.0.0.1.
//!
//! Why this test exists: operators start the system with this file; a wrong
//! dependency condition, a setting nobody reads or a health check that never passes
//! would only surface on `docker compose up`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::multipod_support::check_py;
use chatfleet_tests::{Service, JWT_SECRET, SERVICE_TOKEN};
use serde_json::{json, Value};
use testkit::{free_port, workspace_root, ServerProcess};

/// A secrets file made by `init-secrets.sh` in a scratch directory (the real one is
/// the operator's, and ignored by git).
fn secrets_file() -> std::path::PathBuf {
    let path = testkit::scratch("compose-secrets").join("secrets.env");
    let status = Command::new(workspace_root().join("deploy/compose/init-secrets.sh"))
        .arg(&path)
        .status()
        .expect("init-secrets.sh runs");
    assert!(status.success(), "init-secrets.sh failed");
    path
}

fn resolved() -> Value {
    let env = format!("CHATFLEET_SECRETS_FILE={}", secrets_file().display());
    let out = check_py(&["compose", "docker-compose.yml", "--env", &env]);
    let parsed: Value = serde_json::from_str(&out).expect("check.py compose prints JSON");
    parsed["config"].clone()
}

fn env_of<'a>(service: &'a Value, key: &str) -> &'a str {
    service["environment"][key].as_str().unwrap_or_else(|| panic!("{key} is not set: {}", service["environment"]))
}

const FLEET: [(&str, &str); 7] = [
    ("chatpersistence", "chatpersistence"),
    ("chatpersistencechangehandler", "chatpersistencechangehandler"),
    ("chatwebsocketshandler-1", "chatwebsocketshandler"),
    ("chatwebsocketshandler-2", "chatwebsocketshandler"),
    ("generalnotificationshandler-1", "generalnotificationshandler"),
    ("generalnotificationshandler-2", "generalnotificationshandler"),
    ("emailhandler", "emailhandler"),
];

fn condition(service: &Value, on: &str) -> String {
    service["depends_on"][on]["condition"].as_str().unwrap_or("(none)").to_owned()
}

#[test]
fn compose_resolves_and_wires_the_production_shaped_fleet() {
    let config = resolved();
    let services = &config["services"];
    for name in ["mongo", "kafka", "kafka-topics", "connect", "debezium-register", "redis", "mailpit", "envoy"] {
        assert!(services.get(name).is_some(), "service {name} is missing");
    }
    for (name, binary) in FLEET {
        let service = &services[name];
        assert_eq!(service["command"], json!([binary]), "{name} runs {binary}");
        assert_eq!(service["image"], services["chatpersistence"]["image"], "{name}: one image for the fleet");
        assert!(service["build"]["context"].is_string(), "{name} can be built from the Dockerfile");
        assert!(service["healthcheck"]["test"].is_array(), "{name} has a health check");
        for key in ["KAFKA_BROKERS", "REDIS_URL", "MONGODB_URI", "JWT_SECRET", "INTERNAL_SERVICE_TOKEN", "LOG_FORMAT"] {
            env_of(service, key);
        }
    }
    assert_eq!(env_of(&services["chatpersistence"], "CAPTURE_MODE"), "debezium");
    assert_eq!(env_of(&services["chatpersistence"], "MONGODB_URI"), "mongodb://mongo:27017/?replicaSet=rs0");

    // MongoDB: a replica set, initiated by its health check.
    let mongo = &services["mongo"];
    assert!(mongo["command"].to_string().contains("--replSet"), "mongo runs as a replica set");
    let check = mongo["healthcheck"]["test"].to_string();
    assert!(check.contains("rs.initiate") && check.contains("isWritablePrimary"), "{check}");
    // Kafka in KRaft mode, no auto-created topics.
    let kafka = &services["kafka"]["environment"];
    assert_eq!(kafka["KAFKA_PROCESS_ROLES"], "broker,controller");
    assert_eq!(kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false");
    let topics = env_of(&services["kafka-topics"], "KAFKA_CREATE_TOPICS");
    for topic in [
        "chat.changes:",
        "chat.changes.dlq:",
        "purchases.changes:",
        "payments.changes:",
        "shipments.changes:",
        "email.dlq:",
    ] {
        assert!(topics.contains(topic), "topic {topic} is not created: {topics}");
    }
    // Debezium: Connect, then the registration once Connect is healthy.
    assert!(services["connect"]["image"].as_str().unwrap_or_default().contains("debezium/connect"));
    let register = &services["debezium-register"];
    assert_eq!(condition(register, "connect"), "service_healthy");
    assert!(register["volumes"].to_string().contains("/debezium"), "debezium/ is mounted");
    assert!(register["command"].to_string().contains("/debezium/register.sh"));
    assert!(env_of(register, "MONGODB_CONNECTION_STRING").contains("replicaSet=rs0"));
    assert!(services["mailpit"]["ports"].to_string().contains("8025"), "mailpit's web UI is published");

    // Start order: data stores, topics, pods, Envoy, then the change handler.
    assert_eq!(condition(&services["chatpersistence"], "mongo"), "service_healthy");
    assert_eq!(condition(&services["chatpersistence"], "kafka-topics"), "service_completed_successfully");
    let handler = &services["chatpersistencechangehandler"];
    assert_eq!(condition(handler, "envoy"), "service_healthy");
    assert_eq!(condition(handler, "kafka-topics"), "service_completed_successfully");
    for pod in [
        "chatwebsocketshandler-1",
        "chatwebsocketshandler-2",
        "generalnotificationshandler-1",
        "generalnotificationshandler-2",
    ] {
        assert_eq!(condition(&services["envoy"], pod), "service_healthy", "envoy waits for {pod}");
    }
    assert_eq!(condition(&services["emailhandler"], "mailpit"), "service_healthy");

    // The change handler reaches the pods only through Envoy's internal listener,
    // which is not published on the host.
    assert_eq!(env_of(handler, "CHAT_WEBSOCKET_URL"), "http://envoy:9080");
    assert_eq!(env_of(handler, "NOTIFICATIONS_URL"), "http://envoy:9080");
    let envoy = &services["envoy"];
    assert!(envoy["volumes"].to_string().contains("deploy/envoy/envoy.yaml"), "{}", envoy["volumes"]);
    let published = envoy["ports"].to_string();
    assert!(published.contains("8080"), "the public listener is published: {published}");
    assert!(!published.contains("9080"), "the internal listener must not be published: {published}");
    for (name, _) in FLEET {
        let ports = services[name]["ports"].to_string();
        assert!(!ports.contains("9090"), "{name} publishes its internal port: {ports}");
    }
    // The email handler keeps its own consumer group, retries and window.
    let email = &services["emailhandler"];
    assert_eq!(env_of(email, "KAFKA_GROUP_ID"), "email");
    assert_eq!(env_of(email, "DEDUPLICATION_TTL"), "24h");
    assert_eq!(env_of(handler, "KAFKA_GROUP_ID"), "chat-websocket-forwarder");
    assert_eq!(env_of(email, "SMTP_HOST"), "mailpit");
}

/// Every `KEY=VALUE` line of the compose env files.
fn env_files() -> Vec<(String, String, String)> {
    let dir = workspace_root().join("deploy/compose");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/compose") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "env") {
            continue;
        }
        let file = path.file_name().expect("name").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read env file");
        assert!(text.starts_with('#'), "{file} opens with a comment saying what it is");
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{file}: not KEY=VALUE: {line}"));
            assert!(
                key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{file}: bad variable name {key}"
            );
            assert!(!value.starts_with('"') && !value.starts_with('\''), "{file}: {key}: docker env files keep quotes");
            out.push((file.clone(), key.to_owned(), value.to_owned()));
        }
    }
    out
}

/// All string literals naming variables in the services' and crates' sources.
fn names_in_sources() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    fn walk(dir: &Path, names: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for piece in text.split('"').skip(1).step_by(2) {
                    if !piece.is_empty()
                        && piece.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    {
                        names.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    walk(&workspace_root().join("services"), &mut names);
    walk(&workspace_root().join("crates"), &mut names);
    names
}

#[test]
fn env_files_only_set_variables_the_services_read() {
    let known = names_in_sources();
    let script = std::fs::read_to_string(workspace_root().join("debezium/register.sh")).expect("register.sh");
    let mut unknown = Vec::new();
    for (file, key, _) in env_files() {
        assert!(!key.starts_with("CHATFLEET_"), "{file}: {key}: CHATFLEET_* names are setting overrides in servicekit");
        let read_by_compose = key == "KAFKA_CREATE_TOPICS";
        let read_by_script = script.contains(&format!("{key}:-")) || script.contains(&format!("${key}"));
        if !(known.contains(&key) || key.starts_with("RDKAFKA_") || read_by_compose || read_by_script) {
            unknown.push(format!("{file}: {key}"));
        }
    }
    assert!(unknown.is_empty(), "variables no service reads (renamed? typo?):\n{}", unknown.join("\n"));
}

/// A compose health check test (`["CMD", ...]`) as a command line, `$$` unescaped.
fn compose_check(service: &Value) -> Vec<String> {
    let test: Vec<String> = serde_json::from_value(service["healthcheck"]["test"].clone()).expect("test list");
    assert_eq!(test[0], "CMD", "exec-form health check");
    test[1..].iter().map(|arg| arg.replace("$$", "$")).collect()
}

fn run(command: &[String], envs: &[(&str, String)]) -> bool {
    Command::new(&command[0])
        .args(&command[1..])
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .expect("health check runs")
        .success()
}

#[test]
fn compose_health_checks_pass_against_real_processes() {
    let config = resolved();
    let services = &config["services"];

    // The fleet services' check, against a running chatwebsocketshandler.
    let check = compose_check(&services["chatwebsocketshandler-1"]);
    let env: Vec<(String, String)> = [("JWT_SECRET", JWT_SECRET), ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN)]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let service = Service::start("chatwebsocketshandler", &env);
    assert!(run(&check, &[("HTTP_PORT", service.public_port.to_string())]), "healthy service fails the check");
    assert!(!run(&check, &[("HTTP_PORT", free_port().to_string())]), "a closed port passes the check");

    // Envoy's check (admin /ready over HTTP/1.1), against a real Envoy running the
    // shipped configuration with its ports moved.
    let docs: Value = serde_json::from_str(&check_py(&["yaml", "deploy/envoy/envoy.yaml"])).expect("JSON");
    let mut envoy_config = docs[0].clone();
    let admin = free_port();
    envoy_config["admin"]["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": admin});
    for listener in envoy_config["static_resources"]["listeners"].as_array_mut().expect("listeners") {
        listener["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": free_port()});
    }
    let dir = testkit::scratch("envoy-check");
    let path = dir.join("envoy.json");
    std::fs::write(&path, serde_json::to_vec(&envoy_config).expect("json")).expect("write");
    let binary = check_py(&["envoy-bin"]).trim().to_owned();
    let args: Vec<String> = ["-c", &path.display().to_string(), "--disable-hot-restart", "--concurrency", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let _envoy = ServerProcess::start("envoy", Path::new(&binary), &args, &dir.join("envoy.log"));
    let check: Vec<String> =
        compose_check(&services["envoy"]).into_iter().map(|a| a.replace("/9901", &format!("/{admin}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut passed = false;
    while Instant::now() < deadline && !passed {
        passed = run(&check, &[]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(passed, "envoy's compose health check never passed against a running envoy");
}

const SECRETS_ENV_FILE: &str = "${CHATFLEET_SECRETS_FILE:-deploy/compose/secrets.env}";

#[test]
fn compose_runs_only_with_generated_secrets_and_binds_to_loopback() {
    let root = workspace_root();
    // No committed file sets a secret.
    for (file, key, _) in env_files() {
        assert!(
            !matches!(key.as_str(), "JWT_SECRET" | "INTERNAL_SERVICE_TOKEN" | "SMTP_PASSWORD"),
            "{file} commits {key}: secrets come from init-secrets.sh"
        );
    }
    let old_samples = ["compose-dev-jwt-secret-change-me", "compose-dev-service-token-change-me"];
    for path in ["docker-compose.yml", "docs/deploy.md", "deploy/helm/chatfleet/values.yaml"] {
        let text = std::fs::read_to_string(root.join(path)).expect("read");
        for sample in old_samples {
            assert!(!text.contains(sample), "{path} still carries the sample secret {sample}");
        }
    }
    // Every chatfleet service reads the generated file (raw file: before interpolation).
    let raw: Value = serde_json::from_str(&check_py(&["yaml", "docker-compose.yml"])).expect("yaml");
    for (name, _) in FLEET {
        let files = raw[0]["services"][name]["env_file"].to_string();
        assert!(files.contains(SECRETS_ENV_FILE), "{name} does not load the secrets file: {files}");
    }
    // Without it compose refuses, naming the file.
    let output = Command::new(crate::multipod_support::deploy_python())
        .arg(root.join("deploy/check/check.py"))
        .args(["compose", "docker-compose.yml", "--env", "CHATFLEET_SECRETS_FILE=deploy/compose/missing-secrets.env"])
        .current_dir(&root)
        .output()
        .expect("check.py runs");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("missing-secrets.env"), "compose ran without secrets: {text}");
    // The generated file is ignored by git.
    let ignored = Command::new("git")
        .args(["check-ignore", "-q", "deploy/compose/secrets.env"])
        .current_dir(&root)
        .status()
        .expect("git runs");
    assert!(ignored.success(), "deploy/compose/secrets.env must be in .gitignore");

    let config = resolved();
    let services = config["services"].as_object().expect("services");
    for (name, service) in services {
        for port in service["ports"].as_array().cloned().unwrap_or_default() {
            let text = port.as_str().map(str::to_owned).unwrap_or_else(|| port.to_string());
            let bound = text.starts_with("127.0.0.1:") || port["host_ip"] == "127.0.0.1";
            assert!(bound, "{name} publishes {text} beyond 127.0.0.1 by default");
        }
    }
    // CHATFLEET_BIND_ADDRESS opens the public API (only it).
    let env = format!("CHATFLEET_SECRETS_FILE={}", secrets_file().display());
    let out = check_py(&["compose", "docker-compose.yml", "--env", &env, "--env", "CHATFLEET_BIND_ADDRESS=0.0.0.0"]);
    let opened: Value = serde_json::from_str(&out).expect("json");
    let envoy_ports = opened["config"]["services"]["envoy"]["ports"].to_string();
    assert!(envoy_ports.contains("0.0.0.0:8080:8080"), "{envoy_ports}");
    assert!(envoy_ports.contains("127.0.0.1:9902:9902"), "the ops port stays local: {envoy_ports}");
    assert!(!envoy_ports.contains("9901"), "Envoy's admin is never published: {envoy_ports}");
    assert!(opened["config"]["services"]["kafka"]["ports"].to_string().contains("127.0.0.1:"), "kafka stays local");

    // Token checks and the edge, for every service behind Envoy.
    let services = &config["services"];
    for (name, _) in FLEET {
        let service = &services[name];
        assert!(env_of(service, "JWT_SECRET").len() >= 43, "{name}: generated secret");
        assert!(env_of(service, "INTERNAL_SERVICE_TOKEN").len() >= 43, "{name}: generated token");
        assert!(!env_of(service, "JWT_ISSUER").is_empty(), "{name}: JWT_ISSUER");
        assert!(!env_of(service, "JWT_AUDIENCE").is_empty(), "{name}: JWT_AUDIENCE");
        assert!(!env_of(service, "ALLOWED_ORIGINS").is_empty(), "{name}: ALLOWED_ORIGINS");
        assert_eq!(env_of(service, "CLIENT_IP_HEADER"), "x-forwarded-for", "{name}");
    }
    // The Debezium registration: non-root, read-only, installs nothing.
    let register = &services["debezium-register"];
    let command = format!("{} {}", register["entrypoint"], register["command"]);
    for installer in ["apk ", "apt", "yum", "dnf", "pip"] {
        assert!(!command.contains(installer), "debezium-register installs packages: {command}");
    }
    let user = register["user"].as_str().unwrap_or("root");
    assert!(user != "root" && user != "0" && !user.is_empty(), "debezium-register runs as {user}");
    assert_eq!(register["read_only"], true);
}

#[test]
fn init_secrets_makes_long_url_safe_secrets_once() {
    let dir = testkit::scratch("init-secrets");
    let path = dir.join("secrets.env");
    let script = workspace_root().join("deploy/compose/init-secrets.sh");
    let run = |args: &[&str]| {
        let output = Command::new(&script).args(args).output().expect("init-secrets.sh runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run(&[path.to_str().expect("path")]);
    let first = std::fs::read_to_string(&path).expect("written");
    let values: Vec<(String, String)> = first
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).expect("KEY=VALUE"))
        .collect();
    let keys: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["JWT_SECRET", "INTERNAL_SERVICE_TOKEN"]);
    for (key, value) in &values {
        // 48 random bytes, base64url without padding: 64 characters.
        assert_eq!(value.len(), 64, "{key}");
        assert!(value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{key} is not URL-safe");
    }
    assert_ne!(values[0].1, values[1].1, "two different secrets");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the owner reads the secrets");
    run(&[path.to_str().expect("path")]);
    assert_eq!(std::fs::read_to_string(&path).expect("kept"), first, "a second run keeps the file");
    run(&["--force", path.to_str().expect("path")]);
    assert_ne!(std::fs::read_to_string(&path).expect("replaced"), first, "--force makes new secrets");
    let printed = run(&["--print"]);
    assert!(printed.contains("JWT_SECRET=") && !printed.contains(&values[0].1), "--print prints fresh values");
}
