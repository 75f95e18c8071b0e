//! Node health: sensor sources (EDAC, hwmon, thermal zones, block I/O
//! errors, smartctl, NIC link state), each read on a thread of its own
//! under a deadline, and the faults found in what they read.
//!
//! A source that misses its deadline is reported as a `stuck` fault; its
//! thread is left to finish (a hung sysfs read cannot be cancelled) and the
//! source is not started again until it has. Every input is bounded: see
//! [`read`] and [`smart`] for the limits, and docs/health.md.

#![warn(missing_docs)]

pub mod eval;
pub mod net;
pub mod nvme;
pub mod read;
pub mod run;
pub mod smart;
pub mod sources;
mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use read::{FsReader, Reader};
pub use types::*;

/// Where the sources look; tests point them at fixture trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// Device nodes handed to smartctl (`/dev`).
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

/// What to read and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to read.
    pub roots: Roots,
    /// The sources turned on.
    pub enabled: Vec<Source>,
    /// Deadline of each sysfs source.
    pub deadline: Duration,
    /// Deadline of one smartctl run (the smart source's deadline is this
    /// plus `deadline`, for listing the disks).
    pub smart_timeout: Duration,
    /// The smartctl binary.
    pub smartctl: PathBuf,
    /// systemd-networkd's DHCP leases (`/run/systemd/netif/leases`).
    pub leases_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            roots: Roots::default(),
            enabled: Source::ALL.to_vec(),
            deadline: Duration::from_secs(2),
            smart_timeout: Duration::from_secs(10),
            smartctl: "/usr/sbin/smartctl".into(),
            leases_dir: "/run/systemd/netif/leases".into(),
        }
    }
}

impl Settings {
    /// `source`'s deadline.
    pub fn deadline_of(&self, source: Source) -> Duration {
        match source {
            Source::Smart => self.smart_timeout + self.deadline,
            _ => self.deadline,
        }
    }
}

/// The agent's own checks (`tpm`, `boundary`, `volume`, `engines`), done
/// by the agent, which owns what they look at. Each is called on a thread
/// of its own under the sysfs deadline (`Settings::deadline`) like a
/// sensor source: one that blocks (a hung key thread) is `stuck`, and is
/// not called again until it returns.
pub trait SelfChecks: Send + Sync {
    /// One cheap TPM command through the key thread.
    fn tpm(&self) -> TpmCheck;
    /// The boundary's table as the drift check last found it.
    fn boundary(&self) -> BoundaryCheck;
    /// The tenant volume's state and mount.
    fn volume(&self) -> VolumeCheck;
    /// Engine counts by supervision state.
    fn engines(&self) -> EnginesCheck;
    /// What the agent knows of a check that missed its deadline (the TPM:
    /// the key thread's running job and its age), shown as a problem of
    /// the stuck source. Must not block: it is asked on the report's path.
    fn stuck_detail(&self, _source: Source) -> Option<String> {
        None
    }
}

/// Reads one source (on its own thread).
fn read_source(
    source: Source,
    s: &Settings,
    r: &dyn Reader,
    checks: Option<&dyn SelfChecks>,
) -> (Readings, Vec<Problem>) {
    if let Some(readings) = run_check(source, checks) {
        return (readings, Vec::new());
    }
    let (readings, mut problems) = read_unbounded(source, s, r);
    if problems.len() > read::MAX_PROBLEMS {
        let more = problems.len() - (read::MAX_PROBLEMS - 1);
        problems.truncate(read::MAX_PROBLEMS - 1);
        problems.push(Problem {
            subject: source.as_str().into(),
            message: format!("{more} more unreadable entries not listed"),
        });
    }
    (readings, problems)
}

/// An agent check's readings; None for a sensor source (or no checks).
fn run_check(source: Source, checks: Option<&dyn SelfChecks>) -> Option<Readings> {
    let c = checks?;
    Some(match source {
        Source::Tpm => Readings::Tpm(vec![c.tpm()]),
        Source::Boundary => Readings::Boundary(vec![c.boundary()]),
        Source::Volume => Readings::Volume(vec![c.volume()]),
        Source::Engines => Readings::Engines(vec![c.engines()]),
        _ => return None,
    })
}

