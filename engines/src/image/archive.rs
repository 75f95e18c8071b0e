//! Where blobs come from: an outer tar (oci-archive, docker-archive) read
//! in place by offset, or an OCI layout directory opened beneath itself;
//! and the bounded walk over a tar stream's entries shared with layers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use cap_std::fs::OpenOptionsExt as _;
use nix::fcntl::OFlag;
use sha2::{Digest as _, Sha256};

use super::error::{from_io, CapHit, ImageError};
use super::types::{ImageFormat, Limits, PathMemory};

/// PAX extended headers larger than this are refused (real ones hold a few
/// records: path, linkpath, mtime, xattrs).
const MAX_PAX_BYTES: u64 = 64 * 1024;
/// Symbolic links followed between entries of the outer archive (old
/// `docker save` links duplicate `layer.tar` files to the first copy).
const MAX_ARCHIVE_LINK_HOPS: u32 = 8;

/// A regular file inside the outer tar: where its bytes are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TarBlob {
    offset: u64,
    size: u64,
}

/// The input, opened.
pub(crate) enum Source {
    /// A tar file with an index of its regular files.
    Tar {
        path: PathBuf,
        file: File,
        blobs: HashMap<String, TarBlob>,
    },
    /// An OCI layout directory; every open stays beneath it.
    Dir {
        path: PathBuf,
        dir: cap_std::fs::Dir,
    },
}

impl Source {
    /// Opens `path` (a tar file or a directory) and detects its format.
    pub(crate) fn open(path: &Path, limits: &Limits) -> Result<(Source, ImageFormat), ImageError> {
        // O_NOFOLLOW: the input sits in a tenant's inbox, and a symlink
        // there could name any file the agent can read. O_NONBLOCK: a FIFO
        // swapped in would otherwise block the open. The type is checked on
        // the open descriptor, so a swap after a stat changes nothing.
        let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == nix::errno::Errno::ELOOP as i32 => ImageError::BadArchive {
                    path: path.to_owned(),
                    reason: "a symbolic link (not followed)".into(),
                },
                _ => ImageError::io("open", path, e),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| ImageError::io("stat", path, e))?;
        if limits
            .on_device
            .is_some_and(|d| d != std::os::unix::fs::MetadataExt::dev(&meta))
        {
            return Err(ImageError::BadArchive {
                path: path.to_owned(),
                reason: "not on the filesystem it is expected on (a mount over its directory?)"
                    .into(),
            });
        }
        let source = if meta.is_dir() && limits.archive_file_only {
            return Err(ImageError::BadArchive {
                path: path.to_owned(),
                reason: "a directory, where an archive file is expected".into(),
            });
        } else if meta.is_dir() {
            Source::Dir {
                path: path.to_owned(),
                dir: cap_std::fs::Dir::from_std_file(file),
            }
        } else if meta.is_file() {
            if meta.len() > limits.max_archive_bytes {
                return Err(ImageError::cap(
                    "archive size in bytes",
                    limits.max_archive_bytes,
                ));
            }
            let blobs = index_tar(path, &file, limits)?;
            Source::Tar {
                path: path.to_owned(),
                file,
                blobs,
            }
        } else {
            return Err(ImageError::BadArchive {
                path: path.to_owned(),
                reason: "neither a regular file nor a directory".into(),
            });
        };
        let format = if source.exists("oci-layout") && source.exists("index.json") {
            if meta.is_dir() {
                ImageFormat::OciDirectory
            } else {
                ImageFormat::OciArchive
            }
        } else if !meta.is_dir() && source.exists("manifest.json") {
            ImageFormat::DockerArchive
        } else {
            return Err(ImageError::UnknownFormat {
                path: path.to_owned(),
            });
        };
        Ok((source, format))
    }

    /// What the index of the outer tar holds in names, as counted against
    /// [`Limits::max_path_memory`] (nothing for a directory).
    pub(crate) fn kept_path_memory(&self) -> u64 {
        match self {
            Source::Tar { blobs, .. } => blobs
                .keys()
                .map(|name| PathMemory::cost(name.len()))
                .fold(0, u64::saturating_add),
            Source::Dir { .. } => 0,
        }
    }

    /// The size of `name` in the outer tar (`None`: not there, or a
    /// directory layout, whose sizes come from its descriptors).
    pub(crate) fn tar_size(&self, name: &str) -> Option<u64> {
        match self {
            Source::Tar { blobs, .. } => blobs.get(name).map(|b| b.size),
            Source::Dir { .. } => None,
        }
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Source::Tar { blobs, .. } => blobs.contains_key(name),
            Source::Dir { dir, .. } => dir
                .symlink_metadata(name)
                .map(|m| m.is_file())
                .unwrap_or(false),
        }
    }

    /// The path shown in errors for `name`.
    pub(crate) fn display(&self, name: &str) -> PathBuf {
        match self {
            Source::Tar { path, .. } => PathBuf::from(format!("{}:{name}", path.display())),
            Source::Dir { path, .. } => path.join(name),
        }
    }

    /// Opens the blob `name`; returns a reader of exactly its bytes (a short
    /// read is an `UnexpectedEof` error) and its length.
    pub(crate) fn open_blob(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        match self {
            Source::Tar { file, blobs, .. } => {
                let blob = blobs.get(name).ok_or_else(|| ImageError::Missing {
                    name: name.to_owned(),
                })?;
                let reader = SliceReader {
                    file,
                    pos: blob.offset,
                    end: blob.offset.saturating_add(blob.size),
                };
                Ok((Box::new(reader), blob.size))
            }
            Source::Dir { dir, .. } => {
                // Symlinks inside the layout are followed only while they
                // stay beneath it (cap-std); O_NONBLOCK keeps a FIFO from
                // blocking the open; the type is checked on the descriptor.
                let file = dir
                    .open_with(
                        name,
                        cap_std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(OFlag::O_NONBLOCK.bits()),
                    )
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => ImageError::Missing {
                            name: name.to_owned(),
                        },
                        _ => ImageError::io("open", self.display(name), e),
                    })?
                    .into_std();
                let meta = file
                    .metadata()
                    .map_err(|e| ImageError::io("stat", self.display(name), e))?;
                if !meta.is_file() {
                    return Err(ImageError::Missing {
                        name: format!("{name} (not a regular file)"),
                    });
                }
                let len = meta.len();
                Ok((Box::new(file.take(len)), len))
            }
        }
    }
}

