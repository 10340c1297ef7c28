//! The Helm chart (`deploy/helm/chatfleet`), rendered offline by Helm 4's own library
//! (PyPI `helm-python-sdk`), linted, and every rendered object validated against the
//! Kubernetes 1.30 OpenAPI schemas (`kubernetes-validate`, strict); then held to what
//! the fleet needs: probes, resources, graceful termination matched to the drain time,
//! scrape annotations, HPA/PDB for the socket pods, the NetworkPolicy, the Debezium
//! hook, and an Envoy configuration that Envoy accepts and that routes like
//! `deploy/envoy/envoy.yaml` with a ring of per-pod hash keys matching the StatefulSets.
//!
//! Security: no service-account token in any pod, Envoy admin on 127.0.0.1 with
//! probes and scrapes through its ops listener, the Debezium hook as non-root with a
//! read-only root and nothing installed at run time, secrets shorter than 32 bytes
//! refused, issuer/audience/origins/client-address header set, RS256 usable.
//!
//! Why this test exists: no cluster runs here; this is as close to `helm install` as
//! this machine gets, and refusals (no JWT secret, a grace period shorter than the
//! drain) are tested to really refuse.

use std::process::Command;

use crate::multipod_support::{check_py, deploy_python};
use serde_json::Value;
use testkit::workspace_root;

pub(crate) const CHART: &str = "deploy/helm/chatfleet";
pub(crate) const JWT: &str = "secrets.jwtSecret=test-secret-0123456789-0123456789-abc";
pub(crate) const ISSUER: &str = "auth.issuer=https://auth.example.com/";

/// The value sets plus the required issuer (unless the set names one).
fn with_issuer<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    let mut all = sets.to_vec();
    if !sets.iter().any(|s| s.starts_with("auth.issuer=")) {
        all.push(ISSUER);
    }
    all
}

pub(crate) fn render(sets: &[&str]) -> Vec<Value> {
    let mut args = vec!["helm-render", CHART];
    for set in with_issuer(sets) {
        args.push("--set");
        args.push(set);
    }
    let out: Value = serde_json::from_str(&check_py(&args)).expect("render JSON");
    out["objects"].as_array().expect("objects").iter().map(|o| o["object"].clone()).collect()
}

/// Rendering that must fail; returns the error text.
pub(crate) fn render_error(sets: &[&str]) -> String {
    let root = workspace_root();
    let mut command = Command::new(deploy_python());
    command.arg(root.join("deploy/check/check.py")).args(["helm-render", CHART]).current_dir(&root);
    for set in with_issuer(sets) {
        command.args(["--set", set]);
    }
    let output = command.output().expect("check.py runs");
    assert!(!output.status.success(), "rendering with {sets:?} should have been refused");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub(crate) fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} not rendered"))
}

fn seconds(text: &str) -> u64 {
    let text = text.trim();
    if let Some(s) = text.strip_suffix('s') {
        s.parse().expect("seconds")
    } else if let Some(m) = text.strip_suffix('m') {
        m.parse::<u64>().expect("minutes") * 60
    } else {
        panic!("duration {text}")
    }
}

const WORKLOADS: [(&str, &str, &str); 5] = [
    ("Deployment", "chatfleet-chatpersistence", "chatpersistence"),
    ("Deployment", "chatfleet-changehandler", "chatpersistencechangehandler"),
    ("StatefulSet", "chatfleet-chatsockets", "chatwebsocketshandler"),
    ("StatefulSet", "chatfleet-notifications", "generalnotificationshandler"),
    ("Deployment", "chatfleet-emailhandler", "emailhandler"),
];

#[test]
fn chart_renders_lints_and_every_object_is_valid_kubernetes() {
    let objects = render(&[JWT]);
    assert!(objects.len() > 20, "rendered {} objects", objects.len());
    let out = check_py(&["helm-lint", CHART, "--set", JWT, "--set", ISSUER]);
    let lint: Value = serde_json::from_str(&out).expect("lint JSON");
    assert_eq!(lint["errors"], Value::Array(vec![]), "{lint}");
    // Variants render and validate too.
    render(&[JWT, "chatsockets.autoscaling.enabled=true", "notifications.autoscaling.enabled=true"]);
    render(&[JWT, "chatsockets.replicas=3", "envoy.autoscaling.enabled=true"]);
    render(&[JWT, "networkPolicy.enabled=false", "debezium.register.enabled=false"]);
    render(&["auth.algorithm=RS256", "auth.publicKey.configMapName=jwt-key"]);
    render(&["auth.algorithm=RS256", "auth.jwksUrl=https://auth.example.com/.well-known/jwks.json"]);
}

