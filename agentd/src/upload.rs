//! Image uploads into the tenant's inbox (docs/engines.md, "Uploads").
//!
//! The tenant streams a local archive over its D-Bus connection (local or
//! over `tenantctl --host`'s SSH bridge) in bounded chunks. The bytes go to
//! a temporary name in the inbox on the tenant volume, `.upload-<id>.part`
//! (a name no image reference can take: those never start with `.`), and
//! are renamed to the final name only when the size and the sha256 the
//! client announced both match. Every path is resolved beneath a descriptor
//! of the inbox opened with `O_NOFOLLOW`: the inbox is the tenant's to
//! write, so a symlink planted there never sends the agent's writes
//! elsewhere.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};

use crate::engines::VolumeDir;

/// Most bytes one `UploadChunk` carries (well under the system bus's
/// message limit, and small enough to answer quickly).
pub const MAX_CHUNK: usize = leasehold_dbus_api::MAX_UPLOAD_CHUNK;
/// Default cap on one upload (`engines.upload_max_bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;
/// Bounds of `engines.upload_max_bytes`: at most the unpacker's own
/// archive cap (8 GiB).
pub const MAX_MAX_BYTES: u64 = 8 << 30;
/// Uploads in progress at once, per caller (uid).
pub const MAX_ACTIVE: usize = 4;
/// Uploads in progress at once on the node (every caller).
pub const MAX_ACTIVE_NODE: usize = 16;
/// An upload that received nothing for this long is dropped (its temp file
/// removed) when the next upload begins.
pub const IDLE: Duration = Duration::from_secs(600);
/// Inbox entries one sweep reads, and temp files it removes, at most: the
/// tenant fills its inbox as it likes, and a sweep holds the uploads' lock
/// (every chunk, and the drop before an erase's unmount, waits for it).
/// What is left goes at the next sweep (review: unbounded, and the start's
/// sweep held up the whole agent's start).
pub const MAX_SWEEP_ENTRIES: usize = 100_000;
/// See [`MAX_SWEEP_ENTRIES`].
pub const MAX_SWEEP_REMOVALS: usize = 1_000;

/// Prefix and suffix of temp files.
const TEMP_PREFIX: &str = ".upload-";
const TEMP_SUFFIX: &str = ".part";
/// Longest image file name (as for `Deploy`).
const MAX_NAME: usize = leasehold_node::MAX_IMAGE_REF;

