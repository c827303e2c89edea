//! Restart policy as plain data, and the pure logic that applies it: which
//! children a failure restarts (one-for-one, one-for-all, rest-for-one),
//! whether the restart intensity (max restarts within a period) is exceeded,
//! and how long to back off (exponential, capped, with jitter).

use crate::config::SupervisionConfig;
use std::collections::VecDeque;
use std::time::Duration;

/// OTP restart strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the failed child.
    OneForOne,
    /// Restart every child.
    OneForAll,
    /// Restart the failed child and every child started after it.
    RestForOne,
}

impl Strategy {
    /// Indices of the children to restart when child `failed` of `n` fails.
    pub fn affected(self, failed: usize, n: usize) -> Vec<usize> {
        match self {
            Strategy::OneForOne => vec![failed],
            Strategy::OneForAll => (0..n).collect(),
            Strategy::RestForOne => (failed..n).collect(),
        }
    }
}

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartType {
    /// Always (after a failure or a normal stop).
    Permanent,
    /// Only after a failure.
    Transient,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    pub strategy: Strategy,
    /// Restarts allowed within `period` before escalating.
    pub max_restarts: u32,
    pub period: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Fraction of the delay that is randomised (0 = none, 1 = full jitter).
    pub jitter: f64,
}

impl RestartPolicy {
    pub fn from_config(strategy: Strategy, c: &SupervisionConfig) -> Self {
        RestartPolicy {
            strategy,
            max_restarts: c.max_restarts as u32,
            period: Duration::from_millis(c.period_ms),
            backoff_base: Duration::from_millis(c.backoff_base_ms),
            backoff_max: Duration::from_millis(c.backoff_max_ms),
            jitter: 0.5,
        }
    }
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Restart after `delay`; `attempt` counts restarts within the period.
    Restart { delay: Duration, attempt: u32 },
    /// The intensity is exceeded: give up and fail the supervisor.
    Escalate { restarts: u32 },
}

/// Restart history of one supervisor.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    history: VecDeque<i64>,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker {
            policy,
            history: VecDeque::new(),
        }
    }

    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Record a failure at `now_ms`. `jitter_sample` in [0, 1) randomises
    /// the delay (pass a random number; tests pass a constant).
    pub fn on_failure(&mut self, now_ms: i64, jitter_sample: f64) -> Decision {
        let period = self.policy.period.as_millis() as i64;
        while let Some(&t) = self.history.front() {
            if now_ms - t >= period {
                self.history.pop_front();
            } else {
                break;
            }
        }
        if self.history.len() as u32 >= self.policy.max_restarts {
            return Decision::Escalate {
                restarts: self.history.len() as u32,
            };
        }
        self.history.push_back(now_ms);
        let attempt = self.history.len() as u32;
        Decision::Restart {
            delay: self.delay(attempt, jitter_sample),
            attempt,
        }
    }

    /// Backoff of the `attempt`-th restart (1-based) within the period.
    pub fn delay(&self, attempt: u32, jitter_sample: f64) -> Duration {
        let base = self.policy.backoff_base.as_secs_f64();
        let max = self.policy.backoff_max.as_secs_f64();
        let exp = base * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let capped = exp.min(max);
        let j = self.policy.jitter.clamp(0.0, 1.0);
        let sample = jitter_sample.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (1.0 - j) + capped * j * sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32) -> RestartPolicy {
        RestartPolicy {
            strategy: Strategy::OneForOne,
            max_restarts: max,
            period: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            jitter: 0.5,
        }
    }

    #[test]
    fn strategies_pick_children() {
        assert_eq!(Strategy::OneForOne.affected(1, 4), vec![1]);
        assert_eq!(Strategy::OneForAll.affected(1, 3), vec![0, 1, 2]);
        assert_eq!(Strategy::RestForOne.affected(1, 4), vec![1, 2, 3]);
    }

    #[test]
    fn backoff_grows_exponentially_and_caps() {
        let mut t = RestartTracker::new(policy(10));
        let mut delays = Vec::new();
        for i in 0..6 {
            match t.on_failure(i, 1.0) {
                Decision::Restart { delay, attempt } => {
                    assert_eq!(attempt, i as u32 + 1);
                    delays.push(delay.as_millis());
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let t = RestartTracker::new(policy(10));
        let lo = t.delay(3, 0.0);
        let hi = t.delay(3, 0.999);
        assert_eq!(lo, Duration::from_millis(200));
        assert!(hi > lo && hi <= Duration::from_millis(400));
    }

    #[test]
    fn escalates_when_intensity_exceeded_and_forgets_old_failures() {
        let mut t = RestartTracker::new(policy(3));
        for i in 0..3 {
            assert!(matches!(
                t.on_failure(i * 1000, 0.5),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(t.on_failure(3000, 0.5), Decision::Escalate { restarts: 3 });
        // Outside the 10 s period the old restarts no longer count.
        let mut t = RestartTracker::new(policy(3));
        for i in 0..3 {
            t.on_failure(i * 1000, 0.5);
        }
        assert!(matches!(
            t.on_failure(12_500, 0.5),
            Decision::Restart { attempt: 1, .. }
        ));
    }

    #[test]
    fn zero_restarts_always_escalates() {
        let mut t = RestartTracker::new(policy(0));
        assert!(matches!(t.on_failure(0, 0.0), Decision::Escalate { .. }));
    }
}