#[test]
fn workloads_have_probes_resources_metrics_and_drain_in_time() {
    let objects = render(&[JWT]);
    let common = find(&objects, "ConfigMap", "chatfleet-common");
    let shutdown = seconds(common["data"]["SHUTDOWN_TIMEOUT"].as_str().expect("SHUTDOWN_TIMEOUT"));
    for (kind, name, binary) in WORKLOADS {
        let workload = find(&objects, kind, name);
        let pod = &workload["spec"]["template"];
        let spec = &pod["spec"];
        let container = &spec["containers"][0];
        assert_eq!(container["command"], serde_json::json!([binary]), "{name}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(container["resources"][bound][resource].is_string(), "{name}: resources.{bound}.{resource}");
            }
        }
        let pre_stop: Vec<String> =
            serde_json::from_value(container["lifecycle"]["preStop"]["exec"]["command"].clone()).expect("preStop");
        assert_eq!(pre_stop[0], "sleep", "{name}: preStop sleeps while endpoints update");
        let sleep: u64 = pre_stop[1].parse().expect("seconds");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("grace period");
        assert!(
            grace > sleep + shutdown,
            "{name}: grace {grace}s must exceed preStop {sleep}s + SHUTDOWN_TIMEOUT {shutdown}s"
        );
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");
        assert_eq!(annotations["prometheus.io/port"], "8080", "{name}");
        assert!(annotations["checksum/config"].is_string(), "{name}: config changes roll the pods");
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false, "{name}");
        let env_from = container["envFrom"].to_string();
        assert!(env_from.contains("chatfleet-common"), "{name}: common settings");
        let secrets = container["env"].to_string();
        assert!(secrets.contains("secretKeyRef"), "{name}: secrets come from the Secret");
    }
    let sockets = find(&objects, "StatefulSet", "chatfleet-chatsockets");
    assert_eq!(sockets["spec"]["serviceName"], "chatfleet-chatsockets-headless");
    let handler = find(&objects, "ConfigMap", "chatfleet-changehandler");
    let url = handler["data"]["CHAT_WEBSOCKET_URL"].as_str().expect("CHAT_WEBSOCKET_URL");
    assert!(url.starts_with("http://chatfleet-envoy-internal."), "the change handler forwards through Envoy: {url}");
    assert_eq!(handler["data"]["NOTIFICATIONS_URL"], handler["data"]["CHAT_WEBSOCKET_URL"]);
    let socket_env = find(&objects, "ConfigMap", "chatfleet-chatsockets");
    assert!(socket_env["data"]["CHATPERSISTENCE_INTERNAL_URL"].as_str().unwrap_or_default().contains(":9090"));
    let persistence_env = find(&objects, "ConfigMap", "chatfleet-chatpersistence");
    assert_eq!(persistence_env["data"]["CAPTURE_MODE"], "debezium");
}

#[test]
fn socket_pods_scale_with_an_hpa_and_keep_a_disruption_budget() {
    let objects = render(&[JWT, "chatsockets.autoscaling.enabled=true", "notifications.autoscaling.enabled=true"]);
    for name in ["chatfleet-chatsockets", "chatfleet-notifications"] {
        let hpa = find(&objects, "HorizontalPodAutoscaler", name);
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], name);
        let pdb = find(&objects, "PodDisruptionBudget", name);
        assert!(pdb["spec"]["maxUnavailable"].is_number(), "{name}");
        let workload = find(&objects, "StatefulSet", name);
        assert!(workload["spec"].get("replicas").is_none(), "{name}: the HPA owns replicas");
    }
    let fixed = render(&[JWT, "chatsockets.autoscaling.enabled=false", "chatsockets.replicas=3"]);
    assert!(fixed
        .iter()
        .all(|o| !(o["kind"] == "HorizontalPodAutoscaler" && o["metadata"]["name"] == "chatfleet-chatsockets")));
    assert_eq!(find(&fixed, "StatefulSet", "chatfleet-chatsockets")["spec"]["replicas"], 3);
    let envoy = find(&fixed, "Deployment", "chatfleet-envoy");
    assert_eq!(envoy["spec"]["replicas"], 2, "envoy scales by replicas");
}

