//! Circuit breakers (Envoy's per-cluster thresholds): caps on connections, pending requests,
//! requests and retries in flight. Reaching one fails fast rather than queueing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::raw::RawCircuitBreakers;

/// Defaults for `circuit_breakers`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_RETRIES: usize = 3;

/// What a breaker limits; the `resource` label of the overflow metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Resource {
    pub fn label(self) -> &'static str {
        match self {
            Resource::Connections => "connections",
            Resource::PendingRequests => "pending_requests",
            Resource::Requests => "requests",
            Resource::Retries => "retries",
        }
    }
}

/// The four thresholds of one cluster and what is in use now.
pub struct CircuitBreakers {
    limits: [usize; 4],
    in_use: [AtomicUsize; 4],
}

/// One unit of a resource, given back when dropped.
pub struct Permit {
    breakers: Arc<CircuitBreakers>,
    resource: Resource,
}

impl CircuitBreakers {
    pub fn new(raw: Option<&RawCircuitBreakers>) -> Arc<CircuitBreakers> {
        let d = RawCircuitBreakers::default();
        let raw = raw.unwrap_or(&d);
        Arc::new(CircuitBreakers {
            limits: [
                raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                raw.max_pending_requests
                    .unwrap_or(DEFAULT_MAX_PENDING_REQUESTS),
                raw.max_requests.unwrap_or(DEFAULT_MAX_REQUESTS),
                raw.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            ],
            in_use: Default::default(),
        })
    }

    /// Takes one unit of `resource`, or `None` when the threshold is reached.
    pub fn try_acquire(self: &Arc<Self>, resource: Resource) -> Option<Permit> {
        let i = resource as usize;
        let limit = self.limits[i];
        self.in_use[i]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            breakers: self.clone(),
            resource,
        })
    }

    pub fn in_use(&self, resource: Resource) -> usize {
        self.in_use[resource as usize].load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breakers.in_use[self.resource as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_stop_at_the_limit_and_come_back_when_dropped() {
        let b = CircuitBreakers::new(Some(&RawCircuitBreakers {
            max_requests: Some(2),
            ..Default::default()
        }));
        let one = b.try_acquire(Resource::Requests).unwrap();
        let _two = b.try_acquire(Resource::Requests).unwrap();
        assert!(b.try_acquire(Resource::Requests).is_none());
        drop(one);
        assert!(b.try_acquire(Resource::Requests).is_some());
        assert_eq!(b.in_use(Resource::Requests), 1);
        // Other resources have their own defaults.
        let retries: Vec<_> = (0..3)
            .filter_map(|_| b.try_acquire(Resource::Retries))
            .collect();
        assert_eq!(retries.len(), 3);
        assert!(b.try_acquire(Resource::Retries).is_none());
    }
}
