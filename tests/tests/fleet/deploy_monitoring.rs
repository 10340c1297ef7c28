//! The chart's monitoring: the Grafana dashboard ConfigMap, the ServiceMonitors and the
//! PrometheusRule (`deploy/helm/chatfleet/templates/{dashboard,servicemonitor,
//! prometheusrule}.yaml`), rendered offline by Helm's library like the rest of the chart.
//!
//! Held to: the Prometheus Operator objects validate against the operator's CRDs (strict:
//! unknown fields refused), each ServiceMonitor selects a Service that selects the right
//! pods on a port they have; the dashboard is valid JSON carried unchanged with the
//! sidecar label; every PromQL expression (rules and dashboard) is parsed and type-checked
//! by a real PromQL parser; every metric it names is one the code exports; every alert
//! links a runbook section that exists in docs/deploy.md.
//!
//! Why this test exists: a dashboard or an alert on a metric name nobody exports is
//! silently empty, and an alert whose runbook link is dead fails the person it pages.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use crate::deploy_helm::{find as named, render, render_error, CHART, ISSUER, JWT};
use crate::multipod_support::{check_py, deploy_python};
use serde_json::Value;
use testkit::workspace_root;

/// The monitoring objects on, with the labels an operator's selectors want.
const ALL_ON: [&str; 4] = [
    JWT,
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.serviceMonitor.labels.release=kube-prometheus-stack",
];

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// `check.py promql [--grafana]`: every expression parsed; (results, all parsed).
fn parse_promql(exprs: &[String], grafana: bool) -> (Vec<Value>, bool) {
    let root = workspace_root();
    let mut command = Command::new(deploy_python());
    command.arg(root.join("deploy/check/check.py")).arg("promql").current_dir(&root);
    if grafana {
        command.arg("--grafana");
    }
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("check.py runs");
    let input = serde_json::to_vec(exprs).expect("JSON");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &input).expect("write stdin");
    let output = child.wait_with_output().expect("check.py ends");
    let results: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("promql output: {e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(results.len(), exprs.len());
    (results, output.status.success())
}

/// Every string literal of the Rust sources under crates/ and services/: metric names
/// are literals there, inline or in constants.
fn exported_names() -> BTreeSet<String> {
    fn walk(dir: &std::path::Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read");
                for piece in text.split('"').skip(1).step_by(2) {
                    if !piece.is_empty()
                        && piece.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        names.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    for dir in ["crates", "services"] {
        walk(&workspace_root().join(dir), &mut names);
    }
    names
}

/// The name the code registers for a series name in a query, or why it cannot be one.
/// Histograms (`_bucket`, `_sum`, `_count`) exist only for `_seconds` metrics: the
/// exporter gives buckets to that suffix only (servicekit::metrics); other histograms are
/// summaries, with `_sum`, `_count` and `quantile` but no `_bucket`.
fn exported_metric(series: &str, exported: &BTreeSet<String>) -> Result<String, String> {
    if exported.contains(series) {
        return Ok(series.to_owned());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if !exported.contains(base) {
                continue;
            }
            if suffix == "_bucket" && !base.ends_with("_seconds") {
                return Err(format!("{series}: {base} has no buckets (only *_seconds histograms do)"));
            }
            return Ok(base.to_owned());
        }
    }
    Err(format!("{series}: no such metric in crates/ or services/"))
}

fn dashboard_file() -> String {
    std::fs::read_to_string(workspace_root().join(CHART).join("files/dashboards/chatfleet.json")).expect("dashboard")
}

/// Every (panel title, expression) of the dashboard, rows included.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn collect(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                out.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
            }
            collect(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    out
}

/// The alerts of the rendered PrometheusRule.
fn alerts(objects: &[Value]) -> Vec<Value> {
    let rule = named(objects, "PrometheusRule", "chatfleet");
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().expect("rules"))
        .collect()
}

/// GitHub's anchors of the headings of a Markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn monitoring_objects_are_off_by_default_except_the_dashboard() {
    let objects = render(&[JWT]);
    assert!(of_kind(&objects, "ServiceMonitor").is_empty(), "ServiceMonitors need the operator's CRDs: off by default");
    assert!(
        of_kind(&objects, "PrometheusRule").is_empty(),
        "the PrometheusRule needs the operator's CRDs: off by default"
    );
    assert!(
        objects.iter().all(|o| !o["metadata"]["name"].as_str().unwrap_or_default().ends_with("-metrics")),
        "no metrics Services without ServiceMonitors"
    );
    let dashboard = named(&objects, "ConfigMap", "chatfleet-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1", "Grafana's sidecar label");
    let off = render(&[JWT, "monitoring.dashboard.enabled=false"]);
    assert!(off.iter().all(|o| o["metadata"]["name"] != "chatfleet-dashboard"));
}

