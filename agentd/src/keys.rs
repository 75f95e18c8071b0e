//! The one owner of the key hierarchy: a dedicated thread. Callers send it
//! closures and await the result, so TPM commands never interleave and the
//! TPM context never crosses threads.

use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use std::sync::Arc;

use leasehold_node::backend::{DiskKeyInfo, KeyStore};
use leasehold_tpm::{
    Confirm, KeyChange, KeyConfig, KeyError, KeyHierarchy, Opened, PublicKeyInfo, Role,
    SigningKeyInfo, Status, SymmetricKey,
};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

/// A job and what it is (its closure's type name: the function that sent
/// it), for the log line of a slow one.
type Job = (&'static str, Box<dyn FnOnce(&mut KeyHierarchy) + Send>);

/// A key job taking longer is logged as a warning: TPM commands take
/// milliseconds (seconds for a key generation on a slow TPM), so this is a
/// TPM, or swtpm's socket, that has stopped answering.
const SLOW_JOB: std::time::Duration = std::time::Duration::from_secs(10);

/// The job the key thread is running, and since when.
type RunningJob = Arc<Mutex<Option<(&'static str, std::time::Instant)>>>;

/// Handle to the key-owner thread.
#[derive(Debug)]
pub struct Keys {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    running: RunningJob,
    done: Mutex<Option<oneshot::Receiver<Result<(), KeyError>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The key thread has stopped (only during shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the key service has stopped")]
pub struct KeysGone;

impl Keys {
    /// Opens the hierarchy on a new thread.
    pub fn start(cfg: KeyConfig) -> Result<(Self, Opened), KeyError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (opened_tx, opened_rx) = mpsc::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let running: RunningJob = Arc::default();
        let on_thread = running.clone();
        let thread = std::thread::Builder::new()
            .name("keys".into())
            .spawn(move || {
                let mut keys = match KeyHierarchy::open(&cfg) {
                    Ok((k, o)) => {
                        let _ = opened_tx.send(Ok(o));
                        k
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                // Runs until every sender is dropped.
                for (what, job) in rx {
                    let started = std::time::Instant::now();
                    *lock(&on_thread) = Some((what, started));
                    job(&mut keys);
                    *lock(&on_thread) = None;
                    let took = started.elapsed();
                    if took > SLOW_JOB {
                        tracing::warn!("key thread: a job took {took:?} ({what})");
                    }
                }
                let _ = done_tx.send(keys.shutdown());
            })
            .map_err(|source| KeyError::Io {
                op: "spawn key thread",
                path: Default::default(),
                source,
            })?;
        let opened = opened_rx
            .recv()
            .unwrap_or(Err(KeyError::UnexpectedTpmResponse(
                "key thread ended during start-up",
            )))?;
        Ok((
            Self {
                tx: Mutex::new(Some(tx)),
                running,
                done: Mutex::new(Some(done_rx)),
                thread: Mutex::new(Some(thread)),
            },
            opened,
        ))
    }

    /// The job the key thread is running (its closure's type name: the
    /// function that sent it) and for how long; None when it is idle. For
    /// the TPM checks' messages: a TPM that stopped answering is named
    /// with what it was asked.
    pub fn running(&self) -> Option<(&'static str, std::time::Duration)> {
        lock(&self.running).map(|(what, since)| (what, since.elapsed()))
    }

    /// "; the key thread has run one job for 42 s (WHAT)", or "" when it
    /// is idle: to end a message about a TPM that does not answer.
    pub fn running_note(&self) -> String {
        match self.running() {
            Some((what, took)) => format!(
                "; the key thread has run one job for {} s ({what})",
                took.as_secs()
            ),
            None => String::new(),
        }
    }

    /// Queues a job for the key thread.
    fn send(&self, job: Job) -> Result<(), KeysGone> {
        lock(&self.tx)
            .as_ref()
            .ok_or(KeysGone)?
            .send(job)
            .map_err(|_| KeysGone)
    }

    /// Runs `f` on the key thread.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeyHierarchy) -> R + Send + 'static,
    ) -> Result<R, KeysGone> {
        let (rtx, rrx) = oneshot::channel();
        self.send((
            std::any::type_name_of_val(&f),
            Box::new(move |k| {
                let _ = rtx.send(f(k));
            }),
        ))?;
        rrx.await.map_err(|_| KeysGone)
    }

    /// Runs `f` on the key thread and blocks until it is done (for the node
    /// controller's thread; never call it on an async worker).
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeyHierarchy) -> R + Send + 'static,
    ) -> Result<R, KeysGone> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.send((
            std::any::type_name_of_val(&f),
            Box::new(move |k| {
                let _ = rtx.send(f(k));
            }),
        ))?;
        rrx.recv().map_err(|_| KeysGone)
    }

    /// Stops the thread after queued jobs and shuts the TPM down cleanly.
    /// Later calls fail with `KeysGone`.
    pub async fn shutdown(&self) -> Result<(), KeyError> {
        drop(lock(&self.tx).take());
        let done = lock(&self.done).take();
        let r = match done {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl From<KeysGone> for KeyError {
    fn from(_: KeysGone) -> Self {
        KeyError::UnexpectedTpmResponse("the key thread has stopped")
    }
}

/// The key thread as the node controller's key backend.
#[derive(Debug, Clone)]
pub struct KeyBackend(pub Arc<Keys>);

impl KeyBackend {
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeyHierarchy) -> Result<R, KeyError> + Send + 'static,
    ) -> Result<R, KeyError> {
        self.0.call_blocking(f)?
    }
}

/// The disk key and what it was made from; it leaves the key thread by move.
pub fn disk_key(k: &mut KeyHierarchy) -> Result<DiskKeyInfo, KeyError> {
    let st = k.status();
    Ok(DiskKeyInfo {
        node_id: st.node_id.clone(),
        key: k.disk_key()?,
        generations: leasehold_node::generations(&st),
    })
}

impl KeyStore for KeyBackend {
    fn status(&mut self) -> Result<Status, KeyError> {
        self.run(|k| Ok(k.status()))
    }
    fn public_key(&mut self, role: Role) -> Result<PublicKeyInfo, KeyError> {
        self.run(move |k| k.public_key(role))
    }
    fn owned(&mut self, role: Role) -> Result<bool, KeyError> {
        // A wider level is refused a narrower level's key exactly when
        // that level made its own pair.
        self.run(move |k| {
            k.public_key(role)?;
            Ok(match role {
                Role::Landlord => true,
                Role::Tenant => k.public_key_as(Role::Landlord, Role::Tenant).is_err(),
            })
        })
    }
    fn signing_key(&mut self) -> Result<SigningKeyInfo, KeyError> {
        self.run(|k| k.signing_key())
    }
    fn rotate(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError> {
        self.run(move |k| {
            inject_key_fault(k);
            k.rotate(caller, target, Confirm::DestroyData)
        })
    }
    fn finish_interrupted(&mut self) -> Result<bool, KeyError> {
        self.run(|k| k.finish_interrupted())
    }
    fn rekey(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError> {
        self.run(move |k| k.rekey(caller, target))
    }
    fn assign(
        &mut self,
        name: &str,
        console_key: Option<&str>,
        confirm: Confirm,
    ) -> Result<KeyChange, KeyError> {
        let (name, console) = (name.to_owned(), console_key.map(str::to_owned));
        self.run(move |k| {
            k.assign_tenant_with_console(Role::Landlord, &name, console.as_deref(), confirm)
        })
    }
    fn release(&mut self, confirm: Confirm) -> Result<Option<KeyChange>, KeyError> {
        self.run(move |k| k.release_tenant(Role::Landlord, confirm))
    }
    fn register_console(&mut self, role: Role, name: &str, pem: &str) -> Result<String, KeyError> {
        let (name, pem) = (name.to_owned(), pem.to_owned());
        self.run(move |k| k.register_console(role, &name, &pem))
    }
    fn open_envelope(
        &mut self,
        role: Role,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let envelope = envelope.to_vec();
        self.run(move |k| k.open_envelope(role, &envelope))
    }
    fn data_key(&mut self, purpose: &str) -> Result<SymmetricKey, KeyError> {
        let purpose = purpose.to_owned();
        self.run(move |k| k.data_key(&purpose))
    }
    fn disk_key(&mut self) -> Result<DiskKeyInfo, KeyError> {
        self.run(disk_key)
    }
    fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let data = data.to_vec();
        self.run(move |k| k.sign(&data))
    }
    fn prepare_standby(&mut self) -> Result<usize, KeyError> {
        self.run(|k| k.prepare_standby())
    }
}

/// The VM lab's failure tests (`LEASEHOLD_FAIL_AT`, docs/storage.md): an
/// I/O error the agent survives at a TPM crate fault point of the next
/// rotation. `keys:after-erase`: the old secret undefined, nothing
/// committed; `keys:after-commit`: committed, the old files not removed.
#[cfg(feature = "fault-injection")]
fn inject_key_fault(k: &mut KeyHierarchy) {
    use leasehold_tpm::FaultPoint;
    let point = match std::env::var("LEASEHOLD_FAIL_AT").as_deref() {
        Ok("keys:after-erase") => FaultPoint::AfterOldNvUndefined,
        Ok("keys:after-commit") => FaultPoint::AfterManifestReplaced,
        _ => return,
    };
    tracing::warn!(?point, "LEASEHOLD_FAIL_AT: failing this rotation there");
    k.inject_error(point);
}

#[cfg(not(feature = "fault-injection"))]
fn inject_key_fault(_k: &mut KeyHierarchy) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running job is named while it runs, with its age, and nothing
    /// once the thread is idle again: what the TPM checks' messages say
    /// of a TPM that stopped answering.
    #[test]
    fn the_running_job_is_named_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let swtpm = leasehold_tpm::swtpm::Swtpm::start(&dir.path().join("tpm")).unwrap();
        let (keys, _) = Keys::start(swtpm.key_config(dir.path().join("state"))).unwrap();
        let keys = Arc::new(keys);
        assert!(keys.running().is_none());
        assert_eq!(keys.running_note(), "");
        let (started_tx, started) = mpsc::channel();
        let (release, gate) = mpsc::channel::<()>();
        let k = keys.clone();
        let job = std::thread::spawn(move || {
            k.call_blocking(move |_| {
                started_tx.send(()).unwrap();
                let _ = gate.recv();
            })
        });
        started.recv().unwrap();
        let (what, _) = keys.running().expect("a job is running");
        assert!(
            what.contains("the_running_job_is_named_while_it_runs"),
            "{what}"
        );
        assert!(
            keys.running_note()
                .starts_with("; the key thread has run one job for 0 s ("),
            "{}",
            keys.running_note()
        );
        release.send(()).unwrap();
        job.join().unwrap().unwrap();
        // Cleared once the job has returned (just after its answer is
        // sent: no event to wait for, so a bounded poll).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while keys.running().is_some() {
            assert!(
                std::time::Instant::now() < end,
                "still running: {:?}",
                keys.running()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(keys.shutdown()).unwrap();
        drop(swtpm);
    }
}
