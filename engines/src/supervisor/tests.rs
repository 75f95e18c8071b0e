//! The supervisor on a fake clock: every instant is made up from one base.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn spec(toml: &str) -> Spec {
    Spec::from_toml(toml).expect("test spec")
}

fn default_spec() -> Spec {
    spec(r#"command = ["/bin/app"]"#)
}

const V1: VersionId = VersionId(1);
const V2: VersionId = VersionId(2);

/// A supervisor at a fake time, with the timers it armed.
struct H {
    s: Supervisor,
    t0: Instant,
    now: Duration,
    timers: BTreeMap<TimerId, Instant>,
}

impl H {
    fn new(spec: Spec) -> H {
        H {
            s: Supervisor::new(V1, spec),
            t0: Instant::now(),
            now: Duration::ZERO,
            timers: BTreeMap::new(),
        }
    }

    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    fn step(&mut self, input: Input) -> Vec<Action> {
        let a = self.s.step(self.at(), input).expect("accepted");
        self.note(&a);
        a
    }

    fn note(&mut self, a: &[Action]) {
        for x in a {
            match x {
                Action::Schedule { timer, at } => {
                    self.timers.insert(*timer, *at);
                }
                Action::Cancel(t) => {
                    self.timers.remove(t);
                }
                _ => {}
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Fires timer `t` at its instant (time moves there if it is later).
    fn fire(&mut self, t: TimerId) -> Vec<Action> {
        let at = self.timers.remove(&t).expect("armed");
        self.now = self.now.max(at - self.t0);
        self.step(Input::Timer(t))
    }

    /// The one timer armed in `a`.
    fn armed(a: &[Action]) -> (TimerId, Instant) {
        let s: Vec<_> = a
            .iter()
            .filter_map(|x| match x {
                Action::Schedule { timer, at } => Some((*timer, *at)),
                _ => None,
            })
            .collect();
        assert_eq!(s.len(), 1, "{a:?}");
        s[0]
    }

    /// Starts and brings the first instance to ready (no heartbeat).
    fn running(spec: Spec) -> (H, InstanceId) {
        let mut h = H::new(spec);
        let a = h.step(Input::Start);
        let i = launched(&a).expect("launch");
        h.step(Input::Launched {
            instance: i,
            pid: 100,
        });
        (h, i)
    }
}

fn launched(a: &[Action]) -> Option<InstanceId> {
    let l: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::Launch { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    assert!(l.len() <= 1, "{a:?}");
    l.first().copied()
}

fn events(a: &[Action]) -> Vec<&'static str> {
    a.iter()
        .filter_map(|x| match x {
            Action::Emit(e) => Some(e.name()),
            _ => None,
        })
        .collect()
}

fn has(a: &[Action], want: &Action) -> bool {
    a.iter().any(|x| x == want)
}

#[test]
fn first_restart_within_100ms_then_doubling_to_the_cap() {
    let (mut h, mut i) = H::running(default_spec());
    assert_eq!(h.s.phase(), Phase::Ready);
    let mut delays = Vec::new();
    for n in 1..=12u32 {
        h.advance(ms(5));
        let exit_at = h.at();
        let a = h.step(Input::Exited {
            instance: i,
            exit: Exit::Code(1),
        });
        assert_eq!(events(&a), ["exited", "backing-off"]);
        assert_eq!(h.s.phase(), Phase::BackingOff);
        assert!(launched(&a).is_none(), "no launch before the delay");
        let (t, at) = H::armed(&a);
        delays.push((at - exit_at).as_millis());
        let a = h.fire(t);
        i = launched(&a).expect("restart");
        assert!(has(
            &a,
            &Action::Emit(Event::Restarted {
                instance: i,
                attempt: n,
                delay: at - exit_at
            })
        ));
        h.step(Input::Launched {
            instance: i,
            pid: 100 + n,
        });
    }
    assert!(
        delays[0] <= 100,
        "first restart {} ms after the exit",
        delays[0]
    );
    assert_eq!(
        delays,
        [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
    );
    assert_eq!(h.s.status().restarts, 12);
}

fn grant(a: &[Action]) -> Option<Respawn> {
    a.iter().find_map(|x| match x {
        Action::Launch { respawn, .. } => *respawn,
        _ => None,
    })
}

#[test]
fn the_first_launch_lets_the_shim_restart_once_by_itself() {
    let mut h = H::new(default_spec());
    let a = h.step(Input::Start);
    assert_eq!(
        grant(&a),
        Some(Respawn {
            delay: ms(100),
            on_clean_exit: false
        }),
        "on-failure by default: not after exit code 0"
    );
    let mut h = H::new(spec(
        "command = [\"/bin/app\"]\n[restart]\npolicy = \"always\"\ninitial = \"1ms\"",
    ));
    assert_eq!(
        grant(&h.step(Input::Start)),
        Some(Respawn {
            delay: ms(1),
            on_clean_exit: true
        })
    );
    let mut h = H::new(spec(
        "command = [\"/bin/app\"]\n[restart]\npolicy = \"never\"",
    ));
    assert_eq!(grant(&h.step(Input::Start)), None, "never restarted");
    // A restart by the schedule is not the first of its series: no grant.
    let (mut h, i) = H::running(default_spec());
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(1),
    });
    let (t, _) = H::armed(&a);
    let a = h.fire(t);
    assert!(launched(&a).is_some());
    assert_eq!(grant(&a), None);
    // Nor a reload's instance (it must get ready or fail the reload).
    let (mut h, _) = ready_with_heartbeat();
    assert_eq!(grant(&reload(&mut h, V2)), None);
}

#[test]
fn a_restart_in_place_reads_as_a_restart_of_the_same_instance() {
    let (mut h, i) = H::running(default_spec());
    h.advance(ms(700));
    let a = h.step(Input::Respawning {
        instance: i,
        exit: Exit::Code(3),
    });
    assert_eq!(events(&a), ["exited", "backing-off"]);
    assert!(has(
        &a,
        &Action::Emit(Event::BackingOff {
            delay: ms(100),
            attempt: 1
        })
    ));
    let st = h.s.status();
    assert_eq!(st.phase, Phase::BackingOff, "while the shim waits");
    assert_eq!((st.since, st.last_exit), (None, Some(Exit::Code(3))));
    assert_eq!(st.pid, None, "no engine runs");
    h.advance(ms(100));
    let a = h.step(Input::Respawned { instance: i });
    assert_eq!(events(&a), ["restarted", "started", "ready"]);
    assert!(has(
        &a,
        &Action::Emit(Event::Restarted {
            instance: i,
            attempt: 1,
            delay: ms(100)
        })
    ));
    assert!(
        launched(&a).is_none(),
        "the shim started it, not the runtime"
    );
    let st = h.s.status();
    assert_eq!(st.phase, Phase::Ready);
    assert_eq!((st.instance, st.pid), (Some(i), Some(100)));
    assert_eq!((st.restarts, st.last_exit), (1, Some(Exit::Code(3))));
    assert_eq!(st.since, Some(h.at()), "uptime counts from the new engine");
    // A record again (it cannot come: the grant is used once) changes
    // nothing.
    assert!(h.step(Input::Respawned { instance: i }).is_empty());
    // The series goes on: the next exit waits the second delay.
    h.advance(ms(5));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Oom,
    });
    assert_eq!(events(&a), ["exited", "oom-killed", "backing-off"]);
    assert!(has(
        &a,
        &Action::Emit(Event::BackingOff {
            delay: ms(200),
            attempt: 2
        })
    ));
}

#[test]
fn probes_and_the_watchdog_pause_while_the_shim_waits() {
    let mut h = H::new(spec(
        "command = [\"/bin/app\"]\n[restart]\ninitial = \"10s\"\n[heartbeat]\nenabled = true\nwatchdog = \"1s\"\n[[probes]]\nexec = [\"/bin/true\"]\ninterval = \"2s\"\n",
    ));
    let i = launched(&h.step(Input::Start)).unwrap();
    h.step(Input::Launched {
        instance: i,
        pid: 7,
    });
    h.step(Input::Heartbeat {
        instance: i,
        notify: Notify::Ready,
    });
    let a = h.step(Input::Respawning {
        instance: i,
        exit: Exit::Signal(11),
    });
    assert_eq!(events(&a), ["exited", "backing-off"]);
    assert!(h.timers.is_empty(), "timers left: {:?}", h.timers);
    // A probe that was running, a late ping: ignored.
    let a = h.step(Input::Probe {
        instance: i,
        probe: 0,
        ok: false,
    });
    assert!(a.is_empty(), "{a:?}");
    h.step(Input::Heartbeat {
        instance: i,
        notify: Notify::Watchdog,
    });
    h.advance(ms(10_000));
    let a = h.step(Input::Respawned { instance: i });
    assert_eq!(events(&a), ["restarted", "started"]);
    assert_eq!(h.s.phase(), Phase::Running, "READY=1 awaited again");
    let a = h.step(Input::Heartbeat {
        instance: i,
        notify: Notify::Ready,
    });
    assert_eq!(events(&a), ["ready"]);
    assert_eq!(h.timers.len(), 2, "probe and watchdog armed again");
}

#[test]
fn a_restart_in_place_reports_an_oom() {
    let (mut h, i) = ready_with_heartbeat();
    let a = h.step(Input::Respawning {
        instance: i,
        exit: Exit::Oom,
    });
    assert_eq!(events(&a), ["exited", "oom-killed", "backing-off"]);
    assert_eq!(h.s.status().last_exit, Some(Exit::Oom));
}

#[test]
fn a_stop_while_the_shim_waits_ends_it_with_one_exit_event() {
    let (mut h, i) = H::running(default_spec());
    h.step(Input::Respawning {
        instance: i,
        exit: Exit::Code(1),
    });
    let a = h.step(Input::Stop { grace: None });
    assert!(has(&a, &Action::Terminate { instance: i }));
    assert_eq!(h.s.phase(), Phase::Stopping);
    // The shim ends with the engine's exit: no second `exited`.
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["stopped"]);
    assert_eq!(h.s.phase(), Phase::Stopped);
    assert!(
        h.step(Input::Respawned { instance: i }).is_empty(),
        "gone: stale"
    );
}

