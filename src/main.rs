//! The `smartmsg` binary: `run`, `demo`, `check-config`.

use clap::{Parser, Subcommand};
use smartmsg::clock::SystemClock;
use smartmsg::config::Config;
use smartmsg::node::Node;
use std::path::PathBuf;
use std::sync::Arc;

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

fn main() -> anyhow::Result<()> {
    // glibc gives every thread that allocates its own arena and keeps what
    // it frees there: with the runtime's, rdkafka's and sled's threads that
    // cost ~40 MB of RSS in the aggregation benchmark. Two arenas serve
    // this workload as fast (BENCHMARKS.md). A fixed mmap threshold keeps
    // large buffers (librdkafka's fetch responses) out of the arenas, so
    // they go back to the system when freed; glibc's default raises the
    // threshold to the largest buffer freed and then keeps them.
    // Set before any thread starts.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
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
            tokio::runtime::Runtime::new()?.block_on(run(cfg))
        }
        Cmd::Bench { which } => {
            tokio::runtime::Runtime::new()?.block_on(smartmsg::bench::run(which))
        }
        Cmd::Demo(args) => {
            let cfg = load(None);
            tokio::runtime::Runtime::new()?.block_on(smartmsg::demo::run(cfg, args))
        }
    }
}
