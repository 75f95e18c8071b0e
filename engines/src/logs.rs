//! Each engine's output log: stdout and stderr as timestamped lines, kept in
//! two rotated files on the tenant volume (docs/engines.md, "Logs").
//!
//! - [`LineSplitter`] turns a stream's bytes into [`Record`]s: one per line,
//!   a line longer than the cap split into pieces marked `partial`.
//! - [`LogWriter`] appends records to `<dir>/output.log`; when that would
//!   pass half the engine's budget it is renamed to `output.log.1` (the
//!   previous `.1` goes) and a new one started, so the two files together
//!   hold at most the budget (plus one record).
//! - [`read`] returns the last lines at or after a time, oldest first.
//!
//! On disk, one record a line: `<unix ms> <flag> <bytes>\n`, the flag `o`
//! or `e` (stdout, stderr; upper case: a piece of a longer line that goes
//! on in the next record) or `a` (a note by the agent, e.g. lines dropped).
//! Lines that do not parse (a record torn by a crash) are skipped.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file being written.
pub const CURRENT: &str = "output.log";
/// The file before it.
pub const PREVIOUS: &str = "output.log.1";
/// Default budget per engine, both files together.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;
/// Smallest budget accepted (two files of at least twice [`LINE_MAX`]).
pub const MIN_MAX_BYTES: u64 = 128 << 10;
/// Largest budget accepted.
pub const MAX_MAX_BYTES: u64 = 1 << 30;
/// Longest piece of a line stored in one record (bytes); longer lines are
/// split. Docker's json-file driver splits at 16 KiB too.
pub const LINE_MAX: usize = 16 << 10;
/// Most lines one [`read`] returns.
pub const MAX_READ_LINES: usize = 10_000;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The engine's stdout.
    Out,
    /// The engine's stderr.
    Err,
    /// A note by the agent (lines dropped, output lost).
    Agent,
}

impl Stream {
    /// `out`, `err` or `agent`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
            Stream::Agent => "agent",
        }
    }

    fn flag(self, partial: bool) -> u8 {
        match (self, partial) {
            (Stream::Out, false) => b'o',
            (Stream::Out, true) => b'O',
            (Stream::Err, false) => b'e',
            (Stream::Err, true) => b'E',
            (Stream::Agent, _) => b'a',
        }
    }

    fn from_flag(b: u8) -> Option<(Stream, bool)> {
        Some(match b {
            b'o' => (Stream::Out, false),
            b'O' => (Stream::Out, true),
            b'e' => (Stream::Err, false),
            b'E' => (Stream::Err, true),
            b'a' => (Stream::Agent, false),
            _ => return None,
        })
    }
}

/// One stored line (or piece of a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the agent read it, unix milliseconds.
    pub time_ms: u64,
    /// Its stream.
    pub stream: Stream,
    /// A piece of a line longer than [`LINE_MAX`]: the line goes on in the
    /// next record of the same stream.
    pub partial: bool,
    /// The bytes, without the newline (not necessarily UTF-8).
    pub text: Vec<u8>,
}

impl Record {
    /// A note by the agent.
    pub fn note(time_ms: u64, text: impl Into<String>) -> Self {
        Record {
            time_ms,
            stream: Stream::Agent,
            partial: false,
            text: text.into().into_bytes(),
        }
    }

    /// Its size on disk.
    pub fn stored_len(&self) -> usize {
        // digits, space, flag, space, text, newline
        20 + 3 + self.text.len() + 1
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.time_ms.to_string().as_bytes());
        out.push(b' ');
        out.push(self.stream.flag(self.partial));
        out.push(b' ');
        // A newline in a note would break the format: never stored.
        out.extend(self.text.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
        out.push(b'\n');
    }

    fn decode(line: &[u8]) -> Option<Record> {
        let sp = line.iter().position(|&b| b == b' ')?;
        let digits = &line[..sp];
        if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let time_ms = std::str::from_utf8(digits).ok()?.parse().ok()?;
        let rest = &line[sp + 1..];
        if rest.len() < 2 || rest[1] != b' ' {
            return None;
        }
        let (stream, partial) = Stream::from_flag(rest[0])?;
        Some(Record {
            time_ms,
            stream,
            partial,
            text: rest[2..].to_vec(),
        })
    }
}

/// Splits one stream's bytes into lines of at most `line_max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    line_max: usize,
    pending: Vec<u8>,
}

/// Where to cut a piece of at most `max` bytes out of `bytes`: not inside
/// a UTF-8 sequence when one starts within the last 3 bytes.
fn cut_at(bytes: &[u8], max: usize) -> usize {
    let mut at = max;
    for _ in 0..3 {
        // A continuation byte (10xxxxxx) after the cut: move the cut back.
        if at > 1 && bytes.get(at).is_some_and(|b| b & 0xC0 == 0x80) {
            at -= 1;
        } else {
            break;
        }
    }
    if bytes.get(at).is_some_and(|b| b & 0xC0 == 0x80) {
        max
    } else {
        at
    }
}

