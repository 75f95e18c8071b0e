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

use std::collections::{btree_map, BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::{Dir, OpenOptions, Permissions};

use super::archive::walk;
use super::error::{from_io, ImageError};
use super::types::{Limits, PathMemory, UnpackStats};

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
    /// Ordered, so that the modes under a removed directory are one range.
    ///
    /// Its keys are exactly the directories in the root (resolved paths):
    /// every directory made here records a mode, and `remove` (the only
    /// way anything is replaced) forgets the modes under what it removes.
    /// So `resolve` and `make_parent` take a key for a directory without
    /// looking (a wrong answer could only misplace a file inside the
    /// root: every operation goes through the capability `root`).
    dir_modes: BTreeMap<PathBuf, u32>,
    owners: Owners,
    /// The paths kept (here and in [`LayerPaths`]), against
    /// [`Limits::max_path_memory`].
    memory: PathMemory,
    /// Directories listed by opaque whiteouts.
    #[cfg(test)]
    opaque_listings: u64,
    /// Paths looked at by `resolve` and `make_parent`.
    #[cfg(test)]
    lookups: u64,
    /// Lookups of `resolve` in `dir_modes` past its first.
    #[cfg(test)]
    probes: std::cell::Cell<u64>,
    /// The directory of the last path written, open (see [`Self::at`]).
    parent: Option<(PathBuf, Dir)>,
    /// Neither the map nor the open directory is trusted: every path is
    /// looked at (the reference the shortcuts are tested against).
    #[cfg(test)]
    plain: bool,
}

/// What one layer has done so far, forgotten when it ends.
#[derive(Default)]
struct LayerPaths {
    /// Paths this layer wrote, with their ancestors: an opaque whiteout
    /// keeps these.
    written: HashSet<PathBuf>,
    /// Directories this layer already made opaque. Everything in one since
    /// was written by this layer (an entry's resolved path and its
    /// ancestors are in `written`), so another marker for it would remove
    /// nothing: it is not listed again.
    opaque: HashSet<PathBuf>,
}

/// Why one entry was refused.
type Refusal = String;

/// Non-root owners by path, as recorded.
pub(crate) type Owners = BTreeMap<String, (u64, u64)>;

