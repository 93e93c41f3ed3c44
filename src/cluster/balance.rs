//! Load-balancing algorithms over a weighted endpoint list, precomputed at build time so a
//! pick costs an atomic add or a binary search and takes no lock.

use crate::hash::{fnv, mix, FNV_OFFSET};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed round-robin cycle; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 65_536;
/// Ring points per unit of (gcd-reduced) weight, as in ketama.
const RING_POINTS_PER_WEIGHT: u64 = 160;
/// Largest ring; more points are scaled down to fit.
const MAX_RING: u64 = 1 << 20;

/// Smooth weighted round robin (nginx's algorithm), unrolled into one cycle: every cycle of
/// `sum(weights)` picks gives each index exactly its weight, spread out rather than bunched.
#[derive(Debug)]
pub struct Schedule {
    order: Box<[u32]>,
    next: AtomicUsize,
}

impl Schedule {
    /// `None` when every weight is 0.
    pub fn new(weights: &[u32]) -> Option<Schedule> {
        let weights = reduce(weights, MAX_SCHEDULE);
        let total: i64 = weights.iter().map(|w| *w as i64).sum();
        if total == 0 {
            return None;
        }
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += *w as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best as u32);
        }
        Some(Schedule {
            order: order.into_boxed_slice(),
            // Start at a random point so that many remoras do not move in lockstep.
            next: AtomicUsize::new(fastrand::usize(..total as usize)),
        })
    }

    pub fn next(&self) -> usize {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.order[n % self.order.len()] as usize
    }
}

/// Divides weights by their gcd, then scales them down until they sum to at most `cap`
/// (never to zero for a positive weight).
fn reduce(weights: &[u32], cap: u64) -> Vec<u64> {
    let g = weights.iter().fold(0u64, |g, w| gcd(g, *w as u64)).max(1);
    let mut w: Vec<u64> = weights.iter().map(|w| *w as u64 / g).collect();
    let sum: u64 = w.iter().sum();
    if sum > cap {
        w = w
            .iter()
            .map(|x| if *x == 0 { 0 } else { (x * cap / sum).max(1) })
            .collect();
    }
    w
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weighted random choice by binary search over cumulative weights.
#[derive(Debug)]
pub struct Cumulative {
    ends: Box<[u64]>,
}

impl Cumulative {
    pub fn new(weights: &[u32]) -> Option<Cumulative> {
        let mut sum = 0u64;
        let ends: Box<[u64]> = weights
            .iter()
            .map(|w| {
                sum += *w as u64;
                sum
            })
            .collect();
        (sum > 0).then_some(Cumulative { ends })
    }

    pub fn pick(&self) -> usize {
        let total = *self.ends.last().expect("non-empty");
        let x = fastrand::u64(..total);
        self.ends.partition_point(|end| *end <= x)
    }
}

/// A consistent-hash ring: points hashed from each endpoint's address, so adding or removing
/// one endpoint moves only the keys that land next to its points.
#[derive(Debug)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Ring {
    pub fn new(ids: &[String], weights: &[u32]) -> Option<Ring> {
        let weights = reduce(weights, MAX_RING / RING_POINTS_PER_WEIGHT);
        let mut points = Vec::new();
        for (i, (id, w)) in ids.iter().zip(&weights).enumerate() {
            // The id's hash state once, then each replica number fed into a copy of it: no
            // string per point (a ring has up to a million of them).
            let seed = fnv(FNV_OFFSET, id.as_bytes());
            for replica in 0..w * RING_POINTS_PER_WEIGHT {
                let h = mix(fnv(seed, &replica.to_le_bytes()));
                points.push((h, i as u32));
            }
        }
        if points.is_empty() {
            return None;
        }
        points.sort_unstable();
        Some(Ring {
            points: points.into_boxed_slice(),
        })
    }

    pub fn pick(&self, key: u64) -> usize {
        self.walk(key).next().expect("a ring has points")
    }

    /// Endpoint indices in ring order from `key`'s point, once around the ring (indices
    /// repeat; a caller looking for a distinct endpoint skips the ones it has seen).
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < key);
        let n = self.points.len();
        (0..n).map(move |k| self.points[(start + k) % n].1 as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_gives_exact_proportions_each_cycle_and_interleaves() {
        let s = Schedule::new(&[3, 1]).unwrap();
        let picks: Vec<usize> = (0..8).map(|_| s.next()).collect();
        assert_eq!(picks.iter().filter(|p| **p == 0).count(), 6);
        // Smooth: the weight-1 endpoint never goes twice in a row.
        assert!(!picks.windows(2).any(|w| w == [1, 1]));
        let s = Schedule::new(&[90, 10]).unwrap();
        let n0 = (0..1000).filter(|_| s.next() == 0).count();
        assert_eq!(n0, 900);
        assert!(Schedule::new(&[0, 0]).is_none());
    }

    #[test]
    fn schedule_scales_huge_weights_down() {
        let s = Schedule::new(&[1_000_000, 999_999, 1]).unwrap();
        assert!(s.order.len() as u64 <= MAX_SCHEDULE);
        assert!(s.order.contains(&2));
    }

    #[test]
    fn cumulative_respects_weights_and_skips_zero() {
        let c = Cumulative::new(&[1, 0, 3]).unwrap();
        let mut counts = [0; 3];
        for _ in 0..40_000 {
            counts[c.pick()] += 1;
        }
        assert_eq!(counts[1], 0);
        let share = counts[2] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{counts:?}");
    }

    #[test]
    fn ring_moves_few_keys_when_an_endpoint_is_added() {
        let ids: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:80")).collect();
        let before = Ring::new(&ids, &[1; 4]).unwrap();
        let mut more = ids.clone();
        more.push("10.0.0.5:80".into());
        let after = Ring::new(&more, &[1; 5]).unwrap();
        let keys = 10_000u64;
        let moved = (0..keys)
            .map(|k| crate::hash::hash_bytes(&k.to_le_bytes()))
            .filter(|h| {
                let (a, b) = (before.pick(*h), after.pick(*h));
                a != b
            })
            .count();
        // Ideal is 1/5 of the keys, all of them moving to the new endpoint.
        assert!(moved < keys as usize * 3 / 10, "moved {moved}");
        assert!(moved > keys as usize / 10, "moved {moved}");
    }
}