#[test]
fn service_monitors_and_rules_validate_against_the_operator_crds_and_select_every_pod() {
    // helm-render validates the operator's kinds against its CRDs (strict) and the rest
    // against Kubernetes 1.30; a render that passes is valid.
    let objects = render(&ALL_ON);
    let monitors = of_kind(&objects, "ServiceMonitor");
    let expected = [
        ("chatpersistence", "http", "/metrics"),
        ("changehandler", "http", "/metrics"),
        ("chatsockets", "http", "/metrics"),
        ("notifications", "http", "/metrics"),
        ("emailhandler", "http", "/metrics"),
        ("envoy", "ops", "/stats/prometheus"),
    ];
    assert_eq!(monitors.len(), expected.len(), "one ServiceMonitor per service and Envoy");
    let workloads: Vec<&Value> =
        objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet"))).collect();
    for (component, port, path) in expected {
        let monitor = named(&objects, "ServiceMonitor", &format!("chatfleet-{component}"));
        assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack", "{component}: extra labels");
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], port, "{component}");
        assert_eq!(endpoint["path"], path, "{component}");
        assert_eq!(monitor["spec"]["namespaceSelector"]["matchNames"][0], "chatfleet");
        // The Services the ServiceMonitor selects: exactly one, and it selects the pods.
        let selector = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
        let services: Vec<&Value> = of_kind(&objects, "Service")
            .into_iter()
            .filter(|s| selector.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
            .collect();
        assert_eq!(services.len(), 1, "{component}: the ServiceMonitor selects {} Services", services.len());
        let service = services[0];
        assert_eq!(service["spec"]["ports"][0]["name"], port, "{component}");
        let pod_selector = service["spec"]["selector"].as_object().expect("selector");
        let pods: Vec<&&Value> = workloads
            .iter()
            .filter(|w| pod_selector.iter().all(|(k, v)| &w["spec"]["template"]["metadata"]["labels"][k] == v))
            .collect();
        assert_eq!(pods.len(), 1, "{component}: the metrics Service selects {} workloads", pods.len());
        let ports = pods[0]["spec"]["template"]["spec"]["containers"][0]["ports"].to_string();
        assert!(ports.contains(&format!("\"name\":\"{port}\"")), "{component}: pods have no port {port}: {ports}");
    }
    let mut lint = vec!["helm-lint", CHART, "--set", ISSUER];
    for set in &ALL_ON {
        lint.extend(["--set", set]);
    }
    let report: Value = serde_json::from_str(&check_py(&lint)).expect("lint JSON");
    assert_eq!(report["errors"], Value::Array(vec![]), "{report}");
    // The CRD check is real: a malformed duration is refused.
    let refused = render_error(&[JWT, ALL_ON[1], "monitoring.serviceMonitor.interval=30 seconds"]);
    assert!(refused.contains("interval"), "{refused}");
}

#[test]
fn the_dashboard_is_valid_json_shipped_unchanged_and_covers_the_fleet() {
    let file = dashboard_file();
    let dashboard: Value = serde_json::from_str(&file).expect("files/dashboards/chatfleet.json is JSON");
    let objects = render(&[JWT]);
    let shipped = named(&objects, "ConfigMap", "chatfleet-dashboard")["data"]["chatfleet.json"].clone();
    let shipped: Value = serde_json::from_str(shipped.as_str().expect("chatfleet.json")).expect("shipped JSON");
    assert_eq!(shipped, dashboard, "the ConfigMap must carry the file unchanged");
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "a stable uid");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert!(variables.contains(&"datasource") && variables.contains(&"namespace"), "{variables:?}");
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "duplicate panel id {}", panel["id"]);
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}: the datasource variable", panel["title"]);
        }
    }
    let queries = dashboard_queries(&dashboard);
    for (title, expr) in &queries {
        assert!(expr.contains("namespace=~\"$namespace\""), "{title}: not limited to the namespace: {expr}");
    }
    // What the issue asks the dashboard to show, by the series it must query.
    let all: String = queries.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for (what, needle) in [
        ("POST rate", "http_requests_total{namespace=~\"$namespace\", method=\"POST\", route=\"/chat/messages\"}"),
        ("POST latency", "http_request_duration_seconds_bucket{namespace=~\"$namespace\", method=\"POST\""),
        ("delivery latency", "kafka_record_age_seconds_bucket"),
        ("delivery latency", "forward_duration_seconds_bucket"),
        ("lag per partition", "by (group, topic, partition) (kafka_consumer_lag"),
        ("retries", "kafka_retries_total"),
        ("failovers", "failovers_total"),
        ("dead letters", "kafka_dead_letters_total"),
        ("socket counts", "ws_connections"),
        ("sockets refused", "ws_refused_total"),
        ("email outcomes", "emails_sent_total"),
        ("email outcomes", "email_send_failures_total"),
    ] {
        assert!(all.contains(needle), "the dashboard does not show {what} ({needle})");
    }
}

