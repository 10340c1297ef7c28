//! The container image: `Dockerfile` and `.dockerignore`, checked without a Docker
//! engine (none runs here): hadolint, the structure the fleet relies on (stages, the
//! five binaries, non-root, the templates, a health check, the command picking the
//! binary), and the health check's command run for real against a real service.
//!
//! Why this test exists: compose and Helm start every service from this one image by
//! command; a missing binary, a root user or a health check that only opens a socket
//! would only show up in production.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use crate::multipod_support::check_py;
use chatfleet_tests::{Service, JWT_SECRET, SERVICES, SERVICE_TOKEN};
use testkit::{free_port, workspace_root};

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(' ').unwrap_or((current.as_str(), ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

/// The instructions of the last stage (the runtime image).
fn final_stage() -> Vec<(String, String)> {
    let all = instructions();
    let last_from = all.iter().rposition(|(k, _)| k == "FROM").expect("a FROM");
    all[last_from..].to_vec()
}

fn healthcheck_command() -> Vec<String> {
    let stage = final_stage();
    let (_, health) = stage.iter().find(|(k, _)| k == "HEALTHCHECK").expect("the runtime stage has a HEALTHCHECK");
    let json = &health[health.find("CMD").expect("HEALTHCHECK CMD") + 3..];
    let command: Vec<String> = serde_json::from_str(json.trim()).expect("HEALTHCHECK CMD is a JSON array");
    command
}

#[test]
fn hadolint_finds_nothing_to_fix() {
    check_py(&["hadolint", "Dockerfile"]);
}

#[test]
fn image_builds_every_service_and_runs_them_as_non_root() {
    let all = instructions();
    let froms: Vec<&String> = all.iter().filter(|(k, _)| k == "FROM").map(|(_, v)| v).collect();
    assert!(froms.len() >= 2, "multi-stage: a builder and a runtime stage, got {froms:?}");
    let args: String = all.iter().filter(|(k, _)| k == "ARG").map(|(_, v)| format!("{v}\n")).collect();
    assert!(args.contains("rust:") && args.contains("bookworm"), "builder on the official rust image (bookworm)");
    assert!(args.contains("debian:bookworm-slim"), "runtime on debian:bookworm-slim");

    // Every workspace member's manifest is copied for the dependency layer.
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest.split("members = [").nth(1).and_then(|s| s.split(']').next()).expect("members");
    let copies: Vec<&String> = all.iter().filter(|(k, _)| k == "COPY").map(|(_, v)| v).collect();
    for member in members.split(',').map(|m| m.trim().trim_matches('"')).filter(|m| !m.is_empty()) {
        let wanted = format!("{member}/Cargo.toml");
        assert!(
            copies.iter().any(|c| c.starts_with(&wanted)),
            "the Dockerfile's dependency layer misses {wanted} (a new workspace member?)"
        );
    }

    let runs: String = all.iter().filter(|(k, _)| k == "RUN").map(|(_, v)| format!("{v}\n")).collect();
    for service in SERVICES {
        assert!(runs.contains(&format!("-p {service}")), "{service} is not built");
        assert!(runs.contains(service), "{service} is not installed");
    }
    assert!(runs.contains("--release") && runs.contains("--locked"), "release build from Cargo.lock");
    assert!(runs.contains("services/emailhandler/templates"), "email templates are collected");

    let stage = final_stage();
    let user = stage.iter().rev().find(|(k, _)| k == "USER").map(|(_, v)| v.clone()).expect("USER in runtime stage");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(uid.parse::<u32>().is_ok_and(|u| u != 0), "runtime user must be numeric and not root: {user}");
    let copies: String = stage.iter().filter(|(k, _)| k == "COPY").map(|(_, v)| format!("{v}\n")).collect();
    assert!(copies.contains("/usr/local/bin"), "binaries go to /usr/local/bin");
    assert!(copies.contains("/usr/share/chatfleet/templates"), "templates go to /usr/share/chatfleet/templates");
    let env: String = stage.iter().filter(|(k, _)| k == "ENV").map(|(_, v)| format!("{v}\n")).collect();
    assert!(env.contains("EMAIL_TEMPLATES_DIR=/usr/share/chatfleet/templates"), "{env}");
    let cmd = stage.iter().rev().find(|(k, _)| k == "CMD").map(|(_, v)| v.clone()).expect("CMD");
    assert_eq!(cmd, r#"["chatpersistence"]"#, "the default command is a binary name (compose/Helm replace it)");
    assert!(!stage.iter().any(|(k, _)| k == "ENTRYPOINT"), "no ENTRYPOINT: the command picks the binary");
    let command = healthcheck_command();
    assert!(command.join(" ").contains("GET /healthz"), "the health check speaks HTTP: {command:?}");
    let runtime_runs: String = stage.iter().filter(|(k, _)| k == "RUN").map(|(_, v)| format!("{v}\n")).collect();
    assert!(!runtime_runs.contains("curl"), "no curl in the runtime image: {runtime_runs}");

    let ignore = std::fs::read_to_string(workspace_root().join(".dockerignore")).expect(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert_eq!(lines.first(), Some(&"*"), ".dockerignore is an allowlist starting with '*'");
    for needed in ["!Cargo.toml", "!Cargo.lock", "!crates/", "!services/", "!tests/"] {
        assert!(lines.contains(&needed), ".dockerignore must let {needed} in");
    }
    for never in ["target/", ".local/", ".git/"] {
        assert!(lines.contains(&never), ".dockerignore must name {never}");
    }
}

/// Runs the image's health check command on this machine with `HTTP_PORT=port`.
fn run_healthcheck(port: u16) -> bool {
    let command = healthcheck_command();
    let status = Command::new(&command[0])
        .args(&command[1..])
        .env("HTTP_PORT", port.to_string())
        .status()
        .expect("the health check command runs");
    status.success()
}

/// A one-shot HTTP server answering every request with `status`.
fn fake_server(status: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten().take(4) {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

#[test]
fn the_health_check_passes_on_a_healthy_service_and_fails_otherwise() {
    let env: Vec<(String, String)> = [("JWT_SECRET", JWT_SECRET), ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN)]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let service = Service::start("chatwebsocketshandler", &env);
    assert!(run_healthcheck(service.public_port), "a healthy service must pass the image's health check");
    assert!(!run_healthcheck(free_port()), "nothing listening must fail the health check");
    assert!(!run_healthcheck(fake_server("503 Service Unavailable")), "a 503 must fail the health check");
    assert!(!run_healthcheck(fake_server("404 Not Found")), "a 404 must fail the health check");
}