/// What can go wrong; each names the field, the upload or the path.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A caller's argument is refused.
    #[error("{field}: {reason}")]
    Invalid {
        /// The argument.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No such upload (or not the caller's): the id as errors show caller
    /// input ([`leasehold_node::shown`]: quoted, at most 64 characters).
    #[error("no upload {0} in progress (finished, aborted, expired or never begun)")]
    NotFound(String),
    /// Too many uploads at once: why, with the caller's own uploads.
    #[error("{0}")]
    Busy(String),
    /// No tenant volume: images are kept nowhere else.
    #[error("no tenant volume is mounted: images are only kept on the encrypted volume (volume init, or open it first)")]
    NoVolume,
    /// Not enough room on the volume.
    #[error("the tenant volume at {} is full: {free} bytes free, the upload needs {needed}", mount.display())]
    NoSpace {
        /// The volume's mount point.
        mount: PathBuf,
        /// Bytes free (for unprivileged writers).
        free: u64,
        /// Bytes still to write.
        needed: u64,
    },
    /// The inbox is not a safe place to write.
    #[error("inbox {}: {reason}", path.display())]
    Inbox {
        /// The inbox.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl UploadError {
    /// [`UploadError::NotFound`] for the caller's `id`, shortened.
    fn not_found(id: &str) -> Self {
        UploadError::NotFound(leasehold_node::shown(id))
    }
}

/// One upload in progress.
struct Upload {
    uid: u32,
    name: String,
    size: u64,
    sha256: String,
    received: u64,
    hasher: Sha256,
    file: File,
    dir: OwnedFd,
    inbox: PathBuf,
    mount: PathBuf,
    temp: String,
    last: Instant,
    /// Bytes still to come, shared with its [`Entry`].
    remaining: Arc<AtomicU64>,
}

/// An upload in progress and the bytes it will still write, readable
/// without the upload's lock (free-space checks of new uploads).
struct Entry {
    up: Arc<Mutex<Upload>>,
    remaining: Arc<AtomicU64>,
    /// Its caller (the per-caller bound).
    uid: u32,
}

/// The uploads in progress (in memory: an agent restart drops them, and
/// its start removes their temp files).
pub struct Uploads {
    volume: Arc<dyn VolumeDir>,
    images_dir: String,
    max_bytes: u64,
    active: Mutex<BTreeMap<String, Entry>>,
    /// Held (read) by every call for as long as it works in the inbox;
    /// [`Uploads::drop_all`] takes it (write), so no call still holds a
    /// descriptor on the volume once it returns. `Some(n)`: closed at
    /// the volume's `n`th unmount, which is under way (every call
    /// refused until the volume has been unmounted: it may still show as
    /// mounted, and a descriptor opened now would keep it busy).
    gate: std::sync::RwLock<Option<u64>>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("images_dir", &self.images_dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UploadError + 'a {
    move |source| UploadError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A full volume is named as such, not as an I/O error.
fn write_err(u: &Upload, path: PathBuf, source: std::io::Error) -> UploadError {
    if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        UploadError::NoSpace {
            mount: u.mount.clone(),
            free: free_bytes(&u.dir).unwrap_or(0),
            needed: u.size - u.received,
        }
    } else {
        UploadError::Io {
            op: "write",
            path,
            source,
        }
    }
}

fn free_bytes(dir: &OwnedFd) -> std::io::Result<u64> {
    let s = rustix::fs::fstatvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Checks an image file name: the same rule as `Deploy`'s `image`.
pub fn check_name(name: &str) -> Result<(), UploadError> {
    let reason = if name.is_empty() || name.len() > MAX_NAME {
        Some(format!("1-{MAX_NAME} bytes"))
    } else if name.contains('\0') {
        Some("contains NUL".to_owned())
    } else if name.contains('/') {
        Some("contains /: a file name in the inbox, not a path".to_owned())
    } else if name.starts_with('.') {
        Some("starts with . (`..`, hidden and temp names are refused)".to_owned())
    } else {
        None
    };
    match reason {
        Some(r) => Err(UploadError::Invalid {
            field: "name",
            reason: format!("{}: {r}", leasehold_node::shown(name)),
        }),
        None => Ok(()),
    }
}

fn check_digest(d: &str) -> Result<(), UploadError> {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(UploadError::Invalid {
            field: "sha256",
            reason: "64 lowercase hex digits (optionally after `sha256:`)".into(),
        })
    }
}

/// Refuses another upload of `uid`'s beyond [`MAX_ACTIVE`] (naming its
/// own uploads, so it can abort one), or beyond [`MAX_ACTIVE_NODE`].
fn busy(active: &BTreeMap<String, Entry>, uid: u32) -> Result<(), UploadError> {
    let mine: Vec<&str> = active
        .iter()
        .filter(|(_, e)| e.uid == uid)
        .map(|(id, _)| id.as_str())
        .collect();
    if mine.len() >= MAX_ACTIVE {
        return Err(UploadError::Busy(format!(
            "{MAX_ACTIVE} uploads of yours are in progress ({}): finish one, abort one (tenantctl engine upload-abort ID), or leave it: one that receives no byte for {} minutes is dropped when an upload begins",
            mine.join(", "),
            IDLE.as_secs() / 60
        )));
    }
    if active.len() >= MAX_ACTIVE_NODE {
        return Err(UploadError::Busy(format!(
            "{MAX_ACTIVE_NODE} uploads are in progress on this node; try again later"
        )));
    }
    Ok(())
}

fn temp_name(id: &str) -> String {
    format!("{TEMP_PREFIX}{id}{TEMP_SUFFIX}")
}

fn id_of_temp(name: &str) -> Option<&str> {
    name.strip_prefix(TEMP_PREFIX)?.strip_suffix(TEMP_SUFFIX)
}

impl Uploads {
    /// Uploads into `<volume>/<images_dir>/inbox`, each at most `max_bytes`.
    pub fn new(volume: Arc<dyn VolumeDir>, images_dir: String, max_bytes: u64) -> Self {
        Self {
            volume,
            images_dir,
            max_bytes,
            active: Mutex::new(BTreeMap::new()),
            gate: std::sync::RwLock::new(None),
        }
    }

    /// See `gate`: held for the whole call.
    fn enter(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<u64>>, UploadError> {
        let g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if *g == Some(self.volume.unmounts()) {
            return Err(UploadError::NoVolume);
        }
        Ok(g)
    }

    fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (and if missing creates, owned by `uid`, 0700) the inbox,
    /// refusing a symlink, a non-directory or one others may write.
    fn open_inbox(&self, uid: u32) -> Result<(OwnedFd, PathBuf, PathBuf), UploadError> {
        let mount = self.volume.mounted().ok_or(UploadError::NoVolume)?;
        let base = mount.join(&self.images_dir);
        let inbox = base.join("inbox");
        let dir_flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
        // Only the agent writes `<images_dir>`: made here if missing, and
        // refused if it is not the agent's own (the volume's root is
        // writable by the tenant's users; its sticky bit keeps them from
        // replacing it after this check).
        leasehold_storage::fs::ensure_own_dir(&base).map_err(|e| UploadError::Inbox {
            path: base.clone(),
            reason: e.to_string(),
        })?;
        let basefd =
            rustix::fs::open(&base, dir_flags, Mode::empty()).map_err(|e| UploadError::Inbox {
                path: base.clone(),
                reason: format!("not a directory the agent owns ({e})"),
            })?;
        match rustix::fs::mkdirat(&basefd, "inbox", Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                // The tenant's login owns it, so it may list and remove its
                // images over its SSH login too.
                rustix::fs::chownat(
                    &basefd,
                    "inbox",
                    Some(rustix::fs::Uid::from_raw(uid)),
                    None,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_err("chown", &inbox)(e.into()))?;
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err("mkdir", &inbox)(e.into())),
        }
        let fd = rustix::fs::openat(&basefd, "inbox", dir_flags, Mode::empty()).map_err(|e| {
            UploadError::Inbox {
                path: inbox.clone(),
                reason: format!("not a directory (a symlink is refused): {e}"),
            }
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", &inbox)(e.into()))?;
        if st.st_mode & 0o002 != 0 {
            return Err(UploadError::Inbox {
                path: inbox,
                reason: "writable by every user: only the tenant may write its inbox (chmod o-w)"
                    .into(),
            });
        }
        Ok((fd, inbox, mount))
    }

    /// Removes temp files no upload in progress owns, and drops uploads
    /// idle for [`IDLE`]. Returns how many files were removed.
    fn sweep(&self, dir: &OwnedFd, inbox: &Path) -> usize {
        {
            let mut active = self.active();
            let stale: Vec<String> = active
                .iter()
                .filter(|(_, e)| {
                    e.up.try_lock()
                        .map(|u| u.last.elapsed() >= IDLE)
                        .unwrap_or(false)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                active.remove(&id);
                tracing::info!(upload = id, "an idle upload was dropped");
            }
        }
        let Ok(d) = rustix::fs::Dir::read_from(dir) else {
            return 0;
        };
        let mut removed = 0;
        let active = self.active();
        for entry in d.flatten().take(MAX_SWEEP_ENTRIES) {
            if removed >= MAX_SWEEP_REMOVALS {
                break;
            }
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            let Some(id) = id_of_temp(name) else {
                continue;
            };
            if active.contains_key(id) {
                continue;
            }
            if rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            // One line, not one per file: the tenant names the files and
            // may make as many as it likes (journald's rate limit).
            tracing::info!(files = removed, inbox = %inbox.display(), "removed unfinished uploads");
        }
        removed
    }

    /// Drops every upload in progress (their files close): the volume is
    /// about to be unmounted. Every call answers NoVolume until the
    /// unmount is done, then theirs NotFound; the temp files go with an
    /// erase, or at the next sweep.
    pub fn drop_all(&self) -> usize {
        // Every call in flight ends first (its descriptors with it); none
        // starts until the unmount is done (review: a begin racing the
        // unmount kept the filesystem busy, the unmount was lazy and the
        // mapping's removal deferred, so the next tenancy's volume could
        // not be made).
        let mut gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        *gate = Some(self.volume.unmounts());
        let mut active = self.active();
        let n = active.len();
        active.clear();
        n
    }

    /// At agent start: every temp file is an unfinished upload of an
    /// earlier agent. Nothing to do without a volume.
    pub fn sweep_at_start(&self) -> usize {
        let Ok(_gate) = self.enter() else {
            return 0;
        };
        let Some(mount) = self.volume.mounted() else {
            return 0;
        };
        let inbox = mount.join(&self.images_dir).join("inbox");
        let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
        match rustix::fs::open(&inbox, flags, Mode::empty()) {
            Ok(fd) => self.sweep(&fd, &inbox),
            Err(_) => 0,
        }
    }

    /// Begins an upload of `size` bytes hashing to `sha256` as `name` in
    /// the inbox; returns its id.
    pub fn begin(
        &self,
        uid: u32,
        name: &str,
        size: u64,
        sha256: &str,
    ) -> Result<String, UploadError> {
        let _gate = self.enter()?;
        check_name(name)?;
        if size > self.max_bytes {
            return Err(UploadError::Invalid {
                field: "size",
                reason: format!(
                    "{size} bytes, more than this node's cap of {} (engines.upload_max_bytes)",
                    self.max_bytes
                ),
            });
        }
        check_digest(sha256)?;
        let sha256 = sha256.strip_prefix("sha256:").unwrap_or(sha256).to_owned();
        let (dir, inbox, mount) = self.open_inbox(uid)?;
        // A directory at the name would fail the rename only at the
        // commit, after the whole transfer.
        if let Ok(st) = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() {
                return Err(UploadError::Invalid {
                    field: "name",
                    reason: format!(
                        "{}: a directory of that name is in the inbox (an upload replaces files only)",
                        leasehold_node::shown(name)
                    ),
                });
            }
        }
        self.sweep(&dir, &inbox);
        self.check_busy(uid)?;
        // Created and registered under one lock: another caller's sweep
        // never sees the new temp file as a leftover, and two uploads
        // begun together cannot both count the same free space.
        let mut active = self.active();
        // What the uploads under way will still write counts as taken: the
        // free space is what is left after them.
        let promised: u64 = active
            .values()
            .map(|e| e.remaining.load(Ordering::Acquire))
            .fold(0u64, u64::saturating_add);
        let free = free_bytes(&dir).map_err(|e| io_err("statvfs", &mount)(e))?;
        if free.saturating_sub(promised) < size {
            return Err(UploadError::NoSpace {
                mount,
                free: free.saturating_sub(promised),
                needed: size,
            });
        }
        let id = hex::encode(rand::random::<[u8; 12]>());
        let temp = temp_name(&id);
        let path = inbox.join(&temp);
        let fd = rustix::fs::openat(
            &dir,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", &path)(e.into()))?;
        let up = Upload {
            uid,
            name: name.to_owned(),
            size,
            sha256,
            received: 0,
            hasher: Sha256::new(),
            file: File::from(fd),
            dir,
            inbox,
            mount,
            temp,
            last: Instant::now(),
            remaining: Arc::new(AtomicU64::new(size)),
        };
        if let Err(e) = busy(&active, uid) {
            let _ = rustix::fs::unlinkat(&up.dir, up.temp.as_str(), rustix::fs::AtFlags::empty());
            return Err(e);
        }
        let remaining = up.remaining.clone();
        active.insert(
            id.clone(),
            Entry {
                up: Arc::new(Mutex::new(up)),
                remaining,
                uid,
            },
        );
        // Debug: a tenant can begin and abort uploads as fast as it likes
        // (journald's rate limit would then drop the agent's other lines);
        // never the file's name, the tenant's.
        tracing::debug!(upload = id, uid, size, "upload begun");
        Ok(id)
    }

    fn check_busy(&self, uid: u32) -> Result<(), UploadError> {
        busy(&self.active(), uid)
    }

    fn get(&self, uid: u32, id: &str) -> Result<Arc<Mutex<Upload>>, UploadError> {
        let u = self
            .active()
            .get(id)
            .map(|e| e.up.clone())
            .ok_or_else(|| UploadError::not_found(id))?;
        // Another caller's upload is not shown to exist.
        if u.lock().unwrap_or_else(|p| p.into_inner()).uid != uid {
            return Err(UploadError::not_found(id));
        }
        Ok(u)
    }

    /// Ends an upload: its temp file is removed.
    fn drop_upload(&self, id: &str, u: &Upload) {
        self.active().remove(id);
        let _ = rustix::fs::unlinkat(&u.dir, u.temp.as_str(), rustix::fs::AtFlags::empty());
    }

    /// Appends `data` at `offset` (which must be what was received so far);
    /// returns the bytes received. A write error ends the upload.
    pub fn chunk(&self, uid: u32, id: &str, offset: u64, data: &[u8]) -> Result<u64, UploadError> {
        let _gate = self.enter()?;
        let u = self.get(uid, id)?;
        let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
        if !self.active().contains_key(id) {
            return Err(UploadError::not_found(id));
        }
        if data.len() > MAX_CHUNK {
            return Err(UploadError::Invalid {
                field: "data",
                reason: format!("{} bytes, more than {MAX_CHUNK} in one chunk", data.len()),
            });
        }
        if offset != u.received {
            return Err(UploadError::Invalid {
                field: "offset",
                reason: format!("{offset}, but {} bytes were received so far", u.received),
            });
        }
        let len = data.len() as u64;
        if u.received + len > u.size {
            return Err(UploadError::Invalid {
                field: "data",
                reason: format!(
                    "{} bytes at offset {offset} go past the announced size {}",
                    len, u.size
                ),
            });
        }
        let path = u.inbox.join(&u.temp);
        if let Err(e) = u.file.write_all(data) {
            let err = write_err(&u, path, e);
            self.drop_upload(id, &u);
            return Err(err);
        }
        u.hasher.update(data);
        u.received += len;
        u.remaining.store(u.size - u.received, Ordering::Release);
        // Only bytes keep an upload alive: empty chunks every few minutes
        // held a place for ever (review).
        if len > 0 {
            u.last = Instant::now();
        }
        Ok(u.received)
    }

    /// Finishes an upload: the size and sha256 are compared, then the temp
    /// file is synced, given to the caller and renamed to its name
    /// (replacing an older file of that name). A mismatch ends the upload
    /// and removes its temp file. Returns the name.
    pub fn commit(&self, uid: u32, id: &str) -> Result<String, UploadError> {
        let _gate = self.enter()?;
        let u = self.get(uid, id)?;
        let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
        if !self.active().contains_key(id) {
            return Err(UploadError::not_found(id));
        }
        // Still registered while it is synced and renamed (seconds for a
        // large file): a sweep meanwhile must not take it for a leftover.
        let r = Self::finish(&mut u);
        self.active().remove(id);
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&u.dir, u.temp.as_str(), rustix::fs::AtFlags::empty());
        }
        r
    }

    fn finish(u: &mut Upload) -> Result<String, UploadError> {
        if u.received != u.size {
            return Err(UploadError::Invalid {
                field: "size",
                reason: format!(
                    "{} bytes were announced, {} received: the upload is discarded",
                    u.size, u.received
                ),
            });
        }
        let got = hex::encode(std::mem::take(&mut u.hasher).finalize());
        if got != u.sha256 {
            return Err(UploadError::Invalid {
                field: "sha256",
                reason: format!(
                    "the received bytes hash to sha256:{got}, not sha256:{}: the upload is discarded",
                    u.sha256
                ),
            });
        }
        let temp = u.inbox.join(&u.temp);
        if let Err(e) = u.file.sync_all() {
            return Err(write_err(u, temp, e));
        }
        rustix::fs::fchown(&u.file, Some(rustix::fs::Uid::from_raw(u.uid)), None)
            .map_err(|e| io_err("chown", &temp)(e.into()))?;
        let dest = u.inbox.join(&u.name);
        // The final name appears only now, complete: rename is atomic, and
        // replaces (never follows) whatever had that name.
        rustix::fs::renameat(&u.dir, u.temp.as_str(), &u.dir, u.name.as_str())
            .map_err(|e| io_err("rename", &dest)(e.into()))?;
        rustix::fs::fsync(&u.dir).map_err(|e| io_err("fsync", &u.inbox)(e.into()))?;
        // Debug, as begin and abort: an empty upload can be committed in a
        // loop.
        tracing::debug!(uid = u.uid, size = u.size, "upload committed");
        Ok(u.name.clone())
    }

    /// Abandons an upload: its temp file is removed.
    pub fn abort(&self, uid: u32, id: &str) -> Result<(), UploadError> {
        let _gate = self.enter()?;
        let u = self.get(uid, id)?;
        let u = u.lock().unwrap_or_else(|p| p.into_inner());
        // Committed (or dropped) while this waited for it: not aborted,
        // and never reported so (review: an abort during a commit said
        // "aborted" of a file then in the inbox).
        if !self.active().contains_key(id) {
            return Err(UploadError::not_found(id));
        }
        self.drop_upload(id, &u);
        tracing::debug!(upload = id, "upload aborted");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
