//! The nginx alternative (`deploy/nginx`): the shipped `chatfleet.conf` is exactly the
//! template rendered for compose, the rendering passes `nginx -t`, both servers share
//! one hashed upstream per socket service, and a running nginx answers 404 to internal
//! paths on its public server and to public paths on its internal one.
//! `multipod_nginx.rs` runs it with real pods. The edge limits are held too: a
//! per-address request rate on `POST /chat/messages`, per-address socket caps on the
//! subscribe routes, `X-Forwarded-For` overwritten with the peer's address, access
//! logs without query strings; a running nginx refuses a POST flood from one address
//! (429 + Retry-After) while serving another.
//!
//! Why this test exists: the hand-maintained file and the template must not drift,
//! and the public server must never carry an internal route.

use std::process::Command;
use std::time::Duration;

use crate::multipod_support::{nginx_binary, post_flood, PodAddr, Proxy, StubUpstream, Upstreams};
use testkit::{free_port, workspace_root};

fn compose_render() -> String {
    let root = workspace_root();
    let mut command = Command::new(root.join("deploy/nginx/render.sh"));
    command.args(["--persistence", "chatpersistence:8080:9090"]);
    for i in 1..=2 {
        command.args(["--chat", &format!("chatwebsocketshandler-{i}=chatwebsocketshandler-{i}:8080:9090")]);
    }
    for i in 1..=2 {
        command.args([
            "--notifications",
            &format!("generalnotificationshandler-{i}=generalnotificationshandler-{i}:8080:9090"),
        ]);
    }
    let output = command.output().expect("render.sh runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The text of the `server { ... }` block that listens on `listen`.
fn server_block<'a>(conf: &'a str, listen: &str) -> &'a str {
    let at = conf.find(&format!("listen {listen};")).unwrap_or_else(|| panic!("no server listens on {listen}"));
    let start = conf[..at].rfind("server {").expect("server block");
    let mut depth = 0;
    for (i, c) in conf[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &conf[start..start + i + 1];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced server block");
}

fn upstream_block<'a>(conf: &'a str, name: &str) -> &'a str {
    let start = conf.find(&format!("upstream {name} {{")).unwrap_or_else(|| panic!("upstream {name}"));
    let end = conf[start..].find('}').expect("end") + start;
    &conf[start..end]
}

#[test]
fn shipped_conf_is_the_template_rendered_for_compose() {
    let shipped =
        std::fs::read_to_string(workspace_root().join("deploy/nginx/chatfleet.conf")).expect("chatfleet.conf");
    assert!(
        shipped == compose_render(),
        "deploy/nginx/chatfleet.conf is not the rendering of chatfleet.conf.template: re-run \
         deploy/nginx/render.sh (see docs/deploy.md)"
    );
}

#[test]
fn both_servers_share_one_hashed_ring_and_the_public_one_has_no_internal_path() {
    let conf = compose_render();
    let chat = upstream_block(&conf, "chat_ring");
    assert!(chat.contains("hash $arg_stream_id$arg_conversation_id consistent;"), "{chat}");
    let notify = upstream_block(&conf, "notify_ring");
    assert!(notify.contains("hash $arg_user_id consistent;"), "{notify}");
    assert_eq!(chat.matches("server unix:").count(), 2, "one ring member per chat pod");

    let public = server_block(&conf, "8080");
    let internal = server_block(&conf, "9080");
    for path in ["forward-to-websocket", "forward-event", "close-stream", "location /notifications/ "] {
        assert!(!public.contains(path), "the public server carries {path}");
    }
    assert!(public.contains("location = /chat/subscribe") && public.contains("proxy_pass http://chat_ring;"));
    assert!(public.contains("proxy_set_header Upgrade $http_upgrade;"), "WebSocket upgrade headers");
    assert!(
        public.contains("location = /notifications/subscribe") && public.contains("proxy_pass http://notify_ring;")
    );
    assert!(internal.contains("location = /chat/forward-to-websocket"));
    assert!(internal.contains("location = /chat/close-stream"));
    assert!(internal.contains("location = /chat/forward-event"));
    // A forward batch has no single stream_id to hash on: not routed (the catch-all
    // answers 404 and the change handler forwards one event per request).
    assert!(!conf.contains("forward-batch"), "nginx routes /chat/forward-batch");
    assert!(internal.contains("location /notifications/"));
    assert!(internal.contains("location = /notifications/batch"), "the batch route, with its own body limit");
    assert!(!public.contains("/notifications/batch"), "the public server carries the batch route");
    assert!(internal.contains("proxy_pass http://chat_ring;") && internal.contains("proxy_pass http://notify_ring;"));
    assert!(!internal.contains("/chat/subscribe"), "sockets are not opened on the internal server");
    // Every location of the public server that sets headers marks the request public.
    for location in public.split("location ").skip(1) {
        if location.contains("proxy_set_header") {
            assert!(location.contains("X-Chatfleet-Listener public"), "{location}");
        }
    }
}