#[test]
fn every_promql_expression_parses_and_names_metrics_the_code_exports() {
    let exported = exported_names();
    // The parser and the name check are real: both refuse what they should.
    let (bad, ok) = parse_promql(&["rate(kafka_consumer_lag)".to_owned(), "sum(up".to_owned()], false);
    assert!(!ok && bad.iter().all(|r| r["error"].is_string()), "{bad:?}");
    assert!(exported_metric("chatfleet_made_up_total", &exported).is_err());
    assert!(exported_metric("kafka_consumer_lag_bucket", &exported).is_err(), "a gauge has no buckets");
    assert_eq!(exported_metric("kafka_record_age_seconds_bucket", &exported), Ok("kafka_record_age_seconds".into()));

    let dashboard: Value = serde_json::from_str(&dashboard_file()).expect("JSON");
    let panel_exprs: Vec<(String, String)> = dashboard_queries(&dashboard);
    let objects = render(&ALL_ON);
    let rules = alerts(&objects);
    let rule_exprs: Vec<(String, String)> = rules
        .iter()
        .map(|r| (r["alert"].as_str().expect("alert").to_owned(), r["expr"].as_str().expect("expr").to_owned()))
        .collect();
    assert!(
        panel_exprs.len() >= 20 && rule_exprs.len() >= 5,
        "{} panel, {} rule queries",
        panel_exprs.len(),
        rule_exprs.len()
    );

    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (exprs, grafana) in [(&panel_exprs, true), (&rule_exprs, false)] {
        let texts: Vec<String> = exprs.iter().map(|(_, e)| e.clone()).collect();
        let (results, _) = parse_promql(&texts, grafana);
        for ((owner, expr), result) in exprs.iter().zip(&results) {
            if let Some(error) = result["error"].as_str() {
                problems.push(format!("{owner}: {error}: {expr}"));
            }
            let metrics = result["metrics"].as_array().expect("metrics");
            if metrics.is_empty() && result["error"].is_null() {
                problems.push(format!("{owner}: names no metric: {expr}"));
            }
            for series in metrics.iter().map(|m| m.as_str().expect("name")) {
                match exported_metric(series, &exported) {
                    Ok(base) => {
                        used.entry(base).or_default().insert(owner.clone());
                    }
                    Err(why) => problems.push(format!("{owner}: {why}")),
                }
            }
        }
    }
    assert!(problems.is_empty(), "dashboard/alert queries:\n  {}", problems.join("\n  "));
    assert!(used.len() >= 25, "the dashboard and alerts use {} metrics: {:?}", used.len(), used.keys());
}

#[test]
fn every_alert_links_its_runbook_in_deploy_md_and_is_scoped_to_the_release() {
    let objects = render(&ALL_ON);
    let rules = alerts(&objects);
    let deploy_md = std::fs::read_to_string(workspace_root().join("docs/deploy.md")).expect("docs/deploy.md");
    let sections = anchors(&deploy_md);
    let names: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().expect("alert")).collect();
    for required in [
        "ChatfleetConsumerLagGrowing",
        "ChatfleetDeadLetters",
        "ChatfleetFailovers",
        "ChatfleetSocketsRefused",
        "ChatfleetRelayBehind",
    ] {
        assert!(names.contains(required), "no alert {required}: {names:?}");
    }
    for rule in &rules {
        let name = rule["alert"].as_str().expect("alert");
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_else(|| panic!("{name}: no runbook_url"));
        let (base, anchor) = url.split_once('#').unwrap_or_else(|| panic!("{name}: {url} has no #anchor"));
        assert!(base.ends_with("docs/deploy.md"), "{name}: {url}");
        assert!(sections.contains(anchor), "{name}: docs/deploy.md has no section #{anchor}");
        assert!(deploy_md.contains(&format!("`{name}`")), "{name} is not in docs/deploy.md's alert table");
        assert!(matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical")), "{name}: severity");
        assert!(rule["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{name}: summary");
        let expr = rule["expr"].as_str().expect("expr");
        assert!(expr.contains("namespace=\"chatfleet\""), "{name}: not limited to the release's namespace: {expr}");
    }
    // Thresholds and the runbook base are values.
    let tuned = render(&[
        JWT,
        ALL_ON[2],
        "monitoring.prometheusRule.consumerLagRecords=5000",
        "monitoring.prometheusRule.runbookBaseUrl=https://wiki.example.com/chatfleet/docs/deploy.md/",
    ]);
    let lag = alerts(&tuned).into_iter().find(|r| r["alert"] == "ChatfleetConsumerLagGrowing").expect("lag alert");
    assert!(lag["expr"].as_str().is_some_and(|e| e.contains("> 5000")), "{}", lag["expr"]);
    assert_eq!(
        lag["annotations"]["runbook_url"],
        "https://wiki.example.com/chatfleet/docs/deploy.md#chatfleetconsumerlaggrowing"
    );
}
