//! OCI image archives, verified by digest and unpacked into a root
//! filesystem (issue 14, "deploy NAME IMAGE").
//!
//! [`unpack_image`] takes what `podman save --format oci-archive`,
//! `skopeo copy … oci-archive:`/`oci:`/`docker-archive:` and `docker save`
//! produce, checks every blob it uses against its descriptor (index →
//! manifest → config → layers; sha256 only), and applies the layers in
//! order into a new directory, atomically: the layers go into a staging
//! directory next to the destination, renamed into place at the end; on
//! any error the staging directory is removed and nothing is left.
//!
//! The image is hostile. Every size is capped ([`Limits`]); no path may
//! leave the root (see the `layer` module); device nodes and FIFOs are
//! skipped; setuid and setgid bits are stripped; ownership is recorded,
//! not applied: every file belongs to the agent (root), with the image's
//! permission bits. docs/engines.md, "Images", has the rules and reasons.

mod archive;
mod error;
mod layer;
mod types;

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use cap_std::ambient_authority;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

pub use error::ImageError;
pub use types::{ImageFormat, ImageRuntimeConfig, Limits, UnpackStats, UnpackedImage};

use archive::{read_small, Hashing, ReadCap, Source};
use error::from_io;
use layer::Unpacker;

/// Indexes nested in indexes, at most (an OCI layout's index.json naming a
/// multi-platform index is one level).
const MAX_INDEX_DEPTH: usize = 2;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer to apply.
#[derive(Debug)]
struct LayerPlan {
    /// Name of the blob in the archive or layout.
    name: String,
    /// For messages: "layer 2 (sha256:…)".
    what: String,
    /// `None`: sniffed from the first bytes (docker-archive).
    compression: Option<Compression>,
    /// Digest and size of the blob as stored, when a descriptor gives them.
    blob: Option<(String, u64)>,
    /// The config's diff_id: digest of the uncompressed tar stream.
    diff_id: String,
}

/// What the JSON documents say, all verified.
struct Plan {
    manifest_digest: Option<String>,
    config_digest: String,
    config: ImageRuntimeConfig,
    layers: Vec<LayerPlan>,
}

/// Verifies the image archive (or OCI layout directory) at `input` and
/// unpacks its linux/amd64 image into `dest`, which must not exist and
/// whose parent must. Returns what was unpacked; on error nothing is left
/// at `dest` or next to it.
pub fn unpack_image(
    input: &Path,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackedImage, ImageError> {
    unpack_image_abortable(input, dest, limits, &AtomicBool::new(false))
}

/// [`unpack_image`] that stops, leaving nothing, with
/// [`ImageError::Aborted`] soon after `abort` is set: it is read on every
/// read of a blob and of a decompressed layer (every 8 KiB or so of
/// either, or 16 small entries), and once more before the directory modes
/// are set and before the root is renamed into place. The agent sets it to stop the tenant's engines
/// before an erase: an unpack must not write on a volume being erased,
/// nor hold that stop for minutes.
pub fn unpack_image_abortable(
    input: &Path,
    dest: &Path,
    limits: &Limits,
    abort: &AtomicBool,
) -> Result<UnpackedImage, ImageError> {
    if abort.load(Ordering::SeqCst) {
        return Err(ImageError::Aborted);
    }
    match unpack(input, dest, limits, abort) {
        // Whatever failed first (a read refused by the flag, mostly).
        Err(_) if abort.load(Ordering::SeqCst) => Err(ImageError::Aborted),
        r => r,
    }
}

/// A blob reader that refuses to read once `abort` is set.
struct Abortable<'a, R> {
    inner: R,
    abort: &'a AtomicBool,
}

impl<R: Read> Read for Abortable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped"));
        }
        self.inner.read(buf)
    }
}

