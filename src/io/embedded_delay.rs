//! The embedded delay queue on sled: jobs keyed by due time (so the head is
//! always the next due, whatever the publish order), moved atomically to an
//! in-flight set on delivery, removed on ack, and put back after a restart
//! when they were never acked.

use crate::clock::SharedClock;
use crate::io::{DelayQueue, Delivery, IoError, Job};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    job: Job,
    redelivered: bool,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    clock: SharedClock,
    take: Mutex<()>,
    version: watch::Sender<u64>,
}

/// Delay queue on sled. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedDelayQueue {
    inner: Arc<Inner>,
}

fn ready_key(due_at: i64, id: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'R';
    // Order-preserving for negative values too.
    k[1..9].copy_from_slice(&((due_at as u64) ^ (1 << 63)).to_be_bytes());
    k[9..17].copy_from_slice(&id.to_be_bytes());
    k
}

fn inflight_key(tag: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'I';
    k[1..9].copy_from_slice(&tag.to_be_bytes());
    k
}

fn ser(s: &Stored) -> Vec<u8> {
    serde_json::to_vec(s).expect("serialisable")
}

fn de(b: &[u8]) -> Result<Stored, IoError> {
    serde_json::from_slice(b).map_err(|e| IoError::Fatal(format!("corrupt delay job: {e}")))
}

impl EmbeddedDelayQueue {
    /// Open the queue; deliveries that were never acked become ready again.
    pub fn open(db: &sled::Db, name: &str, clock: SharedClock) -> Result<Self, IoError> {
        let tree = db.open_tree(format!("delay_queue/{name}"))?;
        let mut batch = sled::Batch::default();
        for item in tree.scan_prefix(b"I") {
            let (k, v) = item?;
            let mut s = de(&v)?;
            s.redelivered = true;
            batch.remove(k);
            batch.insert(&ready_key(s.job.due_at, db.generate_id()?)[..], ser(&s));
        }
        tree.apply_batch(batch)?;
        let (version, _) = watch::channel(0);
        Ok(EmbeddedDelayQueue {
            inner: Arc::new(Inner {
                db: db.clone(),
                tree,
                clock,
                take: Mutex::new(()),
                version,
            }),
        })
    }

    /// Jobs waiting (ready or in flight).
    pub fn len(&self) -> usize {
        self.inner.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.tree.is_empty()
    }

    async fn try_take(&self) -> Result<Result<Delivery, Option<i64>>, IoError> {
        let _g = self.inner.take.lock().await;
        let Some(first) = self.inner.tree.scan_prefix(b"R").next() else {
            return Ok(Err(None));
        };
        let (k, v) = first?;
        let s = de(&v)?;
        if s.job.due_at > self.inner.clock.now_ms() {
            return Ok(Err(Some(s.job.due_at)));
        }
        let tag = self.inner.db.generate_id()?;
        let mut batch = sled::Batch::default();
        batch.remove(k);
        batch.insert(&inflight_key(tag)[..], v);
        self.inner.tree.apply_batch(batch)?;
        Ok(Ok(Delivery {
            tag,
            job: s.job,
            redelivered: s.redelivered,
        }))
    }
}

