//! A fleet with several socket pods behind a real L7 proxy (nginx or Envoy), for the
//! multi-pod routing tests (`multipod_nginx.rs`, `multipod_envoy.rs`).
//!
//! Why this module exists: the whole design rests on one routing rule: a stream's
//! subscribes (public) and its forwards (internal) reach the same pod because the
//! proxy hashes both on `stream_id` over the same ring (`user_id` for notifications).
//! A single-pod test cannot show that. This starts two `chatwebsocketshandler` and two
//! `generalnotificationshandler` processes, puts the shipped proxy configuration in
//! front of them (`deploy/nginx/render.sh`, `deploy/envoy/envoy.yaml` with addresses
//! rewritten to loopback ports), points the change handler and the clients only at the
//! proxy, and drives many streams through it, including a pod that dies.

#![allow(dead_code)]

pub mod edge;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use testkit::{free_port, wait_for_port, workspace_root, ServerProcess};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Which proxy stands in front of the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Nginx,
    Envoy,
}

/// A running proxy with a public and an internal listener on loopback.
pub struct Proxy {
    pub public_port: u16,
    pub internal_port: u16,
    pub admin_port: Option<u16>,
    process: ServerProcess,
    pub dir: PathBuf,
}

/// A pod as the proxy sees it: a stable name and its two ports.
#[derive(Debug, Clone)]
pub struct PodAddr {
    pub name: String,
    pub public_port: u16,
    pub internal_port: u16,
}

impl PodAddr {
    pub fn of(name: &str, service: &Service) -> Self {
        Self { name: name.to_owned(), public_port: service.public_port, internal_port: service.internal_port }
    }
}

/// What the proxy puts behind its listeners: chatpersistence and the ring members.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub persistence: PodAddr,
    pub chat: Vec<PodAddr>,
    pub notify: Vec<PodAddr>,
}