fn unpack(
    input: &Path,
    dest: &Path,
    limits: &Limits,
    abort: &AtomicBool,
) -> Result<UnpackedImage, ImageError> {
    let (parent, name) = match (dest.parent(), dest.file_name()) {
        (Some(p), Some(n)) => (
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        ),
        _ => {
            return Err(ImageError::Destination {
                path: dest.to_owned(),
                reason: "has no parent directory",
            })
        }
    };
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(ImageError::Destination {
            path: dest.to_owned(),
            reason: "already exists",
        });
    }
    let (source, format) = Source::open(input, limits)?;
    let plan = match format {
        ImageFormat::OciArchive | ImageFormat::OciDirectory => plan_oci(&source, limits)?,
        ImageFormat::DockerArchive => plan_docker(&source, limits)?,
    };
    // Refuse a bad blob before writing anything.
    for layer in &plan.layers {
        if let Some((digest, size)) = &layer.blob {
            verify_blob(&source, &layer.name, &layer.what, digest, *size, abort)?;
        }
    }

    let staging = Staging::create(parent, name)?;
    let root = cap_std::fs::Dir::open_ambient_dir(&staging.path, ambient_authority())
        .map_err(|e| ImageError::io("open", &staging.path, e))?;
    let mut unpacker = Unpacker::new(root, limits, source.kept_path_memory());
    let mut budget = limits.max_unpacked_bytes;
    for (i, layer) in plan.layers.iter().enumerate() {
        apply_layer(
            &source,
            layer,
            i + 1,
            &mut unpacker,
            &mut budget,
            limits.max_unpacked_bytes,
            abort,
        )?;
    }
    // Nothing is kept once asked to stop, however late.
    let stopped = || {
        if abort.load(Ordering::SeqCst) {
            Err(ImageError::Aborted)
        } else {
            Ok(())
        }
    };
    stopped()?;
    let (stats, owners) = unpacker.finish()?;
    stopped()?;
    staging.commit(dest)?;
    // One warning per image, not one per entry: a hostile image cannot
    // flood the log.
    if stats.skipped_devices > 0 {
        tracing::warn!(
            dest = %dest.display(),
            count = stats.skipped_devices,
            "skipped device nodes and FIFOs in the image (engines are unprivileged)"
        );
    }
    if stats.setid_stripped > 0 {
        tracing::warn!(
            dest = %dest.display(),
            count = stats.setid_stripped,
            "stripped setuid/setgid bits in the image"
        );
    }
    tracing::info!(
        dest = %dest.display(),
        config = %plan.config_digest,
        layers = stats.layers,
        files = stats.files,
        bytes = stats.bytes,
        skipped_devices = stats.skipped_devices,
        setid_stripped = stats.setid_stripped,
        "image unpacked"
    );
    Ok(UnpackedImage {
        format,
        manifest_digest: plan.manifest_digest,
        config_digest: plan.config_digest,
        diff_ids: plan.layers.into_iter().map(|l| l.diff_id).collect(),
        config: plan.config,
        owners,
        stats,
    })
}

/// The staging directory next to the destination, removed on drop unless
/// renamed into place.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(parent: &Path, name: &std::ffi::OsStr) -> Result<Self, ImageError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(
            ".{}.unpacking-{}-{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir(&path).map_err(|e| ImageError::io("create", &path, e))?;
        // It becomes the engine's `/`, which its unprivileged uid must be
        // able to search: 0755 whatever the umask (the agent's unit has
        // UMask=0077, which left it 0700 and every exec EACCES on the lab
        // node). The agent's 0700 directories above it keep others out.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| ImageError::io("chmod", &path, e))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Flushes the unpacked tree to disk (one `syncfs`, not an fsync per
    /// file), renames it into place and flushes the parent's entry, so that
    /// a root reported as unpacked survives a crash whole.
    fn commit(mut self, dest: &Path) -> Result<(), ImageError> {
        let staging =
            std::fs::File::open(&self.path).map_err(|e| ImageError::io("open", &self.path, e))?;
        nix::unistd::syncfs(staging.as_raw_fd())
            .map_err(|e| ImageError::io("syncfs", &self.path, e.into()))?;
        // RENAME_NOREPLACE: whatever appeared at `dest` since the start is
        // never replaced.
        nix::fcntl::renameat2(
            None,
            &self.path,
            None,
            dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| ImageError::io("rename into", dest, e.into()))?;
        self.committed = true;
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // The root is in place and its contents are on disk: a failure to
        // flush the directory entry is worth a warning, not a refusal.
        if let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %parent.display(), error = %e, "could not fsync the directory holding the unpacked root");
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the staging directory");
            }
        }
    }
}

