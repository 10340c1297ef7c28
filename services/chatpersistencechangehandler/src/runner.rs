//! Runs every pipeline's consumer group side by side in one process.
//!
//! Why this module exists: a pipeline is a consumer group, and the process must run
//! all of them at once, stop all of them together on shutdown (each drains what its
//! handlers hold and commits), and not limp on with a pipeline missing: when one group
//! fails, the others are stopped too and the service exits, so the orchestrator
//! restarts it whole.

use std::collections::BTreeMap;

use kafkawrapper::ConsumerGroup;
use servicekit::Shutdown;
use tokio::task::JoinSet;

use crate::handler::PipelineHandler;
use crate::pipeline::Pipeline;

/// The topics the pipelines need: consumed topics with `partitions`, dead-letter
/// topics with one partition. Each topic once.
pub fn topics_to_ensure(pipelines: &[Pipeline], partitions: i32) -> Vec<(String, i32)> {
    let mut topics = BTreeMap::new();
    for pipeline in pipelines {
        for topic in &pipeline.kafka.topics {
            topics.insert(topic.clone(), partitions.max(1));
        }
    }
    for pipeline in pipelines {
        if let Some(topic) = pipeline.kafka.dead_letter_topic() {
            topics.entry(topic.to_owned()).or_insert(1);
        }
    }
    topics.into_iter().collect()
}

/// Logs what a pipeline does and exports it as `pipeline_info` (value 1).
pub fn describe(pipeline: &Pipeline) {
    let targets: Vec<&str> = pipeline.targets.iter().map(|t| t.name()).collect();
    let dedup_by = format!("{:?}", pipeline.dedup_by).to_lowercase();
    let by_target: Vec<String> =
        pipeline.actions().iter().map(|(target, action)| format!("{}={}", target.name(), action.name())).collect();
    let by_target = by_target.join(",");
    tracing::info!(
        pipeline = %pipeline.name,
        group = %pipeline.kafka.group_id,
        topics = ?pipeline.kafka.topics,
        dead_letter_topic = ?pipeline.kafka.dead_letter_topic(),
        targets = ?targets,
        dedup_by = %dedup_by,
        key_prefix = %pipeline.store.key_prefix,
        ttl = ?pipeline.store.ttl,
        max_retries = pipeline.retry.max_retries,
        on_exhausted = pipeline.on_exhausted.name(),
        on_exhausted_by_target = %by_target,
        "pipeline configured"
    );
    metrics::gauge!(
        "pipeline_info",
        "pipeline" => pipeline.name.clone(),
        "group" => pipeline.kafka.group_id.clone(),
        "targets" => targets.join(","),
        "dedup_by" => dedup_by,
        "on_exhausted" => pipeline.on_exhausted.name(),
        "on_exhausted_by_target" => by_target
    )
    .set(1.0);
}

/// Runs the consumer groups until `shutdown`, then waits until each has drained. If a
/// group fails (or stops on its own), the others are stopped and the error returned.
pub async fn run_all(groups: Vec<(String, ConsumerGroup<PipelineHandler>)>, shutdown: Shutdown) -> Result<(), String> {
    let stop = shutdown.token().child_token();
    let mut running = JoinSet::new();
    for (name, group) in groups {
        let token = stop.clone();
        metrics::gauge!("pipeline_running", "pipeline" => name.clone()).set(1.0);
        running.spawn(async move {
            let result = group.run(token).await;
            metrics::gauge!("pipeline_running", "pipeline" => name.clone()).set(0.0);
            (name, result)
        });
    }
    let mut failure: Option<String> = None;
    while let Some(joined) = running.join_next().await {
        let problem = match joined {
            Ok((name, Ok(()))) if stop.is_cancelled() => {
                tracing::info!(pipeline = %name, "pipeline drained and stopped");
                None
            }
            Ok((name, Ok(()))) => Some(format!("pipeline `{name}` stopped unexpectedly")),
            Ok((name, Err(err))) => Some(format!("pipeline `{name}` failed: {err}")),
            Err(err) => Some(format!("a pipeline task failed: {err}")),
        };
        if let Some(problem) = problem {
            tracing::error!(error = %problem, "stopping the other pipelines");
            failure.get_or_insert(problem);
            stop.cancel();
        }
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::resolve;
    use crate::settings::Settings;

    #[test]
    fn consumed_topics_get_the_partition_count_and_dead_letters_one() {
        let mut settings = Settings::default();
        settings.forward.notifications_url = "http://n".into();
        let pipelines = resolve(&settings).expect("valid");
        let topics = topics_to_ensure(&pipelines, 6);
        assert_eq!(
            topics,
            vec![
                ("chat.changes".to_owned(), 6),
                ("chat.changes.dlq".to_owned(), 1),
                ("domain-notifications.dlq".to_owned(), 1),
                ("payments.changes".to_owned(), 6),
                ("purchases.changes".to_owned(), 6),
                ("shipments.changes".to_owned(), 6),
            ]
        );
    }
}
