//! Engine output and events for the tenant (docs/engines.md, "Logs" and
//! "Events").
//!
//! Output: the shim's stdout and stderr are FIFOs in its run directory
//! ([`make_fifos`]); one I/O thread (epoll) reads every instance's FIFOs,
//! splits lines and hands batches to one writer thread, which appends them to the
//! engine's log on the tenant volume. The hand-over is bounded in bytes: a
//! batch that does not fit is dropped and counted, and the count is written
//! into the log as a note as soon as something fits again, so a flood
//! never blocks the engine (its pipe is always drained) nor the agent.
//!
//! Events: a ring of the last [`EVENTS_KEPT`] supervision events with
//! sequence numbers, read by `Events` polls. Full, it drops the oldest
//! event beyond its engine's newest [`EVENTS_PROTECTED`]: a crash-looping
//! engine cannot push out another engine's last events (an OOM kill, a
//! give-up), and otherwise the oldest go first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leasehold_engines::launch::{LaunchError, StatusRecord, STATUS_FIFO, STDERR_FIFO, STDOUT_FIFO};
use leasehold_engines::logs::{LineSplitter, LogWriter, Record, Stream, LINE_MAX};
use leasehold_engines::supervisor::Event;
use leasehold_node::EngineEvent;

use super::notify::NotifyReader;
use super::VolumeDir;

/// Bytes of output waiting for the writer, all engines together, before
/// batches are dropped.
pub const QUEUE_BYTES: usize = 4 << 20;
/// One instance may hold at most this share of the queue (1/4): a
/// flooding engine cannot fill it and have every other engine's lines
/// dropped.
const INSTANCE_SHARE: usize = 4;
/// A batch is offered in pieces of at most this share of an instance's
/// share (1/4): a read of many short lines (64 KiB of them make 65 536
/// records) would otherwise be one batch over the share, dropped whole
/// however idle the queue.
const PIECES_PER_SHARE: usize = 4;

/// What a queued record costs the agent's memory: the record and its
/// text's heap block (glibc: at least 24 usable bytes, and an 8-byte
/// header). Counting stored bytes only, a flood of 1-byte lines held
/// about three times the bound.
fn queued_cost(r: &Record) -> usize {
    std::mem::size_of::<Record>() + r.text.len().max(24) + 8
}
/// Events kept for `Events` polls.
pub const EVENTS_KEPT: usize = 512;
/// Each engine's newest events a full ring keeps while another engine
/// holds more than its own.
pub const EVENTS_PROTECTED: usize = 32;
/// A line with no newline yet is stored after this much silence (a prompt,
/// a progress bar), so it is not held back forever.
const FLUSH_AFTER: Duration = Duration::from_secs(1);
/// The pipe size asked for each FIFO (root may; 1 MiB is the default
/// unprivileged maximum): what an engine can write while no agent reads.
const PIPE_SIZE: i32 = 1 << 20;
/// One read.
const READ_CHUNK: usize = 64 << 10;
/// Most bytes read from one stream once its instance has ended: what its
/// processes wrote fits in the pipe; a write end still held elsewhere (an
/// engine can pass its stdout to another engine) cannot keep the reading,
/// or the agent's descriptors, going.
const DRAIN_AT_END: usize = PIPE_SIZE.unsigned_abs() as usize + READ_CHUNK;

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The read ends of an instance's output FIFOs (non-blocking).
#[derive(Debug)]
pub struct Output {
    /// stdout's.
    pub out: Option<OwnedFd>,
    /// stderr's.
    pub err: Option<OwnedFd>,
}

fn launch_io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LaunchError + 'a {
    move |source| LaunchError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn open_read(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: an open for reading returns at once, and reads never
    // wait (the capture thread polls).
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
}

/// Makes the two FIFOs in `run_dir` (0600), opens their read ends (kept by
/// the agent) and their write ends (the shim's stdout and stderr: blocking,
/// as any stdout; they open at once since a reader exists).
pub fn make_fifos(run_dir: &Path) -> Result<(Output, File, File), LaunchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut ends = Vec::new();
    for name in [STDOUT_FIFO, STDERR_FIFO] {
        let p = run_dir.join(name);
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
            LaunchError::Sys {
                step: format!("mkfifo {}", p.display()),
                source: e,
            }
        })?;
        let r = open_read(&p).map_err(launch_io("open", &p))?;
        let w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&p)
            .map_err(launch_io("open", &p))?;
        // Best effort: the default 64 KiB works too, it only fills sooner.
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&w),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
        );
        ends.push((r, w));
    }
    let (err_r, err_w) = ends.pop().expect("two FIFOs");
    let (out_r, out_w) = ends.pop().expect("two FIFOs");
    Ok((
        Output {
            out: Some(out_r),
            err: Some(err_r),
        },
        out_w,
        err_w,
    ))
}

/// Makes the shim's status FIFO in `run_dir` (0600) and opens its read
/// end (non-blocking; the shim opens it read-write itself).
pub fn make_status_fifo(run_dir: &Path) -> Result<OwnedFd, LaunchError> {
    let p = run_dir.join(STATUS_FIFO);
    let _ = std::fs::remove_file(&p);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
        LaunchError::Sys {
            step: format!("mkfifo {}", p.display()),
            source: e,
        }
    })?;
    open_read(&p).map_err(launch_io("open", &p))
}

/// Re-opens an adopted instance's status FIFO (`None`: started without
/// one, by an agent before respawns).
pub fn reopen_status_fifo(run_dir: &Path) -> Option<OwnedFd> {
    open_read(&run_dir.join(STATUS_FIFO)).ok()
}

/// Re-opens the read ends of an adopted instance's FIFOs. An instance
/// started by an agent before FIFOs (output straight to files) has none:
/// `None`.
pub fn reopen_fifos(run_dir: &Path) -> Option<Output> {
    let out = open_read(&run_dir.join(STDOUT_FIFO)).ok();
    let err = open_read(&run_dir.join(STDERR_FIFO)).ok();
    (out.is_some() || err.is_some()).then_some(Output { out, err })
}

enum LogMsg {
    Begin(Arc<str>, PathBuf),
    /// The engine, the batch, its cost in the queue and the instance's
    /// share of it.
    Records(Arc<str>, Vec<Record>, usize, Arc<AtomicUsize>),
    End(Arc<str>),
}

/// The writer thread's handle: capture threads send batches through it.
#[derive(Clone)]
pub struct LogSink {
    tx: Sender<LogMsg>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    stopping: Arc<AtomicBool>,
    /// Write end of the stop pipe, whose read end the I/O thread watches:
    /// it hangs up when [`LogSink::stop`] closes this, so the idle thread
    /// sleeps in `epoll_wait` without a timeout and still stops at once
    /// (100 idle engines cost the agent no wake-ups).
    stop_w: Arc<Mutex<Option<OwnedFd>>>,
    io: Arc<IoHandle>,
}

struct Open {
    users: u32,
    dir: PathBuf,
    writer: Option<LogWriter>,
    /// The last error logged (logged again only when it changes).
    failing: Option<String>,
}