/// `sha256:<64 lowercase hex>` or a refusal naming the blob.
fn sha256_digest(what: &str, digest: &str) -> Result<String, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(digest.to_owned())
        }
        _ => Err(ImageError::DigestAlgorithm {
            what: what.to_owned(),
            digest: digest.to_owned(),
        }),
    }
}

/// The blob name of a descriptor in an OCI layout, after checking its digest.
fn blob_name(what: &str, desc: &Descriptor) -> Result<(String, String), ImageError> {
    let digest = sha256_digest(what, desc.digest().as_ref())?;
    let name = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
    Ok((name, digest))
}

fn json_error(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Json {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// index.json → (nested index) → manifest → config → layer descriptors.
fn plan_oci(source: &Source, limits: &Limits) -> Result<Plan, ImageError> {
    let (bytes, _) = read_small(
        source,
        "index.json",
        "index.json",
        None,
        limits.max_json_bytes,
    )?;
    let mut index = ImageIndex::from_reader(&bytes[..]).map_err(|e| json_error("index.json", e))?;
    let mut depth = 0;
    let manifest_desc = loop {
        let desc = select_manifest(&index, limits)?;
        let media = desc.media_type().to_string();
        if media == OCI_INDEX || media == DOCKER_LIST {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(ImageError::cap("nested indexes", MAX_INDEX_DEPTH as u64));
            }
            let what = format!("index {}", desc.digest());
            let (name, digest) = blob_name(&what, &desc)?;
            let (bytes, _) = read_small(
                source,
                &name,
                &what,
                Some((&digest, desc.size())),
                limits.max_json_bytes,
            )?;
            index = ImageIndex::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))?;
            continue;
        }
        if media != OCI_MANIFEST && media != DOCKER_MANIFEST {
            return Err(ImageError::MediaType {
                what: format!("manifest {}", desc.digest()),
                media_type: media,
            });
        }
        break desc;
    };

    let what = format!("manifest {}", manifest_desc.digest());
    let (name, manifest_digest) = blob_name(&what, &manifest_desc)?;
    let (bytes, _) = read_small(
        source,
        &name,
        &what,
        Some((&manifest_digest, manifest_desc.size())),
        limits.max_json_bytes,
    )?;
    let manifest = ImageManifest::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))?;

    let config_desc = manifest.config();
    let what = format!("config {}", config_desc.digest());
    let media = config_desc.media_type().to_string();
    if media != OCI_CONFIG && media != DOCKER_CONFIG {
        return Err(ImageError::MediaType {
            what,
            media_type: media,
        });
    }
    let (name, config_digest) = blob_name(&what, config_desc)?;
    let (bytes, _) = read_small(
        source,
        &name,
        &what,
        Some((&config_digest, config_desc.size())),
        limits.max_json_bytes,
    )?;
    let config = ImageConfiguration::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))?;

    let descs = manifest.layers();
    if descs.len() > limits.max_layers {
        return Err(ImageError::cap("layers", limits.max_layers as u64));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != descs.len() {
        return Err(ImageError::LayerCount {
            layers: descs.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut layers = Vec::with_capacity(descs.len());
    let mut total = 0u64;
    for (i, (desc, diff_id)) in descs.iter().zip(diff_ids).enumerate() {
        let what = format!("layer {} ({})", i + 1, desc.digest());
        let compression = layer_compression(&what, desc.media_type().as_ref())?;
        let (name, digest) = blob_name(&what, desc)?;
        total = total.saturating_add(desc.size());
        if total > limits.max_archive_bytes {
            return Err(ImageError::cap(
                "layer blobs in bytes",
                limits.max_archive_bytes,
            ));
        }
        layers.push(LayerPlan {
            name,
            compression: Some(compression),
            blob: Some((digest, desc.size())),
            diff_id: sha256_digest(&format!("{what} diff_id"), diff_id)?,
            what,
        });
    }
    Ok(Plan {
        manifest_digest: Some(manifest_digest),
        config_digest,
        config: runtime_config(&config),
        layers,
    })
}

/// The linux/amd64 entry of an index; a sole entry without a platform is
/// taken as is (skopeo and podman write index.json that way).
fn select_manifest(index: &ImageIndex, limits: &Limits) -> Result<Descriptor, ImageError> {
    let manifests = index.manifests();
    if manifests.len() > limits.max_index_manifests {
        return Err(ImageError::cap(
            "manifests in an index",
            limits.max_index_manifests as u64,
        ));
    }
    if let [only] = manifests.as_slice() {
        if only.platform().is_none() {
            return Ok(only.clone());
        }
    }
    let is_amd64 = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
        })
    };
    // Prefer the baseline (no variant) over e.g. amd64/v3, which needs a
    // newer CPU than the node may have.
    let baseline = manifests
        .iter()
        .filter(is_amd64)
        .find(|d| d.platform().as_ref().is_some_and(|p| p.variant().is_none()));
    if let Some(found) = baseline.or_else(|| manifests.iter().find(is_amd64)) {
        return Ok(found.clone());
    }
    let offered: Vec<String> = manifests
        .iter()
        .map(|d| match d.platform() {
            Some(p) => match p.variant() {
                Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
                None => format!("{}/{}", p.os(), p.architecture()),
            },
            None => "(no platform)".to_owned(),
        })
        .collect();
    Err(ImageError::NoPlatform {
        offered: if offered.is_empty() {
            "nothing".to_owned()
        } else {
            offered.join(", ")
        },
    })
}