#[tokio::test]
async fn running_nginx_refuses_internal_paths_publicly_and_public_paths_internally() {
    // Pods that do not exist: only the routing decisions are exercised.
    let dead = |name: &str| PodAddr { name: name.to_owned(), public_port: free_port(), internal_port: free_port() };
    let upstreams = Upstreams { persistence: dead("p"), chat: vec![dead("c1"), dead("c2")], notify: vec![dead("n1")] };
    let proxy = Proxy::nginx(free_port(), free_port(), &upstreams);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    for path in [
        "/chat/forward-to-websocket?stream_id=0123456789abcdef",
        "/chat/close-stream?stream_id=0123456789abcdef",
        "/chat/forward-event?stream_id=0123456789abcdef",
        "/notifications/chat?user_id=bob",
        "/notifications/batch?user_id=bob",
    ] {
        let status = client.post(proxy.public_http(path)).send().await.expect("nginx answers").status();
        assert_eq!(status.as_u16(), 404, "public POST {path}");
    }
    let internal = format!("{}/chat/subscribe?stream_id=0123456789abcdef", proxy.internal_http());
    let status = client.get(internal).send().await.expect("nginx answers").status();
    assert_eq!(status.as_u16(), 404, "the internal server opens no sockets");
    // A client claiming to be internal on the public server is still public.
    let status = client
        .get(proxy.public_http("/chat/subscribe?stream_id=0123456789abcdef"))
        .header("X-Chatfleet-Listener", "internal")
        .send()
        .await
        .expect("nginx answers")
        .status();
    assert_eq!(status.as_u16(), 502, "with no pod alive the public subscribe fails at the pod, not earlier");
    assert!(nginx_binary().is_file());
}

#[test]
fn edge_limits_trusted_client_address_and_query_free_logs() {
    let conf = compose_render();
    let public = server_block(&conf, "8080");
    let internal = server_block(&conf, "9080");

    // POST /chat/messages: a per-address zone keyed only for POST, enforced with 429.
    assert!(conf.contains("POST    $binary_remote_addr;"), "the rate zone's key is the address, for POST only");
    assert!(conf.contains("limit_req_zone $chatfleet_post_client zone=chatfleet_post:"), "limit_req_zone");
    let messages = &public[public.find("location = /chat/messages").expect("messages")..];
    let messages = &messages[..messages.find('}').expect("end")];
    assert!(messages.contains("limit_req zone=chatfleet_post"), "{messages}");
    assert!(public.contains("limit_req_status 429;") && public.contains("limit_conn_status 429;"));
    assert!(public.contains("add_header Retry-After"), "429s tell the client when to retry");
    // Sockets: a per-address cap on both subscribe routes.
    assert!(conf.contains("limit_conn_zone $binary_remote_addr zone=chatfleet_sockets:"));
    for route in ["location = /chat/subscribe", "location = /notifications/subscribe"] {
        let block = &public[public.find(route).expect(route)..];
        let block = &block[..block.find('}').expect("end")];
        assert!(block.contains("limit_conn chatfleet_sockets "), "{route}: {block}");
    }
    // X-Forwarded-For is overwritten, never appended to what the client sent.
    assert!(!conf.contains("$proxy_add_x_forwarded_for"), "X-Forwarded-For must not keep client-sent entries");
    assert_eq!(
        public.matches("proxy_set_header X-Forwarded-For $remote_addr;").count(),
        public.matches("proxy_pass ").count(),
        "every public location that proxies overwrites X-Forwarded-For"
    );
    assert_eq!(
        public.matches("proxy_pass ").count(),
        6,
        "messages, message changes, conversations, two sockets, presence"
    );
    // Logs: the format has no request line or query; every server logs with it or not at all.
    let format = &conf[conf.find("log_format chatfleet_edge").expect("log_format")..];
    let format = &format[..format.find(';').expect("end")];
    for leak in ["$request ", "$request\"", "$request_uri", "$args", "$query_string", "$arg_"] {
        assert!(!format.contains(leak), "the log format contains {leak}: {format}");
    }
    assert!(format.contains("$request_method") && format.contains("$uri"), "{format}");
    for server in [public, internal] {
        assert!(server.contains("access_log /var/log/nginx/access.log chatfleet_edge;"), "{server}");
    }
    let relays = conf.matches("listen unix:").count();
    assert_eq!(
        conf.matches("access_log off;").count(),
        relays,
        "every relay server logs nothing (logged once at the edge)"
    );
    assert_eq!(conf.matches("access_log ").count(), relays + 2, "no other access_log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_nginx_refuses_a_post_flood_from_one_address_and_serves_others() {
    let stub = StubUpstream::start().await;
    let dead = |name: &str| PodAddr { name: name.to_owned(), public_port: free_port(), internal_port: free_port() };
    let persistence = PodAddr { name: "p".into(), public_port: stub.port, internal_port: free_port() };
    let upstreams = Upstreams { persistence, chat: vec![dead("c1")], notify: vec![dead("n1")] };
    let proxy = Proxy::nginx(free_port(), free_port(), &upstreams);
    let url = proxy.public_http("/chat/messages?access_token=SECRET-IN-QUERY");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");

    // The services see the peer's address, not what the client claims.
    let response = client
        .post(&url)
        .header("X-Forwarded-For", "6.6.6.6")
        .json(&serde_json::json!({"content": "hi"}))
        .send()
        .await
        .expect("nginx answers");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(stub.last_forwarded_for.lock().expect("lock").as_deref(), Some("127.0.0.1"));

    let (statuses, retry_after) = post_flood(&url, "127.0.0.2".parse().expect("ip"), 1500).await;
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(limited > 0, "nginx never limited a 1500-request flood from one address: {served} served");
    assert!(served >= 400, "the burst (400) is served: {served}");
    assert!(retry_after, "every 429 carries Retry-After");
    let (others, _) = post_flood(&url, "127.0.0.1".parse().expect("ip"), 50).await;
    assert!(others.iter().all(|s| *s == 200), "another address was refused: {others:?}");

    // A socket attempt with a token in the query: logged without it.
    let _ = client
        .get(proxy.public_http("/chat/subscribe?stream_id=0123456789abcdef&access_token=SECRET-IN-QUERY"))
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(proxy.dir.join("access.log")).expect("access.log");
    assert!(log.contains("\"path\":\"/chat/subscribe\""), "access log written: {log:.300}");
    assert!(!log.contains("SECRET-IN-QUERY"), "the access log contains the query string");
}
