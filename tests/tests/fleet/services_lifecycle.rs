//! Every service starts against the real local servers, answers its operational
//! endpoints, and exits cleanly on SIGTERM.

use std::time::{Duration, Instant};

use chatfleet_tests::{http_status, Service, Stack, SERVICES};
use testkit::SmtpSink;

fn get_text(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("write");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

#[test]
fn each_service_serves_health_readiness_metrics_and_stops_on_sigterm() {
    let stack = Stack::start();
    let smtp = SmtpSink::start();
    let mut env = stack.env();
    env.push(("SMTP_HOST".into(), "127.0.0.1".into()));
    env.push(("SMTP_PORT".into(), smtp.port().to_string()));

    for name in SERVICES {
        let mut service = Service::start(name, &env);
        assert_eq!(http_status(service.public_port, "/healthz"), Some(200), "{name} /healthz");

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ready = http_status(service.public_port, "/readyz");
        while ready != Some(200) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            ready = http_status(service.public_port, "/readyz");
        }
        assert_eq!(ready, Some(200), "{name} /readyz; log:\n{}", service.log_tail(30));

        let metrics = get_text(service.public_port, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200") || metrics.starts_with("HTTP/1.0 200"), "{name}: {metrics}");
        assert!(metrics.contains("http_requests_total"), "{name} exposes request metrics:\n{metrics}");
        assert_eq!(http_status(service.public_port, "/no-such-path"), Some(404), "{name} unknown path");

        let started = Instant::now();
        let status = service.terminate(Duration::from_secs(15));
        let status = status.unwrap_or_else(|| panic!("{name} did not exit on SIGTERM; log:\n{}", service.log_tail(30)));
        assert!(status.success(), "{name} exited with {status}; log:\n{}", service.log_tail(30));
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}

/// Polls `/readyz` until it answers `want` or `within` passes; returns the last answer.
fn readyz_becomes(service: &Service, want: u16, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    loop {
        let status = http_status(service.public_port, "/readyz");
        if status == Some(want) || Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readiness_fails_while_a_required_dependency_is_down() {
    let mut stack = Stack::start();
    let persistence = Service::start("chatpersistence", &stack.env());
    let notifications = Service::start("generalnotificationshandler", &stack.env());
    assert_eq!(readyz_becomes(&persistence, 200, Duration::from_secs(20)), Some(200), "chatpersistence ready");
    assert_eq!(http_status(notifications.public_port, "/readyz"), Some(200));

    // chatpersistence cannot work without MongoDB: out of rotation while it is down.
    stack.mongo.stop();
    assert_eq!(readyz_becomes(&persistence, 503, Duration::from_secs(10)), Some(503), "MongoDB is down");
    assert_eq!(http_status(persistence.public_port, "/healthz"), Some(200), "liveness does not depend on MongoDB");

    // generalnotificationshandler only keeps presence in Redis (best effort): sockets
    // and notifications work without it, so Redis being down must not take it out of
    // rotation (docs/notifications.md).
    stack.redis.stop();
    assert_eq!(http_status(notifications.public_port, "/readyz"), Some(200), "Redis is down, still ready");
    assert_eq!(http_status(notifications.public_port, "/healthz"), Some(200));

    stack.mongo.restart();
    let back = readyz_becomes(&persistence, 200, Duration::from_secs(30));
    assert_eq!(back, Some(200), "MongoDB is back; log:\n{}", persistence.log_tail(30));
}
