//! `tenantctl engine upload` and `engine deploy ./local.tar`: a local image
//! archive streamed into the tenant's inbox on the node over the same D-Bus
//! connection (local, or `--host`'s SSH bridge) in chunks of at most 4 MiB
//! (docs/engines.md, "Uploads").

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Instant;

use leasehold_dbus_api::tenant_engines::TenantEnginesProxy;
use leasehold_dbus_api::MAX_UPLOAD_CHUNK;
use sha2::{Digest, Sha256};

use crate::progress::within;
use crate::{exit, CliError};

/// Whether IMAGE names a local file to upload (true) or a file already in
/// the inbox: `--upload` / `--from-inbox` decide; else a path with a `/`,
/// or a name that is an existing local file, is uploaded.
pub fn is_local(image: &str, upload: bool, from_inbox: bool) -> bool {
    if upload || from_inbox {
        return upload;
    }
    image.contains('/') || Path::new(image).is_file()
}

fn local_err(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::new(exit::INVALID, format!("image {}: {e}", path.display()))
}

/// The inbox name of a local file: its file name.
pub fn inbox_name(path: &Path) -> Result<String, CliError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            local_err(
                path,
                "has no UTF-8 file name to use in the inbox (give --as NAME)",
            )
        })
}

fn sha256_of(
    file: &mut std::fs::File,
    path: &Path,
    name: &str,
    size: u64,
) -> Result<String, CliError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut progress = Progress::new("hashing");
    let mut done = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                progress.clear();
                return Ok(hex::encode(h.finalize()));
            }
            Ok(n) => {
                h.update(&buf[..n]);
                done += n as u64;
                progress.show(name, done, size);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(local_err(path, e)),
        }
    }
}

/// A progress line on stderr: only on a terminal and without `--quiet`.
struct Progress {
    verb: &'static str,
    on: bool,
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(verb: &'static str) -> Self {
        Self {
            verb,
            on: std::io::stderr().is_terminal() && !crate::output::quiet(),
            start: Instant::now(),
            last: None,
        }
    }
    fn show(&mut self, name: &str, done: u64, total: u64) {
        // At most 4 redraws a second.
        if !self.on || self.last.is_some_and(|t| t.elapsed().as_millis() < 250) {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[2K{} {name}: {:.1}/{:.1} MiB ({pct}%), {:.1} MiB/s",
            self.verb,
            mib(done),
            mib(total),
            mib(done) / secs
        );
        let _ = e.flush();
    }
    fn clear(&self) {
        if self.on && self.last.is_some() {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K");
            let _ = e.flush();
        }
    }
}

/// How long a failed upload's abort is waited for.
const ABORT_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Uploads `path` into the inbox as `name`; returns the name the node
/// stored it under. `resume`: send into an upload already begun (its id)
/// instead of beginning one. An error or Ctrl-C aborts the upload, so the
/// node keeps no partial file. Each chunk and the commit are held to the
/// connection's `--timeout` as a whole, their writes included.
pub async fn upload(
    p: &TenantEnginesProxy<'_>,
    path: &Path,
    name: &str,
    resume: Option<&str>,
) -> Result<String, CliError> {
    let mut file = std::fs::File::open(path).map_err(|e| local_err(path, e))?;
    let meta = file.metadata().map_err(|e| local_err(path, e))?;
    if !meta.is_file() {
        return Err(local_err(path, "not a regular file"));
    }
    let size = meta.len();
    let id = match resume {
        Some(id) => id.to_owned(),
        None => {
            let digest = sha256_of(&mut file, path, name, size)?;
            p.begin_upload(name, size, &digest).await?
        }
    };
    let conn = p.inner().connection();
    let send = async {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| local_err(path, e))?;
        let mut progress = Progress::new("uploading");
        let mut buf = vec![0u8; MAX_UPLOAD_CHUNK];
        let mut offset = 0u64;
        while offset < size {
            let want = usize::try_from(size - offset)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            file.read_exact(&mut buf[..want])
                .map_err(|e| local_err(path, format!("{e} (did it change while being sent?)")))?;
            offset = within(
                conn,
                p.upload_chunk(&id, offset, serde_bytes::Bytes::new(&buf[..want])),
            )
            .await?;
            progress.show(name, offset, size);
        }
        progress.clear();
        Ok::<_, CliError>(within(conn, p.commit_upload(&id)).await?)
    };
    let r = tokio::select! {
        r = send => r,
        _ = tokio::signal::ctrl_c() => Err(CliError::new(exit::FAILURE, format!("interrupted: the upload of {} was aborted", path.display()))),
    };
    if r.is_err() {
        // Best effort, briefly (not a second --timeout after a first): a
        // commit that failed already removed it on the node, and the next
        // upload or agent start removes what is left.
        let _ = tokio::time::timeout(ABORT_BOUND, p.abort_upload(&id)).await;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_or_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("app.tar");
        std::fs::write(&f, b"x").unwrap();
        assert!(is_local("./app.tar", false, false));
        assert!(is_local(f.to_str().unwrap(), false, false));
        assert!(!is_local("surely-not-a-local-file.tar", false, false));
        assert!(is_local("surely-not-a-local-file.tar", true, false));
        assert!(!is_local(f.to_str().unwrap(), false, true));
        assert_eq!(inbox_name(&f).unwrap(), "app.tar");
    }
}
