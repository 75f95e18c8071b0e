//! The restart schedule: after an exit the engine is started again after
//! `initial` (default 100 ms), then each consecutive restart waits
//! `factor` times longer (default doubling) up to `max`; a run that lasts
//! `reset_after` resets the delay to `initial`; with `give_up`, the exit
//! that would make one restart too many within the window is final.
//!
//! Pure: the supervisor passes the times of starts and exits ([`Instant`]s
//! from its clock; tests make them up), and gets back when to restart.
//! No sleeping, no clock reads here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::spec::{Restart, RestartPolicy};

/// The schedule's settings (from a validated spec's `restart`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Delay of the first restart after a reset.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Growth per restart (at least 1).
    pub factor: f64,
    /// A run at least this long resets the delay.
    pub reset_after: Duration,
    /// `(restarts, window)`: give up at the exit that would make more than
    /// `restarts` restarts within `window`.
    pub give_up: Option<(u32, Duration)>,
}

impl From<&Restart> for Schedule {
    fn from(r: &Restart) -> Self {
        Schedule {
            initial: r.initial.0,
            max: r.max.0,
            factor: r.factor,
            reset_after: r.reset_after.0,
            give_up: r.give_up.map(|g| (g.restarts, g.within.0)),
        }
    }
}

impl Default for Schedule {
    /// The spec's defaults: 100 ms, doubling, 30 s cap, reset after 60 s,
    /// never give up.
    fn default() -> Self {
        Schedule::from(&Restart::default())
    }
}

impl Schedule {
    /// The delay after `d`: `d × factor`, never less than `d` and never
    /// more than `max`.
    pub fn grow(&self, d: Duration) -> Duration {
        let f = if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        };
        let next = Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(self.max);
        next.max(d).min(self.max)
    }

    /// The delay of the n-th consecutive restart (0: the first after a
    /// reset): `min(initial × factorⁿ, max)`.
    pub fn delay(&self, n: u32) -> Duration {
        let mut d = self.initial.min(self.max);
        for _ in 0..n {
            let next = self.grow(d);
            if next == d {
                break;
            }
            d = next;
        }
        d
    }
}

/// Whether an exit calls for a restart under `policy`; `clean` is an exit
/// with code 0 (not a signal, not an OOM kill). A `stop` asked for is not
/// an exit the supervisor restarts, whatever the policy.
pub fn wants_restart(policy: RestartPolicy, clean: bool) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Always => true,
    }
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again at `at` (`delay` after the exit).
    Restart {
        /// When.
        at: Instant,
        /// How long after the exit.
        delay: Duration,
        /// Consecutive restarts since the last reset, this one included.
        attempt: u32,
    },
    /// Too many restarts in the window: the exit is final (event
    /// `gave up`); a manual start begins afresh ([`Backoff::reset`]).
    GiveUp {
        /// Restarts already made in the window.
        restarts: u32,
        /// The window.
        within: Duration,
    },
}

/// The restart state of one engine.
#[derive(Debug, Clone)]
pub struct Backoff {
    schedule: Schedule,
    /// Delay of the next restart.
    next: Duration,
    /// Consecutive restarts since the last reset.
    attempt: u32,
    /// When the current run started (`None`: not running).
    running_since: Option<Instant>,
    /// Exits that led to a restart, newest last, within the give-up window
    /// (at most `restarts` kept).
    recent: VecDeque<Instant>,
}

impl Backoff {
    /// A fresh schedule (the next restart waits `initial`).
    pub fn new(schedule: Schedule) -> Self {
        Backoff {
            next: schedule.initial.min(schedule.max),
            schedule,
            attempt: 0,
            running_since: None,
            recent: VecDeque::new(),
        }
    }

    /// The settings.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Consecutive restarts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay the next restart would wait (before any reset the exit
    /// may bring).
    pub fn next_delay(&self) -> Duration {
        self.next
    }

    /// Forget every restart (a manual start, a reload).
    pub fn reset(&mut self) {
        *self = Backoff::new(self.schedule);
    }

    /// The engine started (exec'd) at `now`.
    pub fn started(&mut self, now: Instant) {
        self.running_since = Some(now);
    }

    /// Whether a run started at `since` has been stable by `now` (lasted at
    /// least `reset_after`).
    pub fn is_stable(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.schedule.reset_after
    }

