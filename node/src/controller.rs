//! The controller thread and its workflows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::SystemTime;

use base64::Engine as _;
use leasehold_tpm::{ChangeKind, Confirm, KeyChange, KeyError, Role};
use tokio::sync::oneshot;

use leasehold_engines::budget::{self, Budget};
use leasehold_engines::spec::{Spec, MAX_STOP_GRACE};

use crate::backend::{Backends, BoundaryChange, Failure, FailureKind, Wiped};
use crate::receipt::{Receipt, SignedReceipt, RECEIPT_FORMAT};
use crate::{
    check_name, generations, kind_name, shown, Caller, ChangeReport, Command, EngineCommand,
    EngineStatus, EngineView, NodeError, Outcome, Request, Snapshot, StopReport, ERASE_STOP_GRACE,
    MAX_IMAGE_REF, MAX_SECRETS, MAX_SECRET_BYTES, QUEUE_DEPTH,
};

/// Room kept past [`QUEUE_DEPTH`] for urgent changes
/// ([`Command::is_urgent`]): a full queue refuses them only when this many
/// urgent ones already wait too.
pub const URGENT_RESERVE: usize = 4;

/// A queued change.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<Outcome, NodeError>>);

impl Pending {
    /// Waits for the outcome.
    pub async fn outcome(self) -> Result<Outcome, NodeError> {
        self.0.await.map_err(|_| NodeError::Stopped)?
    }
}

type Reply = oneshot::Sender<Result<Outcome, NodeError>>;

struct Job {
    req: Request,
    reply: Reply,
}

/// Engine commands sent to the engine runtime whose answers are still
/// awaited (off the controller's thread), at most: one more is refused
/// with `Busy` before it is sent.
pub const MAX_ENGINE_ANSWERS_AWAITED: usize = 16;

/// The rest of a command, run off the controller's thread.
type Later = Box<dyn FnOnce() -> Result<Outcome, NodeError> + Send>;

/// What the controller's thread did with a command.
// One per command, moved once: boxing the outcome would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Done {
    Now(Result<Outcome, NodeError>),
    /// Sent on; its answer is awaited by the waiter thread.
    Later(Later),
}

