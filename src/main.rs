//! The `smartmsg` binary: `run`, `demo`, `check-config`.

use clap::{Parser, Subcommand};
use smartmsg::clock::SystemClock;
use smartmsg::config::Config;
use smartmsg::node::Node;
use std::path::PathBuf;
use std::sync::Arc;

/// jemalloc serves every allocation of the process: Rust's, and (unprefixed)
/// librdkafka's and sled's. With glibc's malloc a third of the aggregators'
/// CPU went to malloc/free, arena locks and the page faults of fetch
/// buffers mapped and unmapped per response (BENCHMARKS.md, "Allocator").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (`MALLOC_CONF` in the environment is read
/// after these, so an operator can override them). One arena: the
/// process's threads hand buffers to each other (rdkafka's fetch threads
/// allocate, the runtime's workers free); two arenas were slower. Freed
/// pages go back to the system after 500 ms: jemalloc's defaults (eight
/// arenas here, 10 s) held ~2x the RSS, immediate purging cost 80 % more
/// CPU. Measured in BENCHMARKS.md.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"narenas:1,dirty_decay_ms:500,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads at start-up (`const char *malloc_conf`).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: points to an immutable static C string literal.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(
    name = "smartmsg",
    version,
    about = "Smart message advertising runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        /// Config file overlaid on the defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A complete simulated campaign on the embedded backends, ending with a report.
    Demo(smartmsg::demo::DemoArgs),
    /// The demo's subscriber world against a running cluster: registers
    /// subscribers and a campaign through a node's API, reacts to its
    /// messages through Kafka, and reports (JSON on the last line).
    Simulate(smartmsg::simulate::SimulateArgs),
    /// Benchmarks against the real services (JSON on the last line).
    Bench {
        #[command(subcommand)]
        which: smartmsg::bench::BenchCmd,
    },
    /// Print the effective configuration, or every error in it.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load(config: Option<&PathBuf>) -> Config {
    match Config::load(config.map(|p| p.as_path())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("smartmsg: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let node = match Node::start(cfg, Arc::new(SystemClock), true).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("smartmsg: cannot start: {e}");
            std::process::exit(1);
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = node.wait() => {
            tracing::error!("supervision tree gave up; exiting");
            std::process::exit(1);
        }
    }
    node.shutdown().await;
    Ok(())
}

/// The async runtime of a node.
fn runtime(cfg: &smartmsg::config::Config) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads())
        .enable_all()
        .build()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => {
            let cfg = load(config.as_ref());
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = load(config.as_ref());
            smartmsg::logging::init(&cfg);
            runtime(&cfg)?.block_on(run(cfg))
        }
        Cmd::Bench { which } => {
            tokio::runtime::Runtime::new()?.block_on(smartmsg::bench::run(which))
        }
        Cmd::Simulate(args) => {
            tokio::runtime::Runtime::new()?.block_on(smartmsg::simulate::run(args))
        }
        Cmd::Demo(args) => {
            let cfg = load(None);
            runtime(&cfg)?.block_on(smartmsg::demo::run(cfg, args))
        }
    }
}
