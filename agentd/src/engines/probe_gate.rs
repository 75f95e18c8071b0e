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
//! engine's many probes do not keep another's waiting for the rate; a
//! probe already waiting is not queued twice, and an engine's queue holds
//! only its current instance's runs (at most its 8 probes). Pure: the
//! caller passes the time.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use leasehold_engines::supervisor::InstanceId;

/// Default `[engines] probe_rate`. An exec probe cost the agent about
/// 4 ms of CPU on the bench host (docs/benchmarks.md, "probe_cost": 54 %
/// of one CPU at 128 a second, 15 % at 32); room for two probes of each
/// of 128 engines at the default 10 s interval.
pub const DEFAULT_RATE: u32 = 32;
/// Default `[engines] probe_concurrency`.
pub const DEFAULT_CONCURRENCY: u32 = 32;
/// Bounds of `[engines] probe_rate` (runs a second).
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Bounds of `[engines] probe_concurrency`.
pub const CONCURRENCY_RANGE: std::ops::RangeInclusive<u32> = 1..=1024;

/// One due probe run: which engine (name and incarnation), instance and
/// probe index (its definition and timeout are read when it starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub engine: String,
    pub incarnation: u64,
    pub instance: InstanceId,
    pub probe: usize,
}

/// What one [`ProbeGate::take`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// The runs to start now.
    pub start: Vec<Due>,
    /// Per engine, the runs that came due since the last take and must
    /// wait (each counted once, when it first waits).
    pub waiting: BTreeMap<String, u64>,
}

struct Queued {
    due: Due,
    /// The number of the take after which it came due: younger than the
    /// current take, it has not waited yet.
    since: u64,
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
    /// Takes so far.
    takes: u64,
    /// Per engine, runs queued since the last take.
    fresh: BTreeMap<String, u64>,
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
            takes: 0,
            fresh: BTreeMap::new(),
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
    /// instance is already waiting (it is not queued twice). Only an
    /// engine's current instance is probed: its runs for any other
    /// instance or incarnation are dropped here, so a queue never holds
    /// more than the engine's probes.
    pub fn offer(&mut self, due: Due) -> bool {
        let q = self.queue.entry(due.engine.clone()).or_default();
        let takes = self.takes;
        let mut dropped_fresh = 0;
        q.retain(|w| {
            let keep = w.due.incarnation == due.incarnation && w.due.instance == due.instance;
            if !keep && w.since == takes {
                dropped_fresh += 1;
            }
            keep
        });
        if dropped_fresh > 0 {
            Self::unfresh(&mut self.fresh, &due.engine, dropped_fresh);
        }
        if q.iter().any(|w| w.due.probe == due.probe) {
            return false;
        }
        *self.fresh.entry(due.engine.clone()).or_default() += 1;
        q.push_back(Queued { due, since: takes });
        true
    }

    fn unfresh(fresh: &mut BTreeMap<String, u64>, engine: &str, n: u64) {
        if let Some(f) = fresh.get_mut(engine) {
            *f = f.saturating_sub(n);
            if *f == 0 {
                fresh.remove(engine);
            }
        }
    }

