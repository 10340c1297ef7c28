//! `deploy/envoy/envoy.yaml`: Envoy 1.40 itself validates it (`--mode validate`, no
//! deprecated fields), then the routes are held to the design: public paths only on
//! the public listener, WebSocket upgrades on the socket routes, ring hash on the
//! `stream_id` / `user_id` query parameters, the same keys and the same ring (per-pod
//! `hash_key`s) on the internal listener, long-lived socket timeouts, health checks.
//! `multipod_envoy.rs` runs the same file live. The edge's hardening is held here
//! too: admin on 127.0.0.1 only (probes and scrapes through the `ops` listener),
//! access logs without query strings, a per-client rate limit on `POST
//! /chat/messages` and connection caps, `X-Forwarded-For` the services can trust;
//! a real Envoy refuses a POST flood from one address while serving another.
//!
//! Why this test exists: a route that loses its hash policy or a cluster whose ring
//! differs between public and internal still "works" with one pod and silently
//! drops messages with two.

use std::collections::BTreeMap;

use crate::multipod_support::{check_py, post_flood, PodAddr, Proxy, StubUpstream, Upstreams};
use serde_json::Value;
use testkit::free_port;

pub fn config() -> Value {
    let docs: Value = serde_json::from_str(&check_py(&["yaml", "deploy/envoy/envoy.yaml"])).expect("JSON");
    docs[0].clone()
}

