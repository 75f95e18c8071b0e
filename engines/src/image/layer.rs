//! Applying layer tar streams to a root directory that a hostile image must
//! not escape.
//!
//! Every path is resolved here component by component relative to the root,
//! the way the kernel would resolve it inside the engine with the root as
//! `/`: a symlink met on the way (planted by an earlier entry or layer) is
//! followed *within* the root — an absolute target restarts from the root,
//! `..` stops at the root — so `a -> /etc` then `a/passwd` writes
//! `ROOT/etc/passwd`, never the host's. The final component is never
//! followed: it is removed and created anew. All file operations then go
//! through a `cap_std::fs::Dir` for the root, which refuses (rather than
//! follows) anything leading outside it, as a second line of defence.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::{Dir, OpenOptions, Permissions};

use super::archive::walk;
use super::error::{from_io, ImageError};
use super::types::{Limits, UnpackStats};

/// Marks a whiteout: `.wh.NAME` deletes NAME from lower layers.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Marks an opaque directory: its lower-layer contents are hidden.
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Linux's NAME_MAX.
const MAX_NAME_BYTES: usize = 255;
/// Non-root owners recorded in the result, at most.
const MAX_OWNERS_RECORDED: usize = 1000;

/// Applies layers in order to `root`.
pub(crate) struct Unpacker<'l> {
    root: Dir,
    limits: &'l Limits,
    stats: UnpackStats,
    entries: u64,
    /// Directory modes, applied at the end so that a read-only directory
    /// in a lower layer does not stop a higher one from writing into it.
    dir_modes: HashMap<PathBuf, u32>,
    owners: Owners,
}

/// Why one entry was refused.
type Refusal = String;

/// Non-root owners by path, as recorded.
pub(crate) type Owners = BTreeMap<String, (u64, u64)>;

impl<'l> Unpacker<'l> {
    pub(crate) fn new(root: Dir, limits: &'l Limits) -> Self {
        Unpacker {
            root,
            limits,
            stats: UnpackStats::default(),
            entries: 0,
            dir_modes: HashMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Applies one uncompressed layer tar stream (layer numbers are 1-based).
    pub(crate) fn apply_layer<R: Read>(
        &mut self,
        layer: usize,
        stream: R,
    ) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive
            .entries()
            .map_err(|e| from_io("read layer", format!("layer {layer}"), e))?;
        // Paths this layer wrote: an opaque whiteout keeps these.
        let mut written: HashSet<PathBuf> = HashSet::new();
        let bad = |e: io::Error| from_io("read layer", format!("layer {layer}"), e);
        walk(
            entries,
            self.limits.max_path_bytes,
            bad,
            |entry, path, link| {
                self.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(ImageError::cap(
                        "entries in all layers",
                        self.limits.max_entries,
                    ));
                }
                let shown = String::from_utf8_lossy(&path).into_owned();
                self.apply_entry(entry, &path, link.as_deref(), &mut written)
                    .map_err(|reason| match reason {
                        EntryError::Refused(reason) => ImageError::Entry {
                            layer,
                            entry: shown,
                            reason,
                        },
                        EntryError::Image(e) => e,
                    })
            },
        )?;
        self.stats.layers += 1;
        Ok(())
    }