#[test]
fn network_policy_keeps_internal_ports_inside_the_release() {
    let objects = render(&[JWT]);
    let services = find(&objects, "NetworkPolicy", "chatfleet-services");
    for rule in services["spec"]["ingress"].as_array().expect("ingress") {
        let ports = rule["ports"].to_string();
        if ports.contains("9090") {
            let from = rule["from"].as_array().expect("internal port has a from");
            assert!(
                from.iter().all(|peer| peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "chatfleet"
                    && peer.get("namespaceSelector").is_none()),
                "internal port reachable from outside the release: {rule}"
            );
        }
    }
    let envoy = find(&objects, "NetworkPolicy", "chatfleet-envoy");
    for rule in envoy["spec"]["ingress"].as_array().expect("ingress") {
        let ports = rule["ports"].to_string();
        if ports.contains("9080") {
            assert!(rule["from"].to_string().contains("\"app.kubernetes.io/instance\":\"chatfleet\""), "{rule}");
            assert!(!ports.contains("8080"), "public and internal listeners need separate rules: {rule}");
        }
    }
    let internal = find(&objects, "Service", "chatfleet-envoy-internal");
    assert_eq!(internal["spec"]["type"], "ClusterIP");
    let public = find(&objects, "Service", "chatfleet-envoy");
    assert!(
        !public["spec"]["ports"].to_string().contains("9080"),
        "the public Service exposes only the public listener"
    );
}

#[test]
fn secrets_come_from_the_chart_or_an_existing_secret() {
    let objects = render(&[JWT]);
    let secret = find(&objects, "Secret", "chatfleet");
    for key in ["JWT_SECRET", "INTERNAL_SERVICE_TOKEN", "MONGODB_URI", "REDIS_URL", "MONGODB_CONNECTION_STRING"] {
        assert!(secret["stringData"][key].is_string(), "Secret key {key}");
    }
    assert!(secret["stringData"]["INTERNAL_SERVICE_TOKEN"].as_str().is_some_and(|t| t.len() >= 16), "generated token");
    let with_smtp = render(&[JWT, "secrets.smtpUsername=mailer", "secrets.smtpPassword=pw"]);
    assert_eq!(find(&with_smtp, "Secret", "chatfleet")["stringData"]["SMTP_PASSWORD"], "pw");

    let existing = render(&["secrets.existingSecret=my-secrets"]);
    assert!(existing.iter().all(|o| o["kind"] != "Secret"), "no Secret is created with existingSecret");
    let email = find(&existing, "Deployment", "chatfleet-emailhandler");
    let env = email["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("\"name\":\"my-secrets\""), "{env}");
    assert!(env.contains("SMTP_PASSWORD") && env.contains("\"optional\":true"), "SMTP credentials are optional: {env}");

    let refused = render_error(&[]);
    assert!(refused.contains("jwtSecret"), "without a JWT secret the chart must refuse: {refused}");
}

#[test]
fn a_grace_period_shorter_than_the_drain_is_refused() {
    let refused = render_error(&[JWT, "terminationGracePeriodSeconds=20"]);
    assert!(refused.contains("terminationGracePeriodSeconds"), "{refused}");
    let refused = render_error(&[JWT, "chatsockets.autoscaling.enabled=true", "chatsockets.ringSize=4"]);
    assert!(refused.contains("ringSize"), "a ring smaller than maxReplicas must be refused: {refused}");
    render(&[JWT, "terminationGracePeriodSeconds=60", "config.SHUTDOWN_TIMEOUT=50s"]);
}

/// The Envoy configuration the chart renders, as JSON.
fn chart_envoy(objects: &[Value]) -> (Value, String) {
    let text =
        find(objects, "ConfigMap", "chatfleet-envoy")["data"]["envoy.yaml"].as_str().expect("envoy.yaml").to_owned();
    let dir = testkit::scratch("helm-envoy");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, &text).expect("write");
    let docs: Value = serde_json::from_str(&check_py(&["yaml", &path.display().to_string()])).expect("JSON");
    (docs[0].clone(), path.display().to_string())
}

fn route_configs(config: &Value) -> Vec<Value> {
    config["static_resources"]["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            let filters = l["filter_chains"][0]["filters"].as_array().cloned().expect("filters");
            let hcm = filters.into_iter().find(|f| f["name"] == "envoy.filters.network.http_connection_manager");
            hcm.expect("http_connection_manager")["typed_config"]["route_config"].clone()
        })
        .collect()
}