/// Route name → route object, for the listener `name`.
pub fn routes(config: &Value, name: &str) -> BTreeMap<String, Value> {
    let listener = config["static_resources"]["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("listener {name}"));
    let hcm = http_manager(listener);
    let hosts = hcm["route_config"]["virtual_hosts"].as_array().expect("virtual hosts");
    assert_eq!(hosts.len(), 1, "one virtual host per listener");
    hosts[0]["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| (r["name"].as_str().expect("every route is named").to_owned(), r.clone()))
        .collect()
}

/// The http_connection_manager of a listener (after any network filters such as
/// the public listener's connection limit).
pub fn http_manager(listener: &Value) -> &Value {
    &listener["filter_chains"][0]["filters"]
        .as_array()
        .expect("filters")
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .expect("http_connection_manager")["typed_config"]
}

fn hash_key(route: &Value) -> Option<String> {
    route["route"]["hash_policy"][0]["query_parameter"]["name"].as_str().map(str::to_owned)
}

fn websocket(route: &Value) -> bool {
    route["route"]["upgrade_configs"]
        .as_array()
        .is_some_and(|u| u.iter().any(|c| c["upgrade_type"] == "websocket" && c["enabled"] == true))
}

fn matcher(route: &Value) -> String {
    let m = &route["match"];
    m["path"]
        .as_str()
        .map(|p| format!("={p}"))
        .or_else(|| m["prefix"].as_str().map(|p| format!("^{p}")))
        .expect("match")
}

pub fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["static_resources"]["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("cluster {name}"))
}

/// Per endpoint: (hash_key, address, port, health-check port).
pub fn members(cluster: &Value) -> Vec<(String, String, u64, u64)> {
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        .as_array()
        .expect("lb_endpoints")
        .iter()
        .map(|e| {
            let address = &e["endpoint"]["address"]["socket_address"];
            let port = address["port_value"].as_u64().expect("port");
            (
                e["metadata"]["filter_metadata"]["envoy.lb"]["hash_key"].as_str().unwrap_or_default().to_owned(),
                address["address"].as_str().expect("address").to_owned(),
                port,
                e["endpoint"]["health_check_config"]["port_value"].as_u64().unwrap_or(port),
            )
        })
        .collect()
}

#[test]
fn envoy_accepts_the_configuration_without_deprecated_fields() {
    let root = testkit::workspace_root();
    let output = std::process::Command::new(crate::multipod_support::deploy_python())
        .arg(root.join("deploy/check/check.py"))
        .args(["envoy-validate", "deploy/envoy/envoy.yaml"])
        .current_dir(&root)
        .output()
        .expect("check.py runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "envoy --mode validate refused the configuration:\n{text}");
    assert!(text.contains("OK"), "{text}");
    assert!(!text.contains("Deprecated field"), "the configuration uses deprecated fields:\n{text}");
}

#[test]
fn public_listener_serves_only_public_paths_and_hashes_sockets() {
    let config = config();
    let public = routes(&config, "public");
    let table: Vec<(String, String, Option<String>, bool)> = public
        .values()
        .map(|r| {
            let cluster = r["route"]["cluster"].as_str().unwrap_or("(direct)").to_owned();
            (matcher(r), cluster, hash_key(r), websocket(r))
        })
        .collect();
    let expect = |path: &str, cluster: &str, key: Option<&str>, ws: bool| {
        assert!(
            table.contains(&(path.to_owned(), cluster.to_owned(), key.map(str::to_owned), ws)),
            "public route {path} → {cluster} (hash {key:?}, websocket {ws}) missing; table: {table:#?}"
        );
    };
    expect("=/chat/messages", "chatpersistence_public", None, false);
    expect("=/chat/subscribe", "chatwebsocketshandler_public", Some("stream_id"), true);
    expect("=/notifications/subscribe", "generalnotificationshandler_public", Some("user_id"), true);
    expect("=/presence", "chatpersistence_public", None, false);
    expect("^/", "(direct)", None, false);
    for (path, cluster, _, _) in &table {
        assert!(!cluster.ends_with("_internal"), "public route {path} reaches an internal cluster {cluster}");
        for internal in ["forward-to-websocket", "forward-event", "close-stream", "members", "changes"] {
            assert!(!path.contains(internal), "public listener exposes {path}");
        }
    }
    let catch_all = &public["not-found"];
    assert_eq!(catch_all["direct_response"]["status"], 404, "anything else is 404 on the public listener");
    // Long-lived sockets: no response timeout, an idle timeout, retries on refused
    // connections to the next ring member.
    for name in ["chat-subscribe", "notifications-subscribe"] {
        let route = &public[name]["route"];
        assert_eq!(route["timeout"], "0s", "{name}: a socket has no response timeout");
        assert!(route["idle_timeout"].is_string(), "{name}: idle timeout");
        assert!(route["retry_policy"]["retry_on"].as_str().unwrap_or_default().contains("connect-failure"));
    }
    // The catch-all must be the last route (routes match in order).
    let listener = config["static_resources"]["listeners"][0].clone();
    let ordered =
        http_manager(&listener)["route_config"]["virtual_hosts"][0]["routes"].as_array().cloned().expect("routes");
    assert_eq!(ordered.last().map(|r| r["name"].clone()), Some(Value::from("not-found")));
    let hcm = http_manager(&listener);
    assert!(hcm["stream_idle_timeout"].is_string(), "stream idle timeout set for sockets");
}

#[test]
fn internal_listener_hashes_forwards_with_the_same_keys() {
    let config = config();
    let internal = routes(&config, "internal");
    let get = |name: &str| internal.get(name).unwrap_or_else(|| panic!("internal route {name}"));
    for (name, path, cluster, key) in [
        ("chat-forward", "=/chat/forward-to-websocket", "chatwebsocketshandler_internal", Some("stream_id")),
        ("chat-close-stream", "=/chat/close-stream", "chatwebsocketshandler_internal", Some("stream_id")),
        ("notifications", "^/notifications/", "generalnotificationshandler_internal", Some("user_id")),
        ("presence", "=/presence", "generalnotificationshandler_internal", Some("user_id")),
        ("chat-history", "=/chat/messages", "chatpersistence_internal", None),
        ("chat-forward-event", "=/chat/forward-event", "chatwebsocketshandler_internal", Some("stream_id")),
        ("chat-changes", "=/chat/messages/changes", "chatpersistence_internal", None),
    ] {
        let route = get(name);
        assert_eq!(matcher(route), path, "{name}");
        assert_eq!(route["route"]["cluster"], cluster, "{name}");
        assert_eq!(hash_key(route).as_deref(), key, "{name}: hash key");
    }
    // A forward batch carries several streams and no single key to hash on: the proxy
    // must not route it (its catch-all answers 404 and the change handler forwards one
    // event per request; docs/configuration.md, CHAT_WEBSOCKET_FORWARD_BATCH).
    for (name, route) in &internal {
        assert!(!route["match"].to_string().contains("forward-batch"), "internal route {name} routes a forward batch");
    }
    assert_eq!(internal["not-found"]["direct_response"]["status"], 404, "unknown internal paths are 404");
    // The same query parameter as on subscribe.
    let public = routes(&config, "public");
    assert_eq!(hash_key(&public["chat-subscribe"]), hash_key(get("chat-forward")));
    assert_eq!(hash_key(&public["notifications-subscribe"]), hash_key(get("notifications")));
}

#[test]
fn public_and_internal_clusters_build_the_same_ring() {
    let config = config();
    for service in ["chatwebsocketshandler", "generalnotificationshandler"] {
        let public = cluster(&config, &format!("{service}_public"));
        let internal = cluster(&config, &format!("{service}_internal"));
        for c in [public, internal] {
            assert!(matches!(c["lb_policy"].as_str(), Some("RING_HASH") | Some("MAGLEV")), "{}", c["name"]);
            assert_eq!(c["common_lb_config"]["healthy_panic_threshold"]["value"], 0, "{}: no panic routing", c["name"]);
            assert_eq!(c["health_checks"][0]["http_health_check"]["path"], "/readyz", "{}", c["name"]);
        }
        let (p, i) = (members(public), members(internal));
        assert!(p.len() >= 2, "{service}: two pods in compose");
        assert_eq!(p.len(), i.len(), "{service}: same members");
        for ((pk, pa, pport, phc), (ik, ia, iport, ihc)) in p.iter().zip(&i) {
            assert!(!pk.is_empty(), "{service}: every member has an envoy.lb hash_key");
            assert_eq!(pk, ik, "{service}: the rings differ");
            assert_eq!(pa, ia, "{service}: same pod");
            assert_ne!(pport, iport, "{service}: public and internal ports");
            assert_eq!(phc, ihc, "{service}: both clusters health-check the same (public) port");
            assert_eq!(*phc, *pport, "{service}: health checked on the public port");
        }
    }
}

#[test]
fn edge_is_hardened_admin_logs_limits_and_client_address() {
    crate::multipod_support::edge::assert_edge_hardening(&config(), "deploy/envoy/envoy.yaml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_envoy_refuses_a_post_flood_from_one_address_and_serves_others() {
    let stub = StubUpstream::start().await;
    let dead = |name: &str| PodAddr { name: name.to_owned(), public_port: free_port(), internal_port: free_port() };
    let persistence = PodAddr { name: "p".into(), public_port: stub.port, internal_port: free_port() };
    let upstreams = Upstreams { persistence, chat: vec![dead("c1"), dead("c2")], notify: vec![dead("n1"), dead("n2")] };
    let proxy = tokio::task::spawn_blocking(move || Proxy::envoy(free_port(), free_port(), &upstreams))
        .await
        .expect("envoy starts");
    let url = proxy.public_http("/chat/messages?access_token=SECRET-IN-QUERY");

    // A normal client is served; what it claims in XFF stays on the left and
    // Envoy appends the peer address it saw (for a loopback peer Envoy writes the
    // host's own address instead, by design), which is what the services read.
    let client = reqwest::Client::new();
    let response = client
        .post(&url)
        .header("x-forwarded-for", "6.6.6.6")
        .json(&serde_json::json!({"content": "hi"}))
        .send()
        .await
        .expect("envoy answers");
    assert_eq!(response.status().as_u16(), 200);
    let xff = stub.last_forwarded_for.lock().expect("lock").clone().unwrap_or_default();
    let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
    assert!(entries.len() == 2 && entries[0] == "6.6.6.6" && entries[1] != "6.6.6.6", "Envoy appends the peer: {xff}");

    // One address floods: beyond its burst it gets 429 with Retry-After.
    let flooder: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let (statuses, retry_after) = post_flood(&url, flooder, 1500).await;
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(limited > 0, "envoy never limited a 1500-request flood from one address: {served} served");
    assert!(served >= 400, "the burst (400) is served: {served}");
    assert!(retry_after, "every 429 carries Retry-After");
    // Meanwhile another address is served normally.
    let (others, _) = post_flood(&url, "127.0.0.1".parse().expect("ip"), 50).await;
    assert!(others.iter().all(|s| *s == 200), "another address was refused: {others:?}");

    // GET history is not limited by the POST bucket.
    let get = client.get(proxy.public_http("/chat/messages")).send().await.expect("get").status().as_u16();
    assert_eq!(get, 200);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let log = proxy.log_tail(5000);
    assert!(log.contains("\"path\":\"/chat/messages\""), "access log lines are written: {}", proxy.log_tail(5));
    assert!(!log.contains("SECRET-IN-QUERY"), "the access log contains the query string");
}
