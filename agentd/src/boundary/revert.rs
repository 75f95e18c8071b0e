//! Confirmed changes of the cluster boundary: `SetBoundaryWithRevert`
//! stores the previous boundary and a deadline (wall-clock, unix seconds)
//! in `boundary-revert.json` (atomically) before it applies the new one;
//! `ConfirmBoundary` removes it; when the deadline passes (the agent's
//! timer, or at start if it passed while the agent was down) the previous
//! boundary is put back. Also the refusal of changes that deny everything
//! or drop every failsafe entry unless confirmed.

use std::time::{SystemTime, UNIX_EPOCH};

use leasehold_netpolicy::model::EntryDoc;
use leasehold_netpolicy::BoundaryDoc;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Boundaries, BoundaryError};
use crate::fsutil::write_atomic;

/// State file of a pending revert.
pub const REVERT_FILE: &str = "boundary-revert.json";
/// Bounds of the revert delay, seconds.
pub const REVERT_SECS: std::ops::RangeInclusive<u32> = 2..=3600;

/// A pending revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Pending {
    format: u32,
    /// The boundary to put back (None: there was none; reverting lifts it).
    previous: Option<BoundaryDoc>,
    /// Unix seconds.
    deadline: u64,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the revert delay; the error names the argument.
pub fn check_seconds(seconds: u32) -> Result<Option<u32>, leasehold_netpolicy::DocError> {
    if seconds == 0 {
        return Ok(None);
    }
    if !REVERT_SECS.contains(&seconds) {
        return Err(leasehold_netpolicy::DocError::new(
            "seconds",
            format!(
                "{seconds} is out of range ({}-{}, or 0 for no revert)",
                REVERT_SECS.start(),
                REVERT_SECS.end()
            ),
        ));
    }
    Ok(Some(seconds))
}

impl Boundaries {
    fn read_pending(&self) -> Result<Option<Pending>, BoundaryError> {
        let path = self.dir.join(REVERT_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| BoundaryError::Damaged {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BoundaryError::Io { path, source }),
        }
    }