impl<'l> Unpacker<'l> {
    /// `path_memory` bytes are already held for paths (the outer
    /// archive's index).
    pub(crate) fn new(root: Dir, limits: &'l Limits, path_memory: u64) -> Self {
        Unpacker {
            root,
            limits,
            stats: UnpackStats::default(),
            entries: 0,
            dir_modes: BTreeMap::new(),
            owners: BTreeMap::new(),
            memory: PathMemory::new(limits.max_path_memory, path_memory),
            #[cfg(test)]
            opaque_listings: 0,
            #[cfg(test)]
            lookups: 0,
            #[cfg(test)]
            probes: std::cell::Cell::new(0),
            parent: None,
            #[cfg(test)]
            plain: false,
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
        let mut paths = LayerPaths::default();
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
                self.apply_entry(entry, &path, link.as_deref(), &mut paths)
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
        for path in paths.written.iter().chain(&paths.opaque) {
            self.memory.release(path.as_os_str().len());
        }
        self.stats.layers += 1;
        Ok(())
    }

    /// Sets the recorded directory modes (deepest first) and hands back the
    /// counts and the recorded owners.
    pub(crate) fn finish(mut self) -> Result<(UnpackStats, Owners), ImageError> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dir_modes).into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        let mut this = self;
        for (path, mode) in dirs {
            let chmod = |e| ImageError::io("chmod", &path, e);
            if path.as_os_str().is_empty() {
                this.root.set_permissions(".", perms(mode)).map_err(chmod)?;
                continue;
            }
            // Siblings follow each other (same depth, in order): their
            // directory is opened once.
            let Ok((dir, name)) = this.at(&path) else {
                continue;
            };
            match dir.symlink_metadata(name) {
                Ok(m) if m.is_dir() => dir.set_permissions(name, perms(mode)).map_err(chmod)?,
                // Removed or replaced by a later layer.
                _ => {}
            }
        }
        Ok((this.stats, this.owners))
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        raw_link: Option<&[u8]>,
        paths: &mut LayerPaths,
    ) -> Result<(), EntryError> {
        let comps = clean(raw_path, self.limits.max_path_depth)?;
        let kind = entry.header().entry_type();

        // Whiteouts first: their names are markers, not files. Matched as
        // bytes: a marker for a name that is not UTF-8 is one too (review:
        // it was written into the root as a file, and its victim stayed).
        if let Some(last) = comps.last().map(|c| c.as_bytes()) {
            if last == OPAQUE_WHITEOUT.as_bytes() {
                let dir = self.resolve(&comps[..comps.len() - 1], true)?;
                // Once per directory per layer: a layer repeating the marker
                // would otherwise have the directory listed each time.
                if !paths.opaque.contains(&dir) {
                    self.opaque(&dir, &paths.written)?;
                    self.memory.charge(dir.as_os_str().len())?;
                    paths.opaque.insert(dir);
                }
                self.stats.opaque_whiteouts += 1;
                return Ok(());
            }
            if last.starts_with(b".wh..wh.") {
                // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): no meaning here.
                tracing::debug!(entry = %String::from_utf8_lossy(last), "ignoring AUFS metadata entry");
                return Ok(());
            }
            if let Some(name) = last.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(EntryError::Refused(
                        "a whiteout of no name, `.` or `..`".into(),
                    ));
                }
                let mut victim = comps[..comps.len() - 1].to_vec();
                victim.push(OsStr::from_bytes(name).to_owned());
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
                self.set_mode(PathBuf::new(), mode)?;
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
                // A known directory is kept without a look (see `dir_modes`).
                let is_dir = self.known_dir(&target)
                    || self
                        .at(&target)
                        .and_then(|(dir, name)| dir.symlink_metadata(name))
                        .is_ok_and(|m| m.is_dir());
                if !is_dir {
                    self.make_parent(&target)?;
                    self.remove(&target)?;
                    let (dir, name) = self
                        .at(&target)
                        .map_err(|e| io_refusal("create directory", e))?;
                    dir.create_dir(name)
                        .map_err(|e| io_refusal("create directory", e))?;
                    self.stats.dirs += 1;
                }
                self.set_mode(target.clone(), mode)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = self.mode(entry)?;
                self.make_parent(&target)?;
                self.remove(&target)?;
                let (dir, name) = self.at(&target).map_err(|e| io_refusal("create file", e))?;
                let file = dir
                    .open_with(name, OpenOptions::new().write(true).create_new(true))
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
                let (dir, name) = self
                    .at(&target)
                    .map_err(|e| io_refusal("create symlink", e))?;
                dir.symlink_contents(OsStr::from_bytes(link), name)
                    .map_err(|e| io_refusal("create symlink", e))?;
                self.stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let link = raw_link
                    .ok_or_else(|| EntryError::Refused("a hard link without a target".into()))?;
                let source = self.resolve(&clean(link, self.limits.max_path_depth)?, false)?;
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
                    let (dir, name) = self
                        .at(&target)
                        .and_then(|(d, n)| Ok((d.try_clone()?, n)))
                        .map_err(|e| io_refusal("create hard link", e))?;
                    self.root
                        .hard_link(&source, &dir, name)
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
            if paths.written.contains(path) {
                break;
            }
            self.memory.charge(path.as_os_str().len())?;
            paths.written.insert(path.to_path_buf());
        }
        Ok(())
    }

    /// Records the mode a directory gets at the end, counting a new path
    /// against [`Limits::max_path_memory`].
    fn set_mode(&mut self, path: PathBuf, mode: u32) -> Result<(), ImageError> {
        match self.dir_modes.entry(path) {
            btree_map::Entry::Occupied(mut known) => {
                known.insert(mode);
            }
            btree_map::Entry::Vacant(new) => {
                self.memory.charge(new.key().as_os_str().len())?;
                new.insert(mode);
            }
        }
        Ok(())
    }

    /// Forgets the modes recorded for `path` and the directories under it:
    /// one range of the ordered map (a path sorts just before its
    /// descendants, component by component), so removing a directory costs
    /// what it held, not a pass over every directory recorded.
    fn forget_modes_under(&mut self, path: &Path) {
        loop {
            let next = self
                .dir_modes
                .range::<Path, _>((Bound::Included(path), Bound::Unbounded))
                .next()
                .map(|(p, _)| p)
                .filter(|p| p.starts_with(path))
                .cloned();
            let Some(next) = next else {
                break;
            };
            self.dir_modes.remove(&next);
            self.memory.release(next.as_os_str().len());
        }
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
    ///
    /// A prefix known to be a directory (in `dir_modes`) is not looked at
    /// again: a deep path costs one lookup, not one per component.
    fn resolve(&mut self, comps: &[OsString], follow_last: bool) -> Result<PathBuf, EntryError> {
        // The common case at the cost of one lookup in the map: a path of
        // names whose parent is a known directory (then so is every
        // directory above it, and none of them is a symlink).
        if let Some((last, parent)) = comps.split_last() {
            if !follow_last
                && comps.len() <= self.limits.max_path_depth
                && comps.iter().all(|c| !c.is_empty() && c != "." && c != "..")
            {
                let parent: PathBuf = parent.iter().collect();
                if parent.as_os_str().is_empty() || self.known_dir(&parent) {
                    return Ok(parent.join(last));
                }
            }
        }
        // `here` is the path so far (normal components only), grown and
        // cut with it rather than rebuilt for every component.
        let mut here = PathBuf::new();
        let mut depth = 0usize;
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut hops = 0u32;
        let mut missing = false;
        // Every component this entry may cost, its symlinks' targets
        // included: a target of 4096 bytes holds 2048 `d/..` pairs, and 40
        // of them per entry, each entry alike, made one small image cost
        // the root agent hours (review). Real paths stay far below.
        let budget = 2 * self.limits.max_path_depth;
        let mut steps = comps.len();
        loop {
            if !missing {
                self.skip_known(&mut here, &mut depth, &mut pending)?;
            }
            let Some(comp) = pending.pop() else {
                break;
            };
            if comp == ".." {
                // As the kernel: `m/..` needs `m`. Climbing out of a
                // missing component would give a path nobody looked at
                // (a symlink on it would be taken for a directory).
                if missing {
                    return Err(EntryError::Refused(
                        "a `..` after a component that does not exist (through a symlink's target)"
                            .into(),
                    ));
                }
                if here.pop() {
                    depth -= 1;
                }
                continue;
            }
            if comp.is_empty() || comp == "." {
                continue;
            }
            here.push(&comp);
            depth += 1;
            if depth > self.limits.max_path_depth {
                return Err(depth_cap(self.limits.max_path_depth));
            }
            let last = pending.is_empty();
            if missing || (last && !follow_last) {
                continue;
            }
            #[cfg(test)]
            {
                self.lookups += 1;
            }
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
                    steps += target.components().count();
                    if steps > budget {
                        return Err(EntryError::Refused(format!(
                            "more than {budget} path components to resolve (symlinks' targets included)"
                        )));
                    }
                    here.pop();
                    depth -= 1;
                    for part in target.components().rev() {
                        match part {
                            Component::Normal(p) => pending.push(p.to_owned()),
                            Component::ParentDir => pending.push(OsString::from("..")),
                            Component::CurDir => {}
                            Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                    if target.has_root() {
                        here.clear();
                        depth = 0;
                    }
                }
                // As the kernel (ENOTDIR): nothing goes on past a file,
                // not even `f/..`, which cost a lookup each (review).
                Ok(m) if !last && !m.is_dir() => {
                    return Err(EntryError::Refused(format!(
                        "{} is not a directory, and the path goes on past it",
                        super::error::cut(&here.to_string_lossy(), 256)
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
                Err(e) => return Err(io_refusal("stat", e)),
            }
        }
        Ok(here)
    }

    /// Whether `path` is a directory in the root, from the map alone (see
    /// `dir_modes`): false means "look".
    fn known_dir(&self, path: &Path) -> bool {
        #[cfg(test)]
        if self.plain {
            return false;
        }
        self.dir_modes.contains_key(path)
    }

    /// Moves the longest run of names at the front of `pending` (its end)
    /// that are known directories below `here` onto `here`, found by
    /// bisection: a path is known only if every directory above it is
    /// (see `dir_modes`), so a deep path costs a few lookups in the map,
    /// not one per component.
    fn skip_known(
        &self,
        here: &mut PathBuf,
        depth: &mut usize,
        pending: &mut Vec<OsString>,
    ) -> Result<(), EntryError> {
        let run = pending
            .iter()
            .rev()
            .take_while(|c| !c.is_empty() && *c != "." && *c != "..")
            .count();
        let known = |k: usize| {
            let mut p = here.clone();
            p.extend(pending.iter().rev().take(k));
            #[cfg(test)]
            self.probes.set(self.probes.get() + 1);
            self.known_dir(&p)
        };
        if run == 0 || !known(1) {
            return Ok(());
        }
        // known(lo) holds; known(hi + 1) does not (or hi is the run).
        let (mut lo, mut hi) = (1, run);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if known(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        for _ in 0..lo {
            if let Some(c) = pending.pop() {
                here.push(c);
            }
        }
        *depth += lo;
        if *depth > self.limits.max_path_depth {
            return Err(depth_cap(self.limits.max_path_depth));
        }
        Ok(())
    }

    /// Creates the (resolved) parent directories of `path` as needed, one
    /// by one (each counted); a non-directory in the way is refused.
    fn make_parent(&mut self, path: &Path) -> Result<(), EntryError> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        // Every directory above a known one is known (see `dir_modes`).
        if parent.as_os_str().is_empty() || self.known_dir(parent) {
            return Ok(());
        }
        let mut here = PathBuf::new();
        for comp in parent.components() {
            here.push(comp);
            if self.known_dir(&here) {
                continue;
            }
            #[cfg(test)]
            {
                self.lookups += 1;
            }
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
                    self.set_mode(here.clone(), 0o755)?;
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
        let found = self
            .at(path)
            .and_then(|(dir, name)| dir.symlink_metadata(name));
        match found {
            Ok(m) if m.is_dir() => {
                self.forget_modes_under(path);
                // The open directory goes with it if it is at or under it.
                if self
                    .parent
                    .as_ref()
                    .is_some_and(|(p, _)| p.starts_with(path))
                {
                    self.parent = None;
                }
                let (dir, name) = self
                    .at(path)
                    .map_err(|e| io_refusal("remove directory", e))?;
                dir.remove_dir_all(name)
                    .map_err(|e| io_refusal("remove directory", e))
            }
            Ok(_) => {
                let (dir, name) = self.at(path).map_err(|e| io_refusal("remove", e))?;
                dir.remove_file(name).map_err(|e| io_refusal("remove", e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_refusal("stat", e)),
        }
    }

    /// The open directory holding `path` (a resolved path) and its last
    /// component. Entries of one directory follow each other in a layer,
    /// so that directory is kept open and each entry costs a lookup of
    /// its name, not a walk from the root (cap-std opens each component of
    /// a path in turn: 256 of them for every operation on a deep path).
    /// `remove` drops it when it removes it or a directory above it.
    /// No name (the root itself): not found.
    fn at<'p>(&mut self, path: &'p Path) -> io::Result<(&Dir, &'p OsStr)> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        if parent.as_os_str().is_empty() {
            return Ok((&self.root, name));
        }
        #[cfg(test)]
        if self.plain {
            self.parent = None;
        }
        if self.parent.as_ref().is_none_or(|(p, _)| p != parent) {
            self.parent = None;
            let dir = self.root.open_dir(parent)?;
            self.parent = Some((parent.to_owned(), dir));
        }
        match &self.parent {
            Some((_, dir)) => Ok((dir, name)),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// Removes from `dir` everything this layer did not write.
    fn opaque(&mut self, dir: &Path, written: &HashSet<PathBuf>) -> Result<(), EntryError> {
        let shown = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        #[cfg(test)]
        {
            self.opaque_listings += 1;
        }
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

/// A path deeper than [`Limits::max_path_depth`].
fn depth_cap(max: usize) -> EntryError {
    EntryError::Image(ImageError::cap(
        "path depth in components",
        u64::try_from(max).unwrap_or(u64::MAX),
    ))
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
/// longer than NAME_MAX and more than `max_depth` components.
fn clean(raw: &[u8], max_depth: usize) -> Result<Vec<OsString>, EntryError> {
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
            _ if comps.len() >= max_depth => return Err(depth_cap(max_depth)),
            p => comps.push(OsStr::from_bytes(p).to_owned()),
        }
    }
    Ok(comps)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use std::collections::BTreeSet;

    use cap_std::ambient_authority;
    use proptest::prelude::*;
    use tar::{EntryType, Header};

    use super::*;

    /// A layer tar built entry by entry (the tar crate writes GNU long
    /// names and link names as needed).
    struct LayerTar(tar::Builder<Vec<u8>>);

    impl LayerTar {
        fn new() -> Self {
            LayerTar(tar::Builder::new(Vec::new()))
        }

        fn add(mut self, kind: EntryType, path: &str, link: &str, mode: u32) -> Self {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(0);
            h.set_mtime(1_700_000_000);
            if link.is_empty() {
                self.0.append_data(&mut h, path, io::empty()).unwrap();
            } else {
                self.0.append_link(&mut h, path, link).unwrap();
            }
            self
        }

        fn dir(self, path: &str, mode: u32) -> Self {
            self.add(EntryType::Directory, path, "", mode)
        }

        fn file(self, path: &str) -> Self {
            self.add(EntryType::Regular, path, "", 0o644)
        }

        fn symlink(self, path: &str, target: &str) -> Self {
            self.add(EntryType::Symlink, path, target, 0o777)
        }

        /// A regular file whose name is `raw` bytes (not UTF-8, say).
        fn file_raw(mut self, raw: &[u8]) -> Self {
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_mtime(1_700_000_000);
            h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn root_of(tmp: &tempfile::TempDir) -> Dir {
        Dir::open_ambient_dir(tmp.path(), ambient_authority()).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn expect_cap(result: Result<(), ImageError>, what: &str, cap: u64) {
        match result {
            Err(ImageError::Cap { what: w, cap: c }) => {
                assert!(w.contains(what), "{w} (wanted {what})");
                assert_eq!(c, cap, "{w}");
                // The message names what was counted and the cap.
                let shown = ImageError::Cap { what: w, cap: c }.to_string();
                assert!(
                    shown.contains(&format!("exceeds the cap of {cap}")),
                    "{shown}"
                );
            }
            Err(other) => panic!("wanted a cap on {what}, got {other}"),
            Ok(()) => panic!("wanted a cap on {what}, got success"),
        }
    }

    /// A layer repeating `d/.wh..wh..opq` has `d` listed once: the second
    /// and later markers would remove nothing (everything left in `d` was
    /// written by this layer). The result is the one a single marker gives,
    /// and the next layer's marker applies again.
    #[test]
    fn repeated_opaque_markers_list_the_directory_once_per_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let mut lower = LayerTar::new().dir("d", 0o755);
        for i in 0..50 {
            lower = lower.file(&format!("d/old{i}"));
        }
        unpacker
            .apply_layer(1, &lower.dir("d/sub", 0o700).build()[..])
            .unwrap();

        let mut upper =
            LayerTar::new()
                .file("d/new1")
                .add(EntryType::Regular, "d/.wh..wh..opq", "", 0o644);
        for i in 0..500 {
            if i == 250 {
                upper = upper.file("d/new2");
            }
            upper = upper.add(EntryType::Regular, "d/.wh..wh..opq", "", 0o644);
        }
        // Another directory's marker is its own.
        upper = upper
            .file("e/kept")
            .add(EntryType::Regular, "e/.wh..wh..opq", "", 0o644);
        unpacker
            .apply_layer(2, &upper.file("d/new3").build()[..])
            .unwrap();
        assert_eq!(unpacker.opaque_listings, 2, "d and e, once each");
        assert_eq!(unpacker.stats.opaque_whiteouts, 502);
        assert_eq!(names(&tmp.path().join("d")), ["new1", "new2", "new3"]);
        assert_eq!(names(&tmp.path().join("e")), ["kept"]);

        // A later layer's marker empties d of what layer 2 put there.
        let third = LayerTar::new()
            .add(EntryType::Regular, "d/.wh..wh..opq", "", 0o644)
            .add(EntryType::Regular, "d/.wh..wh..opq", "", 0o644)
            .file("d/third")
            .build();
        unpacker.apply_layer(3, &third[..]).unwrap();
        assert_eq!(unpacker.opaque_listings, 3);
        assert_eq!(names(&tmp.path().join("d")), ["third"]);
        // d/sub (0700), removed by layer 2's marker, has its mode forgotten.
        let kept: Vec<_> = unpacker.dir_modes.keys().cloned().collect();
        assert_eq!(kept, [PathBuf::from("d"), PathBuf::from("e")]);
        unpacker.finish().unwrap();
        let mode = |p: &str| {
            std::fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("d"), 0o755);
    }

    /// The set of directories made opaque is counted too: markers for
    /// directories that do not exist write nothing, yet each distinct one
    /// is kept for the rest of the layer.
    #[test]
    fn the_directories_made_opaque_count_against_the_path_memory() {
        let mut layer = LayerTar::new();
        for i in 0..1000 {
            layer = layer.add(
                EntryType::Regular,
                &format!("x{i:04}/.wh..wh..opq"),
                "",
                0o644,
            );
        }
        let layer = layer.build();
        // 1000 paths of 5 bytes cost 69 000 bytes.
        let limits = Limits {
            max_path_memory: 60_000,
            ..Limits::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        expect_cap(
            unpacker.apply_layer(1, &layer[..]),
            "memory for paths kept",
            60_000,
        );
        let limits = Limits {
            max_path_memory: 70_000,
            ..Limits::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        unpacker.apply_layer(1, &layer[..]).unwrap();
        assert_eq!(unpacker.opaque_listings, 1000);
        // Forgotten (and released) when the layer ends.
        assert_eq!(unpacker.memory.used(), 0);
    }

    /// Paths kept (the layer's written set with ancestors, directory
    /// modes) are counted against the cap, which refuses the image naming
    /// it; what a layer kept is released when it ends.
    #[test]
    fn paths_kept_over_the_cap_are_refused() {
        let mut layer = LayerTar::new().dir("dir", 0o755);
        for i in 0..100 {
            layer = layer.file(&format!("dir/{}{i:03}", "f".repeat(200)));
        }
        let layer = layer.build();
        // 100 files of 207 bytes (271 each) plus `dir` twice and the root.
        let needed = 100 * (207 + 64) + 2 * (3 + 64) + 64;
        let tight = Limits {
            max_path_memory: needed - 1,
            ..Limits::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &tight, 0);
        expect_cap(
            unpacker.apply_layer(1, &layer[..]),
            "memory for paths kept",
            needed - 1,
        );

        let exact = Limits {
            max_path_memory: needed,
            ..Limits::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &exact, 0);
        unpacker.apply_layer(1, &layer[..]).unwrap();
        // Only the directory mode of `dir` stays after the layer.
        assert_eq!(unpacker.memory.used(), 3 + 64);
        // What the outer archive's index holds counts against the same cap.
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &exact, 64);
        expect_cap(
            unpacker.apply_layer(1, &layer[..]),
            "memory for paths kept",
            needed,
        );
        // The default holds it with room to spare.
        let limits = Limits::default();
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        unpacker.apply_layer(1, &layer[..]).unwrap();
        assert_eq!(unpacker.finish().unwrap().0.files, 100);
    }

    /// Entry paths, hard-link targets and paths once resolved through a
    /// symlink are held to `max_path_depth` components.
    #[test]
    fn too_deep_paths_are_refused() {
        let deep = |n: usize| vec!["a"; n].join("/");
        let limits = Limits::default();
        assert_eq!(limits.max_path_depth, 256);
        // 256 components unpack.
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let ok = LayerTar::new().file(&format!("{}/f", deep(255))).build();
        unpacker.apply_layer(1, &ok[..]).unwrap();
        assert!(tmp.path().join(format!("{}/f", deep(255))).is_file());

        // 257 do not, whatever the entry (2048 would fit in 4096 bytes).
        for layer in [
            LayerTar::new().file(&format!("{}/f", deep(256))).build(),
            LayerTar::new().dir(&deep(257), 0o755).build(),
            LayerTar::new()
                .add(
                    EntryType::Regular,
                    &format!("{}/.wh.x", deep(256)),
                    "",
                    0o644,
                )
                .build(),
            LayerTar::new()
                .file("target")
                .add(EntryType::Link, "h", &format!("{}/f", deep(256)), 0o644)
                .build(),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
            expect_cap(
                unpacker.apply_layer(1, &layer[..]),
                "path depth in components",
                256,
            );
        }

        // 101 components through a symlink to 200 are 300 once resolved.
        let tmp = tempfile::tempdir().unwrap();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let layer = LayerTar::new()
            .symlink("s", &deep(200))
            .file(&format!("s/{}/f", deep(99)))
            .build();
        expect_cap(
            unpacker.apply_layer(1, &layer[..]),
            "path depth in components",
            256,
        );
    }

    /// Removing a directory forgets the modes recorded under it, and only
    /// those: `a!`, `a.c` and `ab` sort among `a`'s descendants bytewise
    /// but not component by component.
    #[test]
    fn removing_a_directory_forgets_exactly_the_modes_under_it() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let layer = LayerTar::new()
            .dir("a", 0o755)
            .dir("a/b", 0o700)
            .dir("a/b/c", 0o700)
            .dir("a!", 0o700)
            .dir("a.c", 0o700)
            .dir("ab", 0o700)
            .dir("a0", 0o700)
            .build();
        unpacker.apply_layer(1, &layer[..]).unwrap();
        let before = unpacker.memory.used();
        let layer = LayerTar::new()
            .add(EntryType::Regular, ".wh.a", "", 0o644)
            .build();
        unpacker.apply_layer(2, &layer[..]).unwrap();
        let kept: Vec<_> = unpacker.dir_modes.keys().cloned().collect();
        let expect: Vec<PathBuf> = ["a!", "a.c", "a0", "ab"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(kept, expect);
        assert_eq!(
            before - unpacker.memory.used(),
            PathMemory::cost(1) + PathMemory::cost(3) + PathMemory::cost(5)
        );
        unpacker.finish().unwrap();
        for p in ["a!", "a.c", "a0", "ab"] {
            let mode = std::fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o700, "{p}");
        }
    }

    /// Many entries deep down cost a lookup of their name, not a walk of
    /// every prefix: the directories known from the map are not looked at
    /// again, also past a symlink half-way down (before, every prefix of
    /// every entry was looked at, each a walk from the root: 8.9 ms per
    /// entry at depth 256).
    #[test]
    fn deep_entries_are_not_walked_prefix_by_prefix() {
        let deep = |n: usize| vec!["a"; n].join("/");
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let mut layer = LayerTar::new()
            .dir(&deep(120), 0o755)
            .symlink(&format!("{}/s", deep(120)), &deep(3));
        for i in 0..200 {
            layer = layer
                .file(&format!("{}/f{i}", deep(250)))
                .file(&format!("{}/s/a/g{i}", deep(120)));
        }
        unpacker.apply_layer(1, &layer.build()[..]).unwrap();
        let (lookups, probes) = (unpacker.lookups, unpacker.probes.get());
        // The first file's 130 missing directories are made; after that
        // each entry through the link looks at the link alone (one stat)
        // and bisects the names on either side of it (about 2 x 8).
        assert!(lookups < 130 + 2 * 200 + 50, "{lookups} paths looked at");
        assert!(probes < 200 * 20 + 500, "{probes} lookups in the map");
        assert!(tmp.path().join(format!("{}/f199", deep(250))).is_file());
        // The link is relative: a^120/s/a is a^124.
        assert!(tmp.path().join(format!("{}/g199", deep(124))).is_file());
        unpacker.finish().unwrap();
    }

    /// A symlink target climbing out of a component that does not exist
    /// (`m/../s`) is refused, as the kernel refuses it: the path it gave
    /// was looked at by nobody, and through a symlink `s` it would have
    /// been taken for a directory of the root.
    #[test]
    fn a_climb_out_of_a_missing_component_is_refused() {
        for plain in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let limits = Limits::default();
            let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
            unpacker.plain = plain;
            let layer = LayerTar::new()
                .dir("d/x", 0o755)
                .symlink("s", "d")
                .symlink("l", "m/../s")
                .dir("l/x", 0o700)
                .build();
            match unpacker.apply_layer(1, &layer[..]) {
                Err(ImageError::Entry { entry, reason, .. }) => {
                    assert_eq!(entry, "l/x");
                    assert!(reason.contains("does not exist"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// A path going on past a file (`f/..` in a symlink's target) is
    /// refused as the kernel refuses it, and an entry whose symlinks hold
    /// more components than twice the depth cap (`d/..` pairs: each a
    /// cheap step, but thousands per entry) is refused before it is walked.
    #[test]
    fn paths_through_files_and_long_climbs_are_refused() {
        let pairs = |name: &str, n: usize| vec![format!("{name}/.."); n].join("/");
        let cases = [
            (format!("{}/x", pairs("f", 3)), "is not a directory"),
            (
                format!("{}/x", pairs("d", 300)),
                "path components to resolve",
            ),
        ];
        for (target, why) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let limits = Limits::default();
            let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
            let layer = LayerTar::new()
                .file("f")
                .dir("d", 0o755)
                .dir("x", 0o755)
                .symlink("l", &target)
                .file("l/y")
                .build();
            match unpacker.apply_layer(1, &layer[..]) {
                Err(ImageError::Entry { entry, reason, .. }) => {
                    assert_eq!(entry, "l/y");
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{target}: {other:?}"),
            }
            assert!(
                unpacker.lookups < 20,
                "{} paths looked at",
                unpacker.lookups
            );
        }
        // A short climb through a directory still resolves.
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        let layer = LayerTar::new()
            .dir("d", 0o755)
            .dir("x", 0o755)
            .symlink("l", "d/../d/../x")
            .file("l/y")
            .build();
        unpacker.apply_layer(1, &layer[..]).unwrap();
        assert!(tmp.path().join("x/y").is_file());
    }

    /// A whiteout of a name that is not UTF-8 removes its file, and the
    /// marker is not written into the root (both were, before: matched as
    /// text, the marker was taken for a file).
    #[test]
    fn whiteouts_of_names_that_are_not_utf8_apply() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let mut unpacker = Unpacker::new(root_of(&tmp), &limits, 0);
        unpacker
            .apply_layer(
                1,
                &LayerTar::new()
                    .dir("d", 0o755)
                    .file_raw(b"d/caf\xe9")
                    .build()[..],
            )
            .unwrap();
        let victim = tmp.path().join(OsStr::from_bytes(b"d/caf\xe9"));
        assert!(victim.is_file());
        unpacker
            .apply_layer(2, &LayerTar::new().file_raw(b"d/.wh.caf\xe9").build()[..])
            .unwrap();
        assert!(!victim.exists(), "the whiteout did not apply");
        assert!(
            std::fs::read_dir(tmp.path().join("d"))
                .unwrap()
                .next()
                .is_none(),
            "the marker is in the root"
        );
        unpacker.finish().unwrap();
    }

    /// Every directory in the root, relative, without following links.
    fn dirs_in(root: &Path) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for e in std::fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    let p = rel.join(e.file_name());
                    out.insert(p.clone());
                    todo.push(p);
                }
            }
        }
        out
    }

    /// Path, kind (with a link's target or a file's size), mode.
    type Tree = Vec<(PathBuf, String, u32)>;

    /// Everything in the root.
    fn tree_of(root: &Path) -> Tree {
        let mut out = Vec::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for e in std::fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let p = rel.join(e.file_name());
                let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
                let kind = if m.is_dir() {
                    todo.push(p.clone());
                    "dir".to_owned()
                } else if m.file_type().is_symlink() {
                    format!(
                        "-> {}",
                        std::fs::read_link(root.join(&p)).unwrap().display()
                    )
                } else {
                    format!("file {}", m.len())
                };
                out.push((p, kind, m.permissions().mode() & 0o7777));
            }
        }
        out.sort();
        out
    }

    fn arb_layer() -> impl Strategy<Value = Vec<(u8, String, String)>> {
        let name = prop_oneof![Just("a"), Just("b"), Just("c")];
        let path = proptest::collection::vec(name, 1..5).prop_map(|v| v.join("/"));
        let target = prop_oneof![
            Just("a"),
            Just("b/c"),
            Just(".."),
            Just("../a"),
            Just("/a"),
            Just("/"),
            Just("c/../b"),
            Just("x"),
            Just("a/a/a"),
            Just("x/../b"),
            Just("c/x/../../a"),
        ];
        proptest::collection::vec((0u8..6, path, target), 0..14).prop_map(|v| {
            v.into_iter()
                .map(|(k, p, t)| (k, p, t.to_owned()))
                .collect()
        })
    }

    fn build_layer(entries: &[(u8, String, String)]) -> Vec<u8> {
        let mut l = LayerTar::new();
        for (kind, path, target) in entries {
            l = match kind {
                0 => l.dir(path, 0o750),
                1 => l.file(path),
                2 => l.symlink(path, target),
                3 => match path.rsplit_once('/') {
                    Some((d, n)) => l.file(&format!("{d}/.wh.{n}")),
                    None => l.file(&format!(".wh.{path}")),
                },
                4 => l.file(&format!("{path}/.wh..wh..opq")),
                _ => l.add(EntryType::Link, path, target.trim_start_matches('/'), 0o644),
            };
        }
        l.build()
    }

    /// Layers applied; each layer's result, then the tree.
    fn unpack_with(
        layers: &[Vec<(u8, String, String)>],
        plain: bool,
    ) -> (Vec<Result<(), String>>, Tree) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        let limits = Limits::default();
        let dir = Dir::open_ambient_dir(&root, ambient_authority()).unwrap();
        let mut unpacker = Unpacker::new(dir, &limits, 0);
        unpacker.plain = plain;
        let mut results = Vec::new();
        for (n, layer) in layers.iter().enumerate() {
            let r = unpacker.apply_layer(n + 1, &build_layer(layer)[..]);
            let failed = r.is_err();
            results.push(r.map_err(|e| e.to_string()));
            if !plain {
                // The map's keys are exactly the directories in the root.
                let known: BTreeSet<PathBuf> = unpacker
                    .dir_modes
                    .keys()
                    .filter(|p| !p.as_os_str().is_empty())
                    .cloned()
                    .collect();
                assert_eq!(known, dirs_in(&root), "after layer {}", n + 1);
            }
            if failed {
                break;
            }
        }
        if results.iter().all(Result::is_ok) {
            results.push(unpacker.finish().map(|_| ()).map_err(|e| e.to_string()));
        }
        assert!(names(&tmp.path().join("outside")).is_empty());
        (results, tree_of(&root))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The shortcuts (directories known from the map, the directory
        /// kept open) change nothing: the same layers give the same
        /// results and the same tree as looking at every path, and the
        /// map knows exactly the directories there are.
        #[test]
        fn the_shortcuts_unpack_what_looking_at_every_path_does(
            layers in proptest::collection::vec(arb_layer(), 1..4)
        ) {
            let fast = unpack_with(&layers, false);
            let plain = unpack_with(&layers, true);
            prop_assert_eq!(fast, plain);
        }
    }
}