/// Reads `[pos, end)` of a file with positional reads.
struct SliceReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this file (truncated)",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Normalises a name inside the outer archive: no leading `./` or `/`, no
/// empty or `.` components; `None` if it climbs above the top with `..`.
fn normalise(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// One pass over the outer tar (seeking over file data) recording where each
/// regular file's bytes are. Symlinks between entries are resolved within
/// the archive's own names; anything else is ignored. The names and link
/// targets kept are counted against [`Limits::max_path_memory`].
fn index_tar(
    path: &Path,
    file: &File,
    limits: &Limits,
) -> Result<HashMap<String, TarBlob>, ImageError> {
    let bad = |e: io::Error| match super::error::cap_hit(&e) {
        Some((what, cap)) => ImageError::cap(what, cap),
        None => ImageError::BadArchive {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    };
    let file_len = file
        .metadata()
        .map_err(|e| ImageError::io("stat", path, e))?
        .len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(bad)?;
    let mut blobs = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut memory = PathMemory::new(limits.max_path_memory, 0);
    let mut count = 0u64;
    walk(entries, limits.max_path_bytes, bad, |entry, name, link| {
        count += 1;
        if count > limits.max_archive_entries {
            return Err(ImageError::cap(
                "entries in the archive",
                limits.max_archive_entries,
            ));
        }
        let name = String::from_utf8_lossy(&name).into_owned();
        let Some(name) = normalise(&name) else {
            return Ok(());
        };
        let kind = entry.header().entry_type();
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let blob = TarBlob {
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            if blob.offset.saturating_add(blob.size) > file_len {
                return Err(bad(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the archive ends inside {name} (truncated)"),
                )));
            }
            memory.charge(name.len())?;
            if blobs.insert(name.clone(), blob).is_some() || links.contains_key(&name) {
                return Err(ImageError::Duplicate { name });
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = String::from_utf8_lossy(&link.unwrap_or_default()).into_owned();
            // A symlink's relative target is relative to its directory; an
            // absolute one and a hard link's, to the top of the archive.
            let base = if kind.is_symlink() && !target.starts_with('/') {
                name.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
            } else {
                ""
            };
            if let Some(target) = normalise(&format!("{base}/{target}")) {
                memory.charge(name.len())?;
                memory.charge(target.len())?;
                if links.insert(name.clone(), target).is_some() || blobs.contains_key(&name) {
                    return Err(ImageError::Duplicate { name });
                }
            }
        }
        Ok(())
    })?;
    // Links to links take a bounded number of hops; links that lead to no
    // regular file are ignored (a blob missing is reported when needed).
    // Nothing is ever followed outside the archive.
    let mut resolved = Vec::new();
    for (name, first) in &links {
        let mut target = first;
        for _ in 0..MAX_ARCHIVE_LINK_HOPS {
            if let Some(blob) = blobs.get(target) {
                resolved.push((name.clone(), *blob));
                break;
            }
            match links.get(target) {
                Some(next) => target = next,
                None => break,
            }
        }
    }
    blobs.extend(resolved);
    Ok(blobs)
}

/// Walks a tar stream's real entries, applying GNU long names and PAX
/// `path`/`linkpath` records itself (the tar crate would read either into
/// memory whole, whatever its size), with sizes bounded by `max_path` and
/// [`MAX_PAX_BYTES`]. PAX `size` overrides are refused; global headers are
/// skipped.
pub(crate) fn walk<'a, R: Read + 'a>(
    entries: tar::Entries<'a, R>,
    max_path: usize,
    err: impl Fn(io::Error) -> ImageError,
    mut each: impl FnMut(&mut tar::Entry<'a, R>, Vec<u8>, Option<Vec<u8>>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    let path_cap = u64::try_from(max_path).unwrap_or(u64::MAX);
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(&err)?;
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            let mut v = read_bounded(&mut entry, path_cap + 1, "path length in bytes", path_cap)
                .map_err(&err)?;
            while v.last() == Some(&0) {
                v.pop();
            }
            if kind.is_gnu_longname() {
                long_name = Some(v);
            } else {
                long_link = Some(v);
            }
            continue;
        }
        if kind.is_pax_local_extensions() {
            pax = Some(
                read_bounded(
                    &mut entry,
                    MAX_PAX_BYTES,
                    "PAX header in bytes",
                    MAX_PAX_BYTES,
                )
                .map_err(&err)?,
            );
            continue;
        }
        if kind.is_pax_global_extensions() {
            continue;
        }
        let mut path = long_name
            .take()
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let mut link = long_link
            .take()
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        if let Some(records) = pax.take() {
            for record in tar::PaxExtensions::new(&records) {
                let record = record.map_err(&err)?;
                match record.key_bytes() {
                    b"path" => path = record.value_bytes().to_vec(),
                    b"linkpath" => link = Some(record.value_bytes().to_vec()),
                    b"size" => {
                        let size = record.value().ok().and_then(|s| s.parse::<u64>().ok());
                        if size != Some(entry.size()) {
                            return Err(err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "a PAX size record overrides the header's size (files over 8 GiB are not supported)",
                            )));
                        }
                    }
                    _ => {}
                }
            }
        }
        if path.len() > max_path || link.as_ref().is_some_and(|l| l.len() > max_path) {
            return Err(ImageError::cap("path length in bytes", path_cap));
        }
        each(&mut entry, path, link)?;
    }
    Ok(())
}