#[test]
fn envoy_in_the_chart_routes_like_deploy_envoy_over_per_pod_rings() {
    let objects = render(&[JWT]);
    let (config, path) = chart_envoy(&objects);
    check_py(&["envoy-validate", &path]);
    crate::multipod_support::edge::assert_edge_hardening(&config, "the chart's Envoy");
    let shipped: Value = serde_json::from_str(&check_py(&["yaml", "deploy/envoy/envoy.yaml"])).expect("JSON");
    assert_eq!(
        route_configs(&config),
        route_configs(&shipped[0]),
        "the chart's Envoy routes differ from deploy/envoy/envoy.yaml"
    );
    for (service, key) in [("chatwebsocketshandler", "chatsockets"), ("generalnotificationshandler", "notifications")] {
        let clusters = config["static_resources"]["clusters"].as_array().expect("clusters");
        let get = |side: &str| {
            clusters.iter().find(|c| c["name"] == format!("{service}_{side}").as_str()).cloned().expect("cluster")
        };
        let (public, internal) = (get("public"), get("internal"));
        let endpoints =
            |c: &Value| c["load_assignment"]["endpoints"][0]["lb_endpoints"].as_array().cloned().expect("eps");
        let (pe, ie) = (endpoints(&public), endpoints(&internal));
        assert_eq!(pe.len(), 8, "{service}: ringSize members");
        for (i, (p, q)) in pe.iter().zip(&ie).enumerate() {
            let pod = format!("chatfleet-{key}-{i}");
            let hash = |e: &Value| e["metadata"]["filter_metadata"]["envoy.lb"]["hash_key"].clone();
            assert_eq!(hash(p), Value::from(pod.as_str()), "{service}: hash_key of member {i}");
            assert_eq!(hash(q), Value::from(pod.as_str()), "{service}: internal hash_key of member {i}");
            let dns = p["endpoint"]["address"]["socket_address"]["address"].as_str().expect("address");
            assert_eq!(dns, format!("{pod}.chatfleet-{key}-headless.chatfleet.svc.cluster.local"), "per-pod DNS name");
        }
        assert_eq!(public["lb_policy"], "RING_HASH");
    }
}

#[test]
fn debezium_hook_ships_every_connector_and_the_script() {
    let objects = render(&[JWT]);
    let config_map = find(&objects, "ConfigMap", "chatfleet-debezium");
    let dir = workspace_root().join("debezium");
    let mut shipped = 0;
    for entry in std::fs::read_dir(&dir).expect("debezium/") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        let content = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            config_map["data"][&name].as_str().map(str::trim_end),
            Some(content.trim_end()),
            "debezium/{name} is not shipped unchanged in the chart"
        );
        shipped += 1;
    }
    assert!(shipped >= 2, "register.sh and at least one connector");
    let job = find(&objects, "Job", "chatfleet-debezium-register");
    let hooks = job["metadata"]["annotations"]["helm.sh/hook"].as_str().expect("hook");
    assert!(hooks.contains("post-install") && hooks.contains("post-upgrade"), "{hooks}");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(container["command"].to_string().contains("/debezium/register.sh"));
    let env = container["env"].to_string();
    assert!(env.contains("CONNECT_URL") && env.contains("MONGODB_CONNECTION_STRING"), "{env}");
}

/// Every pod template of the release: (kind/name, pod spec).
fn pod_specs(objects: &[Value]) -> Vec<(String, Value)> {
    objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet" | "Job" | "DaemonSet" | "CronJob")))
        .map(|o| (format!("{} {}", o["kind"], o["metadata"]["name"]), o["spec"]["template"]["spec"].clone()))
        .collect()
}