impl LineSplitter {
    /// A splitter for `stream` with pieces of at most `line_max` bytes
    /// (at least 4, so a UTF-8 character always fits).
    pub fn new(stream: Stream, line_max: usize) -> Self {
        LineSplitter {
            stream,
            line_max: line_max.max(4),
            pending: Vec::new(),
        }
    }

    /// Bytes held back: the start of a line with no newline yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feeds bytes; every completed line (and every full piece of a long
    /// one) is appended to `out`, stamped `time_ms`.
    pub fn push(&mut self, mut bytes: &[u8], time_ms: u64, out: &mut Vec<Record>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    self.emit_full(time_ms, out);
                    let text = std::mem::take(&mut self.pending);
                    out.push(self.record(text, false, time_ms));
                }
                None => {
                    self.pending.extend_from_slice(bytes);
                    bytes = &[];
                    self.emit_full(time_ms, out);
                }
            }
        }
    }

    /// Emits what is held back (the stream ended, or the line has waited
    /// long enough), as a complete line.
    pub fn flush(&mut self, time_ms: u64, out: &mut Vec<Record>) {
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            out.push(self.record(text, false, time_ms));
        }
    }

    /// While more than a piece is held: emits pieces, each marked partial.
    fn emit_full(&mut self, time_ms: u64, out: &mut Vec<Record>) {
        while self.pending.len() > self.line_max {
            let at = cut_at(&self.pending, self.line_max);
            let rest = self.pending.split_off(at);
            let piece = std::mem::replace(&mut self.pending, rest);
            out.push(self.record(piece, true, time_ms));
        }
    }

    fn record(&self, text: Vec<u8>, partial: bool, time_ms: u64) -> Record {
        Record {
            time_ms,
            stream: self.stream,
            partial,
            text,
        }
    }
}

/// Errors of the log store, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The budget is out of range.
    #[error("engine log budget {0} bytes: outside {MIN_MAX_BYTES}..={MAX_MAX_BYTES}")]
    Budget(u64),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Appends records to one engine's log directory, rotating at half the
/// budget.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

fn open_current(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl LogWriter {
    /// Opens (creates, mode 0700) `dir` and its current file. A torn last
    /// record (the agent died while writing it) is closed with a newline,
    /// so it is skipped on reading and the next record starts clean.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, LogError> {
        if !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&max_bytes) {
            return Err(LogError::Budget(max_bytes));
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("mkdir", dir)(e)),
        }
        check_dir(dir)?;
        let path = dir.join(CURRENT);
        let mut file = open_current(&path).map_err(io_err("open", &path))?;
        let mut size = file.metadata().map_err(io_err("stat", &path))?.len();
        if size > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, size - 1)
                .map_err(io_err("read", &path))?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io_err("write", &path))?;
                size += 1;
            }
        }
        Ok(LogWriter {
            dir: dir.to_owned(),
            file,
            size,
            max_bytes,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records (one write per file).
    pub fn append(&mut self, records: &[Record]) -> Result<(), LogError> {
        let half = self.max_bytes / 2;
        let mut buf = Vec::new();
        let mut one = Vec::new();
        for r in records {
            one.clear();
            r.encode(&mut one);
            let held = self.size + buf.len() as u64;
            if held > 0 && held + one.len() as u64 > half {
                // This record would pass the file's half: what came before
                // goes to the current file, then the files turn.
                self.write(&buf)?;
                buf.clear();
                self.rotate()?;
            }
            buf.extend_from_slice(&one);
        }
        self.write(&buf)
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), LogError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(CURRENT);
        self.file.write_all(buf).map_err(io_err("write", &path))?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// `output.log` becomes `output.log.1` (rename: atomic, the old `.1`
    /// goes), and a new `output.log` is started.
    fn rotate(&mut self) -> Result<(), LogError> {
        let cur = self.dir.join(CURRENT);
        let prev = self.dir.join(PREVIOUS);
        fs::rename(&cur, &prev).map_err(io_err("rename", &cur))?;
        self.file = open_current(&cur).map_err(io_err("open", &cur))?;
        self.size = 0;
        Ok(())
    }
}

/// The log directory must be a directory, not a symlink to one: only the
/// agent writes there, and it never follows a link out of the volume.
fn check_dir(dir: &Path) -> Result<(), LogError> {
    let m = fs::symlink_metadata(dir).map_err(io_err("stat", dir))?;
    if m.is_dir() {
        Ok(())
    } else {
        Err(io_err("open", dir)(io::Error::other(
            "not a directory (a symlink where the agent keeps logs?)",
        )))
    }
}

/// Most bytes of text one [`read`] keeps (the newest lines): what a reply
/// can carry anyway (the D-Bus `Logs` reply's 8 MiB). With it, a read
/// holds at most this much whatever the file's size: the whole file was
/// read into memory before (up to 1 GiB at the largest budget, per call).
pub const MAX_READ_BYTES: usize = 8 << 20;

/// Longest line of a log file read whole: a record's header and
/// [`LINE_MAX`] bytes. A longer one (not written by the agent) is skipped.
const MAX_RECORD_LINE: usize = LINE_MAX + 64;

/// The newest records read so far, within the line and byte bounds.
struct Kept {
    out: VecDeque<Record>,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
}

impl Kept {
    fn push(&mut self, r: Record) {
        self.bytes += r.text.len();
        self.out.push_back(r);
        while self.out.len() > self.max_lines || (self.bytes > self.max_bytes && self.out.len() > 1)
        {
            if let Some(old) = self.out.pop_front() {
                self.bytes -= old.text.len();
            }
        }
    }
}

/// The file and its size (one `fstat` for both checks).
fn open_log(path: &Path) -> Result<Option<(File, u64)>, LogError> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = f.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(io_err("read", path)(io::Error::other("not a regular file")));
    }
    Ok(Some((f, meta.len())))
}

