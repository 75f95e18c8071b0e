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
    #[error("{path}: not a readable tar archive: {}", cut(.reason, 256))]
    BadArchive {
        /// The input.
        path: PathBuf,
        /// What the tar reader found.
        reason: String,
    },
    /// A documented cap was exceeded.
    #[error("{} exceeds the cap of {cap}", cut(.what, 256))]
    Cap {
        /// What was counted (e.g. "archive size in bytes", "layers").
        what: String,
        /// The cap in force.
        cap: u64,
    },
    /// A file the format requires is absent from the archive.
    #[error("{} is missing from the archive", cut(.name, 128))]
    Missing {
        /// Its name inside the archive or layout.
        name: String,
    },
    /// The archive holds two entries with the same name.
    #[error("{} appears twice in the archive", cut(.name, 128))]
    Duplicate {
        /// Its name inside the archive.
        name: String,
    },
    /// A JSON document (index, manifest, config, manifest.json) is malformed.
    #[error("{}: invalid JSON: {}", cut(.what, 128), cut(.reason, 256))]
    Json {
        /// Which document.
        what: String,
        /// The parser's message.
        reason: String,
    },
    /// A digest uses an algorithm other than sha256, or is malformed.
    #[error("{}: unsupported digest {:?} (only sha256:<64 hex> is accepted)", cut(.what, 128), cut(.digest, 80))]
    DigestAlgorithm {
        /// Which blob.
        what: String,
        /// The digest as written.
        digest: String,
    },
    /// A blob's content does not hash to its descriptor's digest.
    #[error("{}: digest mismatch: descriptor says {}, content is {actual}", cut(.what, 128), cut(.expected, 80))]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest the descriptor (or config diff_id) names.
        expected: String,
        /// The digest of the bytes found.
        actual: String,
    },
    /// A blob's length differs from its descriptor's size.
    #[error("{}: size mismatch: descriptor says {expected} bytes, blob has {actual}", cut(.what, 128))]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The size the descriptor names.
        expected: u64,
        /// The bytes found (counted up to `expected + 1`).
        actual: u64,
    },
    /// A descriptor's media type is not one this agent unpacks.
    #[error("{}: unsupported media type {:?}", cut(.what, 128), cut(.media_type, 80))]
    MediaType {
        /// Which blob.
        what: String,
        /// The media type as written.
        media_type: String,
    },
    /// The index has no linux/amd64 image.
    #[error("no linux/amd64 image in the index; it offers: {}", cut(.offered, 512))]
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
    #[error("layer {layer}: entry {:?}: {}", cut(.entry, 256), cut(.reason, 512))]
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

/// A value from the archive as an error shows it: at most `max`
/// characters, then how long it was. The archive is the tenant's, and its
/// errors are kept (engine events, a reload's note): a 4 MiB media type or
/// digest was repeated whole in each (review).
pub(crate) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}… ({} bytes)", &s[..at], s.len()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the archive wrote, an error's text stays short.
    #[test]
    fn archive_values_are_cut_in_errors() {
        let long = "x".repeat(4 << 20);
        let errs = [
            ImageError::MediaType {
                what: format!("manifest sha256:{long}"),
                media_type: long.clone(),
            },
            ImageError::DigestAlgorithm {
                what: long.clone(),
                digest: long.clone(),
            },
            ImageError::DigestMismatch {
                what: long.clone(),
                expected: long.clone(),
                actual: "sha256:00".into(),
            },
            ImageError::Json {
                what: long.clone(),
                reason: long.clone(),
            },
            ImageError::NoPlatform {
                offered: long.clone(),
            },
            ImageError::Missing { name: long.clone() },
            ImageError::Duplicate { name: long.clone() },
            ImageError::cap(long.clone(), 1),
        ];
        for e in errs {
            let t = e.to_string();
            assert!(t.len() < 1200, "{} bytes", t.len());
            assert!(
                t.contains(&format!("({} bytes)", long.len())),
                "{}",
                &t[..200]
            );
        }
        assert_eq!(cut("short", 64), "short");
        assert_eq!(
            cut("é".repeat(70).as_str(), 64)
                .chars()
                .filter(|c| *c == 'é')
                .count(),
            64
        );
    }
}
