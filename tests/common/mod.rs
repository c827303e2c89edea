//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A free loopback port (bound then released).
pub mod daemon;
pub mod tansu;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` until it yields `Some`, or fail after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn now_ms() -> i64 {
    smartmsg::clock::system_now_ms()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `PUT /v1/channels/{channel}/subscribers` with an NDJSON `body`.
pub async fn put_subscribers(
    c: &reqwest::Client,
    base: &str,
    channel: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    c.put(format!("{base}/v1/channels/{channel}/subscribers"))
        .body(body)
        .send()
        .await
        .unwrap()
}

/// `POST /v1/campaigns` with a JSON `body`.
pub async fn post_campaign(
    c: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    c.post(format!("{base}/v1/campaigns"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// NDJSON body of `n` subscribers.
pub fn subscribers_ndjson(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"user_id\":\"u{i}\",\"features\":{{\"f\":{}}}}}\n",
                i % 7
            )
        })
        .collect()
}

/// Deletes a RabbitMQ delay-queue topology when dropped, so a failing test
/// leaves no queues behind either.
pub struct RabbitCleanup(pub smartmsg::io::amqp::AmqpSettings);

impl Drop for RabbitCleanup {
    fn drop(&mut self) {
        let s = self.0.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                let _ = rt.block_on(smartmsg::io::amqp::delete_topology(&s));
            }
        })
        .join();
    }
}

/// Every record of `topic`, from offset 0 of each partition to its end.
pub async fn read_all(
    log: &dyn smartmsg::io::EventLog,
    topic: &str,
    partitions: u32,
) -> Vec<smartmsg::io::Record> {
    let mut r = log
        .topic_reader(topic, &vec![0; partitions as usize])
        .unwrap();
    let mut out = Vec::new();
    loop {
        let recs = r.next_batch(5000, Duration::ZERO).await.unwrap();
        if recs.is_empty() {
            return out;
        }
        out.extend(recs);
    }
}

/// The text body of a GET of `url` (a node's `/metrics`, say).
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

/// The JSON body of a GET of `url` (`None` if there is no such answer).
pub async fn get_json(c: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    c.get(url).send().await.ok()?.json().await.ok()
}

/// The campaigns the node at `base` lists (`None` if it does not answer).
pub async fn campaigns(c: &reqwest::Client, base: &str) -> Option<Vec<serde_json::Value>> {
    let v = get_json(c, &format!("{base}/v1/campaigns")).await?;
    v["campaigns"].as_array().cloned()
}

/// Wait until the node at `base` lists `n` campaigns, all completed. On
/// timeout, the failure names the campaigns still pending with their state
/// on that node.
pub async fn all_completed(c: &reqwest::Client, base: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer from the node");
    loop {
        if let Some(list) = campaigns(c, base).await {
            if list.len() == n && list.iter().all(|c| c["status"] == "completed") {
                return;
            }
            let pending: Vec<String> = list
                .iter()
                .filter(|c| c["status"] != "completed")
                .map(|c| {
                    format!(
                        "{} {} batches {}/{} sent {}",
                        c["campaign_id"],
                        c["status"],
                        c["batches_done"],
                        c["batches_total"],
                        c["messages_sent"]
                    )
                })
                .collect();
            last = format!("{} of {n} listed; not completed: {pending:?}", list.len());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for all campaigns completed on {base}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The stdout of a finished command; fails the test, showing both outputs,
/// when the command did not succeed.
pub fn success_stdout(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The partitions of a member's first assignment, sorted.
pub async fn first_assignment(member: &dyn smartmsg::io::GroupMember) -> Vec<u32> {
    let ev = tokio::time::timeout(Duration::from_secs(30), member.next_event())
        .await
        .expect("assignment within 30 s")
        .unwrap();
    let smartmsg::io::PartitionEvent::Assigned(mut parts) = ev else {
        panic!("{ev:?}")
    };
    parts.sort();
    parts
}

/// SIGTERM a daemon and wait up to 20 s for it to drain and exit; SIGKILL
/// after that.
pub fn terminate(mut c: std::process::Child) {
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    for _ in 0..400 {
        if c.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}