    /// Sets the recorded directory modes (deepest first) and hands back the
    /// counts and the recorded owners.
    pub(crate) fn finish(self) -> Result<(UnpackStats, Owners), ImageError> {
        let mut dirs: Vec<_> = self.dir_modes.into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, mode) in dirs {
            let target = if path.as_os_str().is_empty() {
                Path::new(".")
            } else {
                path.as_path()
            };
            match self.root.symlink_metadata(target) {
                Ok(m) if m.is_dir() => self
                    .root
                    .set_permissions(target, perms(mode))
                    .map_err(|e| ImageError::io("chmod", &path, e))?,
                // Removed or replaced by a later layer.
                _ => {}
            }
        }
        Ok((self.stats, self.owners))
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        raw_link: Option<&[u8]>,
        written: &mut HashSet<PathBuf>,
    ) -> Result<(), EntryError> {
        let comps = clean(raw_path)?;
        let kind = entry.header().entry_type();

        // Whiteouts first: their names are markers, not files.
        if let Some(last) = comps.last().and_then(|c| c.to_str()) {
            if last == OPAQUE_WHITEOUT {
                let dir = self.resolve(&comps[..comps.len() - 1], true)?;
                self.opaque(&dir, written)?;
                self.stats.opaque_whiteouts += 1;
                return Ok(());
            }
            if last.starts_with(".wh..wh.") {
                // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): no meaning here.
                tracing::debug!(entry = %last, "ignoring AUFS metadata entry");
                return Ok(());
            }
            if let Some(name) = last.strip_prefix(WHITEOUT_PREFIX) {
                if name.is_empty() || name == "." || name == ".." {
                    return Err(EntryError::Refused(
                        "a whiteout of no name, `.` or `..`".into(),
                    ));
                }
                let mut victim = comps[..comps.len() - 1].to_vec();
                victim.push(OsString::from(name));
                let victim = self.resolve(&victim, false)?;
                self.remove(&victim)?;
                self.stats.whiteouts += 1;
                return Ok(());
            }
        }

        if comps.is_empty() {
            // The root itself ("./"): only its mode matters.
            if kind.is_dir() {
                let mode = self.mode(entry)?;
                self.dir_modes.insert(PathBuf::new(), mode);
                return Ok(());
            }
            return Err(EntryError::Refused(
                "a non-directory entry for the root".into(),
            ));
        }

        let target = self.resolve(&comps, false)?;
        let (uid, gid) = (
            entry.header().uid().unwrap_or(0),
            entry.header().gid().unwrap_or(0),
        );
        if (uid, gid) != (0, 0) {
            self.stats.non_root_owned += 1;
            if self.owners.len() < MAX_OWNERS_RECORDED {
                self.owners
                    .insert(target.to_string_lossy().into_owned(), (uid, gid));
            }
        }
        match kind {
            tar::EntryType::Directory => {
                let mode = self.mode(entry)?;
                match self.root.symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    _ => {
                        self.make_parent(&target)?;
                        self.remove(&target)?;
                        self.root
                            .create_dir(&target)
                            .map_err(|e| io_refusal("create directory", e))?;
                        self.stats.dirs += 1;
                    }
                }
                self.dir_modes.insert(target.clone(), mode);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = self.mode(entry)?;
                self.make_parent(&target)?;
                self.remove(&target)?;
                let file = self
                    .root
                    .open_with(&target, OpenOptions::new().write(true).create_new(true))
                    .map_err(|e| io_refusal("create file", e))?;
                let mut file = file.into_std();
                let n = io::copy(entry, &mut file)
                    .map_err(|e| EntryError::Image(from_io("write", &target, e)))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io_refusal("chmod", e))?;
                self.stats.files += 1;
                self.stats.bytes += n;
            }
            tar::EntryType::Symlink => {
                let link = raw_link
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| EntryError::Refused("a symlink without a target".into()))?;
                self.make_parent(&target)?;
                self.remove(&target)?;
                // The target is stored verbatim: it is resolved later by the
                // kernel inside the engine, where the root is `/`, and by
                // `resolve` here, which keeps it within the root.
                self.root
                    .symlink_contents(OsStr::from_bytes(link), &target)
                    .map_err(|e| io_refusal("create symlink", e))?;
                self.stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let link = raw_link
                    .ok_or_else(|| EntryError::Refused("a hard link without a target".into()))?;
                let source = self.resolve(&clean(link)?, false)?;
                match self.root.symlink_metadata(&source) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(EntryError::Refused(format!(
                            "hard link to {:?}, which is not a regular file already unpacked in the root",
                            String::from_utf8_lossy(link)
                        )))
                    }
                }
                if source != target {
                    self.make_parent(&target)?;
                    self.remove(&target)?;
                    self.root
                        .hard_link(&source, &self.root, &target)
                        .map_err(|e| io_refusal("create hard link", e))?;
                }
                self.stats.hardlinks += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.stats.skipped_devices += 1;
                tracing::debug!(path = %target.display(), "skipping a device node or FIFO");
                return Ok(());
            }
            other => {
                return Err(EntryError::Refused(format!(
                    "unsupported entry type {other:?}"
                )))
            }
        }
        // The target and its ancestors: an opaque whiteout later in this
        // layer keeps them.
        for path in target.ancestors() {
            if !written.insert(path.to_path_buf()) {
                break;
            }
        }
        Ok(())
    }

    /// The entry's mode with setuid and setgid removed (counted).
    fn mode<R: Read>(&mut self, entry: &tar::Entry<'_, R>) -> Result<u32, EntryError> {
        let mode = entry
            .header()
            .mode()
            .map_err(|e| EntryError::Refused(format!("unreadable mode: {e}")))?
            & 0o7777;
        if mode & 0o6000 != 0 {
            self.stats.setid_stripped += 1;
        }
        Ok(mode & !0o6000)
    }

    /// Resolves `comps` inside the root, following symlinks in every
    /// component but the last (and the last too if `follow_last`) within
    /// the root. The result has only normal components and, at the time of
    /// the call, no symlink before its last component.
    fn resolve(&self, comps: &[OsString], follow_last: bool) -> Result<PathBuf, EntryError> {
        let mut out: Vec<OsString> = Vec::new();
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut hops = 0u32;
        let mut missing = false;
        while let Some(comp) = pending.pop() {
            if comp == ".." {
                out.pop();
                continue;
            }
            if comp.is_empty() || comp == "." {
                continue;
            }
            out.push(comp);
            let last = pending.is_empty();
            if missing || (last && !follow_last) {
                continue;
            }
            let here: PathBuf = out.iter().collect();
            match self.root.symlink_metadata(&here) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > self.limits.max_symlink_hops {
                        return Err(EntryError::Refused(format!(
                            "more than {} symlinks on the way",
                            self.limits.max_symlink_hops
                        )));
                    }
                    let target = self
                        .root
                        .read_link_contents(&here)
                        .map_err(|e| io_refusal("read symlink", e))?;
                    out.pop();
                    for part in target.components().rev() {
                        match part {
                            Component::Normal(p) => pending.push(p.to_owned()),
                            Component::ParentDir => pending.push(OsString::from("..")),
                            Component::CurDir => {}
                            Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                    if target.has_root() {
                        out.clear();
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
                Err(e) => return Err(io_refusal("stat", e)),
            }
        }
        Ok(out.iter().collect())
    }

    /// Creates the (resolved) parent directories of `path` as needed, one
    /// by one (each counted); a non-directory in the way is refused.
    fn make_parent(&mut self, path: &Path) -> Result<(), EntryError> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        let mut here = PathBuf::new();
        for comp in parent.components() {
            here.push(comp);
            match self.root.symlink_metadata(&here) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(EntryError::Refused(format!(
                        "parent {} is not a directory",
                        here.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.root
                        .create_dir(&here)
                        .map_err(|e| io_refusal("create parent directory", e))?;
                    // A parent the layer does not list (OCI allows that) is
                    // 0755, as other runtimes make it, not the umask's: the
                    // agent's UMask=0077 would leave it 0700, unreachable to
                    // the engine's uid. A later entry for it sets its own.
                    self.dir_modes.insert(here.clone(), 0o755);
                    self.stats.dirs += 1;
                }
                Err(e) => return Err(io_refusal("stat", e)),
            }
        }
        Ok(())
    }

    /// Removes whatever is at `path` (not following a final symlink), and
    /// forgets the modes recorded for directories under it.
    fn remove(&mut self, path: &Path) -> Result<(), EntryError> {
        match self.root.symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                self.dir_modes.retain(|p, _| !p.starts_with(path));
                self.root
                    .remove_dir_all(path)
                    .map_err(|e| io_refusal("remove directory", e))
            }
            Ok(_) => self
                .root
                .remove_file(path)
                .map_err(|e| io_refusal("remove", e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_refusal("stat", e)),
        }
    }

    /// Removes from `dir` everything this layer did not write.
    fn opaque(&mut self, dir: &Path, written: &HashSet<PathBuf>) -> Result<(), EntryError> {
        let shown = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let entries = match self.root.read_dir(shown) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_refusal("list directory", e)),
        };
        let mut doomed = Vec::new();
        for child in entries {
            let child = child.map_err(|e| io_refusal("list directory", e))?;
            let path = dir.join(child.file_name());
            if !written.contains(&path) {
                doomed.push(path);
            }
        }
        for path in doomed {
            self.remove(&path)?;
        }
        Ok(())
    }
}

/// A refused entry or an error about the whole image (a cap).
enum EntryError {
    Refused(Refusal),
    Image(ImageError),
}

impl From<ImageError> for EntryError {
    fn from(e: ImageError) -> Self {
        EntryError::Image(e)
    }
}

fn io_refusal(op: &str, e: io::Error) -> EntryError {
    EntryError::Refused(format!("{op}: {e}"))
}

fn perms(mode: u32) -> Permissions {
    Permissions::from_std(std::fs::Permissions::from_mode(mode))
}

/// Splits an entry path into normal components: a leading `/` and `.`
/// components are dropped (absolute paths are taken relative to the root,
/// as every image tool writes them), `..` is refused, as are components
/// longer than NAME_MAX.
fn clean(raw: &[u8]) -> Result<Vec<OsString>, EntryError> {
    let mut comps = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(EntryError::Refused("a `..` component".into())),
            p if p.len() > MAX_NAME_BYTES => {
                return Err(EntryError::Refused(format!(
                    "a component longer than {MAX_NAME_BYTES} bytes"
                )))
            }
            p => comps.push(OsStr::from_bytes(p).to_owned()),
        }
    }
    Ok(comps)
}