#[test]
fn a_restart_in_place_during_a_stop_does_not_undo_the_stop() {
    let (mut h, i) = H::running(default_spec());
    let a = h.step(Input::Stop { grace: None });
    assert!(has(&a, &Action::Terminate { instance: i }));
    let a = h.step(Input::Respawning {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited"]);
    let a = h.step(Input::Respawned { instance: i });
    assert_eq!(events(&a), ["started"], "said as it is");
    assert_eq!(h.s.phase(), Phase::Stopping);
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    assert_eq!(events(&a), ["exited", "stopped"]);
    assert_eq!(h.s.phase(), Phase::Stopped);
}

#[test]
fn a_shim_killed_while_it_waits_is_replaced_on_the_same_schedule() {
    let (mut h, i) = H::running(default_spec());
    let a = h.step(Input::Respawning {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited", "backing-off"]);
    let due = h.at() + ms(100);
    h.advance(ms(30));
    // Not by us: the engines unit restarted, someone killed it.
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(9),
    });
    assert!(events(&a).is_empty(), "one exit, one backing-off: {a:?}");
    let (t, at) = H::armed(&a);
    assert_eq!(at, due, "the restart the exit already got");
    let a = h.fire(t);
    assert!(has(
        &a,
        &Action::Emit(Event::Restarted {
            instance: launched(&a).unwrap(),
            attempt: 1,
            delay: ms(100)
        })
    ));
    assert_eq!(h.s.status().restarts, 1);
}

#[test]
fn a_reload_while_the_shim_waits_starts_the_new_version_at_once() {
    let (mut h, i) = H::running(default_spec());
    h.step(Input::Respawning {
        instance: i,
        exit: Exit::Code(1),
    });
    let a = h.step(Input::Reload {
        version: V2,
        spec: Box::new(default_spec()),
    });
    assert_eq!(events(&a), ["reloaded"]);
    assert!(has(&a, &Action::Kill { instance: i }), "{a:?}");
    assert!(launched(&a).is_none(), "after the old shim is gone");
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(9),
    });
    assert!(events(&a).is_empty(), "{a:?}");
    assert!(
        matches!(a.first(), Some(Action::Launch { version: V2, .. })),
        "{a:?}"
    );
    assert_eq!(h.s.version(), V2);
    assert_eq!(h.s.status().last_exit, Some(Exit::Code(1)));
}

