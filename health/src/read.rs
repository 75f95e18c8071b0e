//! Reading sysfs, bounded. Sources reach files only through [`Reader`], so a
//! test can inject one that hangs or fails.

use std::io::{self, Read};
use std::path::Path;

/// Largest attribute file read (a sysfs attribute is at most a page).
pub const MAX_FILE_BYTES: usize = 4096;
/// Most names read from one directory; more are reported as a problem and
/// left unread.
pub const MAX_DIR_ENTRIES: usize = 1024;
/// Most items one source reports (memory controllers, sensors, zones,
/// disks, interfaces); more are reported as a problem.
pub const MAX_ITEMS: usize = 256;

/// Most problems one source reports; more are counted in one last line.
pub const MAX_PROBLEMS: usize = 64;

/// How sources read the filesystem.
pub trait Reader: Send + Sync + 'static {
    /// Up to `limit + 1` bytes of a file (one more than allowed, so the
    /// caller can tell an oversize file).
    fn read(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>>;
    /// Up to `limit + 1` names in a directory, in any order.
    fn list(&self, dir: &Path, limit: usize) -> io::Result<Vec<String>>;
    /// Whether `path` exists (following symlinks).
    fn exists(&self, path: &Path) -> bool;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsReader;

impl Reader for FsReader {
    fn read(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        std::fs::File::open(path)?
            .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
            .read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn list(&self, dir: &Path, limit: usize) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            if names.len() > limit {
                break;
            }
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// A file's text, trimmed; `Ok(None)` when it does not exist. Errors name
/// the file.
pub(crate) fn text(r: &dyn Reader, path: &Path) -> Result<Option<String>, String> {
    match r.read(path, MAX_FILE_BYTES) {
        Ok(b) if b.len() > MAX_FILE_BYTES => Err(format!(
            "{}: larger than {MAX_FILE_BYTES} bytes (not a sysfs attribute?)",
            path.display()
        )),
        Ok(b) => match String::from_utf8(b) {
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(_) => Err(format!("{}: not UTF-8 text", path.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A file holding one integer (decimal, or hex with `0x` as `ioerr_cnt`
/// has); `Ok(None)` when it does not exist.
pub(crate) fn int(r: &dyn Reader, path: &Path) -> Result<Option<i64>, String> {
    let Some(t) = text(r, path)? else {
        return Ok(None);
    };
    let parsed = match t.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16),
        None => t.parse(),
    };
    parsed
        .map(Some)
        .map_err(|_| format!("{}: {:?} is not an integer", path.display(), short(&t)))
}

/// Like [`int`], refusing negative values.
pub(crate) fn count(r: &dyn Reader, path: &Path) -> Result<Option<u64>, String> {
    match int(r, path)? {
        None => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| format!("{}: {v} is negative", path.display())),
    }
}

/// The names in `dir` that start with `prefix`, sorted naturally (`mc2`
/// before `mc10`), at most [`MAX_ITEMS`]. A missing directory is empty
/// (the kernel has no such driver); the rest goes to `problems`.
pub(crate) fn entries(
    r: &dyn Reader,
    dir: &Path,
    prefix: &str,
    problems: &mut Vec<crate::Problem>,
) -> Vec<String> {
    let mut names = match r.list(dir, MAX_DIR_ENTRIES) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            problems.push(crate::Problem {
                subject: dir.display().to_string(),
                message: format!("{}: {e}", dir.display()),
            });
            return Vec::new();
        }
    };
    if names.len() > MAX_DIR_ENTRIES {
        names.truncate(MAX_DIR_ENTRIES);
        problems.push(crate::Problem {
            subject: dir.display().to_string(),
            message: format!(
                "{}: more than {MAX_DIR_ENTRIES} entries; the rest are not read",
                dir.display()
            ),
        });
    }
    names.retain(|n| n.starts_with(prefix));
    names.sort_by(|a, b| natural(a).cmp(&natural(b)));
    if names.len() > MAX_ITEMS {
        names.truncate(MAX_ITEMS);
        problems.push(crate::Problem {
            subject: dir.display().to_string(),
            message: format!(
                "{}: more than {MAX_ITEMS} {prefix}* entries; the first {MAX_ITEMS} are read",
                dir.display()
            ),
        });
    }
    names
}

/// Sort key: the name without its trailing digits, then their value.
fn natural(s: &str) -> (&str, u64, &str) {
    let stem = s.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = &s[stem.len()..];
    (stem, digits.parse().unwrap_or(u64::MAX), s)
}

/// A value shown in a message: at most 40 characters.
pub(crate) fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
