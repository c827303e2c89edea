//! The Prometheus exporter: one process-wide recorder, rendered at `/metrics`.
//! Metric names follow `smartmsg_<what>_<unit>`; labels are bounded (actor
//! kind, result, reason class), never campaign or user ids.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the recorder (once per process) and return its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("smartmsg_job_lateness_seconds".into()),
                    &[
                        0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .expect("valid buckets")
                .set_buckets(&[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0])
                .expect("valid buckets")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "smartmsg_actor_restarts_total",
        "Actor restarts by supervisors, by actor kind."
    );
    describe_counter!(
        "smartmsg_actor_escalations_total",
        "Supervisors that gave up and escalated, by kind."
    );
    describe_counter!(
        "smartmsg_commands_total",
        "Campaign commands applied or rejected."
    );
    describe_counter!("smartmsg_batches_executed_total", "Mini-batches executed.");
    describe_counter!("smartmsg_messages_sent_total", "Outbound messages written.");
    describe_counter!(
        "smartmsg_events_aggregated_total",
        "Reaction events counted in windows."
    );
    describe_counter!(
        "smartmsg_dlq_records_total",
        "Records dead-lettered, by reason class."
    );
    describe_histogram!(
        "smartmsg_partition_input_wait_seconds",
        Unit::Seconds,
        "Waits of a partition reader with nothing fetched (the reader is starved), by topic and partition."
    );
    describe_histogram!(
        "smartmsg_aggregator_commit_wait_seconds",
        Unit::Seconds,
        "Time an aggregator waited for its previous transaction before submitting the next, by partition."
    );
    describe_histogram!(
        "smartmsg_job_lateness_seconds",
        Unit::Seconds,
        "How late batch jobs fired."
    );
    describe_gauge!("smartmsg_model_version", "Model version in use.");
    describe_counter!(
        "smartmsg_model_swaps_total",
        "Model swap attempts by result."
    );
    describe_counter!(
        "smartmsg_jobs_scheduled_total",
        "Batch jobs published to the delay queue."
    );
    describe_counter!("smartmsg_jobs_fired_total", "Batch jobs that came due.");
    describe_counter!(
        "smartmsg_jobs_redelivered_total",
        "Batch jobs delivered again after a failure."
    );
    describe_histogram!(
        "smartmsg_aggregator_restore_seconds",
        Unit::Seconds,
        "Aggregator state restore time."
    );
    describe_gauge!(
        "smartmsg_partition_queue_records",
        "Records fetched from a partition and not yet read by its actor (Kafka)."
    );
    describe_counter!(
        "smartmsg_http_requests_total",
        "HTTP requests by route and status class."
    );
}