#[test]
fn during_a_reload_the_old_instance_is_not_respawned() {
    let (mut h, old) = ready_with_heartbeat();
    let a = reload(&mut h, V2);
    let new = launched(&a).unwrap();
    h.step(Input::Launched {
        instance: new,
        pid: 2,
    });
    let a = h.step(Input::Respawning {
        instance: old,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited"]);
    assert!(has(&a, &Action::Kill { instance: old }), "{a:?}");
    let a = h.step(Input::Exited {
        instance: old,
        exit: Exit::Signal(9),
    });
    assert!(events(&a).is_empty(), "{a:?}");
    assert_eq!(
        h.s.status().last_exit,
        Some(Exit::Code(1)),
        "the engine's exit, not our kill of its shim"
    );
    // The new version takes over when ready.
    let a = h.step(Input::Heartbeat {
        instance: new,
        notify: Notify::Ready,
    });
    assert_eq!(events(&a), ["ready", "reloaded"]);
    assert_eq!(h.s.status().instance, Some(new));
}

#[test]
fn a_stable_run_resets_the_delay() {
    let (mut h, mut i) = H::running(default_spec());
    for _ in 0..3 {
        let a = h.step(Input::Exited {
            instance: i,
            exit: Exit::Signal(11),
        });
        let (t, _) = H::armed(&a);
        i = launched(&h.fire(t)).expect("restart");
        h.step(Input::Launched {
            instance: i,
            pid: 7,
        });
    }
    // 60 s of service (the default reset_after), then a crash.
    h.advance(Duration::from_secs(60));
    let exit_at = h.at();
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(2),
    });
    let (_, at) = H::armed(&a);
    assert_eq!(at - exit_at, ms(100));
}

#[test]
fn gives_up_and_notifies_then_a_start_begins_afresh() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        on_failure = ["notify", "restart"]
        [restart]
        give_up = { restarts = 2, within = "1m" }
        "#,
    );
    let (mut h, mut i) = H::running(s);
    for _ in 0..2 {
        let a = h.step(Input::Exited {
            instance: i,
            exit: Exit::Code(1),
        });
        let (t, _) = H::armed(&a);
        i = launched(&h.fire(t)).expect("restart");
        h.step(Input::Launched {
            instance: i,
            pid: 7,
        });
    }
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited", "gave-up", "failed"]);
    assert!(!a.iter().any(|x| matches!(x, Action::Schedule { .. })));
    assert_eq!(h.s.phase(), Phase::GaveUp);
    let a = h.step(Input::Start);
    assert!(launched(&a).is_some());
}

#[test]
fn probe_failures_up_to_the_threshold_restart_the_engine() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        [[probes]]
        tcp = 8080
        interval = "1s"
        timeout = "500ms"
        threshold = 3
        "#,
    );
    let mut h = H::new(s);
    let i = launched(&h.step(Input::Start)).unwrap();
    let a = h.step(Input::Launched {
        instance: i,
        pid: 9,
    });
    // The first probe one interval after the engine is ready.
    let (mut t, at) = H::armed(&a);
    assert_eq!(at - h.at(), Duration::from_secs(1));
    let mut results = vec![false, false, true, false, false];
    results.push(false);
    let mut last = Vec::new();
    for ok in results {
        let a = h.fire(t);
        assert!(has(
            &a,
            &Action::RunProbe {
                instance: i,
                probe: 0,
                timeout: ms(500)
            }
        ));
        t = H::armed(&a).0;
        h.advance(ms(200));
        last = h.step(Input::Probe {
            instance: i,
            probe: 0,
            ok,
        });
        if h.s.phase() == Phase::Stopping {
            break;
        }
        assert!(!has(&last, &Action::Terminate { instance: i }));
    }
    // fail, fail, ok (reset), fail, fail, fail: the third in a row.
    assert_eq!(events(&last), ["probe-failed"]);
    assert!(has(&last, &Action::Terminate { instance: i }));
    assert_eq!(h.s.phase(), Phase::Stopping);
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    // A failure restarts through the backoff schedule.
    let (t, at) = H::armed(&a);
    assert_eq!(at - h.at(), ms(100));
    assert!(launched(&h.fire(t)).is_some());
}

#[test]
fn a_missed_watchdog_restarts_the_engine() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        [heartbeat]
        enabled = true
        watchdog = "1s"
        "#,
    );
    let mut h = H::new(s);
    let i = launched(&h.step(Input::Start)).unwrap();
    let a = h.step(Input::Launched {
        instance: i,
        pid: 9,
    });
    assert_eq!(h.s.phase(), Phase::Running, "waits for READY=1");
    let (ready_timeout, at) = H::armed(&a);
    assert_eq!(at - h.at(), Duration::from_secs(90));
    let a = h.step(Input::Heartbeat {
        instance: i,
        notify: Notify::Ready,
    });
    assert!(has(&a, &Action::Cancel(ready_timeout)));
    assert_eq!(h.s.phase(), Phase::Ready);
    let (wd, at) = H::armed(&a);
    assert_eq!(at - h.at(), Duration::from_secs(1));
    h.advance(ms(500));
    assert!(h
        .step(Input::Heartbeat {
            instance: i,
            notify: Notify::Watchdog
        })
        .is_empty());
    // At 1 s the deadline has moved to 1.5 s: re-armed, no failure.
    let a = h.fire(wd);
    let (wd, at) = H::armed(&a);
    assert!(events(&a).is_empty(), "{a:?}");
    assert_eq!(at - h.t0, ms(1500));
    let a = h.fire(wd);
    assert_eq!(events(&a), ["watchdog-expired"]);
    assert!(has(&a, &Action::Terminate { instance: i }));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(0),
    });
    // Even a clean exit after a failure is restarted.
    assert_eq!(events(&a), ["exited", "backing-off"]);
}

