//! Why an image was refused.

use std::io;
use std::path::PathBuf;

/// An image archive that could not be verified or unpacked. Nothing is left
/// at the destination when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file concerned (in the archive, the image root or the host).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The input is neither an OCI image layout (tar or directory) nor a
    /// `docker save` archive.
    #[error("{path}: not an OCI image layout (no oci-layout and index.json) nor a docker-archive (no manifest.json)")]
    UnknownFormat {
        /// The input.
        path: PathBuf,
    },
    /// The outer archive is not a readable tar file.
    #[error("{path}: not a readable tar archive: {reason}")]
    BadArchive {
        /// The input.
        path: PathBuf,
        /// What the tar reader found.
        reason: String,
    },
    /// A documented cap was exceeded.
    #[error("{what} exceeds the cap of {cap}")]
    Cap {
        /// What was counted (e.g. "archive size in bytes", "layers").
        what: String,
        /// The cap in force.
        cap: u64,
    },
    /// A file the format requires is absent from the archive.
    #[error("{name} is missing from the archive")]
    Missing {
        /// Its name inside the archive or layout.
        name: String,
    },
    /// The archive holds two entries with the same name.
    #[error("{name} appears twice in the archive")]
    Duplicate {
        /// Its name inside the archive.
        name: String,
    },
    /// A JSON document (index, manifest, config, manifest.json) is malformed.
    #[error("{what}: invalid JSON: {reason}")]
    Json {
        /// Which document.
        what: String,
        /// The parser's message.
        reason: String,
    },
    /// A digest uses an algorithm other than sha256, or is malformed.
    #[error("{what}: unsupported digest {digest:?} (only sha256:<64 hex> is accepted)")]
    DigestAlgorithm {
        /// Which blob.
        what: String,
        /// The digest as written.
        digest: String,
    },
    /// A blob's content does not hash to its descriptor's digest.
    #[error("{what}: digest mismatch: descriptor says {expected}, content is {actual}")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest the descriptor (or config diff_id) names.
        expected: String,
        /// The digest of the bytes found.
        actual: String,
    },
    /// A blob's length differs from its descriptor's size.
    #[error("{what}: size mismatch: descriptor says {expected} bytes, blob has {actual}")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The size the descriptor names.
        expected: u64,
        /// The bytes found (counted up to `expected + 1`).
        actual: u64,
    },
    /// A descriptor's media type is not one this agent unpacks.
    #[error("{what}: unsupported media type {media_type}")]
    MediaType {
        /// Which blob.
        what: String,
        /// The media type as written.
        media_type: String,
    },
    /// The index has no linux/amd64 image.
    #[error("no linux/amd64 image in the index; it offers: {offered}")]
    NoPlatform {
        /// The platforms the index lists, comma separated.
        offered: String,
    },
    /// The manifest's layers and the config's diff_ids disagree in number.
    #[error("the manifest has {layers} layers but the config lists {diff_ids} diff_ids")]
    LayerCount {
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// A layer entry was refused (path escape, unsupported type, bad link).
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        /// Which layer (1-based, in order).
        layer: usize,
        /// The entry's path as written in the layer.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// The destination already exists, or has no parent directory.
    #[error("{path}: {reason}")]
    Destination {
        /// The destination.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Stopped by the caller's flag ([`super::unpack_image_abortable`])
    /// before it finished; nothing is left.
    #[error("stopped before it finished; nothing was kept")]
    Aborted,
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn cap(what: impl Into<String>, cap: u64) -> Self {
        ImageError::Cap {
            what: what.into(),
            cap,
        }
    }
}

/// Marker carried inside an `io::Error` by the bounded readers, so that a
/// cap hit deep inside a decompressor or the tar reader comes back out as
/// [`ImageError::Cap`] rather than as an I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{what} exceeds the cap of {cap}")]
pub(crate) struct CapHit {
    pub(crate) what: &'static str,
    pub(crate) cap: u64,
}

/// Finds a [`CapHit`] anywhere in an I/O error's chain.
pub(crate) fn cap_hit(e: &io::Error) -> Option<(&'static str, u64)> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
    while let Some(err) = cur {
        if let Some(hit) = err.downcast_ref::<CapHit>() {
            return Some((hit.what, hit.cap));
        }
        if let Some(inner) = err.downcast_ref::<io::Error>() {
            if let Some(found) = cap_hit(inner) {
                return Some(found);
            }
        }
        cur = err.source();
    }
    None
}

/// Converts an I/O error, turning a cap hit back into [`ImageError::Cap`].
pub(crate) fn from_io(op: &'static str, path: impl Into<PathBuf>, e: io::Error) -> ImageError {
    match cap_hit(&e) {
        Some((what, cap)) => ImageError::cap(what, cap),
        None => ImageError::io(op, path, e),
    }
}