/// Reads a whole (small) entry, refusing one over `cap` bytes before reading.
fn read_bounded<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    cap: u64,
    what: &'static str,
    shown: u64,
) -> io::Result<Vec<u8>> {
    if entry.size() > cap {
        return Err(io::Error::other(CapHit { what, cap: shown }));
    }
    let mut v = Vec::new();
    entry.take(cap).read_to_end(&mut v)?;
    Ok(v)
}

/// A reader that hashes what passes through it, counts it and, when given
/// a cap, fails once more than `cap` bytes have passed.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    cap: Option<ReadCap>,
}

/// A bound on the bytes a [`Hashing`] reader lets through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadCap {
    /// Bytes allowed through this reader.
    pub(crate) left: u64,
    /// What is counted, for the error.
    pub(crate) what: &'static str,
    /// The cap as configured, for the error (`left` may be what remains of it).
    pub(crate) shown: u64,
}

impl<R: Read> Hashing<R> {
    pub(crate) fn new(inner: R, cap: Option<ReadCap>) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
            cap,
        }
    }

    /// Bytes read so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Reads to the end (bounded by the cap, if any).
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    /// `sha256:<hex>` of what was read, and the inner reader.
    pub(crate) fn finish(self) -> (String, R) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.inner,
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(cap) = self.cap {
            if self.count > cap.left {
                return Err(io::Error::other(CapHit {
                    what: cap.what,
                    cap: cap.shown,
                }));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads a blob whole, with its length bounded by `cap`; checks the length
/// and digest if the descriptor gave them.
pub(crate) fn read_small(
    source: &Source,
    name: &str,
    what: &str,
    expected: Option<(&str, u64)>,
    cap: u64,
) -> Result<(Vec<u8>, String), ImageError> {
    let (reader, len) = source.open_blob(name)?;
    if let Some((_, size)) = expected {
        if size != len {
            return Err(ImageError::SizeMismatch {
                what: what.to_owned(),
                expected: size,
                actual: len,
            });
        }
    }
    if len > cap {
        return Err(ImageError::cap(format!("{what} size in bytes"), cap));
    }
    let mut hashing = Hashing::new(reader, None);
    let mut bytes = Vec::new();
    hashing
        .read_to_end(&mut bytes)
        .map_err(|e| from_io("read", source.display(name), e))?;
    let (actual, _) = hashing.finish();
    if let Some((digest, _)) = expected {
        if digest != actual {
            return Err(ImageError::DigestMismatch {
                what: what.to_owned(),
                expected: digest.to_owned(),
                actual,
            });
        }
    }
    Ok((bytes, actual))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outer tar of `n` empty files with 200-byte names and one symlink.
    fn outer_tar(dir: &Path, n: usize) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for i in 0..n {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            builder
                .append_data(&mut h, format!("{}{i:03}", "n".repeat(197)), io::empty())
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder.append_link(&mut h, "link", "n").unwrap();
        let path = dir.join("outer.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        path
    }

    /// The index of the outer archive counts its names and link targets
    /// against `max_path_memory`, refusing the archive naming the cap; what
    /// it keeps is handed on to the unpacker's count.
    #[test]
    fn the_archive_index_counts_against_the_path_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let path = outer_tar(tmp.path(), 50);
        // 50 names of 200 bytes, plus `link` and its target `n`.
        let needed = 50 * (200 + 64) + (4 + 64) + (1 + 64);
        let limits = Limits {
            max_path_memory: needed - 1,
            ..Limits::default()
        };
        match index_tar(&path, &File::open(&path).unwrap(), &limits) {
            Err(ImageError::Cap { what, cap }) => {
                assert!(what.contains("memory for paths kept"), "{what}");
                assert_eq!(cap, needed - 1);
            }
            Err(other) => panic!("wanted the path-memory cap, got {other}"),
            Ok(_) => panic!("wanted the path-memory cap, got success"),
        }
        let limits = Limits {
            max_path_memory: needed,
            ..Limits::default()
        };
        let file = File::open(&path).unwrap();
        let blobs = index_tar(&path, &file, &limits).unwrap();
        // The link leads to no file: only the 50 names stay in the index.
        assert_eq!(blobs.len(), 50);
        let source = Source::Tar {
            path: path.clone(),
            file,
            blobs,
        };
        assert_eq!(source.kept_path_memory(), 50 * (200 + 64));
    }
}