#[test]
fn no_ready_in_time_kills_and_counts_as_a_failed_exit() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        heartbeat = { enabled = true, ready_timeout = "5s" }
        "#,
    );
    let mut h = H::new(s);
    let i = launched(&h.step(Input::Start)).unwrap();
    let a = h.step(Input::Launched {
        instance: i,
        pid: 9,
    });
    let (t, _) = H::armed(&a);
    let a = h.fire(t);
    assert_eq!(events(&a), ["ready-timeout"]);
    assert!(has(&a, &Action::Kill { instance: i }));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(9),
    });
    assert_eq!(events(&a), ["exited", "backing-off"]);
}

#[test]
fn stop_during_backoff_cancels_the_restart() {
    let (mut h, i) = H::running(default_spec());
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Oom,
    });
    assert_eq!(events(&a), ["exited", "oom-killed", "backing-off"]);
    assert_eq!(h.s.status().last_exit, Some(Exit::Oom));
    let (t, _) = H::armed(&a);
    let a = h.step(Input::Stop { grace: None });
    assert!(has(&a, &Action::Cancel(t)));
    assert_eq!(events(&a), ["stopped"]);
    assert_eq!(h.s.phase(), Phase::Stopped);
    // The timer fires anyway (the runtime may not cancel in time).
    let a = h.s.step(h.at() + ms(100), Input::Timer(t)).unwrap();
    assert!(a.is_empty(), "{a:?}");
}

#[test]
fn stop_escalates_to_kill_after_the_grace() {
    let (mut h, i) = H::running(spec(
        r#"
        command = ["/bin/app"]
        stop_grace = "3s"
        restart = { policy = "always" }
        "#,
    ));
    let a = h.step(Input::Stop { grace: None });
    assert!(has(&a, &Action::Terminate { instance: i }));
    let (t, at) = H::armed(&a);
    assert_eq!(at - h.at(), Duration::from_secs(3));
    assert_eq!(h.s.phase(), Phase::Stopping);
    let a = h.fire(t);
    assert!(has(&a, &Action::Kill { instance: i }));
    assert_eq!(events(&a), ["killed"]);
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(9),
    });
    // policy "always", but a stop is never restarted.
    assert_eq!(events(&a), ["exited", "stopped"]);
    assert!(!a.iter().any(|x| matches!(x, Action::Schedule { .. })));
    assert_eq!(h.s.phase(), Phase::Stopped);

    // Exit within the grace: the kill is cancelled.
    let i = launched(&h.step(Input::Start)).unwrap();
    h.step(Input::Launched {
        instance: i,
        pid: 5,
    });
    let (t, _) = H::armed(&h.step(Input::Stop {
        grace: Some(ms(50)),
    }));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(0),
    });
    assert!(has(&a, &Action::Cancel(t)));
    assert!(h
        .s
        .step(h.at() + ms(50), Input::Timer(t))
        .unwrap()
        .is_empty());
}

#[test]
fn restart_command_stops_then_launches_at_once() {
    let (mut h, i) = H::running(default_spec());
    let a = h.step(Input::Restart);
    assert!(has(&a, &Action::Terminate { instance: i }));
    assert!(launched(&a).is_none(), "one instance at a time");
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    assert!(launched(&a).is_some());
}

fn heartbeat_spec() -> Spec {
    spec(
        r#"
        command = ["/bin/app"]
        heartbeat = { enabled = true }
        "#,
    )
}

/// v1 ready with a heartbeat.
fn ready_with_heartbeat() -> (H, InstanceId) {
    let mut h = H::new(heartbeat_spec());
    let i = launched(&h.step(Input::Start)).unwrap();
    h.step(Input::Launched {
        instance: i,
        pid: 1,
    });
    h.step(Input::Heartbeat {
        instance: i,
        notify: Notify::Ready,
    });
    assert_eq!(h.s.phase(), Phase::Ready);
    (h, i)
}

fn reload(h: &mut H, version: VersionId) -> Vec<Action> {
    h.step(Input::Reload {
        version,
        spec: Box::new(heartbeat_spec()),
    })
}

#[test]
fn reload_keeps_the_old_instance_until_the_new_one_is_ready() {
    let (mut h, old) = ready_with_heartbeat();
    let a = reload(&mut h, V2);
    assert!(has(
        &a,
        &Action::Launch {
            instance: InstanceId(2),
            version: V2,
            fresh_root: false,
            respawn: None,
        }
    ));
    let new = InstanceId(2);
    assert_eq!(events(&a), ["reloading"]);
    assert!(!has(&a, &Action::Terminate { instance: old }));
    assert_eq!(
        h.s.step(h.at(), Input::Restart),
        Err(Refused::ReloadInProgress(V2))
    );
    h.step(Input::Launched {
        instance: new,
        pid: 2,
    });
    assert_eq!(h.s.status().instance, Some(old), "old one still current");
    assert_eq!(h.s.version(), V1);
    let a = h.step(Input::Heartbeat {
        instance: new,
        notify: Notify::Ready,
    });
    assert_eq!(events(&a), ["ready", "reloaded"]);
    assert!(has(&a, &Action::Terminate { instance: old }));
    assert_eq!(h.s.version(), V2);
    assert_eq!(h.s.instances(), [new, old]);
    assert!(h.s.reloading());
    let a = h.step(Input::Exited {
        instance: old,
        exit: Exit::Signal(15),
    });
    assert_eq!(events(&a), ["exited"], "the old one is not restarted");
    assert_eq!(h.s.instances(), [new]);
    assert!(!h.s.reloading());
    assert_eq!(h.s.status().pid, Some(2));
}

