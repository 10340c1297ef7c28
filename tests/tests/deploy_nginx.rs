//! The nginx alternative (`deploy/nginx`): the shipped `chatfleet.conf` is exactly the
//! template rendered for compose, the rendering passes `nginx -t`, both servers share
//! one hashed upstream per socket service, and a running nginx answers 404 to internal
//! paths on its public server and to public paths on its internal one.
//! `multipod_nginx.rs` runs it with real pods.
//!
//! Why this test exists: the hand-maintained file and the template must not drift,
//! and the public server must never carry an internal route.

mod multipod_support;

use std::process::Command;
use std::time::Duration;

use multipod_support::{nginx_binary, PodAddr, Proxy, Upstreams};
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
    assert!(chat.contains("hash $arg_stream_id consistent;"), "{chat}");
    let notify = upstream_block(&conf, "notify_ring");
    assert!(notify.contains("hash $arg_user_id consistent;"), "{notify}");
    assert_eq!(chat.matches("server unix:").count(), 2, "one ring member per chat pod");

    let public = server_block(&conf, "8080");
    let internal = server_block(&conf, "9080");
    for path in ["forward-to-websocket", "close-stream", "location /notifications/ "] {
        assert!(!public.contains(path), "the public server carries {path}");
    }
    assert!(public.contains("location = /chat/subscribe") && public.contains("proxy_pass http://chat_ring;"));
    assert!(public.contains("proxy_set_header Upgrade $http_upgrade;"), "WebSocket upgrade headers");
    assert!(
        public.contains("location = /notifications/subscribe") && public.contains("proxy_pass http://notify_ring;")
    );
    assert!(internal.contains("location = /chat/forward-to-websocket"));
    assert!(internal.contains("location = /chat/close-stream"));
    assert!(internal.contains("location /notifications/"));
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
        "/notifications/chat?user_id=bob",
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