/// A short private directory (unix socket paths must stay under 108 bytes).
fn short_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(testkit::unique(kind).replace(&format!("{kind}-"), "cf-"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The nginx binary: `NGINX_BIN`, Debian's `/usr/sbin/nginx`, or `PATH`.
pub fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        return debian;
    }
    which("nginx").unwrap_or_else(|| panic!("nginx not found: apt-get install nginx (or set NGINX_BIN)"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `deploy/check/install.sh` (idempotent, locked) and returns the venv's python.
pub fn deploy_python() -> PathBuf {
    let root = workspace_root();
    let status = Command::new(root.join("deploy/check/install.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("deploy/check/install.sh runs");
    assert!(status.success(), "deploy/check/install.sh failed");
    let venv = std::env::var_os("DEPLOY_VENV").map(PathBuf::from).unwrap_or_else(|| root.join(".local/deploy-venv"));
    venv.join("bin/python")
}

/// Runs `deploy/check/check.py ARGS`, returning stdout; panics with stderr on failure.
pub fn check_py(args: &[&str]) -> String {
    let root = workspace_root();
    let output = Command::new(deploy_python())
        .arg(root.join("deploy/check/check.py"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("check.py runs");
    assert!(
        output.status.success(),
        "check.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Proxy {
    /// nginx with `deploy/nginx/chatfleet.conf.template` rendered for these pods.
    pub fn nginx(public_port: u16, internal_port: u16, upstreams: &Upstreams) -> Self {
        let dir = short_dir("nginx");
        render_nginx(&dir, public_port, internal_port, upstreams);
        let main = format!(
            "{user}pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/chatfleet.conf;\n}}\n",
            user = if running_as_root() { "user root root;\n" } else { "" },
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        let binary = nginx_binary();
        let args = nginx_args(&dir);
        let test = Command::new(&binary).args(&args).arg("-t").output().expect("nginx -t runs");
        assert!(test.status.success(), "nginx -t failed:\n{}", String::from_utf8_lossy(&test.stderr));
        let process = ServerProcess::start("nginx", &binary, &args, &dir.join("nginx.out"));
        assert!(wait_for_port(public_port, Duration::from_secs(10)), "nginx did not listen on {public_port}");
        assert!(wait_for_port(internal_port, Duration::from_secs(10)), "nginx did not listen on {internal_port}");
        Self { public_port, internal_port, admin_port: None, process, dir }
    }

    /// Renders the configuration for another set of pods and reloads nginx (as an
    /// operator would after a scale-out): new connections use the new rings.
    pub fn nginx_reload(&self, upstreams: &Upstreams) {
        render_nginx(&self.dir, self.public_port, self.internal_port, upstreams);
        let output = Command::new(nginx_binary())
            .args(nginx_args(&self.dir))
            .args(["-s", "reload"])
            .output()
            .expect("nginx runs");
        assert!(output.status.success(), "nginx -s reload failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// A real Envoy with `deploy/envoy/envoy.yaml`, its listeners and endpoints moved to
    /// loopback ports; routes, hash policies, hash keys and health checks are untouched.
    pub fn envoy(public_port: u16, internal_port: u16, upstreams: &Upstreams) -> Self {
        let Upstreams { persistence, chat, notify } = upstreams;
        let dir = short_dir("envoy");
        let docs: Value = serde_json::from_str(&check_py(&["yaml", "deploy/envoy/envoy.yaml"])).expect("JSON");
        let mut config = docs[0].clone();
        let admin_port = free_port();
        config["admin"]["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": admin_port});
        for listener in config["static_resources"]["listeners"].as_array_mut().expect("listeners") {
            let port = match listener["name"].as_str() {
                Some("public") => public_port,
                Some("internal") => internal_port,
                Some("ops") => free_port(),
                other => panic!("unexpected listener {other:?}"),
            };
            listener["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": port});
        }
        // Compose host names → the test's pods, in order.
        let mut hosts: HashMap<String, PodAddr> = HashMap::new();
        hosts.insert("chatpersistence".into(), persistence.clone());
        for (i, pod) in chat.iter().enumerate() {
            hosts.insert(format!("chatwebsocketshandler-{}", i + 1), pod.clone());
        }
        for (i, pod) in notify.iter().enumerate() {
            hosts.insert(format!("generalnotificationshandler-{}", i + 1), pod.clone());
        }
        for cluster in config["static_resources"]["clusters"].as_array_mut().expect("clusters") {
            if cluster["name"] == "envoy_admin" {
                // The ops listener's relay to the admin interface, which moved too.
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                    ["socket_address"]["port_value"] = json!(admin_port);
                continue;
            }
            let internal = cluster["name"].as_str().is_some_and(|n| n.ends_with("_internal"));
            for group in cluster["load_assignment"]["endpoints"].as_array_mut().expect("endpoints") {
                let lb_endpoints = group["lb_endpoints"].as_array_mut().expect("lb_endpoints");
                lb_endpoints.retain(|e| {
                    hosts.contains_key(e["endpoint"]["address"]["socket_address"]["address"].as_str().unwrap_or(""))
                });
                for endpoint in lb_endpoints {
                    let host = endpoint["endpoint"]["address"]["socket_address"]["address"]
                        .as_str()
                        .expect("address")
                        .to_owned();
                    let pod = &hosts[&host];
                    let port = if internal { pod.internal_port } else { pod.public_port };
                    endpoint["endpoint"]["address"]["socket_address"] =
                        json!({"address": "127.0.0.1", "port_value": port});
                    if endpoint["endpoint"].get("health_check_config").is_some() {
                        endpoint["endpoint"]["health_check_config"]["port_value"] = json!(pod.public_port);
                    }
                }
            }
        }
        let path = dir.join("envoy.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("serialize")).expect("write envoy.json");
        let binary = PathBuf::from(check_py(&["envoy-bin"]).trim());
        let args: Vec<String> =
            ["-c", &path.display().to_string(), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let process = ServerProcess::start("envoy", &binary, &args, &dir.join("envoy.log"));
        let proxy = Self { public_port, internal_port, admin_port: Some(admin_port), process, dir };
        proxy.wait_envoy_ready();
        proxy
    }

    fn wait_envoy_ready(&self) {
        let admin = self.admin_port.expect("envoy has an admin port");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if blocking_get(admin, "/ready").starts_with("HTTP/1.1 200") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("envoy did not become ready; log:\n{}", self.process.log_tail(40));
    }

    /// The health Envoy's active checks currently give each host of `cluster`
    /// (`host:port` → healthy).
    pub fn envoy_host_health(&self, cluster: &str) -> HashMap<String, bool> {
        let admin = self.admin_port.expect("envoy");
        let text = blocking_get(admin, "/clusters");
        let mut health = HashMap::new();
        for line in text.lines() {
            let mut parts = line.split("::");
            if parts.next() != Some(cluster) {
                continue;
            }
            let (Some(host), Some("health_flags"), Some(flags)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            health.insert(host.to_owned(), flags == "healthy");
        }
        health
    }

    pub fn public_http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public_port)
    }

    pub fn public_ws(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.public_port)
    }

    pub fn internal_http(&self) -> String {
        format!("http://127.0.0.1:{}", self.internal_port)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    pub fn error_log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log"))
            .map(|s| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    /// SIGTERM first: nginx's master then stops its workers (a SIGKILLed master
    /// leaves them running, holding the ports).
    fn drop(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }
}

/// `deploy/nginx/render.sh` for these pods, into `dir/chatfleet.conf`.
fn render_nginx(dir: &Path, public_port: u16, internal_port: u16, upstreams: &Upstreams) {
    let Upstreams { persistence, chat, notify } = upstreams;
    let mut render = Command::new(workspace_root().join("deploy/nginx/render.sh"));
    render
        .args(["--public-listen", &format!("127.0.0.1:{public_port}")])
        .args(["--internal-listen", &format!("127.0.0.1:{internal_port}")])
        .args(["--run-dir", &dir.display().to_string()])
        .args(["--access-log", &dir.join("access.log").display().to_string()])
        .args(["--persistence", &format!("127.0.0.1:{}:{}", persistence.public_port, persistence.internal_port)]);
    for pod in chat {
        render.args(["--chat", &format!("{}=127.0.0.1:{}:{}", pod.name, pod.public_port, pod.internal_port)]);
    }
    for pod in notify {
        render.args(["--notifications", &format!("{}=127.0.0.1:{}:{}", pod.name, pod.public_port, pod.internal_port)]);
    }
    let output = render.output().expect("render.sh runs");
    assert!(output.status.success(), "render.sh failed: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::write(dir.join("chatfleet.conf"), &output.stdout).expect("write chatfleet.conf");
}

fn nginx_args(dir: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        dir.join("nginx.conf").display().to_string(),
        "-g".into(),
        "daemon off;".into(),
    ]
}

fn blocking_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    // HTTP/1.1: Envoy's admin answers HTTP/1.0 with 426.
    let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// `gauge{labels}` from a pod's `/metrics` (0 when absent).
pub fn gauge(port: u16, series: &str) -> f64 {
    blocking_get(port, "/metrics")
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The whole fleet: servers, chatpersistence, socket pods, notification pods, the
/// proxy and the change handler (which reaches the pods only through the proxy).
pub struct Fleet {
    pub stack: Stack,
    pub persistence: Service,
    pub chat: Vec<Service>,
    pub notify: Vec<Service>,
    pub proxy: Proxy,
    pub handler: Service,
    upstreams: Upstreams,
}

impl Fleet {
    pub fn start(kind: ProxyKind, chat_pods: usize, notify_pods: usize) -> Self {
        Self::start_with(kind, chat_pods, notify_pods, usize::MAX, None)
    }

    /// Like [`Fleet::start`], but only the first `in_ring` pods of each kind are on the
    /// proxy's rings at first (see [`Fleet::grow_rings`]), and with `ownership_check`
    /// (an interval) the socket pods check through the proxy which keys they own.
    pub fn start_with(
        kind: ProxyKind,
        chat_pods: usize,
        notify_pods: usize,
        in_ring: usize,
        ownership_check: Option<&str>,
    ) -> Self {
        let stack = Stack::start();
        for topic in ["purchases.changes", "payments.changes", "shipments.changes", "domain-notifications.dlq"] {
            stack.broker.create_topic(topic, 1);
        }
        let public_port = free_port();
        let internal_port = free_port();
        let mut base = stack.env();
        base.push(("CAPTURE_MODE".into(), "outbox".into()));
        base.push(("KAFKA_GROUP_ID".into(), testkit::unique("multipod")));
        base.push(("MESSAGE_RETRY_INITIAL_INTERVAL".into(), "100ms".into()));
        base.push(("MESSAGE_RETRY_MAX_INTERVAL".into(), "1s".into()));
        base.push(("MESSAGE_RETRY_MAX_RETRIES".into(), "8".into()));
        base.push(("FORWARD_TIMEOUT".into(), "3s".into()));
        base.push(("WS_PING_INTERVAL".into(), "2s".into()));
        base.push(("WS_PONG_TIMEOUT".into(), "10s".into()));
        let persistence = Service::start("chatpersistence", &base);
        // The pods read replay history through the proxy's internal listener, as in
        // compose and Helm.
        let mut pod_env = base.clone();
        pod_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), format!("http://127.0.0.1:{internal_port}")));
        if let Some(interval) = ownership_check {
            pod_env.push(("WS_OWNERSHIP_CHECK_URL".into(), format!("http://127.0.0.1:{internal_port}")));
            pod_env.push(("WS_OWNERSHIP_CHECK_INTERVAL".into(), interval.to_owned()));
        }
        let chat: Vec<Service> = (0..chat_pods).map(|_| Service::start("chatwebsocketshandler", &pod_env)).collect();
        let notify: Vec<Service> =
            (0..notify_pods).map(|_| Service::start("generalnotificationshandler", &pod_env)).collect();
        let chat_addrs: Vec<PodAddr> =
            chat.iter().enumerate().map(|(i, s)| PodAddr::of(&format!("c{}", i + 1), s)).collect();
        let notify_addrs: Vec<PodAddr> =
            notify.iter().enumerate().map(|(i, s)| PodAddr::of(&format!("n{}", i + 1), s)).collect();
        let persistence_addr = PodAddr::of("chatpersistence", &persistence);
        let upstreams = Upstreams { persistence: persistence_addr, chat: chat_addrs, notify: notify_addrs };
        let first = Upstreams {
            persistence: upstreams.persistence.clone(),
            chat: upstreams.chat.iter().take(in_ring).cloned().collect(),
            notify: upstreams.notify.iter().take(in_ring).cloned().collect(),
        };
        let proxy = match kind {
            ProxyKind::Nginx => Proxy::nginx(public_port, internal_port, &first),
            ProxyKind::Envoy => Proxy::envoy(public_port, internal_port, &first),
        };
        let mut handler_env = base;
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), proxy.internal_http()));
        handler_env.push(("NOTIFICATIONS_URL".into(), proxy.internal_http()));
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        Self { stack, persistence, chat, notify, proxy, handler, upstreams }
    }

    /// Puts every pod on the rings (nginx only): a scale-out as the proxy sees it.
    pub fn grow_rings(&self) {
        self.proxy.nginx_reload(&self.upstreams);
    }

    /// Sum of `ws_connections` over the running pods of a kind, and per pod.
    pub fn connections(pods: &mut [Service], hub: &str) -> Vec<f64> {
        let series = format!("ws_connections{{hub=\"{hub}\"}}");
        pods.iter_mut().map(|pod| if pod.is_running() { gauge(pod.public_port, &series) } else { 0.0 }).collect()
    }

    /// Waits until a message posted through the proxy reaches a socket opened through
    /// the proxy (consumer group joined, relay leading).
    pub async fn warm_up(&self) {
        let (a, b) = ("warm-a", "warm-b");
        let mut socket = Socket::connect(&self.proxy.public_ws(&chat_path(b, a, None))).await.expect("subscribe");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let id = post(&self.proxy, a, b, "warm-up").await;
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                match socket.next(Duration::from_millis(500)).await {
                    Event::Frame(frame) if frame["message"]["message_id"] == id.as_str() => {
                        socket.close().await;
                        return;
                    }
                    Event::Closed => panic!("warm-up socket closed"),
                    _ => {}
                }
            }
            assert!(Instant::now() < deadline, "the pipeline did not warm up through the proxy within 90 s");
        }
    }
}

pub fn stream_id(a: &str, b: &str) -> String {
    chatfleet_tests::client::stream_id(a, b)
}

/// `/chat/subscribe?…` for `user` in the conversation with `peer`.
pub fn chat_path(user: &str, peer: &str, since: Option<&str>) -> String {
    let mut path = format!(
        "/chat/subscribe?stream_id={}&sender_id={user}&receiver_id={peer}&access_token={}",
        stream_id(user, peer),
        token(user)
    );
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    path
}

pub fn notify_path(user: &str) -> String {
    format!("/notifications/subscribe?user_id={user}&access_token={}", token(user))
}

/// `POST /chat/messages` through the proxy; returns the message id (retries a 5xx).
pub async fn post(proxy: &Proxy, from: &str, to: &str, content: &str) -> String {
    let client = reqwest::Client::new();
    for attempt in 0..20 {
        let response = client
            .post(proxy.public_http("/chat/messages"))
            .bearer_auth(token(from))
            .json(&json!({"sender_id": from, "receiver_id": to, "content": content}))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = response {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status == 201 {
                return body["message_id"].as_str().expect("message_id").to_owned();
            }
            assert!(status >= 500, "POST through the proxy answered {status}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    panic!("POST /chat/messages through the proxy kept failing");
}

/// A raw WebSocket client.
pub struct Socket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Closed,
    Nothing,
}

impl Socket {
    pub async fn connect(url: &str) -> Result<Self, String> {
        match tokio::time::timeout(Duration::from_secs(5), chatfleet_tests::ws_connect(url)).await {
            Ok(Ok((ws, _))) => Ok(Self { ws }),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    pub async fn next(&mut self, timeout: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Nothing,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Event::Closed,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Event::Frame(serde_json::from_str(text.as_str()).unwrap_or(Value::Null))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
    }
}

/// What one client saw over its whole life, reconnects included.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Every message id in arrival order (a repeat is a duplicate).
    pub ids: Vec<String>,
    pub reconnects: u32,
    pub connected: bool,
}

/// A client that holds a socket, reconnects when it drops (with `since` = the last
/// message id it saw, for chat), and records what it saw, until `stop` is set.
pub fn spawn_client(
    proxy_ws: String,
    path: impl Fn(Option<&str>) -> String + Send + 'static,
    id_of: fn(&Value) -> Option<String>,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    let task = tokio::spawn(async move {
        let mut socket: Option<Socket> = None;
        let mut failures = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let Some(open) = socket.as_mut() else {
                let since = state.lock().expect("lock").ids.last().cloned();
                match Socket::connect(&format!("{proxy_ws}{}", path(since.as_deref()))).await {
                    Ok(new) => {
                        let mut s = state.lock().expect("lock");
                        if failures > 0 || !s.ids.is_empty() || s.reconnects > 0 || s.connected {
                            s.reconnects += 1;
                        }
                        s.connected = true;
                        failures = 0;
                        socket = Some(new);
                    }
                    Err(_) => {
                        failures += 1;
                        assert!(failures < 100, "a client could not reconnect through the proxy");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                continue;
            };
            match open.next(Duration::from_millis(200)).await {
                Event::Frame(frame) => {
                    if let Some(id) = id_of(&frame) {
                        state.lock().expect("lock").ids.push(id);
                    }
                }
                Event::Closed => {
                    state.lock().expect("lock").connected = false;
                    socket = None;
                    // Clients back off a little before reconnecting (socket-protocol.md).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Event::Nothing => {}
            }
        }
        if let Some(open) = socket {
            open.close().await;
        }
    });
    (seen, task)
}

pub fn chat_message_id(frame: &Value) -> Option<String> {
    (frame["type"] == "message").then(|| frame["message"]["message_id"].as_str().map(str::to_owned)).flatten()
}

pub fn chat_notification_id(frame: &Value) -> Option<String> {
    (frame["type"] == "notification" && frame["kind"] == "chat")
        .then(|| frame["data"]["message_id"].as_str().map(str::to_owned))
        .flatten()
}

/// Waits until `done()` or `timeout`; true when done.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

/// Ids a client must have seen, and the problems with what it did see.
pub fn problems(who: &str, seen: &Seen, expected: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &seen.ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in expected {
        match counts.get(id.as_str()) {
            None => out.push(format!("{who}: missing {id}")),
            Some(n) if *n > 1 => out.push(format!("{who}: {id} seen {n} times")),
            _ => {}
        }
    }
    for id in counts.keys() {
        if !expected.iter().any(|e| e == id) {
            out.push(format!("{who}: unexpected {id}"));
        }
    }
    out
}

pub fn has_all(seen: &Seen, expected: &[String]) -> bool {
    expected.iter().all(|id| seen.ids.contains(id))
}

pub fn path_of(path: &Path) -> String {
    path.display().to_string()
}

/// The multi-pod scenario both proxies must pass:
///
/// 1. 40 conversations (80 chat sockets) and 40 notification sockets are opened
///    through the proxy's public listener; both pods of each kind get some.
/// 2. Three messages per conversation are posted through the proxy; the change
///    handler forwards through the proxy's internal listener. Every chat socket gets
///    its stream's three messages exactly once, every receiver its two chat
///    notifications: the forwards reached the pods that hold the sockets.
/// 3. One chat pod and one notification pod are SIGKILLed and a message is posted to
///    every conversation at once. Clients of the dead pods reconnect through the
///    proxy (chat with `since` = the last id they saw) and land on the surviving pod.
/// 4. Another message per conversation. In the end every chat socket has seen every
///    message of its stream exactly once (replay + live, no gap, no duplicate), and
///    every receiver got the notifications posted while its socket was open.
pub async fn two_pods_route_by_key_and_survive_losing_one(kind: ProxyKind) {
    const PAIRS: usize = 40;
    // Ownership checks on: with a ring that only loses pods they must close nothing.
    let mut fleet = Fleet::start_with(kind, 2, 2, usize::MAX, Some("1s"));
    fleet.warm_up().await;
    edge_serves_the_whole_api(&fleet.proxy).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pairs: Vec<(String, String)> = (0..PAIRS).map(|i| (format!("mp{i}-a"), format!("mp{i}-b"))).collect();
    let (chat_clients, notify_clients) = open_conversations(&fleet.proxy, &pairs, &stop);

    let all_open = wait_until(Duration::from_secs(30), || {
        Fleet::connections(&mut fleet.chat, "chat").iter().sum::<f64>() == (2 * PAIRS) as f64
            && Fleet::connections(&mut fleet.notify, "notifications").iter().sum::<f64>() == PAIRS as f64
    })
    .await;
    let chat_before = Fleet::connections(&mut fleet.chat, "chat");
    let notify_before = Fleet::connections(&mut fleet.notify, "notifications");
    assert!(all_open, "not every socket registered: chat pods {chat_before:?}, notification pods {notify_before:?}");
    assert!(chat_before.iter().all(|n| *n > 0.0), "the proxy sent every conversation to one chat pod: {chat_before:?}");
    assert!(
        notify_before.iter().all(|n| *n > 0.0),
        "the proxy sent every user to one notification pod: {notify_before:?}"
    );

    // Round 1: both pods alive.
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); PAIRS];
    let mut notified: Vec<Vec<String>> = vec![Vec::new(); PAIRS];
    let mut maybe_notified: Vec<Vec<String>> = vec![Vec::new(); PAIRS];
    for (i, (a, b)) in pairs.iter().enumerate() {
        for (from, to) in [(a, b), (a, b), (b, a)] {
            let id = post(&fleet.proxy, from, to, &format!("round 1 from {from}")).await;
            if from == a {
                notified[i].push(id.clone());
            }
            expected[i].push(id);
        }
    }
    let delivered = all_delivered(Duration::from_secs(30), &chat_clients, &expected, &notify_clients, &notified).await;
    let mut trouble: Vec<String> = chat_clients
        .iter()
        .flat_map(|(i, who, seen, _)| problems(who, &seen.lock().expect("lock"), &expected[*i]))
        .collect();
    trouble.extend(
        notify_clients.iter().flat_map(|(i, who, seen, _)| problems(who, &seen.lock().expect("lock"), &notified[*i])),
    );
    assert!(
        delivered && trouble.is_empty(),
        "with both pods up, forwards did not reach the sockets' pods:\n{}\nproxy:\n{}{}",
        trouble.join("\n"),
        fleet.proxy.log_tail(20),
        fleet.proxy.error_log_tail()
    );

    // A chat pod and a notification pod die; messages keep coming at once.
    fleet.chat[0].kill();
    fleet.notify[0].kill();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let id = post(&fleet.proxy, a, b, "round 2, while a pod is gone").await;
        expected[i].push(id.clone());
        maybe_notified[i].push(id);
    }
    let moved = wait_until(Duration::from_secs(45), || {
        Fleet::connections(&mut fleet.chat, "chat")[1] == (2 * PAIRS) as f64
            && Fleet::connections(&mut fleet.notify, "notifications")[1] == PAIRS as f64
    })
    .await;
    assert!(
        moved,
        "the dead pods' clients did not all reconnect to the surviving pods: chat {:?}, notifications {:?}",
        Fleet::connections(&mut fleet.chat, "chat"),
        Fleet::connections(&mut fleet.notify, "notifications")
    );
    if kind == ProxyKind::Envoy {
        // Active health checks take the dead pod out of both rings (public and
        // internal judge it on the same port, so they agree).
        let dead = format!("127.0.0.1:{}", fleet.chat[0].public_port);
        let dead_internal = format!("127.0.0.1:{}", fleet.chat[0].internal_port);
        let marked = wait_until(Duration::from_secs(15), || {
            fleet.proxy.envoy_host_health("chatwebsocketshandler_public").get(&dead) == Some(&false)
                && fleet.proxy.envoy_host_health("chatwebsocketshandler_internal").get(&dead_internal) == Some(&false)
        })
        .await;
        assert!(marked, "envoy did not mark the dead pod unhealthy in both chat clusters");
    }

    // Round 3: everyone is on the surviving pods.
    for (i, (a, b)) in pairs.iter().enumerate() {
        let id = post(&fleet.proxy, a, b, "round 3, after the failover").await;
        expected[i].push(id.clone());
        notified[i].push(id);
    }
    let complete = all_delivered(Duration::from_secs(45), &chat_clients, &expected, &notify_clients, &notified).await;
    stop.store(true, Ordering::Relaxed);
    let mut chat_reconnects = 0;
    let mut trouble = Vec::new();
    for (i, who, seen, task) in chat_clients {
        let _ = task.await;
        let seen = seen.lock().expect("lock").clone();
        chat_reconnects += seen.reconnects;
        trouble.extend(problems(&who, &seen, &expected[i]));
    }
    let mut notify_reconnects = 0;
    for (i, who, seen, task) in notify_clients {
        let _ = task.await;
        let seen = seen.lock().expect("lock").clone();
        notify_reconnects += seen.reconnects;
        // Notification sockets have no replay: a notification forwarded while its
        // socket was down is gone (the chat socket and the history still have it).
        let mut allowed = notified[i].clone();
        allowed.extend(seen.ids.iter().filter(|id| maybe_notified[i].contains(id)).cloned());
        trouble.extend(problems(&who, &seen, &allowed));
    }
    assert!(
        complete && trouble.is_empty(),
        "after losing a pod, not every message arrived exactly once:\n{}\nproxy:\n{}{}",
        trouble.join("\n"),
        fleet.proxy.log_tail(20),
        fleet.proxy.error_log_tail()
    );
    // The surviving pods' ownership checks went through the proxy and got answers
    // (some fail while the proxy still routes to the dead pod; those close nothing).
    for (pod, hub) in [(&fleet.chat[1], "chat"), (&fleet.notify[1], "notifications")] {
        let checks = gauge(pod.public_port, &format!("ws_ownership_checks_total{{hub=\"{hub}\"}}"));
        let errors = gauge(pod.public_port, &format!("ws_ownership_check_errors_total{{hub=\"{hub}\"}}"));
        assert!(checks - errors >= 20.0, "{hub} ownership checks through the proxy: {checks} checks, {errors} errors");
    }
    // Exactly the sockets of the dead pods reconnected: the ownership checks closed
    // nothing on the surviving pods (they own every key now).
    assert_eq!(
        chat_reconnects as f64, chat_before[0],
        "{} chat sockets were on the dead pod but {chat_reconnects} reconnects happened",
        chat_before[0]
    );
    assert_eq!(
        notify_reconnects as f64, notify_before[0],
        "{} notification sockets were on the dead pod but {notify_reconnects} reconnects happened",
        notify_before[0]
    );
}

/// A client of a scenario: its conversation index, a description, what it saw, its task.
type Client = (usize, String, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>);

/// Waits until every chat client saw its conversation's `chat` ids and every
/// notification client its conversation's `notify` ids; true when they did.
async fn all_delivered(
    timeout: Duration,
    chat_clients: &[Client],
    chat: &[Vec<String>],
    notify_clients: &[Client],
    notify: &[Vec<String>],
) -> bool {
    let saw_all = |clients: &[Client], ids: &[Vec<String>]| {
        clients.iter().all(|(i, _, seen, _)| has_all(&seen.lock().expect("lock"), &ids[*i]))
    };
    wait_until(timeout, || saw_all(chat_clients, chat) && saw_all(notify_clients, notify)).await
}

/// Clients through the proxy for every conversation: a chat socket for each participant
/// and a notification socket for the receiver (`b`).
fn open_conversations(proxy: &Proxy, pairs: &[(String, String)], stop: &Arc<AtomicBool>) -> (Vec<Client>, Vec<Client>) {
    let ws = proxy.public_ws("");
    let mut chat_clients = Vec::new();
    let mut notify_clients = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        for (user, peer) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
            let who = format!("chat socket of {user} (stream {})", stream_id(&user, &peer));
            let (seen, task) =
                spawn_client(ws.clone(), move |since| chat_path(&user, &peer, since), chat_message_id, stop.clone());
            chat_clients.push((i, who, seen, task));
        }
        let user = b.clone();
        let (seen, task) = spawn_client(ws.clone(), move |_| notify_path(&user), chat_notification_id, stop.clone());
        notify_clients.push((i, format!("notification socket of {b}"), seen, task));
    }
    (chat_clients, notify_clients)
}

/// Scale-out with ownership checks on (nginx, which can change its rings by reload):
///
/// 1. Two pods of each kind run, but the rings hold only the first: 30 conversations
///    (60 chat sockets) and 30 notification sockets all open on pod 1, and a message per
///    conversation reaches them.
/// 2. The rings grow to both pods (`nginx -s reload`): about half the keys now belong to
///    pod 2. Pod 1's ownership check (every second, through the proxy's internal
///    listener) finds them and closes their sockets (chat: `resync` + 4000, notifications:
///    1001); the clients reconnect through the proxy and land on pod 2, chat with `since`.
/// 3. Exactly the moved sockets reconnect (one reconnect per socket now on pod 2, none
///    for the sockets that stayed: no false closes), and another message per conversation
///    reaches every socket live: every chat socket has both messages exactly once and
///    every receiver both chat notifications.
pub async fn scale_out_moves_open_sockets_to_their_new_pods(kind: ProxyKind) {
    const PAIRS: usize = 30;
    let mut fleet = Fleet::start_with(kind, 2, 2, 1, Some("1s"));
    fleet.warm_up().await;
    let stop = Arc::new(AtomicBool::new(false));
    let pairs: Vec<(String, String)> = (0..PAIRS).map(|i| (format!("so{i}-a"), format!("so{i}-b"))).collect();
    let (chat_clients, notify_clients) = open_conversations(&fleet.proxy, &pairs, &stop);
    let on_first_pods = wait_until(Duration::from_secs(30), || {
        Fleet::connections(&mut fleet.chat, "chat") == [(2 * PAIRS) as f64, 0.0]
            && Fleet::connections(&mut fleet.notify, "notifications") == [PAIRS as f64, 0.0]
    })
    .await;
    assert!(
        on_first_pods,
        "with one pod per ring every socket belongs on pod 1: chat {:?}, notifications {:?}",
        Fleet::connections(&mut fleet.chat, "chat"),
        Fleet::connections(&mut fleet.notify, "notifications")
    );

    let mut expected: Vec<Vec<String>> = vec![Vec::new(); PAIRS];
    for (i, (a, b)) in pairs.iter().enumerate() {
        expected[i].push(post(&fleet.proxy, a, b, "before the scale-out").await);
    }
    let delivered = all_delivered(Duration::from_secs(30), &chat_clients, &expected, &notify_clients, &expected).await;
    assert!(delivered, "the first round did not arrive:\n{}", fleet.proxy.error_log_tail());

    // Scale-out: the rings now hold both pods of each kind.
    fleet.grow_rings();
    let reconnects = |clients: &[Client]| -> f64 {
        clients.iter().map(|(_, _, seen, _)| f64::from(seen.lock().expect("lock").reconnects)).sum()
    };
    let connected =
        |clients: &[Client]| -> bool { clients.iter().all(|(_, _, seen, _)| seen.lock().expect("lock").connected) };
    // Settled: some keys moved, every moved socket reconnected to pod 2 once, and two
    // more check rounds found nothing else to move.
    let mut settled = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let chat = Fleet::connections(&mut fleet.chat, "chat");
        let notify = Fleet::connections(&mut fleet.notify, "notifications");
        if chat[1] > 0.0
            && notify[1] > 0.0
            && chat[0] + chat[1] == (2 * PAIRS) as f64
            && notify[0] + notify[1] == PAIRS as f64
            && connected(&chat_clients)
            && connected(&notify_clients)
            && reconnects(&chat_clients) == chat[1]
            && reconnects(&notify_clients) == notify[1]
        {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            settled = Fleet::connections(&mut fleet.chat, "chat") == chat
                && Fleet::connections(&mut fleet.notify, "notifications") == notify
                && reconnects(&chat_clients) == chat[1]
                && reconnects(&notify_clients) == notify[1];
            if settled {
                break;
            }
        }
    }
    let chat = Fleet::connections(&mut fleet.chat, "chat");
    let notify = Fleet::connections(&mut fleet.notify, "notifications");
    assert!(
        settled,
        "after the scale-out exactly the sockets of moved keys should reconnect, to pod 2: chat pods {chat:?} \
         (reconnects {}), notification pods {notify:?} (reconnects {})",
        reconnects(&chat_clients),
        reconnects(&notify_clients)
    );

    for (i, (a, b)) in pairs.iter().enumerate() {
        expected[i].push(post(&fleet.proxy, a, b, "after the scale-out").await);
    }
    let delivered = all_delivered(Duration::from_secs(30), &chat_clients, &expected, &notify_clients, &expected).await;
    stop.store(true, Ordering::Relaxed);
    let mut trouble: Vec<String> = Vec::new();
    for (i, who, seen, task) in chat_clients.into_iter().chain(notify_clients) {
        let _ = task.await;
        trouble.extend(problems(&who, &seen.lock().expect("lock"), &expected[i]));
    }
    assert!(
        delivered && trouble.is_empty(),
        "after the scale-out (chat pods {chat:?}, notification pods {notify:?}) not every socket got every \
         message exactly once:\n{}",
        trouble.join("\n")
    );
}

/// A stand-in upstream for the edge-limit tests: answers every request `200 {}`
/// (closing the connection) and remembers the `X-Forwarded-For` it received last.
pub struct StubUpstream {
    pub port: u16,
    pub last_forwarded_for: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StubUpstream {
    pub async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let port = listener.local_addr().expect("addr").port();
        let last_forwarded_for = Arc::new(Mutex::new(None));
        let seen = last_forwarded_for.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
                    let header = |name: &str| {
                        head.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_owned()))
                    };
                    if let Some(xff) = header("x-forwarded-for") {
                        *seen.lock().expect("lock") = Some(xff);
                    }
                    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    while buffer.len() < head_end + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                        .await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { port, last_forwarded_for, task }
    }
}

impl Drop for StubUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `POST /chat/messages` `count` times, 64 at once, from the local address `from`
/// (a loopback alias such as 127.0.0.2); returns the statuses, and whether every
/// 429 carried `Retry-After`.
pub async fn post_flood(url: &str, from: std::net::IpAddr, count: usize) -> (Vec<u16>, bool) {
    let client =
        reqwest::Client::builder().local_address(from).timeout(Duration::from_secs(10)).build().expect("client");
    let results: Vec<(u16, bool)> = futures::stream::iter(0..count)
        .map(|_| {
            let client = client.clone();
            async move {
                match client.post(url).json(&json!({"content": "flood"})).send().await {
                    Ok(response) => {
                        let retry_after = response.headers().contains_key("retry-after");
                        (response.status().as_u16(), retry_after)
                    }
                    Err(_) => (0, false),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let retry_after = results.iter().filter(|(s, _)| *s == 429).all(|(_, r)| *r);
    (results.into_iter().map(|(s, _)| s).collect(), retry_after)
}

/// The edge routes every public path of the API to chatpersistence (not only
/// `/chat/messages`): the inbox, a group, a message's edit and reactions.
async fn edge_serves_the_whole_api(proxy: &Proxy) {
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = client.request(method, proxy.public_http(path)).bearer_auth(token("edge-a"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.timeout(Duration::from_secs(10)).send()
    };
    let list = send(reqwest::Method::GET, "/chat/conversations", None).await.expect("the edge answers");
    assert_eq!(list.status().as_u16(), 200, "GET /chat/conversations through the edge");
    let group =
        send(reqwest::Method::POST, "/chat/conversations", Some(json!({"title": "edge", "members": ["edge-b"]})))
            .await
            .expect("the edge answers");
    assert_eq!(group.status().as_u16(), 201, "POST /chat/conversations through the edge");
    let group: Value = group.json().await.expect("json");
    let id = group["conversation_id"].as_str().expect("conversation_id").to_owned();
    let shown = send(reqwest::Method::GET, &format!("/chat/conversations/{id}"), None).await.expect("answers");
    assert_eq!(shown.status().as_u16(), 200, "GET /chat/conversations/{{id}} through the edge");
    // A message route below /chat/messages/ reaches chatpersistence (its 404 for an
    // unknown message, not the edge's "no such route").
    let unknown = format!("/chat/messages/{}/reactions/%F0%9F%91%8D", chatstream::MessageId::new());
    let reacted = send(reqwest::Method::PUT, &unknown, None).await.expect("answers");
    let body: Value = reacted.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["message"], "no such message", "{body}");
}

/// Groups through the proxy. A group's sockets subscribe with `conversation_id`, its
/// forwards and conversation events carry `stream_id`: both must hash to one pod.
/// The pods' membership checks (`GET /chat/conversations/{id}/members`) and the
/// change handler's conversation events (`/chat/forward-event`) must be routed on
/// the internal listener. Eight groups over two pods: were the subscribe hashed on
/// anything else, the frames of the groups whose forwards land on the other pod
/// would never arrive.
pub async fn groups_reach_their_pod_through_the_proxy(kind: ProxyKind) {
    let fleet = Fleet::start(kind, 2, 1);
    fleet.warm_up().await;
    let client = reqwest::Client::new();
    for i in 0..8 {
        let (owner, member) = (format!("group-owner-{i}"), format!("group-member-{i}"));
        let response = client
            .post(fleet.proxy.public_http("/chat/conversations"))
            .bearer_auth(token(&owner))
            .json(&json!({"title": format!("route {i}"), "members": [member]}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("create a group through the proxy");
        assert_eq!(response.status().as_u16(), 201, "create group {i}");
        let created: Value = response.json().await.expect("json");
        let group = created["conversation_id"].as_str().expect("conversation_id").to_owned();

        let path = format!("/chat/subscribe?conversation_id={group}&access_token={}", token(&member));
        let mut socket = Socket::connect(&fleet.proxy.public_ws(&path)).await.expect("a member subscribes");

        let response = client
            .post(fleet.proxy.public_http("/chat/messages"))
            .bearer_auth(token(&owner))
            .json(&json!({"sender_id": owner, "conversation_id": group, "content": format!("hello {i}")}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("post to the group");
        assert_eq!(response.status().as_u16(), 201, "post to group {i}");
        let posted: Value = response.json().await.expect("json");
        let id = posted["message_id"].as_str().expect("message_id").to_owned();
        let message = next_matching(&mut socket, |f| f["message"]["message_id"] == id.as_str()).await;
        assert!(message.is_some(), "group {i}: the message frame never reached the member's socket");

        let response = client
            .patch(fleet.proxy.public_http(&format!("/chat/conversations/{group}")))
            .bearer_auth(token(&owner))
            .json(&json!({"title": format!("renamed {i}")}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("rename the group");
        assert_eq!(response.status().as_u16(), 200, "rename group {i}");
        let renamed = next_matching(&mut socket, |f| f["type"] == "conversation_updated").await;
        assert!(renamed.is_some(), "group {i}: conversation_updated (a /chat/forward-event) never arrived");
        socket.close().await;
    }
}

/// The next frame on `socket` that `wanted` accepts, within 15 s.
async fn next_matching(socket: &mut Socket, wanted: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match socket.next(Duration::from_millis(500)).await {
            Event::Frame(frame) if wanted(&frame) => return Some(frame),
            Event::Closed => return None,
            _ => {}
        }
    }
    None
}
