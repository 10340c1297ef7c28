//! A pipeline configuration that cannot work stops chatpersistencechangehandler at
//! start, with a message naming the pipeline and the problem — before it connects to
//! anything. (The rules themselves are unit-tested in the service's `pipeline.rs`;
//! this checks the real binary refuses to start and says why.)

/// Runs the handler with `config` as its `CHATFLEET_CONFIG`; returns exit success and
/// everything it printed. Fails the test if it is still running after 20 s.
fn start_with(config: &str, extra: &[(&str, &str)]) -> (bool, String) {
    let dir = testkit::scratch("pipelines-config");
    let path = dir.join("pipelines.toml");
    std::fs::write(&path, config).expect("write config");
    let mut command = chatfleet_tests::unconnected_handler();
    command.env("CHATFLEET_CONFIG", &path);
    for (k, v) in extra {
        command.env(k, v);
    }
    chatfleet_tests::run_to_exit(
        command,
        &format!(
            "the handler with configuration:
{config}"
        ),
    )
}

fn assert_refused(config: &str, extra: &[(&str, &str)], expected: &[&str]) {
    let (ok, output) = start_with(config, extra);
    assert!(!ok, "the handler must refuse to start; output:\n{output}");
    for part in expected {
        assert!(output.contains(part), "missing {part:?} in the start-up error:\n{output}");
    }
}

#[test]
fn duplicate_group_ids_stop_the_start() {
    assert_refused(
        r#"
[[pipelines]]
name = "chat"
topics = ["chat.changes"]
group_id = "shared"
targets = ["chat_websocket"]
on_exhausted = "failover"
event_store = { key_prefix = "a" }

[[pipelines]]
name = "notify"
topics = ["chat.changes"]
group_id = "shared"
targets = ["chat_notification"]
on_exhausted = "log_and_skip"
event_store = { key_prefix = "b" }
"#,
        &[],
        &["invalid pipeline configuration", "pipeline `notify`: group_id `shared` is used by another pipeline"],
    );
}

#[test]
fn a_chat_target_on_a_domain_topic_stops_the_start() {
    assert_refused(
        r#"
[[pipelines]]
name = "wrong"
topics = ["shipments.changes"]
group_id = "g"
targets = ["chat_notification"]
on_exhausted = "log_and_skip"
"#,
        &[],
        &["pipeline `wrong`: target chat_notification reads chat changes", "shipments.changes"],
    );
}

#[test]
fn an_empty_target_list_stops_the_start() {
    assert_refused(
        r#"
[[pipelines]]
name = "idle"
topics = ["chat.changes"]
group_id = "g"
targets = []
on_exhausted = "log_and_skip"
"#,
        &[],
        &["pipeline `idle`: targets is empty"],
    );
}

#[test]
fn an_unknown_target_or_field_stops_the_start() {
    assert_refused(
        r#"
[[pipelines]]
name = "typo"
topics = ["chat.changes"]
group_id = "g"
targets = ["chat_sockets"]
on_exhausted = "failover"
"#,
        &[],
        &["chat_sockets"],
    );
}

#[test]
fn an_unknown_enabled_pipeline_stops_the_start() {
    assert_refused(
        r#"
[[pipelines]]
name = "chat"
topics = ["chat.changes"]
group_id = "g"
targets = ["chat_websocket"]
on_exhausted = "failover"
"#,
        &[("PIPELINES_ENABLED", "chat,emails")],
        &["PIPELINES_ENABLED names `emails`"],
    );
}