#[test]
fn a_failed_reload_keeps_the_old_instance() {
    let (mut h, old) = ready_with_heartbeat();
    let new = launched(&reload(&mut h, V2)).unwrap();
    let a = h.step(Input::Exited {
        instance: new,
        exit: Exit::Code(3),
    });
    assert_eq!(events(&a), ["exited", "reload-failed"]);
    assert!(!has(&a, &Action::Terminate { instance: old }));
    assert!(launched(&a).is_none());
    assert_eq!(h.s.version(), V1);
    assert_eq!(h.s.instances(), [old]);
    assert_eq!(h.s.phase(), Phase::Ready);

    // No READY=1 in time: the new one is killed, the old one stays.
    let new = launched(&reload(&mut h, VersionId(3))).unwrap();
    let a = h.step(Input::Launched {
        instance: new,
        pid: 3,
    });
    let (t, _) = H::armed(&a);
    let a = h.fire(t);
    assert_eq!(events(&a), ["ready-timeout", "reload-failed"]);
    assert!(has(&a, &Action::Kill { instance: new }));
    assert!(!has(&a, &Action::Terminate { instance: old }));
    assert_eq!(h.s.version(), V1);
    h.step(Input::Exited {
        instance: new,
        exit: Exit::Signal(9),
    });
    assert_eq!(h.s.instances(), [old]);
}

#[test]
fn reload_of_a_stopped_engine_does_not_start_it() {
    let mut h = H::new(default_spec());
    let a = h.step(Input::Reload {
        version: V2,
        spec: Box::new(default_spec()),
    });
    assert_eq!(events(&a), ["reloaded"]);
    assert!(launched(&a).is_none());
    assert_eq!((h.s.version(), h.s.phase()), (V2, Phase::Stopped));
}

#[test]
fn policy_never_leaves_it_exited_and_late_reports_are_ignored() {
    let (mut h, i) = H::running(spec(
        r#"
        command = ["/bin/app"]
        restart = { policy = "never" }
        "#,
    ));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited"]);
    assert_eq!(h.s.phase(), Phase::Exited);
    for input in [
        Input::Exited {
            instance: i,
            exit: Exit::Code(1),
        },
        Input::Launched {
            instance: i,
            pid: 3,
        },
        Input::Probe {
            instance: i,
            probe: 0,
            ok: false,
        },
        Input::Timer(TimerId(999)),
    ] {
        assert!(h.step(input).is_empty());
    }
}

#[test]
fn stop_during_a_reload_stops_both_instances() {
    let (mut h, old) = ready_with_heartbeat();
    let new = launched(&reload(&mut h, V2)).unwrap();
    h.step(Input::Launched {
        instance: new,
        pid: 2,
    });
    let a = h.step(Input::Stop { grace: None });
    assert!(has(&a, &Action::Terminate { instance: new }));
    assert!(has(&a, &Action::Terminate { instance: old }));
    assert_eq!(events(&a), ["reload-failed"]);
    assert_eq!(h.s.version(), V1);
    h.step(Input::Exited {
        instance: new,
        exit: Exit::Signal(15),
    });
    let a = h.step(Input::Exited {
        instance: old,
        exit: Exit::Signal(15),
    });
    assert_eq!(events(&a), ["exited", "stopped"]);
    assert!(h.s.instances().is_empty());
    assert_eq!(h.s.phase(), Phase::Stopped);
}

#[test]
fn the_old_instance_dying_during_a_reload_hands_over_or_comes_back() {
    // The new one becomes ready: it takes over, nothing to stop.
    let (mut h, old) = ready_with_heartbeat();
    let new = launched(&reload(&mut h, V2)).unwrap();
    let a = h.step(Input::Exited {
        instance: old,
        exit: Exit::Code(1),
    });
    assert_eq!(events(&a), ["exited"]);
    assert!(launched(&a).is_none(), "no restart beside the new one");
    h.step(Input::Launched {
        instance: new,
        pid: 2,
    });
    let a = h.step(Input::Heartbeat {
        instance: new,
        notify: Notify::Ready,
    });
    assert_eq!(events(&a), ["ready", "reloaded"]);
    assert_eq!((h.s.version(), h.s.instances()), (V2, vec![new]));

    // The new one fails too: the old version through the restart policy.
    let (mut h, old) = ready_with_heartbeat();
    let new = launched(&reload(&mut h, V2)).unwrap();
    h.step(Input::Exited {
        instance: old,
        exit: Exit::Code(1),
    });
    let a = h.step(Input::LaunchFailed {
        instance: new,
        reason: "no such image".into(),
    });
    assert_eq!(
        events(&a),
        ["launch-failed", "exited", "reload-failed", "backing-off"]
    );
    let (t, _) = H::armed(&a);
    let a = h.fire(t);
    assert!(matches!(
        a.first(),
        Some(Action::Launch {
            version: V1,
            fresh_root: false,
            ..
        })
    ));
}

#[test]
fn on_failure_reload_relaunches_from_a_fresh_root_and_reboot_needs_the_policy() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        on_failure = ["reboot-node", "reload"]
        [[probes]]
        tcp = 80
        interval = "1s"
        timeout = "500ms"
        threshold = 1
        "#,
    );
    let (mut h, i) = H::running(s.clone());
    let fail = |h: &mut H, i| {
        let t = *h.timers.keys().next().expect("probe timer");
        h.fire(t);
        h.step(Input::Probe {
            instance: i,
            probe: 0,
            ok: false,
        })
    };
    // The landlord's policy says no: reload (a fresh root) instead.
    let a = fail(&mut h, i);
    assert!(!a.iter().any(|x| matches!(x, Action::RebootNode { .. })));
    assert!(has(&a, &Action::Terminate { instance: i }));
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    let (t, _) = H::armed(&a);
    let a = h.fire(t);
    assert!(matches!(
        a.first(),
        Some(Action::Launch {
            fresh_root: true,
            ..
        })
    ));
    // The policy allows it: the node controller is asked, nothing else.
    let (mut h, i) = H::running(s);
    h.s.set_reboot_allowed(true);
    let a = fail(&mut h, i);
    assert!(has(
        &a,
        &Action::RebootNode {
            failure: Failure::Probe {
                probe: 0,
                failures: 1
            }
        }
    ));
    assert!(!has(&a, &Action::Terminate { instance: i }));
}

