//! Configuration: `config/default.toml` (compiled in) overlaid by an optional
//! file and by `SMARTMSG__SECTION__KEY` environment variables. Loading checks
//! every key against the defaults and reports every error at once.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The defaults, exactly as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "SMARTMSG__";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub backend: BackendConfig,
    pub kafka: KafkaConfig,
    pub amqp: AmqpConfig,
    pub aggregator: AggregatorConfig,
    pub model: ModelConfig,
    pub campaign: CampaignConfig,
    pub supervision: SupervisionConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; empty means the hostname.
    pub id: String,
    /// What this node runs: "all" or a comma-separated list of roles.
    pub roles: String,
    /// Async worker threads; 0 means half the cores, at least one.
    pub worker_threads: u64,
}

/// The parts of the daemon a node can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Command partitions (campaign actors) and the targeting model.
    Commands,
    /// Executes due batch jobs from the delay queue.
    Scheduler,
    /// Window aggregators of reaction-logs.
    Aggregator,
    /// Read models (campaigns, subscribers, reports) behind the HTTP API.
    Materializer,
    /// Refits the targeting model.
    Trainer,
    /// Classifies `contents` against the filters into `content-matches`
    /// (needs the materializer role: it keeps the filters).
    Percolator,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Commands,
        Role::Scheduler,
        Role::Aggregator,
        Role::Materializer,
        Role::Trainer,
        Role::Percolator,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Role::Commands => "commands",
            Role::Scheduler => "scheduler",
            Role::Aggregator => "aggregator",
            Role::Materializer => "materializer",
            Role::Trainer => "trainer",
            Role::Percolator => "percolator",
        }
    }
}