#[async_trait::async_trait]
impl DelayQueue for EmbeddedDelayQueue {
    async fn publish(&self, job: &Job) -> Result<(), IoError> {
        let id = self.inner.db.generate_id()?;
        let stored = Stored {
            job: job.clone(),
            redelivered: false,
        };
        self.inner
            .tree
            .insert(&ready_key(job.due_at, id)[..], ser(&stored))?;
        crate::io::flush_db(&self.inner.db).await?;
        self.inner.version.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn next_due(&self, wait: Duration) -> Result<Option<Delivery>, IoError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut version = self.inner.version.subscribe();
        loop {
            version.borrow_and_update();
            let due = match self.try_take().await? {
                Ok(d) => return Ok(Some(d)),
                Err(due) => due,
            };
            let sleep = match due {
                Some(at) => self.inner.clock.sleep_until(at),
                None => Box::pin(futures::future::pending()),
            };
            tokio::select! {
                _ = sleep => {}
                _ = version.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    async fn ack(&self, tag: u64) -> Result<(), IoError> {
        self.inner.tree.remove(inflight_key(tag))?;
        Ok(())
    }

    async fn requeue(&self, tag: u64) -> Result<(), IoError> {
        let _g = self.inner.take.lock().await;
        if let Some(v) = self.inner.tree.get(inflight_key(tag))? {
            let mut s = de(&v)?;
            s.redelivered = true;
            let mut batch = sled::Batch::default();
            batch.remove(&inflight_key(tag)[..]);
            batch.insert(
                &ready_key(s.job.due_at, self.inner.db.generate_id()?)[..],
                ser(&s),
            );
            self.inner.tree.apply_batch(batch)?;
            self.inner.version.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    async fn healthcheck(&self) -> Result<(), IoError> {
        self.inner.tree.get(b"health")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::io::store::reopen;
    use rand::seq::SliceRandom;

    fn job(i: u64, due: i64) -> Job {
        Job {
            campaign_id: format!("c{i}"),
            batch: i,
            due_at: due,
            command_id: format!("x{i}"),
        }
    }

    #[tokio::test]
    async fn delivers_in_due_order_whatever_the_publish_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let clock = ManualClock::new(0);
        let q = EmbeddedDelayQueue::open(&db, "t", Arc::new(clock.clone())).unwrap();
        let mut dues: Vec<i64> = (0..50).map(|i| 1000 + i * 10).collect();
        dues.shuffle(&mut rand::thread_rng());
        for (i, d) in dues.iter().enumerate() {
            q.publish(&job(i as u64, *d)).await.unwrap();
        }
        assert!(q
            .next_due(Duration::from_millis(20))
            .await
            .unwrap()
            .is_none());
        clock.set(10_000);
        let mut got = Vec::new();
        while let Some(d) = q.next_due(Duration::from_millis(20)).await.unwrap() {
            got.push(d.job.due_at);
            q.ack(d.tag).await.unwrap();
        }
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted);
        assert_eq!(got.len(), 50);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn waits_for_due_time_then_fires() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let clock = ManualClock::new(0);
        let q = EmbeddedDelayQueue::open(&db, "t", Arc::new(clock.clone())).unwrap();
        q.publish(&job(1, 500)).await.unwrap();
        let q2 = q.clone();
        let h = tokio::spawn(async move { q2.next_due(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!h.is_finished());
        clock.set(500);
        let d = h.await.unwrap().unwrap().unwrap();
        assert_eq!(d.job.batch, 1);
    }

    #[tokio::test]
    async fn unacked_jobs_come_back_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1000));
        {
            let db = sled::open(dir.path()).unwrap();
            let q = EmbeddedDelayQueue::open(&db, "t", clock.clone()).unwrap();
            q.publish(&job(1, 10)).await.unwrap();
            q.publish(&job(2, 20)).await.unwrap();
            let d = q
                .next_due(Duration::from_millis(10))
                .await
                .unwrap()
                .unwrap();
            q.ack(d.tag).await.unwrap();
            let d2 = q
                .next_due(Duration::from_millis(10))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d2.job.batch, 2);
            db.flush().unwrap();
            // "crash" holding d2 unacked
        }
        let db = reopen(dir.path());
        let q = EmbeddedDelayQueue::open(&db, "t", clock).unwrap();
        let d = q
            .next_due(Duration::from_millis(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.job.batch, 2);
        assert!(d.redelivered);
        q.requeue(d.tag).await.unwrap();
        let d = q
            .next_due(Duration::from_millis(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.job.batch, 2);
        q.ack(d.tag).await.unwrap();
        assert!(q
            .next_due(Duration::from_millis(10))
            .await
            .unwrap()
            .is_none());
    }
}
