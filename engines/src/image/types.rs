//! What goes in (caps) and what comes out (the unpacked image).

use std::collections::BTreeMap;

use super::error::ImageError;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Caps on everything a hostile archive could inflate. Every cap is checked
/// while reading, before the memory or disk it guards is spent; exceeding
/// one refuses the image with [`super::ImageError::Cap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of the input archive file, or of the sum of a layout
    /// directory's blobs used (default 8 GiB).
    pub max_archive_bytes: u64,
    /// Entries in the outer archive (default 100 000).
    pub max_archive_entries: u64,
    /// Size of one JSON document: index, manifest, config or
    /// `manifest.json` (default 4 MiB).
    pub max_json_bytes: u64,
    /// Manifests listed by one index (default 256).
    pub max_index_manifests: usize,
    /// Layers in the image (default 128; Docker's own limit is 127).
    pub max_layers: usize,
    /// Uncompressed bytes of all layer tar streams together, headers
    /// included: the decompression-bomb cap (default 16 GiB).
    pub max_unpacked_bytes: u64,
    /// Entries in all layers together (default 1 000 000).
    pub max_entries: u64,
    /// Bytes of an entry's path or link target, after GNU long names and
    /// PAX records are applied (default 4096, Linux's PATH_MAX).
    pub max_path_bytes: usize,
    /// Symbolic links followed while resolving one path inside the root
    /// (default 40, Linux's own limit).
    pub max_symlink_hops: u32,
    /// Components of an entry's path, of a hard link's target, and of a
    /// path once resolved in the root (default 256; real images stay
    /// under 64). Bounds the per-component work on each entry (every
    /// prefix is looked at): without it a 4096-byte path has 2048.
    pub max_path_depth: usize,
    /// Memory held for paths while reading and unpacking: each path kept
    /// (the outer archive's index, directory modes, the paths a layer
    /// wrote and the directories it made opaque) counts its length plus
    /// 64 bytes for the string and the map's slot (default 256 MiB: an
    /// image of 15 000 to 100 000 entries needs 2 to 20 MiB; 1 000 000
    /// entries of 150-byte paths, about 205 MiB).
    pub max_path_memory: u64,
    /// Only an archive file (OCI or docker archive), never a layout
    /// directory (default false). The agent's deploy takes a file from the
    /// tenant's inbox: a directory swapped in after its check was read as
    /// a layout (review).
    pub archive_file_only: bool,
    /// The input must be on this filesystem (`st_dev` of the opened file
    /// or directory; default None: anywhere). The agent's inbox is on the
    /// tenant volume: a mount over it (a tenant's FUSE mount, where the
    /// landlord allows `user_allow_other`) is not read from (its lookup
    /// and open before this check still are: docs/engines.md).
    pub on_device: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_archive_bytes: 8 * GIB,
            max_archive_entries: 100_000,
            max_json_bytes: 4 * MIB,
            max_index_manifests: 256,
            max_layers: 128,
            max_unpacked_bytes: 16 * GIB,
            max_entries: 1_000_000,
            max_path_bytes: 4096,
            max_symlink_hops: 40,
            max_path_depth: 256,
            max_path_memory: 256 * MIB,
            archive_file_only: false,
            on_device: None,
        }
    }
}

/// What a path kept in a map costs beyond its bytes, as counted against
/// [`Limits::max_path_memory`]: the `PathBuf` or `String` itself, its
/// allocation's rounding and the map's slot.
pub(crate) const PATH_OVERHEAD: u64 = 64;

/// The memory held for paths, counted against
/// [`Limits::max_path_memory`]: charged before a path is kept, released
/// when it is dropped.
#[derive(Debug)]
pub(crate) struct PathMemory {
    used: u64,
    cap: u64,
}

impl PathMemory {
    /// `used` bytes are already held (the outer archive's index).
    pub(crate) fn new(cap: u64, used: u64) -> Self {
        PathMemory { used, cap }
    }

    /// What keeping a path of `len` bytes costs.
    pub(crate) fn cost(len: usize) -> u64 {
        u64::try_from(len)
            .unwrap_or(u64::MAX)
            .saturating_add(PATH_OVERHEAD)
    }

    /// Counts a path of `len` bytes about to be kept; refuses it, and the
    /// image, if that goes over the cap.
    pub(crate) fn charge(&mut self, len: usize) -> Result<(), ImageError> {
        let used = self.used.saturating_add(Self::cost(len));
        if used > self.cap {
            return Err(ImageError::cap(
                "memory for paths kept while unpacking, in bytes",
                self.cap,
            ));
        }
        self.used = used;
        Ok(())
    }

    /// A path of `len` bytes is no longer kept.
    pub(crate) fn release(&mut self, len: usize) {
        self.used = self.used.saturating_sub(Self::cost(len));
    }

    /// Bytes counted as held.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used
    }
}

/// The layout the input was found to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// An OCI image layout in a tar file (`podman save --format
    /// oci-archive`, `skopeo copy … oci-archive:`, `docker save` since
    /// Docker 25 also qualifies).
    OciArchive,
    /// An OCI image layout directory (`skopeo copy … oci:DIR`).
    OciDirectory,
    /// A `docker save` / `skopeo copy … docker-archive:` tar with
    /// `manifest.json`.
    DockerArchive,
}

/// The parts of the image configuration the launcher uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRuntimeConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir` (empty if unset).
    pub working_dir: String,
    /// `User` (empty if unset).
    pub user: String,
    /// `ExposedPorts`, e.g. `8080/tcp`.
    pub exposed_ports: Vec<String>,
}

/// Counts from unpacking, for the log line and `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Layers applied.
    pub layers: usize,
    /// Regular files written (the last layer's version counts once per
    /// write, so a file replaced by a later layer counts twice).
    pub files: u64,
    /// Directories created (implicit parents included).
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// `.wh.NAME` whiteout entries applied (whether or not NAME existed).
    pub whiteouts: u64,
    /// `.wh..wh..opq` opaque whiteouts applied.
    pub opaque_whiteouts: u64,
    /// Character and block devices and FIFOs skipped (an engine is
    /// unprivileged and gets its `/dev` from the launcher).
    pub skipped_devices: u64,
    /// Entries whose setuid or setgid bit was stripped.
    pub setid_stripped: u64,
    /// Entries the image gives a non-root owner; unpacked as owned by the
    /// agent all the same (ownership is recorded, not applied).
    pub non_root_owned: u64,
}

/// A verified image unpacked at its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedImage {
    /// The layout the input had.
    pub format: ImageFormat,
    /// `sha256:…` of the image manifest (the digest a registry would show);
    /// `None` for a docker-archive, which carries no manifest blob.
    pub manifest_digest: Option<String>,
    /// `sha256:…` of the image configuration: the image ID as
    /// `docker images --no-trunc` and `podman images` show it.
    pub config_digest: String,
    /// `sha256:…` diff_ids of the layers, in order, each verified against
    /// the uncompressed layer.
    pub diff_ids: Vec<String>,
    /// Entrypoint, command, environment and so on.
    pub config: ImageRuntimeConfig,
    /// Owners the image gave to paths (uid, gid), recorded but not applied:
    /// only non-root owners are listed, up to 1000 paths.
    pub owners: BTreeMap<String, (u64, u64)>,
    /// Counts.
    pub stats: UnpackStats,
}
