//! The node's bound on probe work (docs/engines.md, "What probes may
//! cost the node"). A spec may ask for 8 probes every 100 ms and a tenant
//! may run 128 engines: about 10 000 probe runs a second, each a thread
//! of the agent, an exec probe also a root shim in the agent's cgroup
//! until it joins the engine's, and each result a rebuild of every
//! engine's status. That work is the agent's, outside the tenant's budget.
//!
//! The gate lets at most `rate` runs start a second (a token bucket
//! holding one second's worth) and `concurrency` run at once. A due run
//! past either waits in a queue taken round-robin by engine, so one
//! engine's probes cannot keep another's waiting; a probe already waiting
//! is not queued twice. Pure: the caller passes the time.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use leasehold_engines::supervisor::InstanceId;

/// Default `[engines] probe_rate`: room for every engine's 8 probes at
/// the default 10 s interval (128 × 8 / 10 = 102.4 a second).
pub const DEFAULT_RATE: u32 = 128;
/// Default `[engines] probe_concurrency`.
pub const DEFAULT_CONCURRENCY: u32 = 32;
/// Bounds of `[engines] probe_rate` (runs a second).
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Bounds of `[engines] probe_concurrency`.
pub const CONCURRENCY_RANGE: std::ops::RangeInclusive<u32> = 1..=1024;

/// One due probe run: which engine (name and incarnation), instance,
/// probe index and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub engine: String,
    pub incarnation: u64,
    pub instance: InstanceId,
    pub probe: usize,
    pub timeout: Duration,
}

/// A run let through: `waited` when it could not start as it came due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub due: Due,
    pub waited: bool,
}

struct Queued {
    due: Due,
    /// Left in the queue by a `take`: it waited.
    passed: bool,
}

pub struct ProbeGate {
    rate: u32,
    concurrency: u32,
    /// Tokens, in millionths of a run (integers: no drift).
    micro: u64,
    refilled: Instant,
    running: u32,
    queue: BTreeMap<String, VecDeque<Queued>>,
    /// The engine taken from last: the next take starts after it.
    last: Option<String>,
}

const MICRO: u64 = 1_000_000;

impl ProbeGate {
    /// A full bucket at `now`. `rate` and `concurrency` are at least 1
    /// (the config's bounds).
    pub fn new(rate: u32, concurrency: u32, now: Instant) -> Self {
        let rate = rate.max(1);
        Self {
            rate,
            concurrency: concurrency.max(1),
            micro: u64::from(rate) * MICRO,
            refilled: now,
            running: 0,
            queue: BTreeMap::new(),
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled);
        let add = dt.as_micros().saturating_mul(u128::from(self.rate));
        let cap = u64::from(self.rate) * MICRO;
        self.micro = u64::try_from(u128::from(self.micro).saturating_add(add))
            .unwrap_or(u64::MAX)
            .min(cap);
        self.refilled = now;
    }

    /// A probe run came due. False when the same probe of the same
    /// instance is already waiting (it is not queued twice).
    pub fn offer(&mut self, due: Due) -> bool {
        let q = self.queue.entry(due.engine.clone()).or_default();
        if q.iter().any(|w| {
            w.due.incarnation == due.incarnation
                && w.due.instance == due.instance
                && w.due.probe == due.probe
        }) {
            return false;
        }
        q.push_back(Queued { due, passed: false });
        true
    }

    /// The runs that may start now, one engine after another; each holds a
    /// slot until [`ProbeGate::finished`]. `valid` drops a waiting run
    /// whose engine, instance or probe is gone (no token spent on it).
    pub fn take(&mut self, now: Instant, valid: impl Fn(&Due) -> bool) -> Vec<Admitted> {
        self.refill(now);
        let mut out = Vec::new();
        while self.running < self.concurrency && self.micro >= MICRO {
            let Some(name) = self.next_engine() else {
                break;
            };
            let q = self
                .queue
                .get_mut(&name)
                .expect("next_engine names a queue");
            let w = q.pop_front().expect("queues are never left empty");
            if q.is_empty() {
                self.queue.remove(&name);
            }
            self.last = Some(name);
            if !valid(&w.due) {
                continue;
            }
            self.micro -= MICRO;
            self.running += 1;
            out.push(Admitted {
                due: w.due,
                waited: w.passed,
            });
        }
        for q in self.queue.values_mut() {
            for w in q {
                w.passed = true;
            }
        }
        out
    }

