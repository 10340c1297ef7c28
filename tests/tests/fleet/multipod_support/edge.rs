//! What the shipped Envoy edge must look like, for `deploy/envoy/envoy.yaml` and the
//! configuration the Helm chart renders (`deploy_envoy.rs`, `deploy_helm.rs`).
//!
//! Why this exists: the two configurations are maintained side by side; one set of
//! assertions keeps their hardening (admin, logs, limits, XFF) from drifting.

use std::collections::BTreeMap;

use serde_json::Value;

fn routes(config: &Value, name: &str) -> BTreeMap<String, Value> {
    hcm(listener(config, name))["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| (r["name"].as_str().expect("every route is named").to_owned(), r.clone()))
        .collect()
}

fn matcher(route: &Value) -> String {
    let m = &route["match"];
    m["path"]
        .as_str()
        .map(|p| format!("={p}"))
        .or_else(|| m["prefix"].as_str().map(|p| format!("^{p}")))
        .expect("match")
}

fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["static_resources"]["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("cluster {name}"))
}

fn listener<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["static_resources"]["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("listener {name}"))
}

fn hcm(listener: &Value) -> &Value {
    let filters = listener["filter_chains"][0]["filters"].as_array().expect("filters");
    &filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .expect("http_connection_manager")["typed_config"]
}

/// Shared with deploy_helm.rs (the chart renders the same edge).
pub fn assert_edge_hardening(config: &Value, what: &str) {
    // Admin only on loopback; probes and scrapes use the ops listener.
    assert_eq!(config["admin"]["address"]["socket_address"]["address"], "127.0.0.1", "{what}: admin must be loopback");
    let admin_port = config["admin"]["address"]["socket_address"]["port_value"].clone();
    let ops = routes(config, "ops");
    let relayed: Vec<String> = ops.values().filter(|r| r["route"]["cluster"] == "envoy_admin").map(matcher).collect();
    assert_eq!(
        relayed,
        vec!["=/ready".to_owned(), "=/stats/prometheus".to_owned()],
        "{what}: ops relays exactly these"
    );
    for route in ops.values().filter(|r| r["route"]["cluster"] == "envoy_admin") {
        assert_eq!(route["match"]["headers"][0]["string_match"]["exact"], "GET", "{what}: ops is read-only");
    }
    let admin = cluster(config, "envoy_admin");
    let endpoint =
        &admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(endpoint["address"], "127.0.0.1", "{what}");
    assert_eq!(endpoint["port_value"], admin_port, "{what}: envoy_admin reaches the admin port");

    // Access logs: every listener that logs, logs the path without the query.
    for l in config["static_resources"]["listeners"].as_array().expect("listeners") {
        let logs = hcm(l)["access_log"].as_array().cloned().unwrap_or_default();
        for log in logs {
            let format = &log["typed_config"]["log_format"];
            let text = format.to_string();
            assert!(
                text.contains("REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)"),
                "{what}: {} logs no path: {text}",
                l["name"]
            );
            let without = text.replace("REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)", "");
            assert!(
                !without.contains(":PATH") && !without.contains("%PATH"),
                "{what}: {} logs a query string: {text}",
                l["name"]
            );
            assert!(text.contains("envoy.formatter.req_without_query"), "{what}: formatter extension");
        }
    }
    for name in ["public", "internal"] {
        assert!(hcm(listener(config, name))["access_log"].is_array(), "{what}: {name} has an access log");
    }

    // The public listener: connection cap first, client address appended to XFF.
    let public = listener(config, "public");
    let first = &public["filter_chains"][0]["filters"][0];
    assert_eq!(first["name"], "envoy.filters.network.connection_limit", "{what}: connection limit first");
    assert!(first["typed_config"]["max_connections"].as_u64().is_some_and(|n| n >= 1000), "{what}: {first}");
    let public_hcm = hcm(public);
    assert_eq!(public_hcm["use_remote_address"], true, "{what}");
    assert_eq!(public_hcm["xff_num_trusted_hops"].as_u64().unwrap_or(0), 0, "{what}: no client-sent hop is trusted");
    assert_ne!(public_hcm["skip_xff_append"], true, "{what}");
    let monitors = config["overload_manager"]["resource_monitors"].to_string();
    assert!(
        monitors.contains("global_downstream_max_connections")
            && monitors.contains("max_active_downstream_connections")
    );

    // POST /chat/messages: a per-client-address token bucket, generous.
    let filters: Vec<String> = public_hcm["http_filters"]
        .as_array()
        .expect("http filters")
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(filters, ["envoy.filters.http.local_ratelimit", "envoy.filters.http.router"], "{what}");
    let public_routes = routes(config, "public");
    let post = &public_routes["chat-messages-post"];
    assert_eq!(post["match"]["path"], "/chat/messages");
    assert_eq!(post["match"]["headers"][0]["name"], ":method");
    assert_eq!(post["match"]["headers"][0]["string_match"]["exact"], "POST");
    assert_eq!(post["route"]["cluster"], "chatpersistence_public");
    let limit = &post["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"];
    assert_eq!(limit["filter_enforced"]["default_value"]["numerator"], 100, "{what}: enforced");
    assert_eq!(
        limit["rate_limits"][0]["actions"][0],
        serde_json::json!({"remote_address": {}}),
        "{what}: per client address"
    );
    let per_ip = &limit["descriptors"][0];
    assert_eq!(per_ip["entries"][0]["key"], "remote_address");
    let per_ip_rate = per_ip["token_bucket"]["tokens_per_fill"].as_u64().expect("rate");
    // The services allow RATE_LIMIT_POST_PER_SECOND=20 per user: the edge must allow more per address.
    assert!(
        per_ip_rate >= 100,
        "{what}: the edge's per-address rate {per_ip_rate}/s would bite before the services' limits"
    );
    assert!(limit["token_bucket"]["tokens_per_fill"].as_u64().is_some_and(|n| n >= per_ip_rate), "{what}");
    // The route order keeps POST before the catch-all GET route.
    let ordered: Vec<String> = hcm(public)["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let at = |n: &str| ordered.iter().position(|r| r == n).expect("route");
    assert!(at("chat-messages-post") < at("chat-messages"), "{what}: {ordered:?}");
}