/// Handle to the controller. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Node {
    tx: Mutex<Option<SyncSender<Job>>>,
    /// Changes waiting (sent, not yet taken to run): the bound callers
    /// meet; urgent ones may go past it by [`URGENT_RESERVE`].
    waiting: Arc<AtomicUsize>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    running: Arc<Mutex<Option<&'static str>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Closed when the controller thread ends, however it ends.
    ended: Mutex<Option<oneshot::Receiver<()>>>,
    /// The engine runtime's read-only view (reads never wait for a change).
    engines: Arc<dyn EngineView>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.req.command.name())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked workflow cannot leave a lock's data half-written (the data
    // is replaced whole), so carry on with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Reads the first snapshot and starts the controller thread. Blocking.
    pub fn start(backends: Backends) -> Result<Node, NodeError> {
        let engines = backends.engines.view();
        let awaited = Arc::new(AtomicUsize::new(0));
        let mut c = Controller {
            b: backends,
            after_reply: vec![AfterReply::PrepareStandby],
            awaited: awaited.clone(),
            unfinished: None,
        };
        // Answers of engine commands, awaited in the order sent (the
        // runtime answers in that order).
        let (later_tx, later_rx) = mpsc::channel::<(Later, &'static str, Reply)>();
        std::thread::Builder::new()
            .name("node-answers".into())
            .spawn(move || {
                for (later, name, reply) in later_rx {
                    // A panic answers this caller and keeps the thread (and
                    // the count) for the next.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(later))
                        .unwrap_or_else(|_| {
                            tracing::error!(
                                command = name,
                                "waiting for an engine command's answer panicked"
                            );
                            Err(NodeError::Backend {
                                what: "engines",
                                source: crate::Failure::failed(
                                    "waiting for the engine runtime's answer failed".to_owned(),
                                ),
                            })
                        });
                    if let Err(e) = &r {
                        tracing::debug!(command = name, error = %e, "command refused or failed");
                    }
                    let _ = reply.send(r);
                    awaited.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| NodeError::Backend {
                what: "node controller",
                source: crate::Failure::failed(format!("cannot start its answer thread: {e}")),
            })?;
        // Before the first snapshot: what a killed agent left of a change
        // of tenancy is seen through before anyone reads the state.
        c.finish_tenancy_change();
        c.purge_stale_secrets();
        let first = c.read_snapshot().map_err(NodeError::Keys)?;
        let snapshot = Arc::new(RwLock::new(Arc::new(first)));
        let running = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_DEPTH + URGENT_RESERVE);
        let waiting = Arc::new(AtomicUsize::new(0));
        let (snap, run, wait) = (snapshot.clone(), running.clone(), waiting.clone());
        let (ended_tx, ended) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("node".into())
            .spawn(move || {
                // Dropped on return and on a panic's unwind alike.
                let _ended = ended_tx;
                // Standby keys first: the first rotation should not wait
                // for key generation either.
                *lock(&run) = Some("preparing standby keys");
                c.run_after_reply();
                c.publish(&snap);
                *lock(&run) = None;
                // Taken in order of arrival, except that an urgent change
                // (the landlord's boundary revert) goes first: a full queue
                // of tenant work never holds back the lock-out safety net.
                let mut queue: VecDeque<Job> = VecDeque::new();
                loop {
                    if queue.is_empty() {
                        match rx.recv() {
                            Ok(job) => queue.push_back(job),
                            Err(_) => break,
                        }
                    }
                    queue.extend(rx.try_iter());
                    let next = queue
                        .iter()
                        .position(|j| j.req.command.is_urgent())
                        .unwrap_or(0);
                    let Some(job) = queue.remove(next) else {
                        continue;
                    };
                    wait.fetch_sub(1, Ordering::SeqCst);
                    *lock(&run) = Some(job.req.command.name());
                    let name = job.req.command.name();
                    let done = c.execute_or_send(job.req);
                    // Readers see the new state before the caller's reply.
                    c.publish(&snap);
                    match done {
                        Done::Now(r) => {
                            let _ = job.reply.send(r);
                        }
                        Done::Later(later) => {
                            if let Err(mpsc::SendError((_, _, reply))) =
                                later_tx.send((later, name, job.reply))
                            {
                                c.awaited.fetch_sub(1, Ordering::SeqCst);
                                let _ = reply.send(Err(NodeError::Stopped));
                            }
                        }
                    }
                    // Work the caller need not wait for (the new empty
                    // volume, the next standby keys) still runs before the
                    // next command.
                    if !c.after_reply.is_empty() {
                        *lock(&run) = Some("finishing the previous change");
                        c.run_after_reply();
                        c.publish(&snap);
                    }
                    *lock(&run) = None;
                }
            })
            .map_err(|e| NodeError::Backend {
                what: "node controller",
                source: crate::Failure::failed(format!("cannot start its thread: {e}")),
            })?;
        Ok(Node {
            tx: Mutex::new(Some(tx)),
            waiting,
            snapshot,
            running,
            thread: Mutex::new(Some(thread)),
            ended: Mutex::new(Some(ended)),
            engines,
        })
    }

    /// Every engine, from the engine runtime's view. Never waits for a
    /// change.
    pub fn engines(&self) -> Vec<EngineStatus> {
        self.engines.list()
    }

    /// One engine, from the engine runtime's view. Never waits for a
    /// change.
    pub fn engine(&self, name: &str) -> Result<EngineStatus, NodeError> {
        check_name("name", name)?;
        self.engines.status(name).ok_or_else(|| NodeError::Backend {
            what: "engines",
            source: Failure::new(
                FailureKind::NotFound,
                format!("no engine named {}", shown(name)),
            ),
        })
    }

    /// One engine's output lines (the runtime's view reads the tenant
    /// volume). Blocking: call it off the async threads.
    pub fn engine_logs(
        &self,
        name: &str,
        since_ms: u64,
        max_lines: usize,
    ) -> Result<Vec<leasehold_engines::logs::Record>, NodeError> {
        // NotFound before anything else, as for `status`.
        self.engine(name)?;
        self.engines
            .logs(name, since_ms, max_lines)
            .map_err(|source| NodeError::Backend {
                what: "engines",
                source,
            })
    }

    /// The tenant's subtree for the landlord (budget, counts, aggregate
    /// usage), from the runtime's view. Reads cgroup files: call it off
    /// the async threads.
    pub fn tenant_usage(&self) -> crate::TenantView {
        self.engines.tenant()
    }

    /// The corrective throttles in force, from the runtime's view (no
    /// cgroup read). Never waits for a change.
    pub fn throttles(&self) -> crate::Throttles {
        self.engines.throttles()
    }

    /// The engines' events after `after` (see `EngineView::events`).
    pub fn engine_events(&self, after: u64, max: usize) -> Vec<crate::EngineEvent> {
        self.engines.events(after, max)
    }

    /// Queues a change and waits for its outcome. Refused at once with
    /// `Busy` when [`QUEUE_DEPTH`] changes already wait.
    pub async fn submit(&self, req: Request) -> Result<Outcome, NodeError> {
        self.enqueue(req)?.outcome().await
    }

    /// Queues a change without waiting for it (refused with `Busy` when
    /// the queue is full).
    pub fn enqueue(&self, req: Request) -> Result<Pending, NodeError> {
        let (reply, rx) = oneshot::channel();
        let name = req.command.name();
        let tx = lock(&self.tx);
        let tx = tx.as_ref().ok_or(NodeError::Stopped)?;
        let urgent = req.command.is_urgent();
        // Counted before the send (under the sender's lock: one enqueue at
        // a time), so the thread never takes a job it was not counted for.
        let bound = if urgent {
            QUEUE_DEPTH + URGENT_RESERVE
        } else {
            QUEUE_DEPTH
        };
        let full = self.waiting.load(Ordering::SeqCst) >= bound;
        if !full {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        match if full {
            Err(TrySendError::Full(Job { req, reply }))
        } else {
            tx.try_send(Job { req, reply })
        } {
            Ok(()) => Ok(Pending(rx)),
            Err(TrySendError::Full(_)) => {
                if !full {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                }
                let running = self.running().unwrap_or("a change");
                Err(NodeError::Busy(format!(
                    "{name}: the node is busy ({running} running, {QUEUE_DEPTH} more changes queued); try again"
                )))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(NodeError::Stopped)
            }
        }
    }

    /// The state as of the last completed command. Never waits for a change.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The change running now, if any.
    pub fn running(&self) -> Option<&'static str> {
        *lock(&self.running)
    }

    /// Resolves when the controller thread has ended: after `stop`, or
    /// because a backend panicked (the agent should then exit and be
    /// restarted rather than serve without a controller). Only the first
    /// caller waits; later ones resolve at once.
    pub async fn ended(&self) {
        let rx = lock(&self.ended).take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
    }

    /// Stops taking commands, lets queued ones finish, joins the thread.
    /// Blocking. Engine commands already sent are not waited for: their
    /// callers get their answers if the process lives long enough (an
    /// unfinished unpack is swept at the next start).
    pub fn stop(&self) {
        drop(lock(&self.tx).take());
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// Owns the backends; runs on the controller thread only.
struct Controller {
    b: Backends,
    /// What the running command leaves to do after its reply.
    after_reply: Vec<AfterReply>,
    /// Engine commands sent whose answers are awaited (see
    /// [`MAX_ENGINE_ANSWERS_AWAITED`]).
    awaited: Arc<AtomicUsize>,
    /// A key change that failed part-way and could not be finished: every
    /// destroying change is refused before it touches engines or volume
    /// until the next start finishes it (review: a later rotation of the
    /// other role finished it as its own failure's clean-up, with no
    /// receipt, purge or remake).
    unfinished: Option<String>,
}

/// Work after a reply, before the next command.
#[derive(Debug)]
enum AfterReply {
    /// A new empty filesystem under the new disk key.
    Remake(String),
    /// Pre-generate the keys the next rotation will use.
    PrepareStandby,
}

fn confirm(b: bool) -> Confirm {
    if b {
        Confirm::DestroyData
    } else {
        Confirm::No
    }
}

fn millis_since(from: SystemTime, to: SystemTime) -> u64 {
    to.duration_since(from)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `l3t5` for landlord 3, tenant 5 (receipt file names).
fn compact(g: &[(String, u64)]) -> String {
    g.iter()
        .map(|(r, n)| format!("{}{n}", r.chars().next().unwrap_or('x')))
        .collect()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Controller {
    /// Replaces the readers' snapshot (the last good one, marked stale, if
    /// the key status cannot be read).
    fn publish(&mut self, snap: &RwLock<Arc<Snapshot>>) {
        let next = match self.read_snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the key status after a change");
                let mut s = (**snap.read().unwrap_or_else(|p| p.into_inner())).clone();
                s.stale = Some(e.to_string());
                s
            }
        };
        *snap.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    fn run_after_reply(&mut self) {
        for work in std::mem::take(&mut self.after_reply) {
            match work {
                AfterReply::Remake(reason) => {
                    let r = self
                        .b
                        .keys
                        .disk_key()
                        .map_err(|e| format!("no disk key: {e}"))
                        .and_then(|k| self.b.volume.remake(&k, &reason).map_err(|e| e.to_string()));
                    // The volume's status reports it too.
                    if let Err(e) = r {
                        tracing::error!(error = %e, "the volume was not remade after the key change");
                    }
                }
                AfterReply::PrepareStandby => match self.b.keys.prepare_standby() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(count = n, "standby key generations prepared"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare standby keys; the next rotation makes its keys inline")
                    }
                },
            }
        }
    }

    fn read_snapshot(&mut self) -> Result<Snapshot, KeyError> {
        let status = self.b.keys.status()?;
        let mut keys = Vec::new();
        for role in Role::ALL {
            if role == Role::Tenant && status.tenant.is_none() {
                continue;
            }
            let pk = self.b.keys.public_key(role)?;
            let owned = self.b.keys.owned(role)?;
            keys.push((pk, owned));
        }
        let receipt_key = self.b.keys.signing_key()?;
        Ok(Snapshot {
            status,
            keys,
            receipt_key,
            stale: None,
        })
    }

    /// A tenant's engine command is checked and sent to the engine
    /// runtime here, its answer awaited off this thread; anything else is
    /// carried out.
    fn execute_or_send(&mut self, req: Request) -> Done {
        let Request {
            caller,
            command,
            received,
        } = req;
        match command {
            Command::Engine(c) => {
                let what = c.name();
                match self.engine(caller, c) {
                    Ok(later) => Done::Later(later),
                    Err(e) => {
                        tracing::debug!(command = what, error = %e, "command refused or failed");
                        Done::Now(Err(e))
                    }
                }
            }
            command => Done::Now(self.execute(Request {
                caller,
                command,
                received,
            })),
        }
    }

    fn execute(&mut self, req: Request) -> Result<Outcome, NodeError> {
        let Request {
            caller,
            command,
            received,
        } = req;
        let name = command.name();
        let r = match command {
            Command::Rotate { role, confirm } => self.rotate(caller, role, confirm, received),
            Command::Rekey { role } => self.rekey(caller, role),
            Command::Assign {
                name,
                console_key,
                confirm,
            } => self.assign(caller, &name, console_key.as_deref(), confirm),
            Command::Release { confirm } => self.release(caller, confirm),
            Command::RegisterConsole { name, pem } => {
                check_name("name", &name)?;
                let fp = self
                    .b
                    .keys
                    .register_console(caller.role, &name, &pem)
                    .map_err(console_error)?;
                tracing::info!(uid = caller.uid, role = %caller.role, console = %name, "console key registered");
                Ok(Outcome::ConsoleRegistered(fp))
            }
            Command::PutSecret { name, envelope } => self.put_secret(caller, &name, &envelope),
            Command::RemoveSecret { name } => {
                check_name("name", &name)?;
                self.require_tenant()?;
                self.b
                    .secrets
                    .remove(&name)
                    .map_err(NodeError::backend("secret store"))?;
                // Not its name: the tenant's (docs/agentd.md, "Logging").
                tracing::info!(uid = caller.uid, "tenant secret removed");
                Ok(Outcome::SecretRemoved)
            }
            Command::InitVolume {
                device,
                force,
                confirm,
            } => self.init_volume(caller, &device, force, confirm),
            Command::ForgetVolume { confirm } => self.forget_volume(caller, confirm),
            Command::Boundary(c) => self.boundary(caller, c),
            // Not reached from the thread (`execute_or_send`): waited here.
            Command::Engine(c) => self.engine(caller, c).and_then(|later| {
                let r = later();
                self.awaited.fetch_sub(1, Ordering::SeqCst);
                r
            }),
            Command::SetBudget { budget } => self.set_budget(caller, &budget),
            Command::SignRecord { body } => {
                let sig = self.b.keys.sign(body.as_bytes())?;
                Ok(Outcome::Signed {
                    signature: base64::engine::general_purpose::STANDARD.encode(sig),
                })
            }
            Command::StopEngines => {
                let r = match self.b.engines.stop_all(ERASE_STOP_GRACE) {
                    Ok(r) => r,
                    Err(e) => StopReport {
                        error: Some(e.to_string()),
                        ..StopReport::default()
                    },
                };
                // Counts, not names: the journal is the landlord's (docs/agentd.md,
                // "Logging"); the names are in the answer, to the caller.
                tracing::warn!(
                    uid = caller.uid,
                    stopped = r.stopped.len(),
                    killed = r.killed.len(),
                    not_stopped = r.not_stopped.len(),
                    "engines stopped by a corrective action"
                );
                Ok(Outcome::EnginesStopped(r))
            }
            Command::ThrottleEngines { throttles } => {
                throttles.validate().map_err(|reason| NodeError::Invalid {
                    field: "throttles",
                    reason,
                })?;
                let a = self
                    .b
                    .engines
                    .set_throttles(&throttles)
                    .map_err(NodeError::backend("engines (a corrective throttle)"))?;
                tracing::warn!(uid = caller.uid, cpu_max = %a.cpu_max, rules = ?throttles.0.keys().collect::<Vec<_>>(), written = a.written, "tenant subtree's cpu.max set by a corrective action");
                Ok(Outcome::Throttled(a))
            }
        };
        if let Err(e) = &r {
            tracing::debug!(command = name, error = %e, "command refused or failed");
        }
        r
    }

    fn require_tenant(&mut self) -> Result<(), NodeError> {
        if self.b.keys.status()?.tenant.is_none() {
            return Err(KeyError::NotAssigned.into());
        }
        Ok(())
    }

    /// A destroying rotation, erase first: the volume is marked, dm-crypt's
    /// copy of the disk key wiped and read back, and only then does the TPM
    /// undefine the old generation's secret (before it makes the new pair).
    fn rotate(
        &mut self,
        caller: Caller,
        role: Role,
        confirmed: bool,
        received: SystemTime,
    ) -> Result<Outcome, NodeError> {
        if caller.role > role {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "rotate these keys",
            }
            .into());
        }
        let status = self.b.keys.status()?;
        if role == Role::Tenant && status.tenant.is_none() {
            return Err(KeyError::NotAssigned.into());
        }
        if !confirmed {
            // Refused before anything is touched.
            return Err(NodeError::ConfirmationRequired(format!(
                "rotating the {role} key pair with its symmetric key destroys every piece of data under it: {}; confirm to go ahead",
                self.data_under_keys(&status)
            )));
        }
        let before = generations(&status);
        self.refuse_while_unfinished()?;
        // The engines run from the volume: stopped before its key goes.
        let engines = self.stop_engines();
        if let Err(e) = self.b.volume.begin_key_change() {
            self.resume_engines(&engines);
            return Err(NodeError::Backend {
                what: "volume",
                source: e,
            });
        }
        let wiped = match self.b.volume.wipe() {
            Ok(w) => Ok(w),
            // A failed or stuck volume never blocks a key change: it holds
            // no usable filesystem, and the erase the caller asked for is
            // the TPM's. No receipt claims the kernel's copy gone (see
            // after_change); the report says why.
            Err(e) if self.volume_failed().is_some() => {
                tracing::warn!(error = %e, "the failed volume's kernel key could not be checked; the rotation goes ahead");
                Err(e)
            }
            Err(e) => {
                // The TPM was not touched: the old key generation stands.
                if self.reopen_after_failure() {
                    self.resume_engines(&engines);
                }
                return Err(NodeError::Backend {
                    what: "volume (wiping the kernel's copy of the disk key)",
                    source: e,
                });
            }
        };
        let mut committed_warning = None;
        let c = match self.b.keys.rotate(caller.role, role) {
            Ok(c) => c,
            // Refused before anything changed (another change is pending,
            // the crate's record of it untouched): the old volume back, and
            // that change left for the next start — finishing it here would
            // pass it off as this rotation's clean-up (review).
            Err(e @ KeyError::ChangeUnfinished { .. }) => {
                // Refused before the engines stop next time (review).
                self.unfinished = Some("a key change that failed part-way".into());
                if self.reopen_after_failure() {
                    self.resume_engines(&engines);
                }
                return Err(e.into());
            }
            Err(e) => {
                // The crate counts a rotation made once it has recorded the
                // erase: whatever failed after that (the epoch counter, the
                // undefine, the new pair, the clean-up) is finished now, as
                // the next start would finish it (review: the volume was
                // reopened under a key that start then erased, and a later
                // key change in this process overwrote the record).
                let finished = self.b.keys.finish_interrupted();
                // The old key went by now at the latest (the undefine may
                // be the step that failed, done again by the finish).
                let failed_at = SystemTime::now();
                if let Err(f) = &finished {
                    tracing::error!(error = %f, "a failed rotation could not be finished; the next start finishes or undoes it");
                    self.unfinished = Some(format!("a rotation of the {role} keys"));
                }
                match self.committed_rotation(role, &status) {
                    // Done: the new generation stands and the old one is
                    // gone, so the caller is told it happened, with its
                    // receipt (review: it was reported failed, and a retry
                    // rotated again).
                    Some(mut c) => {
                        tracing::warn!(error = %e, "a rotation failed part-way and was finished");
                        c.erased_at = Some(failed_at);
                        committed_warning = Some(match &finished {
                            Ok(_) => format!(
                                "the rotation is done; a step of it failed ({e}) and was finished"
                            ),
                            Err(f) => format!(
                                "the rotation is done; a step of it failed ({e}) and its clean-up could not be finished ({f}): the next agent start finishes it"
                            ),
                        });
                        c
                    }
                    None => {
                        // Only once nothing of the change is pending is the
                        // old volume opened again: a pending erase that the
                        // next start finishes would find it `ready` under
                        // the old key and refuse it.
                        if finished.is_ok() && self.reopen_after_failure() {
                            self.resume_engines(&engines);
                            return Err(e.into());
                        }
                        return Err(self.erased_unless_readable(role, e, finished.err()));
                    }
                }
            }
        };
        let mut report = self.after_change(
            caller,
            c,
            before,
            Some(received),
            Some(wiped),
            Some(engines),
        );
        if let Some(w) = committed_warning {
            report.warnings.insert(0, w);
        }
        Ok(Outcome::Changed(report))
    }

    /// Refuses a destroying change while a failed one is unfinished.
    fn refuse_while_unfinished(&self) -> Result<(), NodeError> {
        match &self.unfinished {
            Some(what) => Err(NodeError::Backend {
                what: "keys",
                source: Failure::new(
                    FailureKind::Unavailable,
                    format!("{what} is unfinished; restart the agent to finish it before another key change"),
                ),
            }),
            None => Ok(()),
        }
    }

    /// The rotation of `role` as the keys show it now, when they moved on
    /// from `before` (a new key generation: the change was committed).
    fn committed_rotation(
        &mut self,
        role: Role,
        before: &leasehold_tpm::Status,
    ) -> Option<KeyChange> {
        let level = |s: &leasehold_tpm::Status| match role {
            Role::Landlord => Some(s.landlord.clone()),
            Role::Tenant => s.tenant.clone(),
        };
        let old = level(before)?;
        let now = level(&self.b.keys.status().ok()?)?;
        (now.key_generation != old.key_generation).then_some(KeyChange {
            kind: ChangeKind::Rotate,
            role,
            generation_before: Some(old.generation),
            generation_after: Some(now.generation),
            key_generation_before: Some(old.key_generation),
            key_generation_after: Some(now.key_generation),
            data_destroyed: true,
            fingerprint_after: Some(now.fingerprint),
            erased_at: None,
        })
    }

    /// A rotation that failed and whose volume could not be opened again:
    /// if the old key can no longer be read (its secret undefined, the
    /// erase begun), the caller is told the data is gone rather than only
    /// the step that failed (review: a bare TPM error read as "nothing
    /// happened").
    fn erased_unless_readable(
        &mut self,
        role: Role,
        e: KeyError,
        unfinished: Option<KeyError>,
    ) -> NodeError {
        match (self.b.keys.disk_key(), unfinished) {
            (Err(KeyError::KeyErased { .. }), _) => NodeError::Backend {
                what: "keys",
                source: Failure::failed(format!(
                    "the {role} rotation failed after its old key was erased ({e}): the data under it cannot be read again; the next agent start finishes the rotation (new keys, an empty volume); no receipt is signed"
                )),
            },
            (_, Some(f)) => NodeError::Backend {
                what: "keys",
                source: Failure::failed(format!(
                    "the {role} rotation failed part-way ({e}) and could not be finished or undone now ({f}): the volume stays closed, and no other key change is taken until the next agent start finishes or undoes it"
                )),
            },
            (_, None) => e.into(),
        }
    }

    /// The volume is not marked `rekeying` (docs/storage.md: a re-key
    /// does nothing to it; the disk key does not change): engines keep
    /// running from it, and a mark left by an agent killed mid-rekey made
    /// the next start take the change for an interrupted one and tear the
    /// volume down under them (review).
    fn rekey(&mut self, caller: Caller, role: Role) -> Result<Outcome, NodeError> {
        let before = generations(&self.b.keys.status()?);
        let c = self.b.keys.rekey(caller.role, role)?;
        Ok(Outcome::Changed(
            self.after_change(caller, c, before, None, None, None),
        ))
    }

    fn assign(
        &mut self,
        caller: Caller,
        name: &str,
        console_key: Option<&str>,
        confirmed: bool,
    ) -> Result<Outcome, NodeError> {
        if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "assign the node",
            }
            .into());
        }
        check_name("name", name)?;
        if let Some(pem) = console_key {
            // Checked before anything changes: no partial state.
            leasehold_tpm::envelope::RecipientKey::from_pem(pem).map_err(|e| {
                NodeError::Invalid {
                    field: "console_key",
                    reason: e.to_string(),
                }
            })?;
        }
        let status = self.b.keys.status()?;
        if status.tenant.is_some() && !confirmed {
            return Err(NodeError::ConfirmationRequired(format!(
                "assigning the node to {} destroys the current tenant's keys and data: {}; confirm to go ahead",
                shown(name),
                self.data_under_keys(&status)
            )));
        }
        self.change_tenancy(caller, "assign", &status, |keys| {
            keys.assign(name, console_key, confirm(confirmed)).map(Some)
        })
    }

    /// A change of tenancy (`kind`: assign or release), checked and
    /// confirmed: recorded, every engine stopped (they run from the volume
    /// about to be erased), the volume marked, then `change` on the keys.
    /// Committed: finished as every destroying change is. Nothing to change
    /// (`Ok(None)`: a release with no tenant): undone, `AlreadyReleased`.
    /// Failed: undone, or finished if the keys committed first
    /// (`tenancy_change_failed`).
    fn change_tenancy(
        &mut self,
        caller: Caller,
        kind: &'static str,
        status: &leasehold_tpm::Status,
        change: impl FnOnce(&mut dyn crate::backend::KeyStore) -> Result<Option<KeyChange>, KeyError>,
    ) -> Result<Outcome, NodeError> {
        let before = generations(status);
        self.refuse_while_unfinished()?;
        self.begin_tenancy_change(kind, status)?;
        let engines = self.stop_engines();
        if let Err(e) = self.b.volume.begin_key_change() {
            self.resume_engines(&engines);
            self.b.events.end_tenancy_change();
            return Err(NodeError::Backend {
                what: "volume",
                source: e,
            });
        }
        let tenant_before = status.tenant.as_ref().map(|t| t.fingerprint.clone());
        match change(self.b.keys.as_mut()) {
            Ok(Some(c)) => {
                self.tenancy_committed(kind, tenant_before, c.fingerprint_after.clone());
                Ok(Outcome::Changed(self.after_change(
                    caller,
                    c,
                    before,
                    None,
                    None,
                    Some(engines),
                )))
            }
            Ok(None) => {
                self.end_key_change_logged();
                self.resume_engines(&engines);
                self.b.events.end_tenancy_change();
                Ok(Outcome::AlreadyReleased)
            }
            Err(e) => {
                self.tenancy_change_failed(kind, tenant_before.as_deref(), &engines);
                Err(e.into())
            }
        }
    }

    /// The TPM change of a change of tenancy committed: the record says so
    /// and names the tenant after it, so a start that finds the record
    /// finishes only while the keys are still as the change left them.
    fn tenancy_committed(&mut self, kind: &str, before: Option<String>, after: Option<String>) {
        let record = crate::backend::TenancyChange {
            kind: kind.to_owned(),
            tenant_before: before,
            committed: true,
            tenant_after: after,
        };
        if let Err(e) = self.b.events.begin_tenancy_change(&record) {
            // The record as first written still finishes it at a start.
            tracing::warn!(error = %e, "cannot mark the change of tenancy committed");
        }
    }

    /// The keys' change of a change of tenancy reported an error. Not
    /// committed (the tenant is the one before): everything goes back
    /// (volume, engines) and the record goes. Committed anyway (its later
    /// steps failed) or unknown: nothing of the previous tenancy is
    /// started again; a committed change is finished now, an unknown one
    /// by the next start (the record stays).
    fn tenancy_change_failed(&mut self, kind: &str, before: Option<&str>, engines: &StopReport) {
        match self.b.keys.status() {
            Ok(s) if s.tenant.as_ref().map(|t| t.fingerprint.as_str()) == before => {
                self.end_key_change_logged();
                self.resume_engines(engines);
                self.b.events.end_tenancy_change();
            }
            Ok(s) => {
                tracing::error!("the change of tenancy failed after its TPM commit; finishing what it leaves to do");
                // Marked committed first, naming the keys as they are: a
                // record this leaves behind is then stale, never taken for
                // an uncommitted change once the new tenant's keys move.
                self.tenancy_committed(
                    kind,
                    before.map(str::to_owned),
                    s.tenant.map(|t| t.fingerprint),
                );
                // The old disk key is gone with the commit: dm-crypt's copy
                // goes too, and the volume is made again under the new one
                // (no receipt: nothing here can vouch for the erase).
                if let Err(e) = self.b.volume.wipe() {
                    tracing::error!(error = %e, "the kernel's copy of the old disk key could not be shown gone");
                }
                self.finish_tenancy_change();
                self.after_reply.push(AfterReply::Remake(format!(
                    "{kind} (reported failed after its commit)"
                )));
                self.after_reply.push(AfterReply::PrepareStandby);
            }
            Err(e) => {
                tracing::error!(error = %e, "the change of tenancy failed and the keys cannot be read; the next start finishes it if it committed");
            }
        }
    }

    /// Records a change of tenancy before anything changes (see
    /// [`crate::backend::TenancyChange`]); refused when it cannot be
    /// recorded: a crash after it would otherwise leave the previous
    /// tenancy's state to the next tenant.
    fn begin_tenancy_change(
        &mut self,
        kind: &str,
        status: &leasehold_tpm::Status,
    ) -> Result<(), NodeError> {
        let change = crate::backend::TenancyChange {
            kind: kind.to_owned(),
            tenant_before: status.tenant.as_ref().map(|t| t.fingerprint.clone()),
            committed: false,
            tenant_after: None,
        };
        self.b
            .events
            .begin_tenancy_change(&change)
            .map_err(|source| NodeError::Backend {
                what: "state",
                source,
            })
    }

    /// At start: a change of tenancy an earlier agent began and did not
    /// see through. Committed (the tenant is no longer the one before):
    /// the previous tenancy's secrets, sub-boundary, engine records and
    /// receipt record go, as after the change. Not committed: nothing to
    /// do (the volume's own record reopens it). The record goes either way.
    fn finish_tenancy_change(&mut self) {
        let Some(p) = self.b.events.pending_tenancy_change() else {
            return;
        };
        let now = match self.b.keys.status() {
            Ok(s) => s.tenant.map(|t| t.fingerprint),
            Err(e) => {
                // Kept for the next start: the TPM may answer then.
                tracing::error!(error = %e, "cannot read the keys to finish an interrupted change of tenancy");
                return;
            }
        };
        if !p.committed && now == p.tenant_before {
            tracing::info!(
                change = p.kind,
                "an interrupted change of tenancy did not commit; nothing to finish"
            );
        } else if p.committed && now != p.tenant_after {
            // The keys changed again since (the record outlived its
            // change): what it would remove is no longer the previous
            // tenancy's.
            tracing::warn!(
                change = p.kind,
                "a stale record of a change of tenancy (the keys changed since); nothing destroyed"
            );
        } else {
            tracing::warn!(change = p.kind, "finishing an interrupted change of tenancy: the previous tenancy's secrets, sub-boundary and engines go");
            if !p.committed {
                // As after a commit: should a step fail and the record
                // stay, it names these keys and is stale once they move.
                let record = crate::backend::TenancyChange {
                    committed: true,
                    tenant_after: now.clone(),
                    ..p.clone()
                };
                if let Err(e) = self.b.events.begin_tenancy_change(&record) {
                    tracing::warn!(error = %e, "cannot mark the change of tenancy committed");
                }
            }
            let mut failed = false;
            if let Err(e) = self.b.secrets.purge() {
                tracing::error!(error = %e, "the previous tenancy's secrets were not removed");
                failed = true;
            }
            if let Err(e) = self.b.boundaries.change(BoundaryChange::ClearSub) {
                tracing::error!(error = %e, "the previous tenant's sub-boundary was not removed");
                failed = true;
            }
            if let Err(e) = self.b.engines.forget_all() {
                tracing::error!(error = %e, "the previous tenancy's engine records were not dropped");
                failed = true;
            }
            self.b.events.tenancy_recorded(now.is_some());
            if failed {
                // Tried again at the next start (each step is idempotent).
                return;
            }
        }
        self.b.events.end_tenancy_change();
    }

    /// At start: the secrets stored under a key that is gone. A destroying
    /// change purges the store after its TPM commit; an agent killed in
    /// between (no record: a rotation is not a change of tenancy) left
    /// them, unopenable, failing the launches that name them and counting
    /// against the caps. The store tells them by the key each names. Not
    /// checked (and tried at the next start) if the key cannot be read.
    fn purge_stale_secrets(&mut self) {
        match self.b.secrets.list() {
            Ok(l) if l.is_empty() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot list the secret store to check its key");
                return;
            }
        }
        let key = match self.b.keys.data_key(crate::SECRET_STORE_PURPOSE) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot derive the secret store's key; secrets under a replaced key are not looked for");
                return;
            }
        };
        match self.b.secrets.purge_stale(&key) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                count = n,
                "removed secrets stored under a key a destroying change replaced (the agent stopped before it purged them)"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot remove the secrets stored under a replaced key")
            }
        }
    }

    fn release(&mut self, caller: Caller, confirmed: bool) -> Result<Outcome, NodeError> {
        if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "release the node",
            }
            .into());
        }
        let status = self.b.keys.status()?;
        if status.tenant.is_none() {
            // Already so: a result, not an error.
            return Ok(Outcome::AlreadyReleased);
        }
        if !confirmed {
            return Err(NodeError::ConfirmationRequired(format!(
                "releasing the node destroys the tenant's keys and data: {}; confirm to go ahead",
                self.data_under_keys(&status)
            )));
        }
        self.change_tenancy(caller, "release", &status, |keys| {
            keys.release(Confirm::DestroyData)
        })
    }

    /// What a destroying change would erase, in words, for its
    /// confirmation: the tenant by name, the volume by device, the secrets.
    fn data_under_keys(&mut self, status: &leasehold_tpm::Status) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &status.tenant {
            parts.push(format!(
                "the keys of tenant {} (key generation {})",
                t.name
                    .as_deref()
                    .map_or_else(|| "(unnamed)".to_owned(), shown),
                t.key_generation
            ));
        }
        match self.b.volume.describe() {
            Ok(Some((id, device))) => parts.push(match self.volume_failed() {
                Some(why) => format!("the volume record {id} on {device} (failed: {why})"),
                None => format!("the tenant's volume {id} on {device} and every file on it"),
            }),
            Ok(None) => {}
            Err(e) => parts.push(format!("the tenant's volume (cannot be described: {e})")),
        }
        match self.b.secrets.list() {
            Ok(l) if !l.is_empty() => parts.push(format!("{} stored secrets", l.len())),
            _ => {}
        }
        if parts.is_empty() {
            "no tenant data is stored".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// Why the volume is failed or stuck (None: no volume or a usable
    /// one; a volume whose state cannot be read counts as failed).
    fn volume_failed(&mut self) -> Option<String> {
        self.b
            .volume
            .failed()
            .unwrap_or_else(|e| Some(format!("its state cannot be read: {e}")))
    }

    fn end_key_change_logged(&mut self) {
        if let Err(e) = self.b.volume.end_key_change() {
            tracing::error!(error = %e, "cannot mark the volume ready again after a failed key change");
        }
    }

    /// After a rotation failed: the volume opens again under the disk key
    /// if it is still the old one (true). If the old key was already erased
    /// it stays closed and marked `rekeying`: the next start makes it new.
    fn reopen_after_failure(&mut self) -> bool {
        let r = self
            .b
            .keys
            .disk_key()
            .map_err(|e| e.to_string())
            .and_then(|k| self.b.volume.reopen(&k).map_err(|e| e.to_string()));
        if let Err(e) = &r {
            tracing::error!(error = %e, "the volume stays closed after a failed key change");
        }
        r.is_ok()
    }

    /// Before a change that replaces the disk key: every engine stopped
    /// (grace, then kill), since their roots and data dirs are on the
    /// volume. A failure is reported (a warning of the change, the receipt
    /// names what was not shown stopped), never a reason to skip the erase
    /// the caller asked for.
    fn stop_engines(&mut self) -> StopReport {
        match self.b.engines.stop_all(ERASE_STOP_GRACE) {
            Ok(r) => {
                if !r.stopped.is_empty() {
                    tracing::info!(
                        stopped = r.stopped.len(),
                        killed = r.killed.len(),
                        "engines stopped before the erase"
                    );
                }
                if !r.not_stopped.is_empty() {
                    tracing::error!(
                        not_stopped = r.not_stopped.len(),
                        "engines not shown stopped before the erase"
                    );
                }
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot stop the engines before the erase; the erase goes ahead");
                StopReport {
                    error: Some(e.to_string()),
                    ..StopReport::default()
                }
            }
        }
    }

    /// A destroying change failed before its erase and the volume is back
    /// under its old key: the engines it stopped start again (old state,
    /// not half a change).
    fn resume_engines(&mut self, r: &StopReport) {
        for name in &r.stopped {
            if let Err(e) = self.b.engines.start(name) {
                tracing::error!(engine = %name, error = %e, "an engine stopped for a key change that failed was not started again");
            }
        }
    }

    /// Everything after a committed key change. Nothing here undoes the
    /// change: what fails becomes a warning of the report, which is still
    /// signalled (and carries a receipt if the erase is proven).
    fn after_change(
        &mut self,
        caller: Caller,
        c: KeyChange,
        before: Vec<(String, u64)>,
        requested: Option<SystemTime>,
        wiped: Option<Result<Wiped, Failure>>,
        engines: Option<StopReport>,
    ) -> ChangeReport {
        tracing::info!(uid = caller.uid, change = %c, "key change");
        let mut warnings = Vec::new();
        // Logged as counts below, not as text: it names the tenant's
        // engines, which the landlord's journal does not hold (review).
        let engines_warning = engines.as_ref().and_then(StopReport::warning);
        if let Some(w) = &engines_warning {
            warnings.push(w.clone());
        }
        let mut secrets_purged = false;
        // At every tenancy change too: a first assignment destroys no key,
        // but files a failed purge of the release left are not the new
        // tenant's to see.
        if c.data_destroyed || matches!(c.kind, ChangeKind::Assign | ChangeKind::Release) {
            match self.b.secrets.purge() {
                Ok(n) => {
                    secrets_purged = true;
                    if n > 0 {
                        tracing::info!(count = n, "purged tenant secrets after a destroying key change");
                    }
                }
                Err(e) => warnings.push(format!(
                    "the secret store was not emptied ({e}); its secrets can no longer be opened: their key is gone"
                )),
            }
        }
        if matches!(c.kind, ChangeKind::Assign | ChangeKind::Release) {
            // The sub-boundary belonged to the previous tenant.
            if let Err(e) = self.b.boundaries.change(BoundaryChange::ClearSub) {
                warnings.push(format!(
                    "the previous tenant's sub-boundary was not removed: {e}"
                ));
            }
        }
        let disk_key_changed =
            c.data_destroyed || matches!(c.kind, ChangeKind::Assign | ChangeKind::Release);
        let mut receipt = None;
        if disk_key_changed {
            // Reported, never a reason to stop: the key change stands.
            let failed = self.volume_failed();
            if let Some(why) = &failed {
                warnings.push(format!(
                    "the volume was failed before this change ({why}); its old key is gone with the change, and it is made again under the new key only if the node can (see `volume status`; `landlordctl volume forget` drops the record)"
                ));
            }
            // A rotation wiped before the TPM change; the others wipe now.
            // Either way the erase is claimed only once it is read back.
            let wiped = match wiped {
                Some(w) => w,
                None => self.b.volume.wipe(),
            };
            match wiped {
                // Nothing was destroyed (a first assignment: the old disk
                // key was made from KL alone, which stays): no receipt, as
                // a receipt says what can no longer be read (review).
                Ok(_) if !c.data_destroyed => {}
                Ok(w) => match self.sign_receipt(
                    &c,
                    before,
                    requested,
                    w,
                    engines.clone(),
                    failed,
                    secrets_purged,
                ) {
                    Ok(r) => receipt = Some(r),
                    Err(e) => warnings.push(format!("no erase receipt: {e}")),
                },
                Err(e) => warnings.push(format!(
                    "{}the kernel's copy of the old disk key could not be shown gone ({e})",
                    if c.data_destroyed {
                        "no erase receipt: "
                    } else {
                        ""
                    }
                )),
            }
            // Their images, roots and data dirs were on the erased volume.
            match self.b.engines.forget_all() {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "engines forgotten with the erased volume"),
                Err(e) => warnings.push(format!(
                    "the engines' records were not dropped ({e}); they cannot start: their images were on the erased volume"
                )),
            }
            // The caller waits for the erase, not for the new filesystem.
            self.after_reply.push(AfterReply::Remake(format!(
                "{} of {} keys",
                kind_name(c.kind),
                c.role
            )));
        } else if let Err(e) = self.b.volume.end_key_change() {
            warnings.push(format!("the volume was not marked ready again: {e}"));
        }
        self.after_reply.push(AfterReply::PrepareStandby);
        for w in &warnings {
            if Some(w) == engines_warning.as_ref() {
                let r = engines.as_ref();
                tracing::warn!(
                    not_stopped = r.map_or(0, |r| r.not_stopped.len()),
                    stop_failed = r.is_some_and(|r| r.error.is_some()),
                    "key change committed with a warning: engines not shown stopped before the erase"
                );
            } else {
                tracing::warn!(warning = %w, "key change committed with a warning");
            }
        }
        let report = ChangeReport {
            change: c,
            receipt,
            warnings,
            caller,
            engines,
        };
        self.b.events.keys_changed(&report);
        if matches!(report.change.kind, ChangeKind::Assign | ChangeKind::Release) {
            // Everything after the change ran: nothing for a next agent.
            self.b.events.end_tenancy_change();
        }
        report
    }

    // Each argument is one fact of the change the receipt states.
    #[allow(clippy::too_many_arguments)]
    fn sign_receipt(
        &mut self,
        c: &KeyChange,
        before: Vec<(String, u64)>,
        requested: Option<SystemTime>,
        wiped: Wiped,
        engines: Option<StopReport>,
        failed: Option<String>,
        secrets_purged: bool,
    ) -> Result<SignedReceipt, NodeError> {
        let erased_ms = requested.map(|r| {
            let at = c.erased_at.unwrap_or_else(SystemTime::now);
            millis_since(r, at)
        });
        if let Some(ms) = erased_ms {
            tracing::info!(
                millis = ms,
                "old data unrecoverable (kernel key wiped, TPM secret undefined)"
            );
        }
        let status = self.b.keys.status()?;
        let kind = kind_name(c.kind).to_owned();
        let gens = |g: &[(String, u64)]| {
            g.iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut destroyed = Vec::new();
        if let Some(g) = c.key_generation_before.filter(|_| c.data_destroyed) {
            destroyed.push(format!(
                "{} key of key generation {g}: its TPM sealed object and the generation secret it depends on (NV index undefined)",
                c.role
            ));
        }
        destroyed.push(format!(
            "disk key made from key generations {}",
            gens(&before)
        ));
        let volume = self
            .b
            .volume
            .describe()
            .map_err(NodeError::backend("volume"))?
            .map(|(id, device)| crate::ErasedVolume {
                id,
                device,
                kernel_key: wiped,
                remade: "after this receipt",
                failed,
            });
        if let Some(v) = &volume {
            destroyed.push(format!(
                "volume {} on {}: {}; its data is unreadable without the old disk key",
                v.id,
                v.device,
                match wiped {
                    Wiped::Wiped =>
                        "dm-crypt's copy of the key replaced by an error table (read back)",
                    _ => "not mapped: no copy of the key in the kernel",
                }
            ));
        }
        if c.data_destroyed {
            // Claimed only as far as it went (review: claimed whole when
            // the purge failed).
            destroyed.push(if secrets_purged {
                "the tenant's secret store".into()
            } else {
                "the key of the tenant's secret store (its files were not removed: they can no longer be opened)".into()
            });
        }
        let now = SystemTime::now();
        let receipt = Receipt {
            format: RECEIPT_FORMAT,
            node_id: status.node_id.clone(),
            change: kind.clone(),
            role: c.role.to_string(),
            time: unix_secs(now),
            destroyed,
            key_generations_before: before,
            key_generations_after: generations(&status),
            volume,
            engines,
            erased_ms,
            signer: self.b.keys.signing_key()?.fingerprint,
        };
        let body = serde_json::to_string(&receipt).map_err(|e| NodeError::Backend {
            what: "receipt",
            source: crate::Failure::failed(e.to_string()),
        })?;
        let sig = self.b.keys.sign(body.as_bytes())?;
        let signed = SignedReceipt {
            signature: base64::engine::general_purpose::STANDARD.encode(sig),
            // Unique: every destroying change moves a key generation.
            file_name: format!(
                "{}-{}-{}-{}-{}.json",
                receipt.time,
                kind,
                receipt.role,
                compact(&receipt.key_generations_before),
                compact(&receipt.key_generations_after)
            ),
            body,
        };
        if let Err(e) = self.b.events.store_receipt(&signed) {
            // The caller still gets it; only the node's copy is missing.
            tracing::error!(error = %e, "cannot store the erase receipt");
        }
        // Its kind and role only: the body names the tenant's engines
        // (stored, and given to the roles that may read it).
        tracing::info!(change = %kind, role = %receipt.role, "erase receipt signed");
        Ok(signed)
    }

    fn put_secret(
        &mut self,
        caller: Caller,
        name: &str,
        envelope: &[u8],
    ) -> Result<Outcome, NodeError> {
        crate::check_put_secret(name, envelope)?;
        self.require_tenant()?;
        let payload = self
            .b
            .keys
            .open_envelope(Role::Tenant, envelope)
            .map_err(|e| match e {
                KeyError::Envelope(e) => NodeError::Invalid {
                    field: "envelope",
                    reason: e.to_string(),
                },
                other => other.into(),
            })?;
        if payload.len() > crate::MAX_SECRET_PAYLOAD {
            return Err(NodeError::Invalid {
                field: "envelope",
                reason: format!(
                    "its secret is {} bytes; an engine can be given at most {} bytes",
                    payload.len(),
                    crate::MAX_SECRET_PAYLOAD
                ),
            });
        }
        let list = self
            .b
            .secrets
            .list()
            .map_err(NodeError::backend("secret store"))?;
        let existing = list.iter().find(|e| e.name == name).map(|e| e.size);
        if existing.is_none() && list.len() >= MAX_SECRETS {
            return Err(NodeError::Invalid {
                field: "name",
                reason: format!(
                    "the store holds {} secrets, the most it keeps ({MAX_SECRETS}); remove one first",
                    list.len()
                ),
            });
        }
        let total: u64 =
            list.iter().map(|e| e.size).sum::<u64>() - existing.unwrap_or(0) + payload.len() as u64;
        if total > MAX_SECRET_BYTES {
            return Err(NodeError::Invalid {
                field: "envelope",
                reason: format!(
                    "storing it would make {total} bytes of secrets; the limit is {MAX_SECRET_BYTES}"
                ),
            });
        }
        let key = self.b.keys.data_key(crate::SECRET_STORE_PURPOSE)?;
        let entry = self
            .b
            .secrets
            .put(&key, name, &payload)
            .map_err(NodeError::backend("secret store"))?;
        // Not its size: the landlord's journal learns no more of a secret
        // than that one was stored (review: a password's length).
        tracing::info!(uid = caller.uid, "tenant secret stored");
        Ok(Outcome::SecretStored(entry))
    }

    fn init_volume(
        &mut self,
        caller: Caller,
        device: &str,
        force: bool,
        confirmed: bool,
    ) -> Result<Outcome, NodeError> {
        if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "initialize the volume",
            }
            .into());
        }
        // Every check first (nothing written): a device that cannot become
        // the volume is refused before anyone is asked to confirm.
        let target = self
            .b
            .volume
            .check_init(device, force)
            .map_err(NodeError::backend("volume"))?;
        if !confirmed {
            return Err(NodeError::ConfirmationRequired(format!(
                "initializing the volume erases everything on {target}; confirm to go ahead"
            )));
        }
        let k = self.b.keys.disk_key()?;
        self.b
            .volume
            .init(device, force, &k)
            .map_err(NodeError::backend("volume"))?;
        tracing::info!(uid = caller.uid, device, force, "volume initialized");
        Ok(Outcome::VolumeInitialized)
    }

    /// Drops the record of a failed or stuck volume (after confirmation);
    /// a usable volume is refused: a destroying key change empties it.
    fn forget_volume(&mut self, caller: Caller, confirmed: bool) -> Result<Outcome, NodeError> {
        if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "forget the volume",
            }
            .into());
        }
        let Some((id, device)) = self
            .b
            .volume
            .describe()
            .map_err(NodeError::backend("volume"))?
        else {
            // Already so: a result, not an error.
            return Ok(Outcome::VolumeForgotten(None));
        };
        let Some(why) = self
            .b
            .volume
            .failed()
            .map_err(NodeError::backend("volume"))?
        else {
            return Err(NodeError::Invalid {
                field: "volume",
                reason: format!(
                    "volume {id} on {device} is usable; forget only drops the record of a failed volume (a destroying key change empties a usable one)"
                ),
            });
        };
        if !confirmed {
            return Err(NodeError::ConfirmationRequired(format!(
                "forgetting the volume drops the record of volume {id} on {device} (failed: {why}); whatever it holds can never be opened again (the device itself is not written); confirm to go ahead"
            )));
        }
        let forgotten = self
            .b
            .volume
            .forget()
            .map_err(NodeError::backend("volume"))?;
        tracing::info!(uid = caller.uid, %device, %id, "failed volume record forgotten");
        Ok(Outcome::VolumeForgotten(forgotten))
    }

    fn boundary(&mut self, caller: Caller, c: BoundaryChange) -> Result<Outcome, NodeError> {
        if matches!(c, BoundaryChange::Remove { confirm: false }) {
            return Err(NodeError::ConfirmationRequired(
                "removing the boundary lifts every network restriction on this node (cluster boundary, sub-boundary and failsafe)".into(),
            ));
        }
        let tenant_change = matches!(c, BoundaryChange::SetSub { .. } | BoundaryChange::ClearSub);
        if tenant_change {
            self.require_tenant()?;
        } else if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "change the cluster boundary",
            }
            .into());
        }
        let applied = self
            .b
            .boundaries
            .change(c)
            .map_err(NodeError::backend("boundary"))?;
        Ok(Outcome::Boundary(applied))
    }

    /// Checks a tenant's engine command and sends it to the engine
    /// runtime; the rest (waiting for its answer) is handed back.
    fn engine(&mut self, caller: Caller, c: EngineCommand) -> Result<Later, NodeError> {
        if caller.role != Role::Tenant {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "run engines (they are the tenant's)",
            }
            .into());
        }
        self.require_tenant()?;
        check_name("name", c.engine())?;
        let what = c.name();
        let mut notes = Vec::new();
        match &c {
            EngineCommand::Deploy { image, spec, .. } => {
                check_image(image)?;
                notes = self.check_spec(spec)?;
            }
            EngineCommand::Stop { grace, .. } => {
                if let Some(g) = grace.filter(|g| *g > MAX_STOP_GRACE) {
                    return Err(NodeError::Invalid {
                        field: "grace",
                        reason: format!("{g:?}: at most {MAX_STOP_GRACE:?}"),
                    });
                }
            }
            EngineCommand::Reload { image, spec, .. } => {
                if let Some(i) = image {
                    check_image(i)?;
                }
                if let Some(s) = spec {
                    self.check_spec(s)?;
                }
            }
            EngineCommand::Start { .. }
            | EngineCommand::Restart { .. }
            | EngineCommand::Rm { .. } => {}
        }
        // Bounded before anything is sent: a refused command is not
        // carried out later.
        if self.awaited.fetch_add(1, Ordering::SeqCst) >= MAX_ENGINE_ANSWERS_AWAITED {
            self.awaited.fetch_sub(1, Ordering::SeqCst);
            return Err(NodeError::Busy(format!(
                "{MAX_ENGINE_ANSWERS_AWAITED} engine commands already wait for the engine runtime (an image may be being unpacked); {what} was not sent, try again"
            )));
        }
        let answer = self.b.engines.send(&c);
        let uid = caller.uid;
        Ok(Box::new(move || {
            let answered = answer().map_err(NodeError::backend("engines"))?;
            tracing::info!(uid, command = what, "engine command");
            let status = || {
                answered.ok_or_else(|| NodeError::Backend {
                    what: "engines",
                    source: Failure::failed("no status in the engine runtime's answer".to_owned()),
                })
            };
            Ok(match c {
                EngineCommand::Deploy { .. } => Outcome::EngineDeployed {
                    status: status()?,
                    notes,
                },
                EngineCommand::Rm { .. } => Outcome::EngineRemoved,
                _ => Outcome::Engine(status()?),
            })
        }))
    }

    /// The landlord's budget for the tenant. Engines above it are not
    /// stopped or refused: the kernel enforces the total (docs/engines.md,
    /// "Budget").
    fn set_budget(&mut self, caller: Caller, budget: &Budget) -> Result<Outcome, NodeError> {
        if caller.role != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller: caller.role,
                action: "set the tenant budget (it is the landlord's)",
            }
            .into());
        }
        budget.validate().map_err(|e| NodeError::Invalid {
            field: "budget",
            reason: e.to_string(),
        })?;
        let applied = self
            .b
            .engines
            .set_budget(budget)
            .map_err(NodeError::backend("engines (the tenant budget)"))?;
        tracing::info!(
            uid = caller.uid,
            budget = %serde_json::to_string(budget).unwrap_or_default(),
            written = applied.written,
            engines_above = applied.engines_above,
            "tenant budget set"
        );
        Ok(Outcome::BudgetSet(applied))
    }

    /// A spec the tenant may run: valid, inside the tenant budget ("can
    /// only narrow", the field named), its egress inside the tenant's
    /// sub-boundary. Returns the budget limits it inherits, as notes.
    fn check_spec(&mut self, spec: &Spec) -> Result<Vec<String>, NodeError> {
        spec.validate().map_err(|e| NodeError::Invalid {
            field: "spec",
            reason: e.to_string(),
        })?;
        let budget = self
            .b
            .engines
            .budget()
            .map_err(NodeError::backend("engines (the tenant budget)"))?;
        if let Err(excess) = budget::check(&spec.limits, &budget) {
            if let Some((first, rest)) = excess.0.split_first() {
                let mut reason = format!(
                    "{} is above the tenant budget {}",
                    first.engine, first.budget
                );
                for o in rest {
                    reason.push_str(&format!("; {o}"));
                }
                return Err(NodeError::Invalid {
                    field: first.field,
                    reason,
                });
            }
        }
        if spec.egress.is_some() {
            let limit = self
                .b
                .boundaries
                .engine_egress_limit()
                .map_err(NodeError::backend("boundary (the engine's egress)"))?;
            if let Some(limit) = limit {
                let excess = spec.egress_excess(&limit).map_err(|e| NodeError::Invalid {
                    field: "egress",
                    reason: e.to_string(),
                })?;
                if !excess.is_empty() {
                    let parts: Vec<String> = excess.iter().take(3).map(|x| x.to_string()).collect();
                    let more = match excess.len() {
                        n if n > 3 => format!(" (and {} more)", n - 3),
                        _ => String::new(),
                    };
                    return Err(NodeError::Invalid {
                        field: "egress",
                        reason: format!(
                            "allows more than the tenant's sub-boundary (it can only narrow): {}{more}",
                            parts.join("; ")
                        ),
                    });
                }
            }
        }
        Ok(budget::inherited(&spec.limits, &budget)
            .iter()
            .map(ToString::to_string)
            .collect())
    }
}

