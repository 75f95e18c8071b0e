//! The one owner of the key hierarchy: a dedicated thread. Callers send it
//! closures and await the result, so TPM commands never interleave and the
//! TPM context never crosses threads.

use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use leasehold_tpm::{KeyConfig, KeyError, KeyHierarchy, Opened};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut KeyHierarchy) + Send>;

/// Handle to the key-owner thread.
#[derive(Debug)]
pub struct Keys {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
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
                for job in rx {
                    job(&mut keys);
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
                done: Mutex::new(Some(done_rx)),
                thread: Mutex::new(Some(thread)),
            },
            opened,
        ))
    }

    /// Runs `f` on the key thread.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeyHierarchy) -> R + Send + 'static,
    ) -> Result<R, KeysGone> {
        let (rtx, rrx) = oneshot::channel();
        let job: Job = Box::new(move |k| {
            let _ = rtx.send(f(k));
        });
        {
            let tx = lock(&self.tx);
            tx.as_ref()
                .ok_or(KeysGone)?
                .send(job)
                .map_err(|_| KeysGone)?;
        }
        rrx.await.map_err(|_| KeysGone)
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