/// Parse `node.roles`.
pub fn parse_roles(s: &str) -> Result<Vec<Role>, String> {
    if s.trim() == "all" {
        return Ok(Role::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        match Role::ALL.iter().find(|r| r.name() == part) {
            Some(r) if !out.contains(r) => out.push(*r),
            Some(_) => {}
            None => {
                return Err(format!(
                    "unknown role {part:?} (expected \"all\" or a list of {})",
                    Role::ALL.map(Role::name).join(", ")
                ))
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of sled state and embedded backends.
    pub data_dir: PathBuf,
    /// sled page cache, MiB.
    pub cache_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// API listen address.
    pub listen: String,
    /// Bearer token for mutating endpoints; empty = off.
    pub auth_token: String,
    /// Largest request body in bytes.
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Embedded,
    Cluster,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `embedded` or `cluster`.
    pub kind: BackendKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: u32,
    pub group_id: String,
    pub session_timeout_ms: u64,
    pub replication_factor: u64,
    /// Compression of the record batches this node writes.
    pub compression: Compression,
}

/// Record batch compression of the node's producers (Kafka's codecs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// librdkafka's `compression.type` value (also its name in the config).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    pub queue_prefix: String,
    pub prefetch: u64,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    pub grace_ms: u64,
    pub idle_close_ms: u64,
    pub hopping_enabled: bool,
    pub max_batch_records: u64,
    pub max_batch_output: u64,
    pub commit_interval_ms: u64,
    pub min_commit_gap_ms: u64,
    pub checkpoint_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub attribution_window_ms: u64,
    pub retrain_interval_ms: u64,
    pub keep_versions: u64,
    pub max_features: usize,
    pub population_cache_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignConfig {
    pub max_batch_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    pub max_restarts: u64,
    pub period_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Every problem found while loading, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Defaults only (no file, no environment).
    pub fn defaults() -> Config {
        Self::load_from(None, std::iter::empty()).expect("shipped defaults are valid")
    }

    /// Load defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        Self::load_from(file, std::env::vars())
    }

    /// Load with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let defaults: toml::Table = DEFAULT_TOML.parse().expect("default.toml parses");
        let mut merged = defaults.clone();
        let mut errors = Vec::new();
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Err(e) => errors.push(format!("{}: cannot read: {e}", path.display())),
                Ok(text) => match text.parse::<toml::Table>() {
                    Err(e) => errors.push(format!("{}: {}", path.display(), e.message())),
                    Ok(table) => overlay_file(&defaults, &mut merged, &table, path, &mut errors),
                },
            }
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (name, value) in env {
            overlay_env(&defaults, &mut merged, &name, &value, &mut errors);
        }
        check_enum(
            &defaults,
            &mut merged,
            "backend",
            "kind",
            &["embedded", "cluster"],
            &mut errors,
        );
        check_enum(
            &defaults,
            &mut merged,
            "log",
            "format",
            &["text", "json"],
            &mut errors,
        );
        check_enum(
            &defaults,
            &mut merged,
            "kafka",
            "compression",
            &Compression::ALL.map(Compression::as_str),
            &mut errors,
        );
        let config: Option<Config> = {
            match toml::Value::Table(merged).try_into::<Config>() {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(e.message().to_string());
                    None
                }
            }
        };
        if let Some(c) = &config {
            c.validate(&mut errors);
        }
        match (config, errors.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }

    fn validate(&self, errors: &mut Vec<String>) {
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:8080",
                self.http.listen
            ));
        }
        if self.amqp.prefetch == 0 || self.amqp.prefetch > 65535 {
            errors.push("amqp.prefetch: must be within 1..=65535".into());
        }
        if self.node.worker_threads > 1024 {
            errors.push("node.worker_threads: must be within 0..=1024 (0: half the cores)".into());
        }
        if self.kafka.replication_factor == 0 {
            errors.push("kafka.replication_factor: must be > 0".into());
        }
        if self.kafka.partitions == 0 || self.kafka.partitions > 1024 {
            errors.push("kafka.partitions: must be within 1..=1024".into());
        }
        if self.http.max_body_bytes == 0 {
            errors.push("http.max_body_bytes: must be > 0".into());
        }
        if self.aggregator.max_batch_records == 0 {
            errors.push("aggregator.max_batch_records: must be > 0".into());
        }
        if self.aggregator.max_batch_output == 0 {
            errors.push("aggregator.max_batch_output: must be > 0".into());
        }
        if self.aggregator.idle_close_ms == 0 {
            errors.push("aggregator.idle_close_ms: must be > 0".into());
        }
        if self.model.retrain_interval_ms == 0 {
            errors.push("model.retrain_interval_ms: must be > 0".into());
        }
        if self.model.keep_versions == 0 {
            errors.push("model.keep_versions: must be > 0".into());
        }
        if !(1..=64).contains(&self.model.max_features) {
            errors.push("model.max_features: must be between 1 and 64".into());
        }
        if self.model.population_cache_mb == 0 {
            errors.push("model.population_cache_mb: must be > 0".into());
        }
        if self.campaign.max_batch_size == 0 {
            errors.push("campaign.max_batch_size: must be > 0".into());
        }
        if self.supervision.backoff_base_ms > self.supervision.backoff_max_ms {
            errors
                .push("supervision.backoff_base_ms: must be <= supervision.backoff_max_ms".into());
        }
        if self.supervision.period_ms == 0 {
            errors.push("supervision.period_ms: must be > 0".into());
        }
        match parse_roles(&self.node.roles) {
            Err(e) => errors.push(format!("node.roles: {e}")),
            Ok(r) if !r.contains(&Role::Materializer) => {
                // What the materializer keeps, and who reads it.
                for (role, what) in [
                    (Role::Percolator, "the filters"),
                    (Role::Commands, "the subscribers batches are chosen from"),
                    (
                        Role::Trainer,
                        "the subscribers' features and campaigns' channels",
                    ),
                ] {
                    if r.contains(&role) {
                        errors.push(format!(
                            "node.roles: {} needs materializer (which keeps {what})",
                            role.name()
                        ));
                    }
                }
            }
            Ok(_) => {}
        }
        if self.storage.cache_mb == 0 {
            errors.push("storage.cache_mb: must be > 0".into());
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            errors.push("storage.data_dir: must not be empty".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(format!("log.level: {e}"));
        }
    }

    /// The roles this node runs (validated at load).
    pub fn roles(&self) -> Vec<Role> {
        parse_roles(&self.node.roles).unwrap_or_else(|_| Role::ALL.to_vec())
    }

    pub fn runs(&self, role: Role) -> bool {
        self.roles().contains(&role)
    }

    /// The node id, falling back to the hostname.
    pub fn node_id(&self) -> String {
        if !self.node.id.is_empty() {
            return self.node.id.clone();
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "smartmsg".into())
    }

    /// Async worker threads of the runtime (see `node.worker_threads`).
    pub fn worker_threads(&self) -> usize {
        match self.node.worker_threads {
            0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1),
            n => n as usize,
        }
    }

    /// Full topic name for a logical topic.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, name)
    }

    /// Effective config as TOML (for `check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Check a string-enum key; a bad value is reported and replaced by the