/// Most bytes of a record beyond its text: up to 20 digits, a space, the
/// flag, a space, and the newline.
const RECORD_HEADER: u64 = 24;

/// Reads one file from `start` line by line (a buffer's worth at a time,
/// never the whole file), keeping the records stamped at or after
/// `since_ms`. From inside the file, the record `start` falls in is
/// skipped (it is not whole).
fn read_file(
    path: &Path,
    mut f: File,
    start: u64,
    since_ms: u64,
    kept: &mut Kept,
) -> Result<(), LogError> {
    use io::{BufRead, Seek};
    if start > 0 {
        // From the byte before: a record starting exactly at `start` is
        // kept (its newline before it is the one skipped).
        f.seek(io::SeekFrom::Start(start - 1))
            .map_err(io_err("seek", path))?;
    }
    // Bounded: a file is at most half the budget plus one record; a larger
    // one (a budget lowered since) is read up to the largest budget.
    let mut r = io::BufReader::with_capacity(64 << 10, f.take(MAX_MAX_BYTES));
    let mut line = Vec::with_capacity(MAX_RECORD_LINE);
    if start > 0 && !skip_line(&mut r).map_err(io_err("read", path))? {
        return Ok(());
    }
    loop {
        line.clear();
        let n = Read::by_ref(&mut r)
            .take(MAX_RECORD_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if line.len() < MAX_RECORD_LINE {
                // The last piece has no newline: a record being written.
                return Ok(());
            }
            // Too long to be a record: skipped up to its newline.
            if !skip_line(&mut r).map_err(io_err("read", path))? {
                return Ok(());
            }
            continue;
        }
        line.pop();
        match Record::decode(&line) {
            Some(rec) if rec.time_ms >= since_ms => kept.push(rec),
            _ => {}
        }
    }
}

/// Consumes up to and including the next newline; `false`: the end came
/// first.
fn skip_line(r: &mut impl io::BufRead) -> io::Result<bool> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(true);
            }
            None => {
                let all = buf.len();
                r.consume(all);
            }
        }
    }
}

/// The last `max_lines` records (at most [`MAX_READ_LINES`], and at most
/// [`MAX_READ_BYTES`] of text) stamped at or after `since_ms`, oldest
/// first, from both files. No log yet: none.
///
/// The current file is opened before the previous one: a rotation in
/// between (the current file renamed to the previous) then gives the same
/// file twice, read once, instead of the previous file before the rotation
/// and the current one after it, which skipped the file that turned.
///
/// Only the files' last bytes are read: the lines kept lie within the
/// last `MAX_READ_BYTES` of text plus a header per line, so a read's work
/// does not grow with the budget (up to 1 GiB) nor with how often a
/// follower asks.
pub fn read(dir: &Path, since_ms: u64, max_lines: usize) -> Result<Vec<Record>, LogError> {
    let keep = max_lines.min(MAX_READ_LINES);
    if keep == 0 {
        return Ok(Vec::new());
    }
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        _ => check_dir(dir)?,
    }
    let (cur_path, prev_path) = (dir.join(CURRENT), dir.join(PREVIOUS));
    let cur = open_log(&cur_path)?;
    let mut prev = open_log(&prev_path)?;
    if let (Some((c, _)), Some((p, _))) = (&cur, &prev) {
        use std::os::unix::fs::MetadataExt;
        let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
        if id(c).is_some() && id(c) == id(p) {
            prev = None;
        }
    }
    let mut kept = Kept {
        out: VecDeque::with_capacity(keep.min(1024)),
        bytes: 0,
        max_lines: keep,
        max_bytes: MAX_READ_BYTES,
    };
    let window = MAX_READ_BYTES as u64 + keep as u64 * RECORD_HEADER;
    let cur_size = cur.as_ref().map_or(0, |(_, n)| *n);
    let prev_size = prev.as_ref().map_or(0, |(_, n)| *n);
    let cur_start = cur_size.saturating_sub(window);
    let prev_window = window.saturating_sub(cur_size);
    if prev_window == 0 {
        prev = None;
    }
    let prev_start = prev_size.saturating_sub(prev_window);
    for (path, f, start) in [(prev_path, prev, prev_start), (cur_path, cur, cur_start)] {
        if let Some((f, _)) = f {
            read_file(&path, f, start, since_ms, &mut kept)?;
        }
    }
    Ok(kept.out.into())
}

#[cfg(test)]
mod tests;
