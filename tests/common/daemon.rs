//! A `smartmsg run` daemon in cluster mode as a child process, on a
//! broker and RabbitMQ, with its own port and data directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub dir: PathBuf,
    /// Prefix of the RabbitMQ names it declares (unique per test).
    pub queue_prefix: String,
    pub partitions: u32,
    child: Option<Child>,
}

impl ClusterNode {
    /// Not started yet; on a free port.
    pub fn new(id: &str, dir: PathBuf, queue_prefix: &str, partitions: u32) -> Self {
        ClusterNode {
            id: id.into(),
            port: super::free_port(),
            dir,
            queue_prefix: queue_prefix.into(),
            partitions,
            child: None,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start the daemon (logs at `NODE_LOG`, default warn, to stderr).
    pub fn start(&mut self, brokers: &str) {
        let child = Command::new(env!("CARGO_BIN_EXE_smartmsg"))
            .arg("run")
            .env("SMARTMSG__BACKEND__KIND", "cluster")
            .env("SMARTMSG__KAFKA__BROKERS", brokers)
            .env("SMARTMSG__KAFKA__PARTITIONS", self.partitions.to_string())
            .env("SMARTMSG__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("SMARTMSG__NODE__ID", &self.id)
            .env("SMARTMSG__STORAGE__DATA_DIR", &self.dir)
            .env("SMARTMSG__HTTP__LISTEN", format!("127.0.0.1:{}", self.port))
            .env("SMARTMSG__AMQP__QUEUE_PREFIX", &self.queue_prefix)
            .env(
                "SMARTMSG__LOG__LEVEL",
                std::env::var("NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("daemon starts");
        self.child = Some(child);
    }

    /// Whether it was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the drain.
    pub fn terminate(&mut self) {
        if let Some(c) = self.child.take() {
            super::terminate(c);
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill9();
    }
}