fn read_unbounded(source: Source, s: &Settings, r: &dyn Reader) -> (Readings, Vec<Problem>) {
    let sys = &s.roots.sys;
    match source {
        Source::Edac => sources::edac(r, sys),
        Source::Hwmon => sources::hwmon(r, sys),
        Source::Thermal => sources::thermal(r, sys),
        Source::Block => sources::block(r, sys),
        Source::Smart => smart::smart(r, sys, &s.roots.dev, &s.smartctl, s.smart_timeout),
        Source::Net => sources::net(r, sys),
        // Never reached: collect() lists the checks only with SelfChecks,
        // and run_check() answers them.
        Source::Tpm | Source::Boundary | Source::Volume | Source::Engines => (
            Readings::Net(Vec::new()),
            vec![Problem {
                subject: source.as_str().into(),
                message: "the agent's own check has no checker".into(),
            }],
        ),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A report already taken ([`Monitor::last`]).
#[derive(Debug, Clone)]
pub struct Last {
    /// The report.
    pub report: Report,
    /// Since it was finished.
    pub age: Duration,
    /// How long it took.
    pub took: Duration,
}

/// Takes reports: holds the settings, the reader, the previous report's
/// counters and which sources still have a read running.
pub struct Monitor {
    settings: Settings,
    reader: Arc<dyn Reader>,
    checks: Option<Arc<dyn SelfChecks>>,
    state: Mutex<State>,
    /// The rtnetlink watcher, or why it could not start; None: not asked
    /// for (the report's `network` is then null).
    net: Option<Result<Arc<net::NetWatch>, String>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Clears a source's busy flag when its thread is done, also if the read
/// panicked (a bug there must not mark the source stuck for good).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Default)]
struct State {
    /// The last report and when its oldest part was read: a full report's
    /// end; for a report of one source (`report_only`), the full report's
    /// it kept the rest of. So a partial report is never shared with a
    /// caller that asked for a fresh one, and its age is its oldest part's.
    last: Option<(Instant, Report)>,
    /// How long the last full report took.
    last_took: Duration,
    baseline: eval::Baseline,
    /// The counters as the periodic collector last saw them
    /// ([`Monitor::collector_report`]).
    collector: eval::Baseline,
    /// Set while a source's thread runs; a stuck thread keeps it set.
    busy: BTreeMap<Source, Arc<AtomicBool>>,
}

impl Monitor {
    /// A monitor reading the real filesystem.
    pub fn new(settings: Settings) -> Self {
        Self::with_reader(settings, Arc::new(FsReader))
    }

    /// A monitor reading through `reader` (tests).
    pub fn with_reader(settings: Settings, reader: Arc<dyn Reader>) -> Self {
        Self {
            settings,
            reader,
            checks: None,
            state: Mutex::new(State::default()),
            net: None,
        }
    }

    /// Adds the agent's own checks to every report (listed after the
    /// sensors).
    pub fn with_checks(mut self, checks: Arc<dyn SelfChecks>) -> Self {
        self.checks = Some(checks);
        self
    }

    /// Adds the network part to reports: the watcher's state and events
    /// (or why it could not start) and the DHCP leases.
    pub fn with_network(mut self, watch: Result<Arc<net::NetWatch>, String>) -> Self {
        self.net = Some(watch);
        self
    }

    /// The network part of a report now.
    pub fn network(&self) -> Option<net::Network> {
        let watch = self.net.as_ref()?;
        let mut n = match watch {
            Ok(w) => w.snapshot(),
            Err(e) => net::Network {
                error: Some(e.clone()),
                ..Default::default()
            },
        };
        let name_of = |i: u32| watch.as_ref().ok().and_then(|w| w.name_of(i));
        let (leases, problems) = net::leases::read_leases(&self.settings.leases_dir, &name_of);
        n.leases = leases;
        n.problems = problems;
        Some(n)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Reads every enabled source in parallel and evaluates the faults.
    /// Blocks for at most the longest source deadline. Reports are taken
    /// one at a time; callers that asked while one was being taken get
    /// that one (it is fresh for them), so a burst of callers costs one
    /// report and none waits for two.
    pub fn report(&self) -> Report {
        self.report_asked_at(Instant::now())
    }

    /// [`Monitor::report`] for a caller that asked at `asked`: a report
    /// finished since then is returned as it is.
    pub fn report_asked_at(&self, asked: Instant) -> Report {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((done, r)) = &st.last {
            if *done >= asked {
                return r.clone();
            }
        }
        let start = Instant::now();
        let sources = self.collect(&mut st.busy);
        let (faults, baseline) = eval::evaluate(&sources, &st.baseline);
        st.baseline = baseline;
        self.finish(&mut st, start, sources, faults, true)
    }

    /// Adds the network part (a watcher that is not running is a fault),
    /// makes the report and keeps it as the last one.
    fn finish(
        &self,
        st: &mut State,
        start: Instant,
        sources: Vec<SourceReport>,
        mut faults: Vec<Fault>,
        full: bool,
    ) -> Report {
        let network = self.network();
        if let Some(e) = network.as_ref().and_then(|n| n.error.as_ref()) {
            // Not watching: link and address changes go unseen.
            faults.push(Fault {
                severity: Severity::Warning,
                source: Source::Net,
                subject: "rtnetlink".into(),
                message: format!("links and addresses are not watched: {e}"),
            });
        }
        faults.sort_by_key(|f| std::cmp::Reverse(f.severity));
        let report = Report {
            taken_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            severity: faults.first().map_or(Severity::Ok, |f| f.severity),
            sources,
            faults,
            network,
        };
        let done = match (&st.last, full) {
            (Some((oldest, _)), false) => *oldest,
            _ => Instant::now(),
        };
        st.last = Some((done, report.clone()));
        if full {
            st.last_took = start.elapsed();
        }
        report
    }

    /// A report for a link event: the `net` source read again (sysfs,
    /// milliseconds), every other source's readings and faults as the
    /// last report had them, so a link fault is known without waiting for
    /// smartctl or a slow source. Before the first report, or with `net`
    /// not enabled, a full [`Monitor::report`].
    pub fn report_links(&self) -> Report {
        self.report_only(Source::Net)
    }

    /// A report for an event about one source (`net`: a link event;
    /// `smart`: an NVMe SMART event): that source read again, every other
    /// source's readings and faults as the last report had them. Before
    /// the first report, or with `source` not enabled, a full
    /// [`Monitor::report`].
    pub fn report_only(&self, source: Source) -> Report {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let last = match &st.last {
            Some((_, r)) if self.settings.enabled.contains(&source) => r.clone(),
            _ => {
                drop(st);
                return self.report();
            }
        };
        let start = Instant::now();
        let fresh = self.collect_only(&mut st.busy, Some(source));
        let (fresh_faults, baseline) = eval::evaluate(&fresh, &st.baseline);
        st.baseline = baseline;
        let mut sources = last.sources;
        for f in fresh {
            if let Some(s) = sources.iter_mut().find(|s| s.source == f.source) {
                *s = f;
            }
        }
        // The source's faults anew, the others as they were, except the
        // rtnetlink one, which `finish` adds as it is now.
        let faults: Vec<Fault> = last
            .faults
            .into_iter()
            .filter(|f| {
                f.source != source && !(f.source == Source::Net && f.subject == "rtnetlink")
            })
            .chain(fresh_faults)
            .collect();
        self.finish(&mut st, start, sources, faults, false)
    }

    /// The periodic collector's report (what drives `FaultsChanged` and
    /// the corrective actions): [`Monitor::report_asked_at`], or
    /// [`Monitor::report_only`] for an event about `only`, with rising
    /// counters (corrected memory errors, I/O errors, carrier changes)
    /// judged against the collector's own previous report. Judged against
    /// whichever report came last, an on-demand one (`landlordctl health`,
    /// a metrics scrape) took the rise, and the collection, its signal and
    /// its actions never saw it (review).
    pub fn collector_report(&self, asked: Instant, only: Option<Source>) -> Report {
        let mut r = match only {
            Some(source) => self.report_only(source),
            None => self.report_asked_at(asked),
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (faults, next) = eval::evaluate(&r.sources, &st.collector);
        st.collector = next;
        drop(st);
        // `finish`'s own fault (the link watcher) as the report has it.
        let watcher = r
            .faults
            .iter()
            .filter(|f| f.source == Source::Net && f.subject == "rtnetlink")
            .cloned();
        let mut faults: Vec<Fault> = faults.into_iter().chain(watcher).collect();
        faults.sort_by_key(|f| std::cmp::Reverse(f.severity));
        r.severity = faults.first().map_or(Severity::Ok, |f| f.severity);
        r.faults = faults;
        r
    }

    /// The last report taken (by anyone), with its age and how long it
    /// took; None before the first. Never waits for a report being taken.
    pub fn last(&self) -> Option<Last> {
        let st = self.state.try_lock().ok()?;
        st.last.as_ref().map(|(done, r)| Last {
            report: r.clone(),
            age: done.elapsed(),
            took: st.last_took,
        })
    }

    fn collect(&self, busy: &mut BTreeMap<Source, Arc<AtomicBool>>) -> Vec<SourceReport> {
        self.collect_only(busy, None)
    }

    /// Reads every source, or only `only`.
    fn collect_only(
        &self,
        busy: &mut BTreeMap<Source, Arc<AtomicBool>>,
        only: Option<Source>,
    ) -> Vec<SourceReport> {
        let start = Instant::now();
        // None: the read panicked (a bug), which is not "slow".
        let (tx, rx) = mpsc::channel::<(Source, Option<(Readings, Vec<Problem>)>)>();
        let mut out: BTreeMap<Source, SourceReport> = BTreeMap::new();
        let mut pending: BTreeMap<Source, Instant> = BTreeMap::new();
        let checks: &[Source] = if self.checks.is_some() {
            &Source::CHECKS
        } else {
            &[]
        };
        for source in Source::ALL.into_iter().chain(checks.iter().copied()) {
            if only.is_some_and(|o| o != source) {
                continue;
            }
            let deadline = self.settings.deadline_of(source);
            let mut report = SourceReport {
                source,
                status: SourceStatus::Disabled,
                deadline_ms: ms(deadline),
                elapsed_ms: 0,
                readings: None,
                problems: Vec::new(),
            };
            // The agent's checks are always on: they are what the agent
            // itself owns.
            if !self.settings.enabled.contains(&source) && !Source::CHECKS.contains(&source) {
                out.insert(source, report);
                continue;
            }
            let flag = busy.entry(source).or_default().clone();
            // One read per source at a time: a hung one is not joined by
            // another each report.
            if flag.swap(true, Ordering::AcqRel) {
                report.status = SourceStatus::Stuck;
                report.elapsed_ms = report.deadline_ms;
                report.problems.push(Problem {
                    subject: source.as_str().into(),
                    message: "its previous read has not returned yet".into(),
                });
                out.insert(source, report);
                continue;
            }
            let (tx, settings, reader) = (tx.clone(), self.settings.clone(), self.reader.clone());
            let checks = self.checks.clone();
            let running = Running(flag.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("health-{}", source.as_str()))
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        read_source(source, &settings, reader.as_ref(), checks.as_deref())
                    }));
                    drop(running);
                    let _ = tx.send((source, r.ok()));
                });
            match spawned {
                Ok(_) => {
                    pending.insert(source, start + deadline);
                    report.status = SourceStatus::Stuck;
                    report.elapsed_ms = report.deadline_ms;
                }
                Err(e) => {
                    // The closure, with its `Running`, was dropped: the
                    // flag is clear again.
                    report.status = SourceStatus::Failed;
                    report.problems.push(Problem {
                        subject: source.as_str().into(),
                        message: format!("no thread: {e}"),
                    });
                }
            }
            out.insert(source, report);
        }
        drop(tx);
        while let Some(next) = pending.values().min().copied() {
            let now = Instant::now();
            match rx.recv_timeout(next.saturating_duration_since(now)) {
                Ok((source, answer)) => {
                    let Some(due) = pending.remove(&source) else {
                        continue;
                    };
                    let at = Instant::now();
                    // Late is stuck, even if it came back meanwhile.
                    if at > due {
                        continue;
                    }
                    let Some(r) = out.get_mut(&source) else {
                        continue;
                    };
                    r.elapsed_ms = ms(at - start);
                    match answer {
                        Some((readings, problems)) => {
                            r.status = SourceStatus::Ok;
                            r.readings = Some(readings);
                            r.problems = problems;
                        }
                        None => {
                            r.status = SourceStatus::Failed;
                            r.problems.push(Problem {
                                subject: source.as_str().into(),
                                message: "its read panicked (a bug: see the agent's log)".into(),
                            });
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    pending.retain(|_, due| *due > now);
                }
                // Every thread answered or is gone.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(checks) = &self.checks {
            for r in out.values_mut() {
                if r.status != SourceStatus::Stuck {
                    continue;
                }
                if let Some(detail) = checks.stuck_detail(r.source) {
                    r.problems.push(Problem {
                        subject: r.source.as_str().into(),
                        message: detail,
                    });
                }
            }
        }
        out.into_values().collect()
    }
}