    /// The first engine with a waiting run after the last one taken from.
    fn next_engine(&self) -> Option<String> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after = match &self.last {
            Some(l) => self
                .queue
                .range::<str, _>((Excluded(l.as_str()), Unbounded))
                .next(),
            None => None,
        };
        after
            .or_else(|| self.queue.iter().next())
            .map(|(k, _)| k.clone())
    }

    /// A run let through by `take` ended.
    pub fn finished(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// When a waiting run could start for the rate: None when nothing
    /// waits, or every slot is held (a run's end wakes the caller).
    pub fn wake_at(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() || self.running >= self.concurrency {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.refilled);
        let have =
            u128::from(self.micro) + elapsed.as_micros().saturating_mul(u128::from(self.rate));
        let short = u128::from(MICRO).saturating_sub(have);
        // Rounded up to the microsecond: woken early, nothing could start.
        let us = short.div_ceil(u128::from(self.rate));
        Some(now + Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX)))
    }

    /// Every waiting run dropped (the tenancy's engines are forgotten).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.last = None;
    }

    /// Runs waiting now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.queue.values().map(VecDeque::len).sum()
    }

    /// Runs holding a slot now.
    #[cfg(test)]
    pub fn running(&self) -> u32 {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(engine: &str, probe: usize) -> Due {
        Due {
            engine: engine.into(),
            incarnation: 1,
            instance: InstanceId(1),
            probe,
            timeout: Duration::from_millis(50),
        }
    }

    fn names(a: &[Admitted]) -> Vec<String> {
        a.iter()
            .map(|a| format!("{}{}", a.due.engine, a.due.probe))
            .collect()
    }

    /// Within the bucket a run starts as it comes due; past it, runs start
    /// at the rate and say they waited.
    #[test]
    fn runs_start_at_most_at_the_rate() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(4, 100, t0);
        for p in 0..6 {
            assert!(g.offer(due("a", p)));
        }
        let first = g.take(t0, |_| true);
        assert_eq!(first.len(), 4, "a second's worth at once");
        assert!(first.iter().all(|a| !a.waited));
        assert!(g.take(t0, |_| true).is_empty());
        // A token every 250 ms: woken for it, not before.
        let at = g.wake_at(t0).unwrap();
        assert_eq!(at - t0, Duration::from_millis(250));
        assert!(g.take(at - Duration::from_micros(1), |_| true).is_empty());
        let next = g.take(at, |_| true);
        assert_eq!(names(&next), ["a4"]);
        assert!(next[0].waited);
        // Over any window, at most a second's worth plus the rate.
        let mut started = 4 + 1;
        let mut now = at;
        for i in 0..400 {
            g.offer(due("b", i % 8));
            now += Duration::from_millis(10);
            started += g.take(now, |_| true).len();
        }
        let secs = (now - t0).as_secs_f64();
        assert!(
            started as f64 <= 4.0 + 4.0 * secs + 1.0,
            "{started} in {secs} s"
        );
        assert!(started >= 16, "{started}: the rate is also reached");
    }

    /// At most `concurrency` hold a slot; an ending run frees one.
    #[test]
    fn at_most_concurrency_run_at_once() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(1000, 2, t0);
        for p in 0..5 {
            g.offer(due("a", p));
        }
        assert_eq!(g.take(t0, |_| true).len(), 2);
        assert_eq!(g.running(), 2);
        assert_eq!(g.wake_at(t0), None, "woken by an end, not a timer");
        assert!(g.take(t0 + Duration::from_secs(5), |_| true).is_empty());
        g.finished();
        let next = g.take(t0 + Duration::from_secs(5), |_| true);
        assert_eq!(names(&next), ["a2"]);
        assert!(next[0].waited);
    }

    /// A probe already waiting is not queued again.
    #[test]
    fn a_waiting_probe_is_not_doubled() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(1, 1, t0);
        g.offer(due("a", 0));
        assert_eq!(g.take(t0, |_| true).len(), 1);
        assert!(g.offer(due("a", 0)));
        assert!(!g.offer(due("a", 0)));
        let mut other = due("a", 0);
        other.instance = InstanceId(2);
        assert!(g.offer(other), "another instance's is another run");
        assert_eq!(g.waiting(), 2);
    }

    /// Engines are taken in turn: a busy engine's queue does not hold
    /// another's runs behind it.
    #[test]
    fn engines_take_turns() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(1, 100, t0);
        for p in 0..8 {
            g.offer(due("busy", p));
        }
        g.offer(due("calm", 0));
        g.offer(due("quiet", 0));
        let mut order = Vec::new();
        let mut now = t0;
        for _ in 0..5 {
            now += Duration::from_secs(1);
            order.extend(names(&g.take(now, |_| true)));
        }
        assert_eq!(order, ["busy0", "calm0", "quiet0", "busy1", "busy2"]);
    }

    /// A run whose engine or instance went while it waited is dropped
    /// without spending a token.
    #[test]
    fn gone_runs_are_dropped_free() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(1, 100, t0);
        g.offer(due("gone", 0));
        g.offer(due("here", 0));
        let a = g.take(t0, |d| d.engine != "gone");
        assert_eq!(names(&a), ["here0"]);
        assert_eq!(g.waiting(), 0);
        g.offer(due("x", 0));
        g.clear();
        assert_eq!(g.waiting(), 0);
        assert_eq!(g.wake_at(t0), None);
    }
}