/// default so the remaining checks still run.
fn check_enum(
    defaults: &toml::Table,
    merged: &mut toml::Table,
    section: &str,
    key: &str,
    allowed: &[&str],
    errors: &mut Vec<String>,
) {
    let table = merged
        .get_mut(section)
        .and_then(|s| s.as_table_mut())
        .expect("section");
    let value = table.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    if !allowed.contains(&value) {
        errors.push(format!(
            "{section}.{key}: {value:?} is not one of {}",
            allowed.join(", ")
        ));
        let default = defaults[section][key].clone();
        table.insert(key.to_string(), default);
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

fn overlay_file(
    defaults: &toml::Table,
    merged: &mut toml::Table,
    file: &toml::Table,
    path: &Path,
    errors: &mut Vec<String>,
) {
    for (section, value) in file {
        let Some(default_section) = defaults.get(section).and_then(|v| v.as_table()) else {
            errors.push(format!("{}: unknown section [{section}]", path.display()));
            continue;
        };
        let Some(table) = value.as_table() else {
            errors.push(format!("{}: {section} must be a table", path.display()));
            continue;
        };
        for (key, v) in table {
            let Some(default) = default_section.get(key) else {
                errors.push(format!("{}: unknown key {section}.{key}", path.display()));
                continue;
            };
            if std::mem::discriminant(default) != std::mem::discriminant(v) {
                errors.push(format!(
                    "{}: {section}.{key} must be {}, got {}",
                    path.display(),
                    type_name(default),
                    type_name(v)
                ));
                continue;
            }
            merged
                .get_mut(section)
                .and_then(|s| s.as_table_mut())
                .expect("section exists")
                .insert(key.clone(), v.clone());
        }
    }
}

fn overlay_env(
    defaults: &toml::Table,
    merged: &mut toml::Table,
    name: &str,
    raw: &str,
    errors: &mut Vec<String>,
) {
    let rest = &name[ENV_PREFIX.len()..];
    let parts: Vec<&str> = rest.split("__").collect();
    if parts.len() != 2 {
        errors.push(format!("{name}: expected SMARTMSG__SECTION__KEY"));
        return;
    }
    let (section, key) = (parts[0].to_ascii_lowercase(), parts[1].to_ascii_lowercase());
    let Some(default) = defaults
        .get(&section)
        .and_then(|s| s.as_table())
        .and_then(|s| s.get(&key))
    else {
        errors.push(format!("{name}: unknown key {section}.{key}"));
        return;
    };
    let value = match default {
        toml::Value::String(_) => Some(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => raw.trim().parse::<i64>().ok().map(toml::Value::Integer),
        toml::Value::Boolean(_) => raw.trim().parse::<bool>().ok().map(toml::Value::Boolean),
        toml::Value::Float(_) => raw.trim().parse::<f64>().ok().map(toml::Value::Float),
        _ => None,
    };
    match value {
        Some(v) => {
            merged
                .get_mut(&section)
                .and_then(|s| s.as_table_mut())
                .expect("section exists")
                .insert(key, v);
        }
        None => errors.push(format!(
            "{name}: {raw:?} is not a valid {}",
            type_name(default)
        )),
    }
}

/// Parse a `key=value` environment listing (used by tests).
pub fn env_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() {
        let c = Config::defaults();
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.kafka.partitions, 8);
        assert_eq!(c.backend.kind, BackendKind::Embedded);
        assert_eq!(c.topic("campaign-events"), "smartmsg.campaign-events");
    }

    #[test]
    fn env_overrides_and_types() {
        let env = env_map(&[
            ("SMARTMSG__HTTP__LISTEN", "127.0.0.1:18080"),
            ("SMARTMSG__KAFKA__PARTITIONS", "4"),
            ("SMARTMSG__AGGREGATOR__HOPPING_ENABLED", "false"),
            ("OTHER", "x"),
        ]);
        let c = Config::load_from(None, env).unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:18080");
        assert_eq!(c.kafka.partitions, 4);
        assert!(!c.aggregator.hopping_enabled);
        assert_eq!(c.kafka.compression, Compression::Lz4);
        assert!(c.worker_threads() >= 1);
        let c =
            Config::load_from(None, env_map(&[("SMARTMSG__NODE__WORKER_THREADS", "3")])).unwrap();
        assert_eq!(c.worker_threads(), 3);
        let c =
            Config::load_from(None, env_map(&[("SMARTMSG__KAFKA__COMPRESSION", "zstd")])).unwrap();
        assert_eq!(c.kafka.compression.as_str(), "zstd");
        let err = Config::load_from(
            None,
            env_map(&[("SMARTMSG__NODE__ROLES", "percolator,aggregator")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("percolator needs materializer"), "{err}");
        for roles in ["commands", "trainer,aggregator"] {
            let err = Config::load_from(None, env_map(&[("SMARTMSG__NODE__ROLES", roles)]))
                .unwrap_err()
                .to_string();
            let first = roles.split(',').next().unwrap();
            assert!(
                err.contains(&format!("{first} needs materializer")),
                "{err}"
            );
        }
        let err = Config::load_from(None, env_map(&[("SMARTMSG__MODEL__MAX_FEATURES", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.max_features"), "{err}");
        let err = Config::load_from(
            None,
            env_map(&[("SMARTMSG__MODEL__POPULATION_CACHE_MB", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.population_cache_mb"), "{err}");
        Config::load_from(
            None,
            env_map(&[("SMARTMSG__NODE__ROLES", "percolator,materializer")]),
        )
        .unwrap();
        let err = Config::load_from(None, env_map(&[("SMARTMSG__KAFKA__COMPRESSION", "brotli")]))
            .unwrap_err();
        assert!(err.to_string().contains("kafka.compression"), "{err}");
    }

    #[test]
    fn all_errors_reported_at_once() {
        let env = env_map(&[
            ("SMARTMSG__HTTP__NOPE", "1"),
            ("SMARTMSG__KAFKA__PARTITIONS", "many"),
            ("SMARTMSG__BOGUS", "1"),
        ]);
        let err = Config::load_from(None, env).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        let text = err.to_string();
        assert!(text.contains("http.nope"), "{text}");
        assert!(text.contains("SMARTMSG__KAFKA__PARTITIONS"), "{text}");
    }

    #[test]
    fn file_unknown_keys_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[http]\nlisten = \"nowhere\"\nextra = 1\n[zzz]\na = 1\n[kafka]\npartitions = \"x\"\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&path), std::iter::empty()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown key http.extra"), "{text}");
        assert!(text.contains("unknown section [zzz]"), "{text}");
        assert!(text.contains("kafka.partitions must be integer"), "{text}");
        assert!(text.contains("http.listen"), "{text}");
        std::fs::write(
            &path,
            "[http]\nlisten = \"nowhere\"\n[backend]\nkind = \"cloud\"\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&path), std::iter::empty()).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.to_string().contains("backend.kind"), "{err}");
    }

    #[test]
    fn every_default_key_is_documented() {
        // Each key line in default.toml is preceded by a comment line.
        let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with('[') {
                continue;
            }
            assert!(
                i > 0 && lines[i - 1].trim().starts_with('#'),
                "key without comment: {l}"
            );
        }
    }
}