impl LogSink {
    /// Starts the writer thread. Logs are written only under the mounted
    /// tenant volume; `queue_limit` bounds what waits for it (bytes).
    pub fn start(
        volume: Arc<dyn VolumeDir>,
        max_bytes: u64,
        queue_limit: usize,
    ) -> io::Result<Self> {
        let (stop_r, stop_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        use rustix::event::{epoll, eventfd, EventfdFlags};
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        for (fd, token) in [(&wake, WAKE), (&stop_r, STOP)] {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(token),
                epoll::EventFlags::IN,
            )?;
        }
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new()
            .name("engine-logs".into())
            .spawn(move || writer(rx, q, volume, max_bytes))?;
        let (jobs, jobs_rx) = mpsc::channel();
        let (epoll, wake) = (Arc::new(epoll), Arc::new(wake));
        let io = Arc::new(IoHandle {
            jobs: Mutex::new(jobs),
            epoll: epoll.clone(),
            wake: wake.clone(),
            next: 1.into(),
            tid: Arc::default(),
        });
        let stopping: Arc<AtomicBool> = Arc::default();
        let lp = IoLoop {
            epoll,
            wake,
            exits: HashMap::new(),
            readings: HashMap::new(),
            notifies: HashMap::new(),
        };
        let (tid, st) = (io.tid.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("engine-io".into())
            // The stop pipe's read end lives as long as the thread.
            .spawn(move || {
                let _stop_r = stop_r;
                lp.run(jobs_rx, tid, st)
            })?;
        Ok(LogSink {
            tx,
            queued,
            limit: queue_limit,
            stopping,
            stop_w: Arc::new(Mutex::new(Some(stop_w))),
            io,
        })
    }

    /// The runtime ends: every capture stops reading at once (the stop
    /// pipe hangs up) and closes its FIFOs, leaving what is unread in them.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Ok(mut w) = self.stop_w.lock() {
            w.take();
        }
    }

    /// Takes a batch if it fits in the queue and in the instance's share
    /// of it (`mine`), else `false`: dropped.
    fn offer(
        &self,
        engine: &Arc<str>,
        mine: &Arc<AtomicUsize>,
        records: Vec<Record>,
        force: bool,
    ) -> bool {
        let bytes: usize = records.iter().map(queued_cost).sum();
        let held = self.queued.fetch_add(bytes, Ordering::AcqRel);
        let own = mine.fetch_add(bytes, Ordering::AcqRel);
        let undo = || {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            mine.fetch_sub(bytes, Ordering::AcqRel);
        };
        if !force && (held + bytes > self.limit || own + bytes > self.limit / INSTANCE_SHARE) {
            undo();
            return false;
        }
        let msg = LogMsg::Records(engine.clone(), records, bytes, mine.clone());
        if self.tx.send(msg).is_err() {
            undo();
            return false;
        }
        true
    }
}

fn writer(rx: Receiver<LogMsg>, queued: Arc<AtomicUsize>, volume: Arc<dyn VolumeDir>, max: u64) {
    let mut open: BTreeMap<Arc<str>, Open> = BTreeMap::new();
    for msg in rx {
        match msg {
            LogMsg::Begin(e, dir) => {
                let o = open.entry(e).or_insert_with(|| Open {
                    users: 0,
                    dir: dir.clone(),
                    writer: None,
                    failing: None,
                });
                o.users += 1;
                if o.dir != dir {
                    o.dir = dir;
                    o.writer = None;
                }
            }
            LogMsg::End(e) => {
                if let Some(o) = open.get_mut(&e) {
                    o.users = o.users.saturating_sub(1);
                    if o.users == 0 {
                        // Closed: nothing of the volume stays open when no
                        // instance runs (a rotation unmounts it).
                        open.remove(&e);
                    }
                }
            }
            LogMsg::Records(e, records, bytes, mine) => {
                if let Some(o) = open.get_mut(&e) {
                    let r = append(o, &*volume, max, &records);
                    match r {
                        Ok(()) => o.failing = None,
                        Err(err) => {
                            if o.failing.as_deref() != Some(err.as_str()) {
                                tracing::warn!(engine = %e, error = %err, "engine output not stored");
                                o.failing = Some(err);
                            }
                            o.writer = None;
                        }
                    }
                }
                queued.fetch_sub(bytes, Ordering::AcqRel);
                mine.fetch_sub(bytes, Ordering::AcqRel);
            }
        }
    }
}

fn append(
    o: &mut Open,
    volume: &dyn VolumeDir,
    max: u64,
    records: &[Record],
) -> Result<(), String> {
    if o.writer.is_none() {
        // Only ever under the mounted volume: never on the bare mount point
        // (the node's own disk) when the volume is gone.
        let mounted = volume.mounted();
        if !mounted.as_ref().is_some_and(|m| o.dir.starts_with(m)) {
            return Err(format!(
                "{}: the tenant volume is not mounted",
                o.dir.display()
            ));
        }
        o.writer = Some(LogWriter::open(&o.dir, max).map_err(|e| e.to_string())?);
    }
    o.writer
        .as_mut()
        .map_or(Ok(()), |w| w.append(records).map_err(|e| e.to_string()))
}

/// What one capture does with its batches: counts what was dropped and
/// writes the count as a note ahead of the next batch that fits.
pub struct Capture {
    sink: LogSink,
    engine: Arc<str>,
    /// This instance's bytes in the queue.
    held: Arc<AtomicUsize>,
    dropped: u64,
    /// Told when the capture ends (tests wait on it).
    #[cfg(test)]
    ended: Option<mpsc::Sender<()>>,
}

impl Capture {
    /// Registers an instance's output with the writer (its log directory).
    pub fn new(sink: LogSink, engine: &str, dir: PathBuf) -> Self {
        let engine: Arc<str> = Arc::from(engine);
        let _ = sink.tx.send(LogMsg::Begin(engine.clone(), dir));
        Capture {
            sink,
            engine,
            held: Arc::default(),
            dropped: 0,
            #[cfg(test)]
            ended: None,
        }
    }

    /// Lines dropped and not yet reported in the log.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Hands a batch to the writer in pieces, each taken or dropped
    /// (counted).
    pub fn send(&mut self, records: Vec<Record>, time_ms: u64) {
        let piece = (self.sink.limit / INSTANCE_SHARE / PIECES_PER_SHARE).max(1);
        let (mut chunk, mut cost) = (Vec::new(), 0);
        for r in records {
            let c = queued_cost(&r);
            if !chunk.is_empty() && cost + c > piece {
                self.send_piece(std::mem::take(&mut chunk), time_ms);
                cost = 0;
            }
            cost += c;
            chunk.push(r);
        }
        self.send_piece(chunk, time_ms);
    }

    fn send_piece(&mut self, mut records: Vec<Record>, time_ms: u64) {
        if records.is_empty() {
            return;
        }
        let n = records.len() as u64;
        if self.dropped > 0 {
            records.insert(0, self.note(time_ms));
        }
        if self.sink.offer(&self.engine, &self.held, records, false) {
            self.dropped = 0;
        } else {
            self.dropped += n;
        }
    }

    fn note(&self, time_ms: u64) -> Record {
        Record::note(
            time_ms,
            format!(
                "{} line(s) dropped: the engine wrote faster than its log could be stored",
                self.dropped
            ),
        )
    }