/// An image reference: the archive's file name in the tenant's inbox.
fn check_image(image: &str) -> Result<(), NodeError> {
    let bad = image.is_empty()
        || image.len() > MAX_IMAGE_REF
        || image.starts_with('.')
        || image.contains(['/', '\0']);
    if bad {
        return Err(NodeError::Invalid {
            field: "image",
            reason: format!(
                "{}: the file name of an image archive in the inbox (1-{MAX_IMAGE_REF} bytes, no /, not starting with .)",
                shown(image)
            ),
        });
    }
    Ok(())
}

/// A console registration's refusal: the per-role cap is the caller's
/// input (`name`) like the secret store's cap; the rest as it is.
fn console_error(e: KeyError) -> NodeError {
    match e {
        KeyError::TooManyConsoles { .. } => NodeError::Invalid {
            field: "name",
            reason: e.to_string(),
        },
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_cap_is_an_invalid_name_naming_the_cap() {
        let e = console_error(KeyError::TooManyConsoles {
            role: Role::Tenant,
            count: leasehold_tpm::MAX_CONSOLES,
            max: leasehold_tpm::MAX_CONSOLES,
        });
        assert!(
            matches!(e, NodeError::Invalid { field: "name", .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "name: the tenant has 32 console keys, the most a role may register (32); \
             register one of those names again to replace its key"
        );
        assert!(matches!(
            console_error(KeyError::NotAssigned),
            NodeError::Keys(KeyError::NotAssigned)
        ));
    }
}