/// A fresh root's instance that fails to launch is tried again from a
/// fresh root through the backoff, [`MAX_FRESH_ROOT_TRIES`] times in a
/// row; then the supervisor says so and restarts from the previous root.
/// One that starts resets the count.
#[test]
fn fresh_root_launches_are_retried_with_backoff_then_fall_back() {
    let s = spec(
        r#"
        command = ["/bin/app"]
        on_failure = ["reload"]
        restart.policy = "never"
        [[probes]]
        tcp = 80
        interval = "1s"
        timeout = "500ms"
        threshold = 1
        "#,
    );
    let (mut h, i) = H::running(s);
    let t = *h.timers.keys().next().expect("probe timer");
    h.fire(t);
    h.step(Input::Probe {
        instance: i,
        probe: 0,
        ok: false,
    });
    let a = h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    let (mut t, mut at) = H::armed(&a);
    let mut delays = Vec::new();
    for n in 1..=MAX_FRESH_ROOT_TRIES {
        let a = h.fire(t);
        let fresh = a.iter().find_map(|x| match x {
            Action::Launch {
                instance,
                fresh_root,
                ..
            } => Some((*instance, *fresh_root)),
            _ => None,
        });
        let (inst, fresh) = fresh.expect("a launch");
        assert!(fresh, "try {n} is from a fresh root");
        let a = h.step(Input::LaunchFailed {
            instance: inst,
            reason: "no space left".into(),
        });
        let (t2, at2) = H::armed(&a);
        delays.push(at2 - at);
        (t, at) = (t2, at2);
        if n < MAX_FRESH_ROOT_TRIES {
            assert!(!events(&a).contains(&"image-reload-failed"), "{a:?}");
        } else {
            assert!(events(&a).contains(&"image-reload-failed"), "{a:?}");
            assert!(has(
                &a,
                &Action::Emit(Event::ImageReloadFailed {
                    instance: inst,
                    reason: format!("{MAX_FRESH_ROOT_TRIES} launches from a fresh root failed in a row; restarting from the previous root"),
                })
            ));
        }
    }
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]),
        "backoff: {delays:?}"
    );
    // Then from the previous root (the policy is `never`: forced).
    let a = h.fire(t);
    assert!(
        matches!(
            a.first(),
            Some(Action::Launch {
                fresh_root: false,
                ..
            })
        ),
        "{a:?}"
    );
    let inst = launched(&a).unwrap();
    h.step(Input::Launched {
        instance: inst,
        pid: 7,
    });
    assert_eq!(h.s.status().phase, Phase::Ready);
}

// ---------------------------------------------------------------------------
// Property: for any sequence of inputs, at most one instance is alive
// outside a reload (two at most in one), no launch happens while the tenant
// has the engine stopped, and signals go only to live instances.

#[derive(Debug, Clone)]
enum Move {
    Start,
    Stop(bool),
    Restart,
    Reload,
    Launched(usize),
    Exit(usize, u8),
    Ready(usize),
    Watchdog(usize),
    Probe(usize, bool),
    Fire(usize),
    Advance(u16),
    Stale(u8),
    /// The shim of the k-th instance restarts its engine in place (only
    /// if granted and unused, and the exit is one the grant covers).
    Respawn(usize, u8),
}

fn arb_move() -> impl Strategy<Value = Move> {
    prop_oneof![
        2 => Just(Move::Start),
        2 => any::<bool>().prop_map(Move::Stop),
        1 => Just(Move::Restart),
        2 => Just(Move::Reload),
        4 => any::<usize>().prop_map(Move::Launched),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(k, e)| Move::Exit(k, e)),
        3 => any::<usize>().prop_map(Move::Ready),
        1 => any::<usize>().prop_map(Move::Watchdog),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(k, ok)| Move::Probe(k, ok)),
        6 => any::<usize>().prop_map(Move::Fire),
        2 => (0u16..5000).prop_map(Move::Advance),
        1 => any::<u8>().prop_map(Move::Stale),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(k, e)| Move::Respawn(k, e)),
    ]
}

fn prop_specs() -> Vec<Spec> {
    vec![
        default_spec(),
        spec(
            r#"
            command = ["/bin/app"]
            on_failure = ["notify", "restart"]
            stop_grace = "0ms"
            [restart]
            policy = "always"
            give_up = { restarts = 3, within = "10s" }
            [heartbeat]
            enabled = true
            watchdog = "1s"
            ready_timeout = "2s"
            [[probes]]
            tcp = 80
            interval = "500ms"
            timeout = "100ms"
            threshold = 2
            "#,
        ),
        spec(
            r#"
            command = ["/bin/app"]
            on_failure = ["reload", "notify"]
            restart = { policy = "never" }
            [[probes]]
            exec = ["/bin/check"]
            interval = "1s"
            timeout = "500ms"
            threshold = 1
            "#,
        ),
    ]
}

