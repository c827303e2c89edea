//! Business time: the system clock in production, a scaled clock for the
//! demo's accelerated campaigns, and a manual clock for deterministic tests.
//! Due times, event-time windows and idle detection all read a [`Clock`].

use futures::future::BoxFuture;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A source of epoch-millisecond time that can be slept on.
pub trait Clock: Send + Sync + 'static {
    /// Now, in epoch milliseconds.
    fn now_ms(&self) -> i64;
    /// Resolve once `now_ms() >= at_ms`.
    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()>;
}

pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_now_ms()
    }
    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()> {
        let wait = (at_ms - system_now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// Time that runs `factor` times faster than the wall clock from `origin_ms`.
#[derive(Debug, Clone)]
pub struct ScaledClock {
    origin_ms: i64,
    started: Instant,
    factor: f64,
}

impl ScaledClock {
    pub fn new(origin_ms: i64, factor: f64) -> Self {
        ScaledClock {
            origin_ms,
            started: Instant::now(),
            factor: factor.max(0.001),
        }
    }
}

impl Clock for ScaledClock {
    fn now_ms(&self) -> i64 {
        self.origin_ms + (self.started.elapsed().as_secs_f64() * 1000.0 * self.factor) as i64
    }
    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()> {
        let ahead = (at_ms - self.now_ms()).max(0) as f64 / self.factor;
        // +1 ms so the scaled reading has certainly passed `at_ms` on wake.
        Box::pin(tokio::time::sleep(Duration::from_micros(
            (ahead * 1000.0) as u64 + 1000,
        )))
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
    tick: watch::Sender<i64>,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        let (tick, _) = watch::channel(start_ms);
        ManualClock {
            now: Arc::new(AtomicI64::new(start_ms)),
            tick,
        }
    }
    pub fn set(&self, ms: i64) {
        self.now.store(ms, Ordering::SeqCst);
        self.tick.send_replace(ms);
    }
    pub fn advance(&self, ms: i64) {
        let now = self.now.fetch_add(ms, Ordering::SeqCst) + ms;
        self.tick.send_replace(now);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()> {
        let mut rx = self.tick.subscribe();
        let now = self.now.clone();
        Box::pin(async move {
            while now.load(Ordering::SeqCst) < at_ms {
                if rx.changed().await.is_err() {
                    futures::future::pending::<()>().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers() {
        let c = ManualClock::new(1000);
        let s = c.sleep_until(1500);
        let h = tokio::spawn(s);
        c.advance(200);
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        c.advance(400);
        tokio::time::timeout(Duration::from_secs(1), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.now_ms(), 1600);
    }

    #[tokio::test]
    async fn scaled_clock_runs_faster() {
        let c = ScaledClock::new(0, 1000.0);
        let t0 = c.now_ms();
        c.sleep_until(t0 + 2000).await;
        assert!(c.now_ms() >= t0 + 2000);
    }
}
