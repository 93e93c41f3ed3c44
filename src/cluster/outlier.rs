//! Passive health per endpoint: the classic breaker (closed → open → half-open) driven by
//! Envoy's consecutive-failure ejection rules.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::raw::RawOutlierDetection;

/// The outcome of one request to an endpoint, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A response with this status.
    Status(u16),
    /// The connection could not be opened (a local-origin failure).
    ConnectFailure,
    /// Reset before a response, or the per-try timeout hit.
    NoResponse,
}

/// A breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Ejected until the instant.
    Open(Instant),
    /// Letting a few probes through.
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open(_) => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Outlier detection settings with defaults applied.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub half_open_probes: u32,
}

impl OutlierConfig {
    pub fn new(raw: &RawOutlierDetection) -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: raw.consecutive_5xx.unwrap_or(5),
            consecutive_gateway_failure: raw.consecutive_gateway_failure.unwrap_or(5),
            consecutive_local_origin_failure: raw.consecutive_local_origin_failure.unwrap_or(5),
            interval: raw.interval.map_or(Duration::from_secs(10), |d| d.0),
            base_ejection_time: raw
                .base_ejection_time
                .map_or(Duration::from_secs(30), |d| d.0),
            max_ejection_time: raw
                .max_ejection_time
                .map_or(Duration::from_secs(300), |d| d.0),
            max_ejection_percent: raw.max_ejection_percent.unwrap_or(10),
            half_open_probes: raw.half_open_probes.unwrap_or(1).max(1),
        }
    }
}

/// What a transition means to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: &'static str,
}