    pub(super) fn write_pending(&self, p: Option<&Pending>) -> Result<(), BoundaryError> {
        let path = self.dir.join(REVERT_FILE);
        let io = |source| BoundaryError::Io {
            path: path.clone(),
            source,
        };
        match p {
            Some(p) => {
                let bytes = serde_json::to_vec(p).map_err(|e| BoundaryError::Damaged {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                write_atomic(&self.dir, REVERT_FILE, &bytes).map_err(io)
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => std::fs::File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(e)),
            },
        }
    }

    /// The deadline (unix seconds) of a pending revert.
    pub fn pending_deadline(&self) -> Option<u64> {
        match self.read_pending() {
            Ok(p) => p.map(|p| p.deadline),
            Err(e) => {
                warn!(error = %e, "cannot read the pending boundary revert");
                None
            }
        }
    }

    /// Sets the cluster boundary. Refused unless `confirm` when the result
    /// denies everything (no allow entry, no failsafe entry). With
    /// `revert_after`, the previous boundary (the last confirmed one if a
    /// revert is already pending) and the deadline are stored first.
    pub fn set_cluster(
        &self,
        doc: BoundaryDoc,
        confirm: bool,
        revert_after: Option<u32>,
    ) -> Result<Vec<String>, BoundaryError> {
        let snap = self.snapshot();
        let failsafe_after = if doc.failsafe.is_empty() {
            snap.policy.cluster.as_ref().map_or(0, |c| c.failsafe.len())
        } else {
            doc.failsafe.len()
        };
        if !confirm && doc.allow.is_empty() && failsafe_after == 0 {
            return Err(BoundaryError::Unconfirmed(
                "this boundary has no allow entry and no failsafe entry: it denies all traffic of the node, management included; confirm to apply it".into(),
            ));
        }
        let old = self.read_pending()?;
        if let Some(secs) = revert_after {
            let previous = match &old {
                Some(p) => p.previous.clone(),
                None => snap.policy.cluster.clone(),
            };
            self.write_pending(Some(&Pending {
                format: 1,
                previous,
                deadline: now_unix() + u64::from(secs),
            }))?;
        }
        drop(snap);
        match self.update(|p| p.set_cluster(doc)) {
            Ok(((), w)) => Ok(w),
            Err(e) => {
                if revert_after.is_some() {
                    if let Err(e2) = self.write_pending(old.as_ref()) {
                        warn!(error = %e2, "cannot put the pending revert back");
                    }
                }
                Err(e)
            }
        }
    }

    /// Replaces the failsafe entries. Removing every one, or leaving a
    /// boundary that denies everything, needs `confirm`.
    pub fn set_failsafe(
        &self,
        entries: Vec<EntryDoc>,
        confirm: bool,
    ) -> Result<Vec<String>, BoundaryError> {
        if !confirm && entries.is_empty() {
            let snap = self.snapshot();
            if let Some(c) = &snap.policy.cluster {
                if c.allow.is_empty() {
                    return Err(BoundaryError::Unconfirmed(
                        "without failsafe entries this boundary (no allow entry) denies all traffic of the node, management included; confirm to apply it".into(),
                    ));
                }
                if !c.failsafe.is_empty() {
                    return Err(BoundaryError::Unconfirmed(format!(
                        "this removes every failsafe entry ({}): management traffic is then only what the boundary allows; confirm to apply it",
                        c.failsafe.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        self.update(|p| p.set_failsafe(entries)).map(|((), w)| w)
    }

    /// Keeps the boundary set with a revert deadline.
    pub fn confirm_pending(&self) -> Result<(), BoundaryError> {
        if self.read_pending()?.is_none() {
            return Err(BoundaryError::NoPending);
        }
        self.write_pending(None)?;
        info!(
            event = "boundary-confirmed",
            "boundary change confirmed; no revert"
        );
        Ok(())
    }

    /// The deadline `deadline` came: puts the previous boundary back if
    /// that revert is still pending (not confirmed, not re-armed). Returns
    /// what was done.
    pub fn revert_pending(&self, deadline: u64) -> Result<Option<String>, BoundaryError> {
        let Some(p) = self.read_pending()? else {
            return Ok(None);
        };
        if p.deadline != deadline || now_unix() < p.deadline {
            return Ok(None);
        }
        let what = match p.previous {
            Some(doc) => {
                let n = doc.allow.len();
                self.update(|pol| {
                    doc.validate(true)?;
                    pol.cluster = Some(doc);
                    Ok(())
                })?;
                format!("the boundary change was not confirmed in time; the previous cluster boundary ({n} allow entries) is back")
            }
            None => {
                self.remove()?;
                "the boundary change was not confirmed in time; there was no boundary before, so it was lifted".to_owned()
            }
        };
        self.write_pending(None)?;
        warn!(event = "boundary-reverted", what = %what, "boundary reverted");
        Ok(Some(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_seconds_are_bounded_and_named() {
        assert_eq!(check_seconds(0).unwrap(), None);
        assert_eq!(check_seconds(2).unwrap(), Some(2));
        assert_eq!(check_seconds(3600).unwrap(), Some(3600));
        let e = check_seconds(1).unwrap_err();
        assert_eq!(e.field, "seconds");
        assert!(check_seconds(3601).is_err());
    }

    #[test]
    fn deny_all_needs_confirmation_and_pending_revert_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let b = Boundaries::load(dir.path()).unwrap();
        let e = b
            .set_cluster(BoundaryDoc::default(), false, None)
            .unwrap_err();
        assert!(matches!(e, BoundaryError::Unconfirmed(_)), "{e}");
        assert!(b.pending_deadline().is_none());
        assert!(matches!(b.confirm_pending(), Err(BoundaryError::NoPending)));
        // A pending revert is read back from the state dir.
        b.write_pending(Some(&Pending {
            format: 1,
            previous: None,
            deadline: 42,
        }))
        .unwrap();
        let b2 = Boundaries::load(dir.path()).unwrap();
        assert_eq!(b2.pending_deadline(), Some(42));
        // Another deadline (re-armed) does nothing.
        assert_eq!(b2.revert_pending(41).unwrap(), None);
        b2.confirm_pending().unwrap();
        assert!(b2.pending_deadline().is_none());
    }
}
