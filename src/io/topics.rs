//! Topic names (prefix from config) and the specs every daemon ensures at start.

use crate::config::Config;
use crate::io::TopicSpec;

/// Full names of the contract's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    pub commands: String,
    /// Unreadable command records (internal).
    pub commands_dlq: String,
    pub events: String,
    pub subscribers: String,
    pub outbound: String,
    pub reactions: String,
    pub aggregates: String,
    pub reactions_dlq: String,
    pub models: String,
    /// Rollback and resume requests to the trainer (internal).
    pub model_commands: String,
    pub contents: String,
    /// Unreadable `contents` records (internal).
    pub contents_dlq: String,
    /// Content filters by id (internal, compacted).
    pub filters: String,
    pub content_matches: String,
    /// Changelog of the window aggregators' state (internal).
    pub aggregator_changelog: String,
    pub partitions: u32,
}

impl Topics {
    pub fn new(cfg: &Config) -> Self {
        let t = |n: &str| cfg.topic(n);
        Topics {
            commands: t("campaign-commands"),
            commands_dlq: t("campaign-commands.dlq"),
            events: t("campaign-events"),
            subscribers: t("subscribers"),
            outbound: t("outbound-messages"),
            reactions: t("reaction-logs"),
            aggregates: t("reaction-aggregates"),
            reactions_dlq: t("reaction-logs.dlq"),
            models: t("models"),
            model_commands: t("model-commands"),
            contents: t("contents"),
            filters: t("filters"),
            contents_dlq: t("contents.dlq"),
            content_matches: t("content-matches"),
            aggregator_changelog: t("aggregator-changelog"),
            partitions: cfg.kafka.partitions,
        }
    }

    /// Every topic with its partition count and cleanup policy.
    pub fn specs(&self) -> Vec<TopicSpec> {
        let p = self.partitions;
        let spec = |name: &String, compacted: bool| TopicSpec {
            name: name.clone(),
            partitions: p,
            compacted,
            max_message_bytes: None,
        };
        vec![
            spec(&self.commands, false),
            spec(&self.events, false),
            spec(&self.commands_dlq, false),
            spec(&self.subscribers, true),
            spec(&self.outbound, false),
            spec(&self.reactions, false),
            spec(&self.aggregates, false),
            spec(&self.reactions_dlq, false),
            TopicSpec {
                max_message_bytes: Some(crate::io::MODEL_MAX_BYTES),
                ..spec(&self.models, true)
            },
            spec(&self.model_commands, false),
            spec(&self.contents, false),
            spec(&self.filters, true),
            spec(&self.contents_dlq, false),
            spec(&self.content_matches, false),
            spec(&self.aggregator_changelog, true),
        ]
    }
}
