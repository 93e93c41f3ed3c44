//! Retry budget (Linkerd's): over a sliding window, retries may add at most `ratio` of the
//! requests, plus a floor of `min_retries_per_second`. Lock-free: one bucket per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::raw::RawRetryBudget;

pub const DEFAULT_RATIO: f64 = 0.2;
pub const DEFAULT_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    buckets: Box<[Bucket]>,
    epoch: Instant,
}

impl RetryBudget {
    pub fn new(raw: Option<&RawRetryBudget>) -> RetryBudget {
        let d = RawRetryBudget::default();
        let raw = raw.unwrap_or(&d);
        let window = raw.window.map_or(DEFAULT_WINDOW, |w| w.0);
        let n = window.as_secs().clamp(1, 300) as usize;
        RetryBudget {
            ratio: raw.ratio.unwrap_or(DEFAULT_RATIO),
            min_per_second: raw.min_retries_per_second.unwrap_or(DEFAULT_MIN_PER_SECOND),
            buckets: (0..n)
                .map(|_| Bucket {
                    second: AtomicU64::new(u64::MAX),
                    requests: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                })
                .collect(),
            epoch: Instant::now(),
        }
    }

    fn bucket(&self) -> &Bucket {
        let now = self.epoch.elapsed().as_secs();
        let b = &self.buckets[now as usize % self.buckets.len()];
        let seen = b.second.load(Ordering::Acquire);
        if seen != now
            && b.second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.retries.store(0, Ordering::Release);
        }
        b
    }

    /// Counts a first attempt.
    pub fn deposit(&self) {
        self.bucket().requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, or says no.
    pub fn try_withdraw(&self) -> bool {
        let current = self.bucket();
        let now = self.epoch.elapsed().as_secs();
        let window = self.buckets.len() as u64;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in self.buckets.iter() {
            let s = b.second.load(Ordering::Acquire);
            if s != u64::MAX && now.saturating_sub(s) < window {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = self.min_per_second as f64 * window as f64 + self.ratio * requests as f64;
        if (retries as f64) < allowed {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::duration::Dur;

    #[test]
    fn retries_are_capped_by_ratio_plus_floor() {
        let budget = RetryBudget::new(Some(&RawRetryBudget {
            ratio: Some(0.2),
            min_retries_per_second: Some(1),
            window: Some(Dur::secs(10)),
        }));
        for _ in 0..100 {
            budget.deposit();
        }
        // 1/s × 10 s + 20% of 100 = 30.
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 30);
    }
}