    /// The engine exited at `now` and the policy wants it back: when to
    /// start it, or give up. A run of at least `reset_after` first resets
    /// the delay to `initial`; an exit without a start (exec failed) counts
    /// as a run of zero.
    pub fn exited(&mut self, now: Instant) -> Decision {
        if let Some(since) = self.running_since.take() {
            if self.is_stable(since, now) {
                self.next = self.schedule.initial.min(self.schedule.max);
                self.attempt = 0;
            }
        }
        if let Some((restarts, within)) = self.schedule.give_up {
            // Keep the restarts strictly inside (now - within, now].
            while let Some(&t) = self.recent.front() {
                if now.saturating_duration_since(t) >= within {
                    self.recent.pop_front();
                } else {
                    break;
                }
            }
            let made = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
            if made >= restarts {
                return Decision::GiveUp {
                    restarts: made,
                    within,
                };
            }
            self.recent.push_back(now);
        }
        let delay = self.next;
        self.next = self.schedule.grow(delay);
        self.attempt = self.attempt.saturating_add(1);
        Decision::Restart {
            at: now + delay,
            delay,
            attempt: self.attempt,
        }
    }

    /// The delay of the restart the next exit is sure to get, whenever it
    /// comes, if that is the first of a series: no restart since the last
    /// reset, and room in the give-up window (restarts only leave the
    /// window as time passes). `None`: the next exit may wait longer, or
    /// give up. What the shim may do by itself (`LaunchSpec::respawn`).
    pub fn sure_first_restart(&self) -> Option<Duration> {
        if self.attempt != 0 {
            return None;
        }
        if let Some((restarts, _)) = self.schedule.give_up {
            if u32::try_from(self.recent.len()).unwrap_or(u32::MAX) >= restarts {
                return None;
            }
        }
        Some(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A fake clock: instants made from one base.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, t: Duration) -> Instant {
            self.0 + t
        }
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            Decision::GiveUp { .. } => panic!("gave up"),
        }
    }

    proptest! {
        /// Whatever exits came before and whenever the next one comes: a
        /// sure first restart is exactly what `exited` then decides.
        #[test]
        fn a_sure_first_restart_is_what_the_next_exit_gets(
            gaps in proptest::collection::vec(0u64..5_000, 0..8),
            next in 0u64..200_000,
            give_up in proptest::option::of((0u32..4, 1u64..20_000)),
            resets in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let s = Schedule {
                initial: ms(100),
                max: ms(1_000),
                factor: 2.0,
                reset_after: ms(3_000),
                give_up: give_up.map(|(n, w)| (n, ms(w))),
            };
            let clock = Clock(Instant::now());
            let mut b = Backoff::new(s);
            let mut t = ms(0);
            for (n, g) in gaps.iter().enumerate() {
                if resets[n] { b.reset(); }
                b.started(clock.at(t));
                t += ms(*g);
                if let Decision::GiveUp { .. } = b.exited(clock.at(t)) { b.reset(); }
            }
            b.started(clock.at(t));
            if let Some(d) = b.sure_first_restart() {
                let got = b.exited(clock.at(t + ms(next)));
                prop_assert!(
                    matches!(got, Decision::Restart { delay, attempt: 1, .. } if delay == d),
                    "granted {d:?}, got {got:?}"
                );
            }
        }
    }

    #[test]
    fn sure_first_restart_only_before_a_series_and_with_room() {
        let clock = Clock(Instant::now());
        let mut b = Backoff::new(Schedule::default());
        assert_eq!(b.sure_first_restart(), Some(ms(100)));
        b.started(clock.at(ms(0)));
        b.exited(clock.at(ms(10)));
        assert_eq!(b.sure_first_restart(), None, "a series has begun");
        b.reset();
        assert_eq!(b.sure_first_restart(), Some(ms(100)));
        let mut none = Backoff::new(Schedule {
            give_up: Some((0, ms(1_000))),
            ..Schedule::default()
        });
        assert_eq!(none.sure_first_restart(), None, "no restart allowed at all");
        none.reset();
        assert_eq!(none.sure_first_restart(), None);
    }

    #[test]
    fn defaults_restart_within_100ms_and_double_to_the_cap() {
        let s = Schedule::default();
        assert!(s.initial <= ms(100));
        let clock = Clock(Instant::now());
        let mut b = Backoff::new(s);
        let mut t = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..12 {
            b.started(clock.at(t));
            t += ms(5);
            let d = b.exited(clock.at(t));
            seen.push(delay(d).as_millis());
            t += delay(d);
        }
        assert_eq!(
            seen,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(b.attempt(), 12);
        assert_eq!(s.delay(0), ms(100));
        assert_eq!(s.delay(3), ms(800));
        assert_eq!(s.delay(u32::MAX), ms(30_000));
    }

    #[test]
    fn a_stable_run_resets_exactly_at_reset_after() {
        let s = Schedule::default();
        let clock = Clock(Instant::now());
        let mut b = Backoff::new(s);
        for _ in 0..3 {
            b.exited(clock.at(Duration::ZERO));
        }
        assert_eq!(b.next_delay(), ms(800));
        b.started(clock.at(ms(1000)));
        let d = b.exited(clock.at(ms(1000) + s.reset_after - Duration::from_nanos(1)));
        assert_eq!(delay(d), ms(800), "one nanosecond short: no reset");
        b.started(clock.at(ms(100_000)));
        let d = b.exited(clock.at(ms(100_000) + s.reset_after));
        assert_eq!(delay(d), ms(100));
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn gives_up_after_n_restarts_within_the_window() {
        let s = Schedule {
            give_up: Some((3, Duration::from_secs(10))),
            ..Schedule::default()
        };
        let clock = Clock(Instant::now());
        let mut b = Backoff::new(s);
        for i in 0..3 {
            assert!(matches!(
                b.exited(clock.at(ms(i * 1000))),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(
            b.exited(clock.at(ms(9_999))),
            Decision::GiveUp {
                restarts: 3,
                within: Duration::from_secs(10)
            }
        );
        // The first restart (t=0) has left the window at t=10s.
        assert!(matches!(
            b.exited(clock.at(ms(10_000))),
            Decision::Restart { .. }
        ));
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn policies() {
        assert!(!wants_restart(RestartPolicy::Never, false));
        assert!(!wants_restart(RestartPolicy::OnFailure, true));
        assert!(wants_restart(RestartPolicy::OnFailure, false));
        assert!(wants_restart(RestartPolicy::Always, true));
    }

    prop_compose! {
        fn arb_schedule()(initial in 1u64..5_000, extra in 0u64..600_000, factor in 1.0f64..16.0, reset in 1_000u64..120_000) -> Schedule {
            Schedule {
                initial: ms(initial),
                max: ms(initial + extra),
                factor,
                reset_after: ms(reset),
                give_up: None,
            }
        }
    }

    /// How long a run lasts, against `reset_after`.
    #[derive(Debug, Clone, Copy)]
    enum Run {
        /// This fraction of it (from 1.0: stable).
        Frac(f64),
        /// Exactly it.
        Exact,
        /// One nanosecond short.
        JustShort,
    }

    fn arb_run() -> impl Strategy<Value = Run> {
        prop_oneof![
            3 => (0.0f64..2.0).prop_map(Run::Frac),
            1 => Just(Run::Exact),
            1 => Just(Run::JustShort),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Delays start at `initial`, never decrease until a reset, never
        /// exceed `max`, and reset exactly when a run lasted `reset_after`.
        #[test]
        fn delays_grow_to_the_cap_and_reset_after_the_stable_period(
            s in arb_schedule(),
            runs in proptest::collection::vec(arb_run(), 1..60),
        ) {
            let clock = Clock(Instant::now());
            let mut b = Backoff::new(s);
            let mut t = Duration::ZERO;
            let mut prev: Option<Duration> = None;
            for r in runs {
                b.started(clock.at(t));
                let run = match r {
                    Run::Exact => s.reset_after,
                    Run::JustShort => s.reset_after - Duration::from_nanos(1),
                    Run::Frac(f) => s.reset_after.mul_f64(f),
                };
                t += run;
                let d = delay(b.exited(clock.at(t)));
                prop_assert!(d <= s.max);
                if run >= s.reset_after || prev.is_none() {
                    prop_assert_eq!(d, s.initial);
                } else {
                    let p = prev.unwrap();
                    prop_assert!(d >= p, "{d:?} after {p:?}");
                    prop_assert_eq!(d, s.grow(p));
                }
                prev = Some(d);
                t += d;
            }
        }

        /// The n-th delay is initial × factorⁿ capped, within rounding (each
        /// step rounds to a whole nanosecond of an initial of at least 1 ms,
        /// and later steps multiply the error).
        #[test]
        fn delay_is_initial_times_factor_to_the_n(s in arb_schedule(), n in 0u32..40) {
            let d = s.delay(n).as_secs_f64();
            let want = (s.initial.as_secs_f64() * s.factor.powi(i32::try_from(n).unwrap())).min(s.max.as_secs_f64());
            prop_assert!((d - want).abs() <= want * 1e-6 * f64::from(n + 1), "{d} vs {want}");
        }

        /// With give_up, no window of that length ever holds more than the
        /// allowed restarts, and giving up happens only when it is full.
        #[test]
        fn give_up_bounds_restarts_in_every_window(
            n in 1u32..6,
            within in 100u64..10_000,
            gaps in proptest::collection::vec(0u64..5_000, 1..80),
        ) {
            let s = Schedule { give_up: Some((n, ms(within))), ..Schedule::default() };
            let clock = Clock(Instant::now());
            let mut b = Backoff::new(s);
            let mut t = 0u64;
            let mut restarts: Vec<u64> = Vec::new();
            for g in gaps {
                t += g;
                let in_window = restarts.iter().filter(|&&r| r + within > t).count();
                match b.exited(clock.at(ms(t))) {
                    Decision::Restart { .. } => {
                        prop_assert!(in_window < n as usize);
                        restarts.push(t);
                    }
                    Decision::GiveUp { restarts: made, .. } => {
                        prop_assert_eq!(in_window, n as usize);
                        prop_assert_eq!(made, n);
                    }
                }
            }
        }
    }
}