    /// The output ended: a count still unreported goes in whatever the
    /// queue holds (one short line).
    pub fn finish(mut self, time_ms: u64) {
        if self.dropped > 0 {
            let note = self.note(time_ms);
            self.sink.offer(&self.engine, &self.held, vec![note], true);
            self.dropped = 0;
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.sink.tx.send(LogMsg::End(self.engine.clone()));
        #[cfg(test)]
        if let Some(t) = self.ended.take() {
            let _ = t.send(());
        }
    }
}

/// Hands one instance's output to the I/O thread, which reads both FIFOs
/// until every writer is gone (the shim and the engine ended) or, with
/// `end` (the shim's pidfd), until the instance has ended and what it
/// wrote is read ([`DRAIN_AT_END`]). After [`LogSink::stop`] nothing is
/// read: the capture ends at once.
pub fn capture(
    sink: LogSink,
    engine: &str,
    dir: PathBuf,
    output: Output,
    end: Option<OwnedFd>,
) -> io::Result<()> {
    let cap = Capture::new(sink.clone(), engine, dir);
    sink.hand(Job::Output(cap, output, end))
}

/// What the I/O thread is handed.
enum Job {
    /// An instance's output: read until its writers are gone or the
    /// instance has ended (the pidfd, if any).
    Output(Capture, Output, Option<OwnedFd>),
    /// A pidfd (readable once the process exited) and what to call then;
    /// with the shim's status FIFO, whose records are all handed on before
    /// `Done` is called.
    Exit(OwnedFd, Done, Option<StatusReader>),
    /// An instance's notify socket, until the pipe's write end is gone.
    Notify(NotifyReader, OwnedFd),
}

impl Job {
    /// The descriptors the job is watched by, with their stream bit.
    fn fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        match self {
            Job::Output(_, o, end) => [(&o.out, 0u64), (&o.err, 1), (end, 2)]
                .into_iter()
                .filter_map(|(fd, i)| Some((fd.as_ref()?.as_fd(), i)))
                .collect(),
            Job::Exit(fd, _, status) => {
                let mut v = vec![(fd.as_fd(), 0)];
                if let Some(s) = status {
                    v.push((s.file.as_fd(), 1));
                }
                v
            }
            Job::Notify(r, stop) => vec![(r.fd(), 0), (stop.as_fd(), 1)],
        }
    }
}

/// Called once, on the I/O thread, when a watched process has exited.
pub type Done = Box<dyn FnOnce() + Send>;

/// Most bytes of a status record (a line); the shim writes far less.
const STATUS_LINE_MAX: usize = 4096;

/// A shim's status FIFO on the I/O thread: each record (a JSON line) goes
/// to `on`.
pub struct StatusReader {
    file: File,
    label: String,
    partial: Vec<u8>,
    on: Box<dyn FnMut(StatusRecord) + Send>,
}

impl StatusReader {
    /// Reads `fd` (the status FIFO's read end) for `on`.
    pub fn new(fd: OwnedFd, label: String, on: impl FnMut(StatusRecord) + Send + 'static) -> Self {
        StatusReader {
            file: File::from(fd),
            label,
            partial: Vec::new(),
            on: Box::new(on),
        }
    }

    /// Hands on what is there now (an adopted instance's records, before
    /// the reader goes to the I/O thread).
    pub fn drain_now(&mut self) {
        let mut buf = [0u8; 1024];
        let _ = self.drain(&mut buf);
    }

    /// Hands on every complete record there is (the shim is trusted, and
    /// writes one line per respawn: no fairness bound needed). `false`:
    /// the FIFO is done (no writer left, or it failed).
    fn drain(&mut self, buf: &mut [u8]) -> bool {
        let label = self.label.as_str();
        loop {
            match self.file.read(buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.partial.extend_from_slice(&buf[..n]);
                    while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.partial.drain(..=end).collect();
                        match serde_json::from_slice::<StatusRecord>(&line[..end]) {
                            Ok(r) => (self.on)(r),
                            Err(e) => {
                                tracing::warn!(engine = label, error = %e, "shim status record not understood")
                            }
                        }
                    }
                    if self.partial.len() > STATUS_LINE_MAX {
                        tracing::warn!(engine = label, "shim status record too long: dropped");
                        self.partial.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    tracing::warn!(engine = label, error = %e, "shim status: read");
                    return false;
                }
            }
        }
    }
}

/// The I/O thread's handle (inside [`LogSink`]). The thread itself holds
/// none of it but the epoll set, the eventfd and `tid`: once every
/// handle is gone, the stop pipe hangs up and the thread ends.
struct IoHandle {
    jobs: Mutex<Sender<(u64, Job)>>,
    /// The epoll set: a job's descriptors are added by the caller, so an
    /// error is the caller's, at once.
    epoll: Arc<OwnedFd>,
    /// An eventfd: written after each job, so the thread takes it at once.
    wake: Arc<OwnedFd>,
    /// Entry ids (tokens `id << 2 | slot`); 0 is the thread's own.
    next: std::sync::atomic::AtomicU64,
    /// The thread's id, for tests that count its wake-ups.
    tid: Arc<std::sync::atomic::AtomicI32>,
}

impl LogSink {
    /// Calls `done` once `pidfd` is readable (the process exited), on the
    /// I/O thread: one thread watches every instance. `status`: the
    /// shim's status records, each handed on as it comes and all of them
    /// before `done`.
    pub fn watch_exit(
        &self,
        pidfd: OwnedFd,
        done: Done,
        status: Option<StatusReader>,
    ) -> io::Result<()> {
        self.hand(Job::Exit(pidfd, done, status))
    }

    /// Reads `reader`'s socket on the I/O thread until `stop`'s write end
    /// is closed.
    pub fn watch_notify(&self, reader: NotifyReader, stop: OwnedFd) -> io::Result<()> {
        self.hand(Job::Notify(reader, stop))
    }

    fn hand(&self, job: Job) -> io::Result<()> {
        use rustix::event::epoll;
        if self.stopping.load(Ordering::Acquire) {
            // Stopped: nothing is read or watched any more (a capture's
            // drop still tells the writer it ended).
            return Ok(());
        }
        let id = self.io.next.fetch_add(1, Ordering::Relaxed);
        let fds = job.fds();
        // Added here, not on the thread: a failure fails the caller (the
        // launch), never an instance left unheard. An event that comes
        // before the thread has the job is reported again (level).
        for (n, (fd, i)) in fds.iter().enumerate() {
            let added = epoll::add(
                &*self.io.epoll,
                fd,
                epoll::EventData::new_u64(id << 2 | i),
                epoll::EventFlags::IN,
            );
            if let Err(e) = added {
                for (fd, _) in &fds[..n] {
                    let _ = epoll::delete(&*self.io.epoll, fd);
                }
                return Err(io::Error::other(format!("epoll_ctl: {e}")));
            }
        }
        drop(fds);
        let sent = match self.io.jobs.lock() {
            Ok(tx) => tx.send((id, job)).map_err(|e| e.0 .1),
            Err(_) => Err(job),
        };
        if let Err(job) = sent {
            for (fd, _) in job.fds() {
                let _ = epoll::delete(&*self.io.epoll, fd);
            }
            if self.stopping.load(Ordering::Acquire) {
                // Stopped meanwhile: as above.
                return Ok(());
            }
            return Err(io::Error::other("the engine I/O thread has ended"));
        }
        // The job is queued: taken at the latest with the next event.
        let _ = rustix::io::write(&*self.io.wake, &1u64.to_ne_bytes());
        Ok(())
    }

    /// The I/O thread's id (0 until it runs).
    #[cfg(test)]
    fn io_tid(&self) -> i32 {
        self.io.tid.load(Ordering::Acquire)
    }
}

/// epoll tokens: 0 and 1 are the wake eventfd and the stop pipe; an entry
/// `id` (from 1) uses `id << 2 | slot`: output 0 stdout, 1 stderr, 2 the
/// instance's end; an exit 0 its pidfd, 1 the status FIFO; a notify 0 the
/// socket, 1 the stop pipe.
const WAKE: u64 = 0;
const STOP: u64 = 1;