fn layer_compression(what: &str, media: &str) -> Result<Compression, ImageError> {
    Ok(match media {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
        other => {
            return Err(ImageError::MediaType {
                what: what.to_owned(),
                media_type: other.to_owned(),
            })
        }
    })
}

/// One image in a `docker save` manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    layers: Vec<String>,
}

/// manifest.json → config (named by its digest) → layers (checked against
/// the config's diff_ids while they are unpacked).
fn plan_docker(source: &Source, limits: &Limits) -> Result<Plan, ImageError> {
    let (bytes, _) = read_small(
        source,
        "manifest.json",
        "manifest.json",
        None,
        limits.max_json_bytes,
    )?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&bytes).map_err(|e| json_error("manifest.json", e))?;
    let [entry] = entries.as_slice() else {
        return Err(json_error(
            "manifest.json",
            format!("holds {} images; save exactly one", entries.len()),
        ));
    };
    // The config is named by its digest: "<hex>.json" (docker save up to
    // 24) or "blobs/sha256/<hex>" (25 and later).
    let what = format!("config {}", entry.config);
    let file = entry.config.rsplit('/').next().unwrap_or("");
    let hex = file.strip_suffix(".json").unwrap_or(file);
    let config_digest = sha256_digest(&what, &format!("sha256:{hex}")).map_err(|_| {
        ImageError::DigestAlgorithm {
            what: what.clone(),
            digest: entry.config.clone(),
        }
    })?;
    let name = archive_name(&entry.config);
    let (bytes, actual) = read_small(source, &name, &what, None, limits.max_json_bytes)?;
    if actual != config_digest {
        return Err(ImageError::DigestMismatch {
            what,
            expected: config_digest,
            actual,
        });
    }
    let config = ImageConfiguration::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))?;
    if entry.layers.len() > limits.max_layers {
        return Err(ImageError::cap("layers", limits.max_layers as u64));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        return Err(ImageError::LayerCount {
            layers: entry.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    let mut total = 0u64;
    for (i, (layer, diff_id)) in entry.layers.iter().zip(diff_ids).enumerate() {
        let what = format!("layer {} ({layer})", i + 1);
        let name = archive_name(layer);
        // As the OCI descriptors' sizes are summed: a layer listed many
        // times is read as many times, and layers of empty compressed
        // frames never reach the unpacked cap (review: one large layer
        // listed 128 times was read 128 times).
        total = total.saturating_add(source.tar_size(&name).unwrap_or(0));
        if total > limits.max_archive_bytes {
            return Err(ImageError::cap(
                "layer blobs in bytes (a layer listed twice counts twice)",
                limits.max_archive_bytes,
            ));
        }
        layers.push(LayerPlan {
            name,
            compression: None,
            blob: None,
            diff_id: sha256_digest(&format!("{what} diff_id"), diff_id)?,
            what,
        });
    }
    Ok(Plan {
        manifest_digest: None,
        config_digest,
        config: runtime_config(&config),
        layers,
    })
}

/// A name from manifest.json as the archive index spells it.
fn archive_name(name: &str) -> String {
    name.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn runtime_config(config: &ImageConfiguration) -> ImageRuntimeConfig {
    let Some(c) = config.config() else {
        return ImageRuntimeConfig::default();
    };
    ImageRuntimeConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
        exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
    }
}

/// Hashes a whole blob and compares its size and digest with the descriptor.
fn verify_blob(
    source: &Source,
    name: &str,
    what: &str,
    digest: &str,
    size: u64,
    abort: &AtomicBool,
) -> Result<(), ImageError> {
    let (reader, len) = source.open_blob(name)?;
    let reader = Abortable {
        inner: reader,
        abort,
    };
    if len != size {
        return Err(ImageError::SizeMismatch {
            what: what.to_owned(),
            expected: size,
            actual: len,
        });
    }
    let mut hashing = Hashing::new(reader, None);
    hashing
        .drain()
        .map_err(|e| from_io("read", source.display(name), e))?;
    check_blob(what, digest, size, hashing)
}

fn check_blob<R: Read>(
    what: &str,
    digest: &str,
    size: u64,
    hashing: Hashing<R>,
) -> Result<(), ImageError> {
    let count = hashing.count();
    let (actual, _) = hashing.finish();
    if count != size {
        return Err(ImageError::SizeMismatch {
            what: what.to_owned(),
            expected: size,
            actual: count,
        });
    }
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// A decompressor over a buffered reader that gives the reader back, so
/// that the compressed bytes after the end of the stream can be hashed too.
enum Decoder<B: BufRead> {
    None(B),
    Gzip(flate2::bufread::MultiGzDecoder<B>),
    Zstd(zstd::stream::read::Decoder<'static, B>),
}

impl<B: BufRead> Decoder<B> {
    fn new(compression: Compression, inner: B) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::None(inner),
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(inner)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(inner)?),
        })
    }

    fn into_inner(self) -> B {
        match self {
            Decoder::None(b) => b,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

impl<B: BufRead> Read for Decoder<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::None(b) => b.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// Compression from the first bytes (docker-archive layers carry no media
/// type; `docker save` writes plain tars, other tools may not).
fn sniff<B: BufRead>(reader: &mut B) -> io::Result<Compression> {
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Streams one layer through its digest check, decompressor and diff_id
/// check into the unpacker. The digests are checked again here, over the
/// bytes actually unpacked, so that a blob swapped after [`verify_blob`]
/// is caught too.
fn apply_layer(
    source: &Source,
    layer: &LayerPlan,
    number: usize,
    unpacker: &mut Unpacker<'_>,
    budget: &mut u64,
    max_unpacked: u64,
    abort: &AtomicBool,
) -> Result<(), ImageError> {
    let shown = source.display(&layer.name);
    let (reader, _) = source.open_blob(&layer.name)?;
    let reader = Abortable {
        inner: reader,
        abort,
    };
    let cap = layer.blob.as_ref().map(|(_, size)| ReadCap {
        left: *size,
        what: "layer blob in bytes (its descriptor's size)",
        shown: *size,
    });
    let mut compressed = BufReader::new(Hashing::new(reader, cap));
    let compression = match layer.compression {
        Some(c) => c,
        None => sniff(&mut compressed).map_err(|e| from_io("read", &shown, e))?,
    };
    let decoder =
        Decoder::new(compression, compressed).map_err(|e| from_io("decompress", &shown, e))?;
    let mut tar_stream = Hashing::new(
        decoder,
        Some(ReadCap {
            left: *budget,
            what: "uncompressed layer bytes",
            shown: max_unpacked,
        }),
    );
    // Checked on the decompressed stream too: 8 KiB of gzip can be
    // megabytes of entries.
    unpacker.apply_layer(
        number,
        Abortable {
            inner: &mut tar_stream,
            abort,
        },
    )?;
    tar_stream
        .drain()
        .map_err(|e| from_io("decompress", &shown, e))?;
    *budget -= tar_stream.count();
    let (diff_id, decoder) = tar_stream.finish();
    if diff_id != layer.diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("{} uncompressed (diff_id)", layer.what),
            expected: layer.diff_id.clone(),
            actual: diff_id,
        });
    }
    let mut rest = decoder.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| from_io("read", &shown, e))?;
    if let Some((digest, size)) = &layer.blob {
        check_blob(&layer.what, digest, *size, rest.into_inner())?;
    }
    Ok(())
}