    /// The runs that may start now, one engine after another; each holds a
    /// slot until [`ProbeGate::finished`]. `valid` drops a waiting run
    /// whose engine, instance or probe is gone (no token spent on it).
    /// Also says which runs began to wait.
    pub fn take(&mut self, now: Instant, valid: impl Fn(&Due) -> bool) -> Taken {
        self.refill(now);
        let mut start = Vec::new();
        while self.running < self.concurrency && self.micro >= MICRO {
            let Some(name) = self.next_engine() else {
                break;
            };
            let Some(q) = self.queue.get_mut(&name) else {
                break;
            };
            let Some(w) = q.pop_front() else {
                self.queue.remove(&name);
                continue;
            };
            if q.is_empty() {
                self.queue.remove(&name);
            }
            if w.since == self.takes {
                Self::unfresh(&mut self.fresh, &name, 1);
            }
            self.last = Some(name);
            if !valid(&w.due) {
                continue;
            }
            self.micro -= MICRO;
            self.running += 1;
            start.push(w.due);
        }
        self.takes += 1;
        Taken {
            start,
            waiting: std::mem::take(&mut self.fresh),
        }
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
        self.fresh.clear();
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
        }
    }

    fn names(t: &Taken) -> Vec<String> {
        t.start
            .iter()
            .map(|d| format!("{}{}", d.engine, d.probe))
            .collect()
    }

    fn waiting(t: &Taken, engine: &str) -> u64 {
        t.waiting.get(engine).copied().unwrap_or(0)
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
        assert_eq!(first.start.len(), 4, "a second's worth at once");
        assert_eq!(waiting(&first, "a"), 2, "two wait, counted once");
        let again = g.take(t0, |_| true);
        assert_eq!(again, Taken::default(), "not counted twice");
        // A token every 250 ms: woken for it, not before.
        let at = g.wake_at(t0).unwrap();
        assert_eq!(at - t0, Duration::from_millis(250));
        assert!(g
            .take(at - Duration::from_micros(1), |_| true)
            .start
            .is_empty());
        let next = g.take(at, |_| true);
        assert_eq!(names(&next), ["a4"]);
        // Over any window, at most a second's worth plus the rate.
        let mut started = 4 + 1;
        let mut now = at;
        for i in 0..400 {
            g.offer(due("b", i % 8));
            now += Duration::from_millis(10);
            started += g.take(now, |_| true).start.len();
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
        let first = g.take(t0, |_| true);
        assert_eq!(first.start.len(), 2);
        assert_eq!(waiting(&first, "a"), 3);
        assert_eq!(g.running(), 2);
        assert_eq!(g.wake_at(t0), None, "woken by an end, not a timer");
        assert!(g
            .take(t0 + Duration::from_secs(5), |_| true)
            .start
            .is_empty());
        g.finished();
        let next = g.take(t0 + Duration::from_secs(5), |_| true);
        assert_eq!(names(&next), ["a2"]);
        assert!(next.waiting.is_empty());
    }

    /// A probe already waiting is not queued again.
    #[test]
    fn a_waiting_probe_is_not_doubled() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(1, 1, t0);
        g.offer(due("a", 0));
        assert_eq!(g.take(t0, |_| true).start.len(), 1);
        assert!(g.offer(due("a", 0)));
        assert!(!g.offer(due("a", 0)));
        assert!(g.offer(due("a", 1)));
        assert_eq!(g.waiting(), 2);
    }

    /// An engine's queue holds its current instance's runs only: an
    /// instance restarting faster than the gate admits does not pile up
    /// its predecessors' runs (at most the engine's probes wait).
    #[test]
    fn a_new_instance_replaces_the_old_ones_waiting_runs() {
        let t0 = Instant::now();
        let mut g = ProbeGate::new(9, 100, t0);
        for i in 1..=1000 {
            for p in 0..8 {
                g.offer(Due {
                    instance: InstanceId(i),
                    ..due("a", p)
                });
            }
            let mut next = due("b", 0);
            next.incarnation = i;
            g.offer(next);
        }
        assert_eq!(g.waiting(), 8 + 1);
        // The runs left are the newest instance's and incarnation's.
        let t = g.take(t0, |d| match d.engine.as_str() {
            "a" => d.instance == InstanceId(1000),
            _ => d.incarnation == 1000,
        });
        assert_eq!(t.start.len(), 9, "{t:?}");
        assert!(t.waiting.is_empty(), "{t:?}");
        // One more, past the bucket: counted once as waiting.
        g.offer(Due {
            instance: InstanceId(1001),
            ..due("a", 0)
        });
        let t = g.take(t0, |_| true);
        assert!(t.start.is_empty());
        assert_eq!(waiting(&t, "a"), 1);
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
        assert!(a.waiting.is_empty());
        assert_eq!(g.waiting(), 0);
        g.offer(due("x", 0));
        g.clear();
        assert_eq!(g.waiting(), 0);
        assert_eq!(g.wake_at(t0), None);
    }
}