/// One instance's output on the I/O thread.
struct Reading {
    cap: Capture,
    /// stdout's and stderr's read ends while they last.
    streams: [Option<(File, LineSplitter)>; 2],
    /// The instance's pidfd: readable once it has ended.
    end: Option<OwnedFd>,
    /// The last read: a line without its newline is stored after
    /// [`FLUSH_AFTER`] of silence on both streams.
    last: Instant,
}

impl Reading {
    fn pending(&self) -> bool {
        self.streams.iter().flatten().any(|(_, s)| s.pending() > 0)
    }

    fn flush(&mut self, now: u64) {
        let mut batch = Vec::new();
        for (_, s) in self.streams.iter_mut().flatten() {
            s.flush(now, &mut batch);
        }
        self.cap.send(batch, now);
    }
}

/// The one thread that reads every instance's output, watches every
/// instance's exit and reads every heartbeat socket (epoll): 100 engines
/// cost one thread and one read buffer, not two or three threads each.
struct IoLoop {
    epoll: Arc<OwnedFd>,
    wake: Arc<OwnedFd>,
    exits: HashMap<u64, (OwnedFd, Done, Option<StatusReader>)>,
    readings: HashMap<u64, Reading>,
    /// Notify sockets (token `id << 2`) and their stop pipes (`id << 2 | 1`).
    notifies: HashMap<u64, (NotifyReader, OwnedFd)>,
}

/// Ends the agent if the I/O thread ends any other way than by the stop
/// (a panic, an `epoll_wait` error): every instance's exit, output and
/// heartbeat would go unheard. systemd restarts the agent, which adopts
/// the running instances again (docs/engines.md).
struct AbortUnlessStopped(bool);

impl Drop for AbortUnlessStopped {
    fn drop(&mut self) {
        if !self.0 {
            tracing::error!("the engine I/O thread failed: the agent ends (systemd restarts it)");
            std::process::abort();
        }
    }
}