#[derive(Debug)]
struct State {
    breaker: BreakerState,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    times_ejected: u32,
    /// When the breaker last closed, to forget past ejections after healthy intervals.
    closed_since: Instant,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    probes: AtomicU32,
    /// Lock-free mirrors for the hot path: half-open now, open (ejected) now.
    half_open: AtomicBool,
    open: AtomicBool,
    /// Lock-free mirror: some failure is counted or the breaker is not closed, so a
    /// success has something to reset.
    dirty: AtomicBool,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State {
                breaker: BreakerState::Closed,
                consecutive_5xx: 0,
                consecutive_gateway: 0,
                consecutive_local: 0,
                times_ejected: 0,
                closed_since: Instant::now(),
            }),
            probes: AtomicU32::new(0),
            half_open: AtomicBool::new(false),
            open: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        self.state.lock().expect("breaker lock").breaker
    }

    pub fn times_ejected(&self) -> u32 {
        self.state.lock().expect("breaker lock").times_ejected
    }

    /// Records an outcome. `may_eject` says whether the cluster's ejection cap allows one
    /// more (asked only when this outcome would eject). Returns the transition, if any.
    pub fn observe(
        &self,
        cfg: &OutlierConfig,
        obs: Observation,
        may_eject: impl FnOnce() -> bool,
        now: Instant,
    ) -> Option<Transition> {
        let failed = !matches!(obs, Observation::Status(code) if code < 500);
        if !failed && !self.dirty.load(Ordering::Acquire) {
            // The common case, a success with nothing to reset: no lock.
            return None;
        }
        let mut s = self.state.lock().expect("breaker lock");
        let t = self.observe_locked(cfg, &mut s, obs, may_eject, now);
        self.mirror(&s);
        t
    }

    fn mirror(&self, s: &State) {
        self.half_open
            .store(s.breaker == BreakerState::HalfOpen, Ordering::Release);
        self.open.store(
            matches!(s.breaker, BreakerState::Open(_)),
            Ordering::Release,
        );
        let dirty = s.breaker != BreakerState::Closed
            || s.consecutive_5xx + s.consecutive_gateway + s.consecutive_local > 0;
        self.dirty.store(dirty, Ordering::Release);
    }

    /// Ejected right now (lock-free).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Half-open right now (lock-free).
    pub fn is_half_open(&self) -> bool {
        self.half_open.load(Ordering::Acquire)
    }

    fn observe_locked(
        &self,
        cfg: &OutlierConfig,
        s: &mut State,
        obs: Observation,
        may_eject: impl FnOnce() -> bool,
        now: Instant,
    ) -> Option<Transition> {
        let (is_5xx, is_gateway, is_local) = match obs {
            Observation::Status(code) => (code >= 500, (502..=504).contains(&code), false),
            Observation::ConnectFailure => (true, true, true),
            Observation::NoResponse => (true, true, false),
        };
        if s.breaker == BreakerState::HalfOpen {
            let _ = self
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            return Some(if is_5xx {
                self.eject(cfg, s, now, "half_open_probe_failed")
            } else {
                Self::close(s, now)
            });
        }
        if !is_5xx {
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            s.consecutive_local = 0;
            return None;
        }
        s.consecutive_5xx += 1;
        s.consecutive_gateway = if is_gateway {
            s.consecutive_gateway + 1
        } else {
            0
        };
        s.consecutive_local = if is_local { s.consecutive_local + 1 } else { 0 };
        let reason = if s.consecutive_local >= cfg.consecutive_local_origin_failure {
            "consecutive_local_origin_failure"
        } else if s.consecutive_gateway >= cfg.consecutive_gateway_failure {
            "consecutive_gateway_failure"
        } else if s.consecutive_5xx >= cfg.consecutive_5xx {
            "consecutive_5xx"
        } else {
            return None;
        };
        if s.breaker != BreakerState::Closed || !may_eject() {
            return None;
        }
        Some(self.eject(cfg, s, now, reason))
    }

    fn eject(
        &self,
        cfg: &OutlierConfig,
        s: &mut State,
        now: Instant,
        reason: &'static str,
    ) -> Transition {
        // Healthy intervals since the last close each forget one past ejection.
        if s.breaker == BreakerState::Closed && !cfg.interval.is_zero() {
            let forgiven = (now.saturating_duration_since(s.closed_since).as_millis()
                / cfg.interval.as_millis().max(1)) as u32;
            s.times_ejected = s.times_ejected.saturating_sub(forgiven);
        }
        s.times_ejected += 1;
        let time = (cfg.base_ejection_time * s.times_ejected).min(cfg.max_ejection_time);
        let from = s.breaker;
        s.breaker = BreakerState::Open(now + time);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        s.consecutive_local = 0;
        Transition {
            from,
            to: s.breaker,
            reason,
        }
    }

    fn close(s: &mut State, now: Instant) -> Transition {
        let from = s.breaker;
        s.breaker = BreakerState::Closed;
        s.closed_since = now;
        Transition {
            from,
            to: BreakerState::Closed,
            reason: "recovered",
        }
    }

    /// Open → half-open once the ejection time has passed.
    pub fn expire(&self, now: Instant) -> Option<Transition> {
        let mut s = self.state.lock().expect("breaker lock");
        match s.breaker {
            BreakerState::Open(until) if until <= now => {
                s.breaker = BreakerState::HalfOpen;
                self.probes.store(0, Ordering::Release);
                self.mirror(&s);
                Some(Transition {
                    from: BreakerState::Open(until),
                    to: BreakerState::HalfOpen,
                    reason: "ejection_time_elapsed",
                })
            }
            _ => None,
        }
    }

    /// A passing active health check ends an ejection at once.
    pub fn reset(&self, now: Instant) -> Option<Transition> {
        let mut s = self.state.lock().expect("breaker lock");
        if s.breaker == BreakerState::Closed {
            return None;
        }
        let mut t = Self::close(&mut s, now);
        self.mirror(&s);
        t.reason = "health_check_passed";
        Some(t)
    }

    /// Gives back a probe slot whose request ended without an outcome (the client went away).
    pub fn release_probe(&self) {
        let _ = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// In half-open, admits up to `limit` probes at once.
    pub fn try_probe(&self, limit: u32) -> bool {
        self.probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig::new(&RawOutlierDetection {
            consecutive_5xx: Some(3),
            base_ejection_time: Some(crate::config::duration::Dur::secs(10)),
            max_ejection_time: Some(crate::config::duration::Dur::secs(25)),
            ..Default::default()
        })
    }

    #[test]
    fn trips_after_consecutive_failures_and_backs_off_longer_each_time() {
        let (c, b, t0) = (cfg(), Breaker::default(), Instant::now());
        assert!(b
            .observe(&c, Observation::Status(503), || true, t0)
            .is_none());
        assert!(
            b.observe(&c, Observation::Status(200), || true, t0)
                .is_none(),
            "success resets"
        );
        assert!(b
            .observe(&c, Observation::Status(500), || true, t0)
            .is_none());
        assert!(b
            .observe(&c, Observation::Status(500), || true, t0)
            .is_none());
        let t = b
            .observe(&c, Observation::Status(500), || true, t0)
            .unwrap();
        assert_eq!(t.to, BreakerState::Open(t0 + Duration::from_secs(10)));
        assert_eq!(t.reason, "consecutive_5xx");
        assert!(b.expire(t0 + Duration::from_secs(9)).is_none());
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.expire(t1).unwrap().to, BreakerState::HalfOpen);
        assert!(b.try_probe(1));
        assert!(!b.try_probe(1), "one probe at a time");
        // The probe fails: open again, for twice as long.
        let t = b.observe(&c, Observation::NoResponse, || true, t1).unwrap();
        assert_eq!(t.to, BreakerState::Open(t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        b.expire(t2).unwrap();
        assert!(b.try_probe(1));
        let t = b
            .observe(&c, Observation::Status(200), || true, t2)
            .unwrap();
        assert_eq!(t.to, BreakerState::Closed);
        // A third ejection is capped at max_ejection_time.
        for _ in 0..3 {
            b.observe(&c, Observation::ConnectFailure, || true, t2);
        }
        assert_eq!(b.state(), BreakerState::Open(t2 + Duration::from_secs(25)));
    }

    #[test]
    fn the_ejection_cap_keeps_an_endpoint_in() {
        let (c, b, t0) = (cfg(), Breaker::default(), Instant::now());
        for _ in 0..10 {
            assert!(b
                .observe(&c, Observation::Status(500), || false, t0)
                .is_none());
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