#[test]
fn no_pod_gets_a_service_account_token_and_envoy_admin_stays_local() {
    let objects = render(&[JWT]);
    let pods = pod_specs(&objects);
    assert!(pods.len() >= 7, "five services, Envoy and the Debezium job: {}", pods.len());
    for (name, spec) in &pods {
        assert_eq!(spec["automountServiceAccountToken"], false, "{name} mounts a service-account token");
    }
    for sa in objects.iter().filter(|o| o["kind"] == "ServiceAccount") {
        assert_eq!(sa["automountServiceAccountToken"], false, "ServiceAccount {}", sa["metadata"]["name"]);
    }
    let envoy = find(&objects, "Deployment", "chatfleet-envoy");
    let pod = &envoy["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let ports = container["ports"].to_string();
    assert!(!ports.contains("9901"), "the admin port is not a container port: {ports}");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "ops", "readiness through the ops listener");
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9902");
    let (config, _) = chart_envoy(&objects);
    assert_eq!(config["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
    let policy = find(&objects, "NetworkPolicy", "chatfleet-envoy").to_string();
    assert!(!policy.contains("9901"), "no NetworkPolicy opens the admin port: {policy}");
}

#[test]
fn debezium_job_runs_as_non_root_read_only_and_installs_nothing() {
    let objects = render(&[JWT]);
    let job = find(&objects, "Job", "chatfleet-debezium-register");
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(spec["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u > 0));
    let container = &spec["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    let command = format!("{} {}", container["command"], container["args"]);
    for installer in ["apk ", "apt", "yum", "dnf", "pip", "microdnf"] {
        assert!(!command.contains(installer), "the job installs packages at run time: {command}");
    }
    assert!(container["volumeMounts"].to_string().contains("\"/tmp\""), "a writable /tmp for curl's bodies");
    let script = std::fs::read_to_string(workspace_root().join("debezium/register.sh")).expect("register.sh");
    let code: String = script.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(!code.contains("jq "), "register.sh must run with bash and curl only (no jq in the Connect image)");
}

#[test]
fn tokens_edge_settings_and_secret_lengths() {
    let objects = render(&[JWT]);
    let common = &find(&objects, "ConfigMap", "chatfleet-common")["data"];
    assert_eq!(common["JWT_ALGORITHM"], "HS256");
    assert_eq!(common["JWT_ISSUER"], "https://auth.example.com/");
    assert_eq!(common["JWT_AUDIENCE"], "chatfleet");
    assert_eq!(common["CLIENT_IP_HEADER"], "x-forwarded-for");
    assert!(common["ALLOWED_ORIGINS"].is_string());
    let origins = render(&[JWT, "edge.allowedOrigins=https://app.example.com"]);
    assert_eq!(find(&origins, "ConfigMap", "chatfleet-common")["data"]["ALLOWED_ORIGINS"], "https://app.example.com");
    let secret = find(&objects, "Secret", "chatfleet");
    assert!(secret["stringData"]["INTERNAL_SERVICE_TOKEN"].as_str().is_some_and(|t| t.len() >= 32), "generated token");

    // Short secrets and a missing issuer are refused at render time.
    let refused = render_error(&["secrets.jwtSecret=only-20-bytes-long!!"]);
    assert!(refused.contains("secrets.jwtSecret") && refused.contains("32"), "{refused}");
    let refused = render_error(&[JWT, "secrets.internalServiceToken=short-token"]);
    assert!(refused.contains("internalServiceToken") && refused.contains("32"), "{refused}");
    let refused = render_error(&[JWT, "auth.issuer="]);
    assert!(refused.contains("auth.issuer"), "{refused}");
    let refused = render_error(&[JWT, "config.JWT_SECRET=x"]);
    assert!(refused.contains("config.JWT_SECRET"), "{refused}");
    let refused = render_error(&["auth.algorithm=RS256"]);
    assert!(refused.contains("RS256"), "RS256 without a key must be refused: {refused}");

    // RS256 with a public key from a Secret: mounted read-only, JWT_PUBLIC_KEY_FILE
    // points at it, no JWT_SECRET anywhere.
    let rs =
        render(&["auth.algorithm=RS256", "auth.publicKey.secretName=jwt-public-key", "auth.publicKey.key=issuer.pem"]);
    let common = &find(&rs, "ConfigMap", "chatfleet-common")["data"];
    assert_eq!(common["JWT_ALGORITHM"], "RS256");
    assert_eq!(common["JWT_PUBLIC_KEY_FILE"], "/etc/chatfleet/jwt/issuer.pem");
    assert!(find(&rs, "Secret", "chatfleet")["stringData"].get("JWT_SECRET").is_none());
    for (kind, name, _) in WORKLOADS {
        let spec = &find(&rs, kind, name)["spec"]["template"]["spec"];
        assert_eq!(spec["volumes"][0]["secret"]["secretName"], "jwt-public-key", "{name}");
        let mount = &spec["containers"][0]["volumeMounts"][0];
        assert_eq!(mount["mountPath"], "/etc/chatfleet/jwt", "{name}");
        assert_eq!(mount["readOnly"], true, "{name}");
        assert!(!spec["containers"][0]["env"].to_string().contains("JWT_SECRET"), "{name}");
    }
    let jwks = render(&["auth.algorithm=RS256", "auth.jwksUrl=https://auth.example.com/jwks.json"]);
    let common = &find(&jwks, "ConfigMap", "chatfleet-common")["data"];
    assert_eq!(common["JWT_JWKS_URL"], "https://auth.example.com/jwks.json");
    assert!(common["JWT_JWKS_REFRESH_INTERVAL"].is_string());
    let values = std::fs::read_to_string(workspace_root().join(CHART).join("values.yaml")).expect("values.yaml");
    assert!(values.contains(">= 32"), "values.yaml documents the 32-byte minimum");
}