impl IoLoop {
    fn run(
        mut self,
        jobs: Receiver<(u64, Job)>,
        tid: Arc<std::sync::atomic::AtomicI32>,
        stopping: Arc<AtomicBool>,
    ) {
        use rustix::event::{epoll, Timespec};
        let mut guard = AbortUnlessStopped(false);
        tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        loop {
            // A timeout only while a line waits for its newline; otherwise
            // sleep until output, an exit, a job or the stop.
            let now = Instant::now();
            let timeout = self
                .readings
                .values()
                .filter(|r| r.pending())
                .map(|r| (r.last + FLUSH_AFTER).saturating_duration_since(now))
                .min()
                .map(|d| Timespec {
                    tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(d.subsec_nanos()),
                });
            events.clear();
            match epoll::wait(
                &*self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    // Not expected (EBADF, EINVAL): the guard ends the agent.
                    tracing::error!(error = %e, "engine I/O: epoll_wait");
                    return;
                }
            }
            let now = Instant::now();
            let now_ms = now_ms();
            // The stop first: nothing more is read once it is seen (what
            // is unread stays in the FIFOs for the next agent). The stop
            // pipe hangs up on `LogSink::stop` or when the last handle is
            // dropped: either ends the thread.
            if stopping.load(Ordering::Acquire) || events.iter().any(|e| e.data.u64() == STOP) {
                for (_, mut r) in self.readings.drain() {
                    r.flush(now_ms);
                    r.cap.finish(now_ms);
                }
                guard.0 = true;
                return;
            }
            // New jobs first: their descriptors are in the epoll set
            // already, so this batch may hold their events, and the order
            // below needs to know an exit entry's status stream.
            if events.iter().any(|e| e.data.u64() == WAKE) {
                let mut n = [0u8; 8];
                let _ = rustix::io::read(&*self.wake, &mut n);
                while let Ok((id, job)) = jobs.try_recv() {
                    self.take(id, job);
                }
            }
            // Status records first (stream 1 of an exit entry): a shim's
            // record comes before anything its new engine does (READY=1 on
            // the notify socket, output) and before its own exit.
            let (first, rest): (Vec<_>, Vec<_>) = events
                .drain(..)
                .filter(|ev| ev.data.u64() != WAKE)
                .partition(|ev| {
                    let t = ev.data.u64();
                    t & 3 == 1 && self.exits.contains_key(&(t >> 2))
                });
            for ev in first.into_iter().chain(rest) {
                self.ready(ev.data.u64(), &mut buf, now, now_ms);
            }
            // Silence: store what waits for a newline.
            for r in self.readings.values_mut() {
                if r.pending() && now.saturating_duration_since(r.last) >= FLUSH_AFTER {
                    r.flush(now_ms);
                }
            }
        }
    }

    /// A job whose descriptors are in the epoll set already.
    fn take(&mut self, id: u64, job: Job) {
        match job {
            Job::Exit(fd, done, status) => {
                self.exits.insert(id, (fd, done, status));
            }
            Job::Notify(reader, stop) => {
                self.notifies.insert(id, (reader, stop));
            }
            Job::Output(cap, output, end) => {
                let streams = [(output.out, Stream::Out), (output.err, Stream::Err)]
                    .map(|(fd, s)| fd.map(|fd| (File::from(fd), LineSplitter::new(s, LINE_MAX))));
                let mut r = Reading {
                    cap,
                    streams,
                    end,
                    last: Instant::now(),
                };
                if r.streams.iter().all(Option::is_none) {
                    self.close(&mut r);
                    r.cap.finish(now_ms());
                    return;
                }
                self.readings.insert(id, r);
            }
        }
    }

    fn ready(&mut self, token: u64, buf: &mut [u8], now: Instant, now_ms: u64) {
        let id = token >> 2;
        if token & 3 == 1 {
            if let Some((_, _, status)) = self.exits.get_mut(&id) {
                // The status FIFO: its records now; done once no writer
                // is left (the shim ended: its pidfd says so next).
                if let Some(s) = status.as_mut() {
                    if !s.drain(buf) {
                        let _ = rustix::event::epoll::delete(&self.epoll, &s.file);
                        *status = None;
                    }
                }
                return;
            }
        }
        if let Some((fd, done, status)) = self.exits.remove(&id) {
            let _ = rustix::event::epoll::delete(&self.epoll, &fd);
            drop(fd);
            if let Some(mut s) = status {
                // Whatever the shim wrote before it ended, before its exit.
                s.drain(buf);
                let _ = rustix::event::epoll::delete(&self.epoll, &s.file);
            }
            done();
            return;
        }
        if let Some((reader, _)) = self.notifies.get_mut(&id) {
            // The socket: one datagram; the stop pipe: the instance is gone.
            if token & 3 == 1 || !reader.read_one(buf) {
                if let Some((reader, stop)) = self.notifies.remove(&id) {
                    let _ = rustix::event::epoll::delete(&self.epoll, reader.fd());
                    let _ = rustix::event::epoll::delete(&self.epoll, &stop);
                }
            }
            return;
        }
        if token & 3 == 2 {
            // The instance has ended: what it wrote is read now, and the
            // reading ends even if a write end is still held elsewhere.
            if let Some(mut r) = self.readings.remove(&id) {
                let mut batch = Vec::new();
                for (f, s) in r.streams.iter_mut().flatten() {
                    let mut read = 0;
                    while read < DRAIN_AT_END {
                        match f.read(buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                s.push(&buf[..n], now_ms, &mut batch);
                                read += n;
                                // Handed over read by read, as while it
                                // ran: a full pipe of empty lines is
                                // millions of records (review: 2 MiB of
                                // output gathered as 100+ MB at once).
                                r.cap.send(std::mem::take(&mut batch), now_ms);
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    s.flush(now_ms, &mut batch);
                }
                r.cap.send(batch, now_ms);
                self.close(&mut r);
                r.cap.finish(now_ms);
            }
            return;
        }
        let Some(r) = self.readings.get_mut(&id) else {
            return;
        };
        let i = usize::from(token & 3 == 1);
        let Some((f, s)) = r.streams[i].as_mut() else {
            return;
        };
        // One read per readiness (level-triggered): a flooding engine
        // cannot starve the others.
        let mut batch = Vec::new();
        let ended = match f.read(buf) {
            Ok(0) => true,
            Ok(n) => {
                s.push(&buf[..n], now_ms, &mut batch);
                r.last = now;
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Err(e) => {
                tracing::warn!(engine = %r.cap.engine, error = %e, "engine output: read");
                true
            }
        };
        if ended {
            s.flush(now_ms, &mut batch);
            if let Some((f, _)) = r.streams[i].take() {
                let _ = rustix::event::epoll::delete(&self.epoll, &f);
            }
        }
        r.cap.send(batch, now_ms);
        if r.streams.iter().all(Option::is_none) {
            if let Some(mut r) = self.readings.remove(&id) {
                self.close(&mut r);
                r.cap.finish(now_ms);
            }
        }
    }

    /// Takes a reading's descriptors out of the epoll set and closes them
    /// (explicitly: the pidfd is a copy of the exit watch's, whose open
    /// description would keep this entry in the set).
    fn close(&self, r: &mut Reading) {
        for (f, _) in r.streams.iter_mut().filter_map(Option::take) {
            let _ = rustix::event::epoll::delete(&self.epoll, &f);
        }
        if let Some(end) = r.end.take() {
            let _ = rustix::event::epoll::delete(&self.epoll, &end);
        }
    }
}

/// The last events, shared by the runtime thread (writes) and the view.
#[derive(Debug)]
pub struct EventRing {
    next: u64,
    kept: VecDeque<EngineEvent>,
    /// Events kept per engine (no zero entries).
    per_engine: HashMap<String, usize>,
}

/// Shared handle.
pub type Events = Arc<Mutex<EventRing>>;

impl EventRing {
    /// Sequence numbers start from the clock in microseconds, so they keep
    /// increasing across agent restarts (a follower's last number stays
    /// below the new agent's first).
    pub fn new() -> Events {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
        Arc::new(Mutex::new(EventRing {
            next: start.max(1),
            kept: VecDeque::new(),
            per_engine: HashMap::new(),
        }))
    }

    /// Records one event; full, drops the oldest event that is not among
    /// its engine's newest [`EVENTS_PROTECTED`] (the oldest of all if
    /// every engine is within them).
    pub fn push(&mut self, engine: &str, ev: &Event) {
        if self.kept.len() >= EVENTS_KEPT {
            self.drop_one(engine);
        }
        *self.per_engine.entry(engine.to_owned()).or_default() += 1;
        self.kept.push_back(EngineEvent {
            seq: self.next,
            time_ms: now_ms(),
            engine: engine.to_owned(),
            kind: ev.name().to_owned(),
            detail: bounded(detail(ev)),
        });
        self.next += 1;
    }

    fn drop_one(&mut self, incoming: &str) {
        // The engine about to add one counts it. Scanning from the front,
        // the first event of an engine is its oldest: the first whose
        // engine holds more than its protected ones is the one to drop.
        let count =
            |e: &str| self.per_engine.get(e).copied().unwrap_or(0) + usize::from(e == incoming);
        let at = self
            .kept
            .iter()
            .position(|e| count(&e.engine) > EVENTS_PROTECTED)
            .unwrap_or(0);
        if let Some(gone) = self.kept.remove(at) {
            if let Some(n) = self.per_engine.get_mut(&gone.engine) {
                *n -= 1;
                if *n == 0 {
                    self.per_engine.remove(&gone.engine);
                }
            }
        }
    }

    /// Forgets every event (a tenancy ends: the next tenant sees none of
    /// the last one's); numbers go on increasing.
    pub fn clear(&mut self) {
        self.kept.clear();
        self.per_engine.clear();
    }

    /// Events after `after`, oldest first, at most `max`.
    pub fn after(&self, after: u64, max: usize) -> Vec<EngineEvent> {
        self.kept
            .iter()
            .filter(|e| e.seq > after)
            .take(max)
            .cloned()
            .collect()
    }
}

/// Longest event detail kept, in bytes: 512 events are kept, and a
/// detail may quote what the tenant's image or spec holds.
pub const MAX_EVENT_DETAIL: usize = 2048;

/// `d` cut to [`MAX_EVENT_DETAIL`] bytes (at a character boundary).
fn bounded(d: String) -> String {
    cut_to(d, MAX_EVENT_DETAIL)
}

/// `d` cut to at most `max` bytes (at a character boundary, ending `…`).
pub fn cut_to(mut d: String, max: usize) -> String {
    if d.len() > max {
        let mut at = max - 3;
        while !d.is_char_boundary(at) {
            at -= 1;
        }
        d.truncate(at);
        d.push('…');
    }
    d
}

/// One line on an event for the tenant.
pub fn detail(ev: &Event) -> String {
    match ev {
        Event::Started {
            instance,
            pid,
            version,
        } => format!("instance {instance}, pid {pid}, version {version}"),
        Event::Ready { instance }
        | Event::OomKilled { instance }
        | Event::WatchdogExpired { instance }
        | Event::ReadyTimeout { instance }
        | Event::Killed { instance } => format!("instance {instance}"),
        Event::Exited { instance, exit } => format!("instance {instance}: {exit}"),
        Event::LaunchFailed { instance, reason } => format!("instance {instance}: {reason}"),
        Event::ProbeFailed {
            instance,
            probe,
            failures,
            threshold,
        } => format!(
            "instance {instance}: probes[{probe}] failed {failures} of {threshold} in a row"
        ),
        Event::Failed { failure } => failure.to_string(),
        Event::BackingOff { delay, attempt } => {
            format!("next start in {delay:?} (attempt {attempt})")
        }
        Event::Restarted {
            instance,
            attempt,
            delay,
        } => format!("instance {instance}, attempt {attempt}, after {delay:?}"),
        Event::GaveUp { restarts, within } => {
            format!("{restarts} restarts within {within:?}: left exited")
        }
        Event::Stopped => String::new(),
        Event::Reloading { from, to } => format!("version {from} → {to}"),
        Event::Reloaded { version } => format!("version {version}"),
        Event::ReloadFailed { version, reason } => format!("version {version}: {reason}"),
        Event::ImageReloaded { instance } => {
            format!("instance {instance}: runs from a fresh root of the verified image")
        }
        Event::ImageReloadFailed { instance, reason } => format!("instance {instance}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct At(PathBuf);
    impl VolumeDir for At {
        fn mounted(&self) -> Option<PathBuf> {
            Some(self.0.clone())
        }
    }

    fn lines(n: usize, stream: Stream) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                time_ms: 1,
                stream,
                partial: false,
                text: format!("line {i}").into_bytes(),
            })
            .collect()
    }

    /// A sink writing logs under `root` (taken as the mounted volume).
    fn sink_at(root: PathBuf) -> LogSink {
        LogSink::start(
            Arc::new(At(root)),
            leasehold_engines::logs::MIN_MAX_BYTES,
            QUEUE_BYTES,
        )
        .unwrap()
    }

    /// `capture`, and a channel told when it ends.
    fn capture_then(sink: &LogSink, engine: &str, dir: PathBuf, output: Output) -> Receiver<()> {
        capture_until(sink, engine, dir, output, None)
    }

    /// [`capture_then`], the reading also ended by `end` (a pidfd).
    fn capture_until(
        sink: &LogSink,
        engine: &str,
        dir: PathBuf,
        output: Output,
        end: Option<OwnedFd>,
    ) -> Receiver<()> {
        let (tx, rx) = mpsc::channel();
        let mut cap = Capture::new(sink.clone(), engine, dir);
        cap.ended = Some(tx);
        sink.hand(Job::Output(cap, output, end)).unwrap();
        rx
    }

    /// A temp dir with a run directory and engine `web`'s log directory
    /// (not made: the writer makes it), and a sink writing under it.
    fn web() -> (tempfile::TempDir, PathBuf, PathBuf, LogSink) {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(tmp.path().join("web")).unwrap();
        let dir = tmp.path().join("web/logs");
        let sink = sink_at(tmp.path().to_owned());
        (tmp, run, dir, sink)
    }

    fn wait_written(sink: &LogSink) {
        let t = std::time::Instant::now();
        while sink.queued.load(Ordering::Acquire) > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "writer stuck");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_full_queue_drops_batches_and_the_log_says_how_many() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("web/logs");
        std::fs::create_dir_all(tmp.path().join("web")).unwrap();
        let sink = LogSink::start(
            Arc::new(At(tmp.path().to_owned())),
            leasehold_engines::logs::MIN_MAX_BYTES,
            4000,
        )
        .unwrap();
        let mut cap = Capture::new(sink.clone(), "web", dir.clone());
        // The writer is held up: the queue is filled by hand first.
        sink.queued.fetch_add(4000, Ordering::AcqRel);
        cap.send(lines(3, Stream::Out), 5);
        cap.send(lines(4, Stream::Err), 6);
        assert_eq!(cap.dropped(), 7);
        sink.queued.fetch_sub(4000, Ordering::AcqRel);
        cap.send(lines(1, Stream::Out), 7);
        assert_eq!(cap.dropped(), 0);
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 100).unwrap();
        assert_eq!(back.len(), 2, "{back:?}");
        assert_eq!(back[0].stream, Stream::Agent);
        assert!(
            String::from_utf8_lossy(&back[0].text).starts_with("7 line(s) dropped"),
            "{back:?}"
        );
        assert_eq!(back[1].text, b"line 0");
        // Dropped at the very end: the note still goes in.
        sink.queued.fetch_add(4000, Ordering::AcqRel);
        cap.send(lines(2, Stream::Out), 8);
        sink.queued.fetch_sub(4000, Ordering::AcqRel);
        cap.finish(9);
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 100).unwrap();
        assert!(String::from_utf8_lossy(&back[2].text).starts_with("2 line(s) dropped"));
    }

    /// One instance's flood fills its share of the queue, not the queue:
    /// another engine's lines still go in. What a batch costs counts the
    /// records' memory, not only their bytes on disk.
    #[test]
    fn a_flooding_instance_leaves_room_for_the_others() {
        let tmp = tempfile::tempdir().unwrap();
        for e in ["flood", "quiet"] {
            std::fs::create_dir_all(tmp.path().join(e)).unwrap();
        }
        let sink = LogSink::start(
            Arc::new(At(tmp.path().to_owned())),
            leasehold_engines::logs::MIN_MAX_BYTES,
            QUEUE_BYTES,
        )
        .unwrap();
        let mut flood = Capture::new(sink.clone(), "flood", tmp.path().join("flood/logs"));
        let mut quiet = Capture::new(sink.clone(), "quiet", tmp.path().join("quiet/logs"));
        // The writer is held up: the flood's share is full (by hand).
        flood
            .held
            .fetch_add(QUEUE_BYTES / INSTANCE_SHARE, Ordering::AcqRel);
        flood.send(lines(1, Stream::Out), 1);
        assert_eq!(flood.dropped(), 1, "beyond its share");
        quiet.send(lines(2, Stream::Out), 2);
        assert_eq!(quiet.dropped(), 0, "the other engine's lines go in");
        flood
            .held
            .fetch_sub(QUEUE_BYTES / INSTANCE_SHARE, Ordering::AcqRel);
        wait_written(&sink);
        assert_eq!(quiet.held.load(Ordering::Acquire), 0);
        let back = leasehold_engines::logs::read(&tmp.path().join("quiet/logs"), 0, 10).unwrap();
        assert_eq!(back.len(), 2);
        // A 1-byte line costs its record and heap block too, not 25 bytes.
        let one = Record {
            time_ms: 1,
            stream: Stream::Out,
            partial: false,
            text: b"x".to_vec(),
        };
        assert!(queued_cost(&one) >= std::mem::size_of::<Record>() + 32);
    }

    /// A read of many short lines (more than an instance's share once
    /// costed) goes in pieces: with the queue idle, the first pieces are
    /// stored, not the whole batch dropped.
    #[test]
    fn a_batch_over_the_share_is_stored_in_pieces() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("seq")).unwrap();
        let sink = sink_at(tmp.path().to_owned());
        let dir = tmp.path().join("seq/logs");
        let mut cap = Capture::new(sink.clone(), "seq", dir.clone());
        let batch = lines(20_000, Stream::Out);
        let cost: usize = batch.iter().map(queued_cost).sum();
        assert!(cost > QUEUE_BYTES / INSTANCE_SHARE, "{cost}");
        cap.send(batch, 1);
        let dropped = cap.dropped();
        assert!(dropped < 20_000, "every line dropped");
        cap.finish(2);
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 10_000).unwrap();
        let first = back
            .iter()
            .find(|r| r.stream == Stream::Out)
            .expect("lines stored");
        assert!(first.text.starts_with(b"line "), "{first:?}");
        // What was dropped is said (at the latest once the output ends).
        let noted = back.iter().any(|r| r.stream == Stream::Agent);
        assert!(dropped == 0 || noted, "{dropped} dropped, no note");
    }

    #[test]
    fn nothing_is_written_outside_the_mounted_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        let sink = sink_at(vol);
        let outside = tmp.path().join("bare/web/logs");
        let mut cap = Capture::new(sink.clone(), "web", outside.clone());
        cap.send(lines(2, Stream::Out), 1);
        wait_written(&sink);
        assert!(!outside.exists());
        assert!(!tmp.path().join("bare").exists());
    }

    #[test]
    fn fifos_carry_output_to_the_log_and_end_when_the_writers_go() {
        let (_tmp, run, dir, sink) = web();
        let (output, mut out_w, mut err_w) = make_fifos(&run).unwrap();
        let ended = capture_then(&sink, "web", dir.clone(), output);
        use std::io::Write;
        out_w.write_all(b"hello\nwor").unwrap();
        err_w.write_all(b"oops\n").unwrap();
        out_w.write_all(b"ld\n").unwrap();
        let long = vec![b'x'; LINE_MAX + 10];
        out_w.write_all(&long).unwrap();
        out_w.write_all(b"\nno newline at the end").unwrap();
        drop((out_w, err_w));
        ended.recv_timeout(Duration::from_secs(10)).unwrap();
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 100).unwrap();
        let got: Vec<(Stream, bool, String)> = back
            .iter()
            .map(|r| {
                let t = String::from_utf8_lossy(&r.text);
                let t = if t.len() > 100 {
                    format!("{}…", &t[..3])
                } else {
                    t.into_owned()
                };
                (r.stream, r.partial, t)
            })
            .collect();
        let want = [
            (Stream::Err, false, "oops".to_owned()),
            (Stream::Out, false, "hello".to_owned()),
            (Stream::Out, false, "world".to_owned()),
            (Stream::Out, true, "xxx…".to_owned()),
            (Stream::Out, false, "xxxxxxxxxx".to_owned()),
            (Stream::Out, false, "no newline at the end".to_owned()),
        ];
        // Each stream in its own order; the two interleave as they came.
        for s in [Stream::Out, Stream::Err] {
            let g: Vec<_> = got.iter().filter(|r| r.0 == s).collect();
            let w: Vec<_> = want.iter().filter(|r| r.0 == s).collect();
            assert_eq!(g, w);
        }
    }

    /// Voluntary context switches of one thread of this process.
    fn switches(tid: i32) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn an_idle_capture_sleeps_until_output_or_stop() {
        use std::io::Write;
        let (_tmp, run, dir, sink) = web();
        let (output, mut out_w, _err_w) = make_fifos(&run).unwrap();
        let done_rx = capture_then(&sink, "web", dir.clone(), output);
        out_w.write_all(b"one line\n").unwrap();
        wait_written(&sink);
        let n = || leasehold_engines::logs::read(&dir, 0, 10).map_or(0, |v| v.len());
        let t0 = std::time::Instant::now();
        while n() < 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the line never came"
            );
            std::thread::yield_now();
        }
        // Idle (writers open, nothing pending): no timeout, so no wake-up
        // over 2.5 times FLUSH_AFTER (the old loop woke every FLUSH_AFTER).
        let tid = sink.io_tid();
        assert_ne!(tid, 0);
        let before = switches(tid);
        std::thread::sleep(FLUSH_AFTER * 5 / 2);
        assert!(
            switches(tid) <= before + 1,
            "an idle capture woke up: {} -> {}",
            before,
            switches(tid)
        );
        // A line without its newline is still stored after FLUSH_AFTER.
        out_w.write_all(b"prompt> ").unwrap();
        let t0 = std::time::Instant::now();
        while n() < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the prompt was never stored"
            );
            std::thread::yield_now();
        }
        // The stop wakes it at once, writers still open.
        let t0 = std::time::Instant::now();
        sink.stop();
        done_rx
            .recv_timeout(FLUSH_AFTER / 2)
            .expect("the capture did not stop at once");
        assert!(t0.elapsed() < FLUSH_AFTER / 2);
    }

    #[test]
    fn one_thread_reads_every_instance_a_flood_starves_none_and_exits_are_seen() {
        use std::io::Write;
        use std::sync::atomic::AtomicBool;
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink_at(tmp.path().to_owned());
        let mut writers = Vec::new();
        let mut ends = Vec::new();
        for i in 0..20 {
            let run = tmp.path().join(format!("run{i}"));
            std::fs::create_dir_all(&run).unwrap();
            std::fs::create_dir_all(tmp.path().join(format!("e{i}"))).unwrap();
            let (output, out_w, err_w) = make_fifos(&run).unwrap();
            let dir = tmp.path().join(format!("e{i}/logs"));
            ends.push(capture_then(&sink, &format!("e{i}"), dir, output));
            writers.push((out_w, err_w));
        }
        // Instance 0 floods until told; instance 1's one line still comes.
        let (mut flood, _) = writers.remove(0);
        let go = Arc::new(AtomicBool::new(true));
        let g = go.clone();
        let flooder = std::thread::spawn(move || {
            let line = [b'f'; 1023];
            while g.load(Ordering::Acquire) {
                if flood
                    .write_all(&line)
                    .and_then(|()| flood.write_all(b"\n"))
                    .is_err()
                {
                    break;
                }
            }
        });
        writers[0].0.write_all(b"quiet\n").unwrap();
        let quiet = tmp.path().join("e1/logs");
        let t0 = std::time::Instant::now();
        while leasehold_engines::logs::read(&quiet, 0, 10).map_or(0, |v| v.len()) < 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a flooding instance starved another"
            );
            std::thread::yield_now();
        }
        assert!(!flooder.is_finished(), "the flood ended before the check");
        go.store(false, Ordering::Release);
        flooder.join().unwrap();
        // Writers gone: every capture ends.
        drop(writers);
        for e in ends {
            e.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // An exit is seen through its pidfd.
        let (mut child, pidfd) = sleeper();
        let (tx, rx) = mpsc::channel();
        sink.watch_exit(pidfd, Box::new(move || tx.send(()).unwrap()), None)
            .unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "told before the exit"
        );
        child.kill().unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the exit was not seen");
        child.wait().unwrap();
        // After the stop nothing more is taken, and no error either.
        sink.stop();
        let again = make_fifos(&tmp.path().join("run3")).unwrap().0;
        assert!(capture(sink.clone(), "late", tmp.path().join("late"), again, None).is_ok());
    }

    /// An engine can hand its stdout to another engine (an abstract
    /// socket): the write end then outlives the instance. The reading ends
    /// with the instance anyway — what was written is stored, the agent's
    /// read ends are closed (the holder's next write: EPIPE) — instead of
    /// keeping two descriptors per instance until the holder lets go.
    #[test]
    fn an_ended_instance_ends_its_reading_though_a_write_end_is_held() {
        use std::io::Write;
        let (_tmp, run, dir, sink) = web();
        let (output, mut out_w, err_w) = make_fifos(&run).unwrap();
        let (mut shim, pidfd) = sleeper();
        let ended = capture_until(&sink, "web", dir.clone(), output, Some(pidfd));
        out_w.write_all(b"before the end\nno newline").unwrap();
        // Read while the instance runs: nothing ends.
        let t = Instant::now();
        while leasehold_engines::logs::read(&dir, 0, 10).map_or(0, |r| r.len()) == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "not read");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ended.recv_timeout(Duration::from_millis(200)).is_err());
        out_w.write_all(b" yet\nwritten last\n").unwrap();
        shim.kill().unwrap();
        shim.wait().unwrap();
        ended
            .recv_timeout(Duration::from_secs(10))
            .expect("the reading went on after the instance ended");
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 100).unwrap();
        let texts: Vec<String> = back
            .iter()
            .map(|r| String::from_utf8_lossy(&r.text).into_owned())
            .collect();
        assert_eq!(
            texts,
            ["before the end", "no newline yet", "written last"],
            "{back:?}"
        );
        // The agent's read ends are closed: a held write end finds no reader.
        let e = out_w.write_all(b"after\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPIPE), "{e}");
        drop(err_w);
    }

    /// A `sleep 600` child and its pidfd (readable once it exits).
    fn sleeper() -> (std::process::Child, OwnedFd) {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        (child, pidfd)
    }

    #[test]
    fn status_records_come_as_written_and_all_before_the_exit() {
        use leasehold_engines::launch::Exit as LExit;
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink_at(tmp.path().join("logs"));
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let read = make_status_fifo(&run).unwrap();
        // The shim's end: read-write, as the shim opens it.
        let mut shim = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(run.join(STATUS_FIFO))
            .unwrap();
        let (mut child, pidfd) = sleeper();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        let status = StatusReader::new(read, "e".into(), move |r| tx2.send(Some(r)).unwrap());
        sink.watch_exit(
            pidfd,
            Box::new(move || tx.send(None).unwrap()),
            Some(status),
        )
        .unwrap();
        let rec = |code| StatusRecord::Exited {
            exit: LExit::Code(code),
        };
        shim.write_all(b"{\"exited\":{\"exit\":{\"Code\":3}}}\n")
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Some(rec(3))
        );
        // Garbage is logged and skipped; a record split over two writes
        // still arrives whole.
        shim.write_all(b"not json\n{\"exited\":{\"exit\":").unwrap();
        shim.write_all(b"{\"Code\":4}}}\n").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Some(rec(4))
        );
        // Written just before the exit: still handed on first.
        shim.write_all(b"\"respawned\"\n").unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let rest: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(rest, [Some(StatusRecord::Respawned), None]);
        drop(shim);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }

    #[test]
    fn the_io_thread_ends_with_its_last_handle_without_a_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink_at(tmp.path().to_owned());
        let t0 = std::time::Instant::now();
        while sink.io_tid() == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no I/O thread");
            std::thread::yield_now();
        }
        let task = PathBuf::from(format!("/proc/self/task/{}", sink.io_tid()));
        assert!(task.exists());
        // Dropped, not stopped (a runtime that failed to start): the
        // thread ends instead of spinning on the hung-up stop pipe.
        drop(sink);
        while task.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the I/O thread outlived its last handle"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn output_written_while_no_agent_reads_waits_for_the_next_one() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(tmp.path().join("web")).unwrap();
        let dir = tmp.path().join("web/logs");
        let (first, mut out_w, err_w) = make_fifos(&run).unwrap();
        // What the shim does: hold each FIFO open for reading.
        let held = open_read(&run.join(STDOUT_FIFO)).unwrap();
        // The agent ends: its read ends go.
        drop(first);
        // The engine writes on, without EPIPE: the line waits in the pipe.
        out_w.write_all(b"while the agent restarts\n").unwrap();
        // The next agent re-opens the FIFOs and reads what waited.
        let again = reopen_fifos(&run).unwrap();
        let sink = sink_at(tmp.path().to_owned());
        let ended = capture_then(&sink, "web", dir.clone(), again);
        out_w.write_all(b"after\n").unwrap();
        drop((out_w, err_w, held));
        ended.recv_timeout(Duration::from_secs(10)).unwrap();
        wait_written(&sink);
        let back = leasehold_engines::logs::read(&dir, 0, 10).unwrap();
        let texts: Vec<&[u8]> = back.iter().map(|r| r.text.as_slice()).collect();
        assert_eq!(texts, [&b"while the agent restarts"[..], b"after"]);
        // Without the shim's hold the same write fails: the hold is what
        // keeps the engine's output alive.
        let (first, mut out_w, _err_w) = make_fifos(&run).unwrap();
        drop(first);
        let e = out_w.write_all(b"x\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPIPE));
    }

    /// An event's detail is kept to [`MAX_EVENT_DETAIL`] bytes, cut at a
    /// character (a launch failure quoting the tenant's input).
    #[test]
    fn event_details_are_bounded() {
        let ring = EventRing::new();
        let mut r = ring.lock().unwrap();
        r.push(
            "web",
            &Event::LaunchFailed {
                instance: leasehold_engines::supervisor::InstanceId(1),
                reason: "é".repeat(1 << 20),
            },
        );
        let d = &r.after(0, 1)[0].detail;
        assert!(d.len() <= MAX_EVENT_DETAIL, "{}", d.len());
        assert!(d.ends_with('…'));
    }

    #[test]
    fn a_noisy_engine_cannot_push_out_another_engines_events() {
        let ring = EventRing::new();
        let mut r = ring.lock().unwrap();
        let exit = Event::Stopped;
        r.push("quiet", &exit);
        r.push("calm", &exit);
        r.push("calm", &exit);
        for _ in 0..(EVENTS_KEPT * 3) {
            r.push("noisy", &exit);
        }
        r.push("quiet", &exit);
        let all = r.after(0, 10_000);
        assert_eq!(all.len(), EVENTS_KEPT);
        let n = |e: &str| all.iter().filter(|x| x.engine == e).count();
        assert_eq!((n("quiet"), n("calm")), (2, 2), "the rare events stay");
        assert_eq!(n("noisy"), EVENTS_KEPT - 4);
        // Still oldest first, numbers increasing (holes where dropped).
        assert!(all.windows(2).all(|w| w[1].seq > w[0].seq));
        assert_eq!(all[0].engine, "quiet");
        // The noisy engine keeps its newest.
        let last_noisy = all.iter().rev().find(|x| x.engine == "noisy").unwrap();
        assert_eq!(last_noisy.seq, all.last().unwrap().seq - 1);
        // An engine busy after another was: the later one's events all
        // stay (a reader of its round finds each), the earlier one's
        // oldest go first, down to its newest protected ones.
        r.clear();
        for _ in 0..400 {
            r.push("first", &exit);
        }
        for _ in 0..400 {
            r.push("second", &exit);
        }
        let all = r.after(0, 10_000);
        let n = |e: &str| all.iter().filter(|x| x.engine == e).count();
        assert_eq!((n("first"), n("second")), (EVENTS_KEPT - 400, 400));
        for _ in 0..400 {
            r.push("second", &exit);
        }
        let all = r.after(0, 10_000);
        let n = |e: &str| all.iter().filter(|x| x.engine == e).count();
        assert_eq!(
            (n("first"), n("second")),
            (EVENTS_PROTECTED, EVENTS_KEPT - EVENTS_PROTECTED)
        );
        // Two engines as noisy as each other share the ring: the oldest
        // go first.
        r.clear();
        for i in 0..(EVENTS_KEPT * 2) {
            r.push(if i % 2 == 0 { "a" } else { "b" }, &exit);
        }
        let all = r.after(0, 10_000);
        let n = |e: &str| all.iter().filter(|x| x.engine == e).count();
        assert_eq!((n("a"), n("b")), (EVENTS_KEPT / 2, EVENTS_KEPT / 2));
        assert_eq!(r.per_engine.values().sum::<usize>(), EVENTS_KEPT);
        r.clear();
        assert!(r.per_engine.is_empty() && r.after(0, 10).is_empty());
    }

    #[test]
    fn events_are_numbered_kept_bounded_and_read_after_a_number() {
        let ring = EventRing::new();
        let mut r = ring.lock().unwrap();
        for i in 0..(EVENTS_KEPT + 10) {
            r.push(
                if i % 2 == 0 { "a" } else { "b" },
                &Event::BackingOff {
                    delay: Duration::from_millis(100),
                    attempt: 1,
                },
            );
        }
        let all = r.after(0, 10_000);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let last = all.last().unwrap().seq;
        assert!(r.after(last, 10).is_empty());
        let some = r.after(last - 3, 2);
        assert_eq!(some.len(), 2);
        assert_eq!(some[0].seq, last - 2);
        assert_eq!(some[0].kind, "backing-off");
        assert_eq!(some[0].detail, "next start in 100ms (attempt 1)");
        // A later ring (an agent restart) numbers above this one.
        drop(r);
        std::thread::sleep(Duration::from_millis(2));
        let later = EventRing::new();
        later.lock().unwrap().push("a", &Event::Stopped);
        assert!(later.lock().unwrap().after(0, 1)[0].seq > last);
    }
}