fn nth<T: Copy>(v: &[T], k: usize) -> Option<T> {
    (!v.is_empty()).then(|| v[k % v.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn one_instance_outside_a_reload_and_no_launch_while_stopped(
        which in 0usize..3,
        reload_which in 0usize..3,
        moves in proptest::collection::vec(arb_move(), 1..120),
    ) {
        let specs = prop_specs();
        let mut h = H::new(specs[which].clone());
        // The runtime's view: live instances (launched or not), and whether
        // each exec'd.
        let mut live: BTreeMap<InstanceId, bool> = BTreeMap::new();
        let mut seen: BTreeSet<InstanceId> = BTreeSet::new();
        let mut stopped = true;
        let mut next_version = 2u64;
        // Unused grants of live instances, used ones whose shim waits to
        // respawn; instances a stop was sent to.
        let mut grants: BTreeMap<InstanceId, Respawn> = BTreeMap::new();
        let mut waiting: BTreeMap<InstanceId, Respawn> = BTreeMap::new();
        let mut signalled: BTreeSet<InstanceId> = BTreeSet::new();
        // Instances whose engine's exit was told from the shim's record
        // and that have not respawned since.
        let mut reported: BTreeSet<InstanceId> = BTreeSet::new();
        for m in moves {
            let ids: Vec<InstanceId> = live.keys().copied().collect();
            let timers: Vec<TimerId> = h.timers.keys().copied().collect();
            let input = match m {
                Move::Start => Some(Input::Start),
                Move::Stop(zero) => Some(Input::Stop { grace: zero.then_some(Duration::ZERO) }),
                Move::Restart => Some(Input::Restart),
                Move::Reload => {
                    next_version += 1;
                    Some(Input::Reload {
                        version: VersionId(next_version),
                        spec: Box::new(specs[reload_which].clone()),
                    })
                }
                Move::Launched(k) => nth(&ids, k)
                    .filter(|i| !live[i])
                    .map(|instance| Input::Launched { instance, pid: 1000 }),
                Move::Exit(k, e) => nth(&ids, k).map(|instance| {
                    if live[&instance] {
                        let exit = match e % 4 {
                            0 => Exit::Code(0),
                            1 => Exit::Code(1),
                            2 => Exit::Signal(9),
                            _ => Exit::Oom,
                        };
                        Input::Exited { instance, exit }
                    } else {
                        Input::LaunchFailed { instance, reason: "exec".into() }
                    }
                }),
                Move::Ready(k) => nth(&ids, k).map(|instance| Input::Heartbeat { instance, notify: Notify::Ready }),
                Move::Watchdog(k) => nth(&ids, k).map(|instance| Input::Heartbeat { instance, notify: Notify::Watchdog }),
                Move::Probe(k, ok) => nth(&ids, k).map(|instance| Input::Probe { instance, probe: 0, ok }),
                Move::Fire(k) => nth(&timers, k).map(|t| {
                    let at = h.timers.remove(&t).unwrap();
                    h.now = h.now.max(at - h.t0);
                    Input::Timer(t)
                }),
                Move::Advance(n) => {
                    h.advance(ms(u64::from(n)));
                    None
                }
                Move::Stale(n) => Some(Input::Exited { instance: InstanceId(10_000 + u64::from(n)), exit: Exit::Code(1) }),
                Move::Respawn(k, e) => nth(&ids, k).filter(|i| live[i]).and_then(|instance| {
                    if waiting.contains_key(&instance) {
                        return Some(Input::Respawned { instance });
                    }
                    let g = grants.get(&instance)?;
                    let exit = match e % 4 {
                        0 => Exit::Code(0),
                        1 => Exit::Code(1),
                        2 => Exit::Signal(9),
                        _ => Exit::Oom,
                    };
                    (g.on_clean_exit || !exit.clean()).then_some(Input::Respawning { instance, exit })
                }),
            };
            let Some(input) = input else { continue };
            let command = matches!(input, Input::Start | Input::Stop { .. } | Input::Restart | Input::Reload { .. });
            match &input {
                Input::Exited { instance, .. } | Input::LaunchFailed { instance, .. } => {
                    live.remove(instance);
                }
                Input::Launched { instance, .. } => {
                    live.insert(*instance, true);
                }
                _ => {}
            }
            let before: BTreeSet<InstanceId> = live.keys().copied().collect();
            let respawning = match &input {
                Input::Respawning { instance, .. } => grants.remove(instance).map(|g| {
                    waiting.insert(*instance, g);
                    (*instance, g)
                }),
                _ => None,
            };
            let respawned = match &input {
                Input::Respawned { instance } => waiting.remove(instance).map(|g| (*instance, g)),
                _ => None,
            };
            if let Input::Exited { instance, .. } | Input::LaunchFailed { instance, .. } = &input {
                waiting.remove(instance);
                grants.remove(instance);
            }
            let r = h.s.step(h.at(), input.clone());
            let a = match r {
                Ok(a) => a,
                Err(_) => {
                    prop_assert!(command, "only commands are refused");
                    continue;
                }
            };
            h.note(&a);
            match input {
                Input::Stop { .. } => stopped = true,
                Input::Start | Input::Restart => stopped = false,
                _ => {}
            }
            // Exactly one `exited` per engine exit: from the record, or from
            // the instance's end when no record told it.
            let exited_events = |i: InstanceId| a.iter().filter(|x| matches!(x,
                Action::Emit(Event::Exited { instance, .. }) if *instance == i)).count();
            match &input {
                Input::Respawning { instance, .. } => {
                    prop_assert_eq!(exited_events(*instance), 1, "{:?}", a);
                    reported.insert(*instance);
                }
                Input::Respawned { instance } => {
                    prop_assert_eq!(exited_events(*instance), 0, "{:?}", a);
                    reported.remove(instance);
                }
                // (Not a stale report: those name no instance there was.)
                Input::Exited { instance, .. } | Input::LaunchFailed { instance, .. }
                    if seen.contains(instance) =>
                {
                    let want = usize::from(!reported.remove(instance));
                    prop_assert_eq!(exited_events(*instance), want, "{:?}", a);
                }
                _ => {}
            }
            if let Some((i, g)) = respawning {
                // The supervisor agrees with what the shim does: the first
                // restart of a series after the granted delay; or, a stop
                // on its way or a reload running, no restart (the shim is
                // ended).
                let backing: Vec<_> = a.iter().filter_map(|x| match x {
                    Action::Emit(Event::BackingOff { attempt, delay }) => Some((*attempt, *delay)),
                    _ => None,
                }).collect();
                let killed = has(&a, &Action::Kill { instance: i });
                if signalled.contains(&i) {
                    prop_assert!(backing.is_empty(), "{:?}", a);
                } else {
                    prop_assert!(backing == vec![(1, g.delay)] || (backing.is_empty() && killed), "{:?}", a);
                }
                prop_assert!(launched(&a).is_none());
            }
            if let Some((i, g)) = respawned {
                let restarted: Vec<_> = a.iter().filter_map(|x| match x {
                    Action::Emit(Event::Restarted { instance, attempt, delay }) => Some((*instance, *attempt, *delay)),
                    _ => None,
                }).collect();
                if signalled.contains(&i) {
                    prop_assert!(restarted.is_empty(), "{:?}", a);
                } else {
                    prop_assert_eq!(restarted, vec![(i, 1, g.delay)], "{:?}", a);
                }
                prop_assert!(launched(&a).is_none());
            }
            for x in &a {
                match x {
                    Action::Launch { instance, respawn, .. } => {
                        if let Some(g) = respawn {
                            grants.insert(*instance, *g);
                        }
                        prop_assert!(!stopped, "launch while stopped: {:?} after {:?}", a, input);
                        prop_assert!(seen.insert(*instance), "instance id reused");
                        live.insert(*instance, false);
                    }
                    Action::Terminate { instance } | Action::Kill { instance } => {
                        signalled.insert(*instance);
                        prop_assert!(before.contains(instance) || live.contains_key(instance),
                            "signal to a dead instance {:?}", instance);
                    }
                    _ => {}
                }
            }
            let alive: Vec<InstanceId> = live.keys().copied().collect();
            let mut mine = h.s.instances();
            mine.sort();
            prop_assert_eq!(&mine, &alive, "the supervisor's instances are the runtime's");
            prop_assert!(alive.len() <= 2, "{:?}", alive);
            prop_assert!(alive.len() <= 1 || h.s.reloading(), "two instances outside a reload: {:?}", alive);
            prop_assert_eq!(h.s.enabled(), !stopped);
            if stopped {
                prop_assert!(matches!(h.s.phase(), Phase::Stopped | Phase::Stopping), "{:?}", h.s.phase());
            }
        }
    }
}

#[test]
fn only_an_enabled_engine_at_rest_is_settled() {
    let never = spec("command = [\"/bin/app\"]\n[restart]\npolicy = \"never\"");
    let mut h = H::new(never.clone());
    assert_eq!(h.s.settled(), None, "never started: stopped, not at rest");
    let (mut h2, i) = H::running(never);
    assert_eq!(h2.s.settled(), None, "running");
    let a = h2.step(Input::Exited {
        instance: i,
        exit: Exit::Code(0),
    });
    assert_eq!(events(&a), ["exited"]);
    assert_eq!(h2.s.settled(), Some(Settled::Exited));
    // Backing off is not at rest (a restart is pending).
    let (mut h3, i) = H::running(default_spec());
    h3.step(Input::Exited {
        instance: i,
        exit: Exit::Code(1),
    });
    assert_eq!(h3.s.phase(), Phase::BackingOff);
    assert_eq!(h3.s.settled(), None);
    // Stopped by the tenant: not wanted running.
    let a = h.step(Input::Start);
    let i = launched(&a).unwrap();
    h.step(Input::Launched {
        instance: i,
        pid: 5,
    });
    h.step(Input::Stop { grace: None });
    h.step(Input::Exited {
        instance: i,
        exit: Exit::Signal(15),
    });
    assert_eq!(h.s.phase(), Phase::Stopped);
    assert_eq!(h.s.settled(), None);
    // A launch that failed is not the engine's own end.
    let a = h.step(Input::Start);
    let i = launched(&a).unwrap();
    h.step(Input::LaunchFailed {
        instance: i,
        reason: "no cgroup".into(),
    });
    assert_eq!(h.s.phase(), Phase::Exited);
    assert_eq!(h.s.settled(), None);
}

#[test]
fn a_restored_rest_is_as_it_was_and_a_start_begins_afresh() {
    let mut h = H::new(default_spec());
    h.s.restore_settled(Settled::GaveUp, Some(Exit::Code(2)), 4);
    let st = h.s.status();
    assert_eq!(
        (h.s.phase(), st.last_exit, st.restarts, h.s.enabled()),
        (Phase::GaveUp, Some(Exit::Code(2)), 4, true)
    );
    assert_eq!(h.s.settled(), Some(Settled::GaveUp));
    assert!(launched(&h.step(Input::Start)).is_some());
    // Never over something alive.
    h.s.restore_settled(Settled::Exited, None, 0);
    assert_eq!(h.s.phase(), Phase::Starting);
}

#[test]
fn an_exit_while_no_agent_watched_is_decided_by_the_policy() {
    for (policy, exit, restarts) in [
        ("never", Exit::Code(1), false),
        ("on-failure", Exit::Code(0), false),
        ("on-failure", Exit::Oom, true),
        ("always", Exit::Code(0), true),
    ] {
        let mut h = H::new(spec(&format!(
            "command = [\"/bin/app\"]\n[restart]\npolicy = {policy:?}"
        )));
        let at = h.at();
        let a = h.s.resume_after_exit(at, exit);
        h.note(&a);
        assert!(launched(&a).is_none(), "a timer, never a launch here");
        assert_eq!(h.s.status().last_exit, Some(exit));
        assert!(h.s.enabled());
        if restarts {
            let mut want = vec!["exited"];
            if exit == Exit::Oom {
                want.push("oom-killed");
            }
            want.push("backing-off");
            assert_eq!(events(&a), want, "{policy}");
            let (t, when) = H::armed(&a);
            assert_eq!(when, at + ms(100), "the first delay");
            assert!(launched(&h.fire(t)).is_some());
        } else {
            assert_eq!(events(&a), ["exited"], "{policy}");
            assert_eq!(h.s.settled(), Some(Settled::Exited), "{policy}");
        }
    }
    // Ignored over something alive.
    let (mut h, _) = H::running(default_spec());
    let at = h.at();
    assert!(h.s.resume_after_exit(at, Exit::Code(1)).is_empty());
    assert_eq!(h.s.phase(), Phase::Ready);
}
