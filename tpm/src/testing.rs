//! Helpers for tests that look at the TPM from outside the hierarchy
//! (feature `testing`): list and remove Leasehold NV indices.

use crate::error::Result;
use crate::sys::Tpm;

/// The epoch counter's NV index.
pub const EPOCH_NV_INDEX: u32 = crate::sys::NV_EPOCH;

/// Leasehold NV indices the TPM holds (secrets and epoch counter), sorted.
/// Connects, lists, and shuts the TPM down cleanly.
pub fn nv_indices(tcti: &str) -> Result<Vec<u32>> {
    let mut tpm = Tpm::connect(tcti)?;
    let mut v = tpm.nv_indices();
    if let Ok(v) = &mut v {
        v.sort_unstable();
    }
    tpm.shutdown()?;
    v
}

/// Undefines one NV index (simulating a TPM from before a change).
pub fn nv_undefine(tcti: &str, index: u32) -> Result<()> {
    let mut tpm = Tpm::connect(tcti)?;
    let r = tpm.nv_undefine(index);
    tpm.shutdown()?;
    r
}
