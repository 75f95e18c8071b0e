//! T0: image verification and unpacking, with every archive built here.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use leasehold_engines::image::{unpack_image, ImageError, ImageFormat, Limits, UnpackedImage};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

// ---------------------------------------------------------------- layers

/// Builds a layer tar entry by entry, writing names and link names as raw
/// bytes so that hostile names (`..`, absolute) can be written too.
struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

impl LayerTar {
    fn new() -> Self {
        LayerTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(mut self, kind: EntryType, path: &str, link: &str, mode: u32, data: &[u8]) -> Self {
        assert!(path.len() < 100 && link.len() < 100);
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        {
            let bytes = h.as_mut_bytes();
            bytes[..100].fill(0);
            bytes[..path.len()].copy_from_slice(path.as_bytes());
            bytes[157..257].fill(0);
            bytes[157..157 + link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn dir(self, path: &str, mode: u32) -> Self {
        self.raw(EntryType::Directory, path, "", mode, b"")
    }

    fn file(self, path: &str, data: &[u8]) -> Self {
        self.raw(EntryType::Regular, path, "", 0o644, data)
    }

    fn file_mode(self, path: &str, data: &[u8], mode: u32) -> Self {
        self.raw(EntryType::Regular, path, "", mode, data)
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(EntryType::Symlink, path, target, 0o777, b"")
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(EntryType::Link, path, target, 0o644, b"")
    }

    /// A path longer than 100 bytes, written with a GNU long-name entry.
    fn long_file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    fn build(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug)]
enum Comp {
    Plain,
    Gzip,
    Zstd,
}

fn compress(tar: &[u8], comp: Comp) -> (Vec<u8>, &'static str) {
    match comp {
        Comp::Plain => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(tar).unwrap();
            (
                enc.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(tar, 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

// ---------------------------------------------------------------- images

/// An image's files by name, as they go into an archive or a directory.
#[derive(Clone)]
struct Image {
    files: BTreeMap<String, Vec<u8>>,
    manifest_digest: String,
    config_digest: String,
    layer_blobs: Vec<String>,
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/bin", "MODE=test"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

fn descriptor(media: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media, "digest": sha256(bytes), "size": bytes.len()})
}

/// Adds a manifest (config + layers) as blobs; returns its bytes.
fn add_manifest(
    files: &mut BTreeMap<String, Vec<u8>>,
    layers: &[(Vec<u8>, Comp)],
) -> (Vec<u8>, String, Vec<String>) {
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut blobs = Vec::new();
    for (tar, comp) in layers {
        let (blob, media) = compress(tar, *comp);
        diff_ids.push(sha256(tar));
        layer_descs.push(descriptor(media, &blob));
        blobs.push(format!("blobs/sha256/{}", hex_of(&sha256(&blob))));
        files.insert(format!("blobs/sha256/{}", hex_of(&sha256(&blob))), blob);
    }
    let config = config_json(&diff_ids);
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layer_descs,
    }))
    .unwrap();
    files.insert(format!("blobs/sha256/{}", hex_of(&config_digest)), config);
    files.insert(
        format!("blobs/sha256/{}", hex_of(&sha256(&manifest))),
        manifest.clone(),
    );
    (manifest, config_digest, blobs)
}

fn oci_image(layers: &[(Vec<u8>, Comp)]) -> Image {
    let mut files = BTreeMap::new();
    let (manifest, config_digest, layer_blobs) = add_manifest(&mut files, layers);
    // As skopeo writes it: one manifest, no platform.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [descriptor(OCI_MANIFEST, &manifest)],
    }))
    .unwrap();
    files.insert("index.json".into(), index);
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    Image {
        files,
        manifest_digest: sha256(&manifest),
        config_digest,
        layer_blobs,
    }
}

impl Image {
    fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in &self.files {
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn write_tar(&self, dir: &Path) -> PathBuf {
        let path = dir.join("image.tar");
        std::fs::write(&path, self.tar()).unwrap();
        path
    }

    fn write_dir(&self, dir: &Path) -> PathBuf {
        let root = dir.join("layout");
        for (name, data) in &self.files {
            let p = root.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        root
    }
}

/// A fresh place for input and output: `out` stays empty unless an unpack
/// succeeds, which `assert_nothing_left` checks.
struct Place {
    _tmp: tempfile::TempDir,
    input: PathBuf,
    out: PathBuf,
}

impl Place {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in");
        let out = tmp.path().join("out");
        std::fs::create_dir(&input).unwrap();
        std::fs::create_dir(&out).unwrap();
        Place {
            _tmp: tmp,
            input,
            out,
        }
    }

    fn dest(&self) -> PathBuf {
        self.out.join("rootfs")
    }

    fn unpack(&self, archive: &Path) -> Result<UnpackedImage, ImageError> {
        self.unpack_with(archive, &Limits::default())
    }

    fn unpack_with(&self, archive: &Path, limits: &Limits) -> Result<UnpackedImage, ImageError> {
        unpack_image(archive, &self.dest(), limits)
    }

    fn assert_nothing_left(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dest().join(rel)).unwrap()
    }

    fn exists(&self, rel: &str) -> bool {
        std::fs::symlink_metadata(self.dest().join(rel)).is_ok()
    }
}

fn base_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("bin/", 0o755)
        .file_mode("bin/app", b"#!/bin/sh\necho hi\n", 0o755)
        .dir("etc/", 0o755)
        .file("etc/os-release", b"ID=test\n")
        .symlink("usr", ".")
        .build()
}

fn second_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("srv/", 0o750)
        .file("srv/data.txt", b"hello from layer two\n")
        .file("etc/os-release", b"ID=replaced\n")
        .hardlink("srv/same.txt", "srv/data.txt")
        .build()
}

// ---------------------------------------------------------------- formats

#[test]
fn oci_archive_with_gzip_and_zstd_layers() {
    let place = Place::new();
    let image = oci_image(&[(base_layer(), Comp::Gzip), (second_layer(), Comp::Zstd)]);
    let archive = image.write_tar(&place.input);
    let got = place.unpack(&archive).unwrap();

    assert_eq!(got.format, ImageFormat::OciArchive);
    assert_eq!(
        got.manifest_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(got.config_digest, image.config_digest);
    assert_eq!(
        got.diff_ids,
        vec![sha256(&base_layer()), sha256(&second_layer())]
    );
    assert_eq!(got.config.entrypoint, vec!["/bin/app"]);
    assert_eq!(got.config.cmd, vec!["--serve"]);
    assert_eq!(got.config.env, vec!["PATH=/bin", "MODE=test"]);
    assert_eq!(got.config.working_dir, "/srv");
    assert_eq!(got.config.user, "1000:1000");
    assert_eq!(got.config.exposed_ports, vec!["8080/tcp"]);

    assert_eq!(place.read("bin/app"), b"#!/bin/sh\necho hi\n");
    assert_eq!(place.read("etc/os-release"), b"ID=replaced\n");
    assert_eq!(place.read("srv/same.txt"), b"hello from layer two\n");
    let data = std::fs::metadata(place.dest().join("srv/data.txt")).unwrap();
    let same = std::fs::metadata(place.dest().join("srv/same.txt")).unwrap();
    assert_eq!(data.ino(), same.ino(), "a hard link, not a copy");
    assert_eq!(
        std::fs::read_link(place.dest().join("usr")).unwrap(),
        Path::new(".")
    );
    let mode = |p: &str| {
        std::fs::symlink_metadata(place.dest().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/app"), 0o755);
    assert_eq!(mode("srv"), 0o750);
    assert_eq!(got.stats.layers, 2);
    assert_eq!(got.stats.files, 4);
    assert_eq!(got.stats.symlinks, 1);
    assert_eq!(got.stats.hardlinks, 1);
    assert_eq!(got.stats.whiteouts, 0);
    // Only the destination, no staging directory.
    let left: Vec<_> = std::fs::read_dir(&place.out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["rootfs"]);
}

#[test]
fn oci_layout_directory_with_an_uncompressed_layer() {
    let place = Place::new();
    let image = oci_image(&[(base_layer(), Comp::Plain)]);
    let layout = image.write_dir(&place.input);
    let got = place.unpack(&layout).unwrap();
    assert_eq!(got.format, ImageFormat::OciDirectory);
    assert_eq!(place.read("etc/os-release"), b"ID=test\n");
    // Where only an archive file is taken (the agent's inbox), the same
    // directory is refused, naming it, and nothing is made.
    let files_only = Limits {
        archive_file_only: true,
        ..Limits::default()
    };
    let other = Place::new();
    let layout = image.write_dir(&other.input);
    let e = other
        .unpack_with(&layout, &files_only)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a directory, where an archive file is expected"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(other.dest()).is_err());
    // Not on the filesystem it must be on: refused, nothing made.
    let elsewhere = Limits {
        on_device: Some(u64::MAX),
        ..Limits::default()
    };
    let e = other
        .unpack_with(&layout, &elsewhere)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not on the filesystem it is expected on"), "{e}");
    assert!(std::fs::symlink_metadata(other.dest()).is_err());
    // The root is the engine's `/`: searchable by its uid whatever the
    // agent's umask (the lab node's UMask=0077 made it 0700 before).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(place.dest())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

/// `docker save` (before Docker 25): manifest.json, `<hex>.json` config,
/// `<id>/layer.tar`; a later duplicate layer is a symlink to the first.
#[test]
fn docker_archive() {
    let place = Place::new();
    let l1 = base_layer();
    let l2 = second_layer();
    let config = config_json(&[sha256(&l1), sha256(&l2), sha256(&l1)]);
    let config_name = format!("{}.json", hex_of(&sha256(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["test:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]
    }]))
    .unwrap();
    // The second layer gzip-compressed, as some tools write it: sniffed.
    let (l2_gz, _) = compress(&l2, Comp::Gzip);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        (&config_name[..], &config[..]),
        ("aaa/layer.tar", &l1[..]),
        ("bbb/layer.tar", &l2_gz[..]),
    ] {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar")
        .unwrap();
    let archive = place.input.join("docker.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();

    let got = place.unpack(&archive).unwrap();
    assert_eq!(got.format, ImageFormat::DockerArchive);
    assert_eq!(got.manifest_digest, None);
    assert_eq!(got.config_digest, sha256(&config));
    assert_eq!(got.stats.layers, 3);
    // The third layer (the first again) put the original os-release back.
    assert_eq!(place.read("etc/os-release"), b"ID=test\n");
    assert_eq!(place.read("srv/data.txt"), b"hello from layer two\n");
}

/// A docker-archive listing one layer many times reads it as many times:
/// the listed layers' sizes are summed against `max_archive_bytes`, as an
/// OCI manifest's are (before, nothing bounded them: a large layer of empty
/// compressed frames listed 128 times was read 128 times).
#[test]
fn docker_archive_layers_listed_again_count_again() {
    let place = Place::new();
    let l1 = base_layer();
    let n = 40;
    let config = config_json(&vec![sha256(&l1); n]);
    let config_name = format!("{}.json", hex_of(&sha256(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "Layers": vec!["a/layer.tar"; n],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        (&config_name[..], &config[..]),
        ("a/layer.tar", &l1[..]),
    ] {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    }
    let archive = place.input.join("docker.tar");
    let bytes = b.into_inner().unwrap();
    std::fs::write(&archive, &bytes).unwrap();
    // The archive itself is within the cap; its layer listed 40 times is not.
    let limits = Limits {
        max_archive_bytes: (bytes.len() + 10 * l1.len()) as u64,
        ..Limits::default()
    };
    let err = place.unpack_with(&archive, &limits).unwrap_err();
    assert!(
        matches!(err, ImageError::Cap { ref what, .. } if what.contains("listed twice")),
        "{err}"
    );
    place.assert_nothing_left();
    // Listed as often as fits, it unpacks.
    let got = place
        .unpack_with(
            &archive,
            &Limits {
                max_archive_bytes: (bytes.len() + n * l1.len()) as u64,
                ..Limits::default()
            },
        )
        .unwrap();
    assert_eq!(got.stats.layers, n);
}

#[test]
fn docker_archive_config_not_matching_its_name_is_refused() {
    let place = Place::new();
    let l1 = base_layer();
    let config = config_json(&[sha256(&l1)]);
    let wrong = format!("{}.json", hex_of(&sha256(b"something else")));
    let manifest =
        serde_json::to_vec(&serde_json::json!([{"Config": wrong, "Layers": ["a/layer.tar"]}]))
            .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        (&wrong[..], &config[..]),
        ("a/layer.tar", &l1[..]),
    ] {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    let archive = place.input.join("docker.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = place.unpack(&archive).unwrap_err();
    assert!(
        matches!(err, ImageError::DigestMismatch { ref what, .. } if what.contains("config")),
        "{err}"
    );
    place.assert_nothing_left();
}

#[test]
fn neither_format_is_refused() {
    let place = Place::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_ustar();
    h.set_size(5);
    b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
    let archive = place.input.join("x.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = place.unpack(&archive).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat { .. }), "{err}");

    std::fs::write(&archive, b"this is not a tar file at all, just some words").unwrap();
    let err = place.unpack(&archive).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::BadArchive { .. } | ImageError::UnknownFormat { .. }
        ),
        "{err}"
    );
    place.assert_nothing_left();
}

#[test]
fn existing_destination_is_refused() {
    let place = Place::new();
    let archive = oci_image(&[(base_layer(), Comp::Gzip)]).write_tar(&place.input);
    std::fs::create_dir(place.dest()).unwrap();
    let err = place.unpack(&archive).unwrap_err();
    assert!(matches!(err, ImageError::Destination { .. }), "{err}");
}

// ---------------------------------------------------------------- platforms

/// index.json → an OCI index listing arm64 and amd64 (as `podman save` of a
/// multi-arch image writes it): the amd64 one is unpacked.
#[test]
fn index_with_several_platforms_selects_linux_amd64() {
    let place = Place::new();
    let mut files = BTreeMap::new();
    let arm = LayerTar::new().file("arch", b"arm64\n").build();
    let amd = LayerTar::new().file("arch", b"amd64\n").build();
    let (arm_manifest, _, _) = add_manifest(&mut files, &[(arm, Comp::Gzip)]);
    let (amd_manifest, amd_config, _) = add_manifest(&mut files, &[(amd, Comp::Zstd)]);
    let platform = |arch: &str, m: &[u8]| {
        let mut d = descriptor(OCI_MANIFEST, m);
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        d
    };
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [platform("arm64", &arm_manifest), platform("amd64", &amd_manifest)],
    }))
    .unwrap();
    files.insert(
        format!("blobs/sha256/{}", hex_of(&sha256(&inner))),
        inner.clone(),
    );
    let top = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [descriptor(OCI_INDEX, &inner)],
    }))
    .unwrap();
    files.insert("index.json".into(), top);
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let image = Image {
        files,
        manifest_digest: sha256(&amd_manifest),
        config_digest: amd_config,
        layer_blobs: vec![],
    };
    let got = place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_eq!(
        got.manifest_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(got.config_digest, image.config_digest);
    assert_eq!(place.read("arch"), b"amd64\n");
}

#[test]
fn index_without_linux_amd64_lists_what_it_offers() {
    let place = Place::new();
    let mut files = BTreeMap::new();
    let (m1, _, _) = add_manifest(
        &mut files,
        &[(LayerTar::new().file("a", b"1").build(), Comp::Gzip)],
    );
    let (m2, _, _) = add_manifest(
        &mut files,
        &[(LayerTar::new().file("a", b"2").build(), Comp::Gzip)],
    );
    let mut d1 = descriptor(OCI_MANIFEST, &m1);
    d1["platform"] = serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"});
    let mut d2 = descriptor(OCI_MANIFEST, &m2);
    d2["platform"] = serde_json::json!({"os": "linux", "architecture": "s390x"});
    files.insert(
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [d1, d2]}))
            .unwrap(),
    );
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let image = Image {
        files,
        manifest_digest: String::new(),
        config_digest: String::new(),
        layer_blobs: vec![],
    };
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    match &err {
        ImageError::NoPlatform { offered } => assert_eq!(offered, "linux/arm/v7, linux/s390x"),
        other => panic!("{other}"),
    }
    place.assert_nothing_left();
}

// ---------------------------------------------------------------- digests

#[test]
fn a_flipped_layer_byte_is_refused_naming_the_layer() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip), (second_layer(), Comp::Zstd)]);
    let name = image.layer_blobs[1].clone();
    let blob = image.files.get_mut(&name).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0x01;
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    match &err {
        ImageError::DigestMismatch { what, expected, .. } => {
            assert!(what.starts_with("layer 2"), "{what}");
            assert_eq!(
                expected,
                &format!("sha256:{}", name.rsplit('/').next().unwrap())
            );
        }
        other => panic!("{other}"),
    }
    place.assert_nothing_left();
}

#[test]
fn a_flipped_config_or_manifest_byte_is_refused() {
    for target in ["config", "manifest"] {
        let place = Place::new();
        let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
        let digest = if target == "config" {
            image.config_digest.clone()
        } else {
            image.manifest_digest.clone()
        };
        let blob = image
            .files
            .get_mut(&format!("blobs/sha256/{}", hex_of(&digest)))
            .unwrap();
        // Same length, different content: "amd64" → "amd65" or a space.
        let last = blob.len() - 2;
        blob[last] ^= 0x20;
        let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
        assert!(
            matches!(err, ImageError::DigestMismatch { ref what, .. } if what.starts_with(target)),
            "{err}"
        );
        place.assert_nothing_left();
    }
}

#[test]
fn a_blob_longer_than_its_descriptor_is_refused() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
    let name = image.layer_blobs[0].clone();
    image.files.get_mut(&name).unwrap().push(0);
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    match &err {
        ImageError::SizeMismatch {
            what,
            expected,
            actual,
        } => {
            assert!(what.starts_with("layer 1"), "{what}");
            assert_eq!(*actual, expected + 1);
        }
        other => panic!("{other}"),
    }
    place.assert_nothing_left();
}

/// The compressed blob matches its descriptor but the config's diff_id does
/// not match the uncompressed tar: refused after unpacking into staging,
/// and the staging directory is gone.
#[test]
fn a_wrong_diff_id_is_refused_and_staging_removed() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
    // Rewrite config with a wrong diff_id, and the manifest and index after it.
    let layer_name = image.layer_blobs[0].clone();
    let blob = image.files[&layer_name].clone();
    let config = config_json(&[sha256(b"not the layer")]);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &blob)],
    }))
    .unwrap();
    image
        .files
        .insert(format!("blobs/sha256/{}", hex_of(&sha256(&config))), config);
    image.files.insert(
        format!("blobs/sha256/{}", hex_of(&sha256(&manifest))),
        manifest.clone(),
    );
    image.files.insert(
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [descriptor(OCI_MANIFEST, &manifest)]})).unwrap(),
    );
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(
        matches!(err, ImageError::DigestMismatch { ref what, .. } if what.contains("diff_id")),
        "{err}"
    );
    place.assert_nothing_left();
}

#[test]
fn digest_algorithms_other_than_sha256_are_refused() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
    let manifest = image.files[&format!("blobs/sha256/{}", hex_of(&image.manifest_digest))].clone();
    let sha512 = format!("sha512:{}", "ab".repeat(64));
    image.files.insert(
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha512, "size": manifest.len()}
        ]}))
        .unwrap(),
    );
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(matches!(err, ImageError::DigestAlgorithm { .. }), "{err}");
}

#[test]
fn a_truncated_archive_is_refused_and_nothing_left() {
    let place = Place::new();
    let image = oci_image(&[(base_layer(), Comp::Gzip), (second_layer(), Comp::Zstd)]);
    let full = image.tar();
    // Cut at several points: inside blobs, inside headers, inside index.json.
    // (A cut that loses only the end-of-archive blocks loses nothing the
    // image needs; that one unpacks.)
    for cut in [
        full.len() / 4,
        full.len() / 2,
        full.len() * 3 / 4,
        full.len() - 2048 - 100,
    ] {
        let archive = place.input.join("cut.tar");
        std::fs::write(&archive, &full[..cut]).unwrap();
        let err = place.unpack(&archive).unwrap_err();
        println!("cut at {cut}: {err}");
        place.assert_nothing_left();
    }
}

#[test]
fn an_unknown_layer_media_type_is_refused() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
    let key = format!("blobs/sha256/{}", hex_of(&image.manifest_digest));
    let text = String::from_utf8(image.files[&key].clone()).unwrap();
    let manifest = text.replace("tar+gzip", "tar+gzip+encrypted").into_bytes();
    image.files.insert(
        format!("blobs/sha256/{}", hex_of(&sha256(&manifest))),
        manifest.clone(),
    );
    image.files.insert(
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [descriptor(OCI_MANIFEST, &manifest)]})).unwrap(),
    );
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(matches!(err, ImageError::MediaType { .. }), "{err}");
}

// ---------------------------------------------------------------- whiteouts

#[test]
fn whiteouts_and_opaque_whiteouts_across_two_layers() {
    let place = Place::new();
    let lower = LayerTar::new()
        .dir("a/", 0o755)
        .file("a/gone", b"x")
        .file("a/kept", b"y")
        .dir("a/sub/", 0o755)
        .file("a/sub/deep", b"z")
        .dir("b/", 0o755)
        .file("b/old1", b"1")
        .dir("b/olddir/", 0o755)
        .file("b/olddir/old2", b"2")
        .file("top", b"t")
        .build();
    let upper = LayerTar::new()
        .file("a/.wh.gone", b"")
        .file("a/.wh.sub", b"")
        .file(".wh.top", b"")
        // Written before the opaque marker in the same layer: kept.
        .dir("b/", 0o755)
        .file("b/new/inner", b"n")
        .file("b/.wh..wh..opq", b"")
        .file("b/after", b"a")
        .file(".wh.never-existed", b"")
        .build();
    let image = oci_image(&[(lower, Comp::Gzip), (upper, Comp::Zstd)]);
    let got = place.unpack(&image.write_tar(&place.input)).unwrap();
    assert!(!place.exists("a/gone"));
    assert!(!place.exists("a/sub"));
    assert!(!place.exists("top"));
    assert_eq!(place.read("a/kept"), b"y");
    assert!(!place.exists("b/old1"));
    assert!(!place.exists("b/olddir"));
    assert_eq!(place.read("b/new/inner"), b"n");
    assert_eq!(place.read("b/after"), b"a");
    assert!(!place.exists("a/.wh.gone"));
    assert!(!place.exists("b/.wh..wh..opq"));
    assert_eq!(got.stats.whiteouts, 4);
    assert_eq!(got.stats.opaque_whiteouts, 1);
}

// ---------------------------------------------------------------- escapes

/// A directory outside the root that the image tries to write into.
fn outside() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn assert_untouched(dir: &Path) {
    let inside: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        inside.is_empty(),
        "the image wrote outside its root: {inside:?}"
    );
}

#[test]
fn absolute_symlink_then_write_through_it_stays_inside() {
    let outside = outside();
    let target = outside.path().to_str().unwrap().to_owned();
    let place = Place::new();
    // Layer 1 plants `a -> /<outside>` and `e -> /etc`; layer 2 writes
    // through both. Within one layer too (`c`).
    let l1 = LayerTar::new()
        .symlink("a", &target)
        .symlink("e", "/etc")
        .build();
    let l2 = LayerTar::new()
        .file("a/pwned", b"gotcha")
        .file("e/leasehold-escape-test", b"gotcha")
        .symlink("c", &target)
        .file("c/pwned2", b"gotcha")
        .build();
    let image = oci_image(&[(l1, Comp::Gzip), (l2, Comp::Gzip)]);
    place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_untouched(outside.path());
    assert!(!Path::new("/etc/leasehold-escape-test").exists());
    // Neutralised: the writes landed inside the root, where the engine sees
    // them through its own `/`.
    let inside = place.dest().join(target.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside.join("pwned")).unwrap(), b"gotcha");
    assert_eq!(std::fs::read(inside.join("pwned2")).unwrap(), b"gotcha");
    assert!(place.dest().join("etc/leasehold-escape-test").exists());
    // The symlinks themselves are kept verbatim.
    assert_eq!(
        std::fs::read_link(place.dest().join("a")).unwrap(),
        Path::new(&target)
    );
}

#[test]
fn relative_symlink_climbing_out_stays_inside() {
    let outside = outside();
    let place = Place::new();
    let depth = "../".repeat(30);
    let l1 = LayerTar::new()
        .dir("x/", 0o755)
        .symlink("x/up", &depth)
        .symlink("loop1", "loop2")
        .symlink("loop2", "loop1")
        .build();
    let rel = format!("x/up{}/pwned", outside.path().display());
    let l2 = LayerTar::new().file(&rel, b"gotcha").build();
    let image = oci_image(&[(l1, Comp::Zstd), (l2, Comp::Zstd)]);
    place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_untouched(outside.path());
    let inside = place
        .dest()
        .join(outside.path().strip_prefix("/").unwrap())
        .join("pwned");
    assert!(inside.exists());

    // A symlink loop is refused, not followed forever.
    let place = Place::new();
    let l1 = LayerTar::new()
        .symlink("loop1", "loop2")
        .symlink("loop2", "loop1")
        .build();
    let l2 = LayerTar::new().file("loop1/x", b"x").build();
    let image = oci_image(&[(l1, Comp::Zstd), (l2, Comp::Zstd)]);
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(matches!(err, ImageError::Entry { layer: 2, .. }), "{err}");
    place.assert_nothing_left();
}

#[test]
fn dotdot_paths_are_refused() {
    for path in ["../pwned", "a/../../pwned", "./../../../../tmp/pwned"] {
        let place = Place::new();
        let l1 = LayerTar::new()
            .dir("a/", 0o755)
            .file(path, b"gotcha")
            .build();
        let image = oci_image(&[(l1, Comp::Gzip)]);
        let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
        match &err {
            ImageError::Entry {
                layer: 1,
                entry,
                reason,
            } => {
                assert_eq!(entry, path);
                assert!(reason.contains(".."), "{reason}");
            }
            other => panic!("{path}: {other}"),
        }
        place.assert_nothing_left();
    }
}

#[test]
fn absolute_entry_paths_are_taken_inside_the_root() {
    let outside = outside();
    let place = Place::new();
    let abs = format!("{}/pwned", outside.path().display());
    let l1 = LayerTar::new().file(&abs, b"inside").build();
    let image = oci_image(&[(l1, Comp::Gzip)]);
    place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_untouched(outside.path());
    assert_eq!(place.read(abs.trim_start_matches('/')), b"inside");
}

#[test]
fn hard_links_to_outside_or_to_nothing_are_refused() {
    let outside = outside();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    let secret = secret.to_str().unwrap().to_owned();
    for link in [
        secret.as_str(),
        "../../../../../../etc/passwd",
        "not-unpacked",
        "dir",
    ] {
        let place = Place::new();
        let l1 = LayerTar::new()
            .dir("dir/", 0o755)
            .symlink("sym", &secret)
            .hardlink("stolen", link)
            .build();
        let image = oci_image(&[(l1, Comp::Gzip)]);
        let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
        assert!(
            matches!(err, ImageError::Entry { layer: 1, ref entry, .. } if entry == "stolen"),
            "{link}: {err}"
        );
        place.assert_nothing_left();
    }
    // Through a symlink planted earlier: the link resolves inside the root,
    // where there is no such file.
    let place = Place::new();
    let l1 = LayerTar::new()
        .symlink("host", outside.path().to_str().unwrap())
        .build();
    let l2 = LayerTar::new().hardlink("stolen", "host/secret").build();
    let image = oci_image(&[(l1, Comp::Gzip), (l2, Comp::Gzip)]);
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(matches!(err, ImageError::Entry { layer: 2, .. }), "{err}");
    place.assert_nothing_left();
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"host secret"
    );
}

#[test]
fn setuid_stripped_devices_skipped_owners_recorded() {
    let place = Place::new();
    let mut l1 = LayerTar::new()
        .file_mode("bin/su", b"\x7fELF", 0o4755)
        .file_mode("bin/wall", b"\x7fELF", 0o2755)
        .dir("tmp/", 0o1777)
        .file_mode("etc/shadow", b"root:*:", 0o640)
        .raw(EntryType::Char, "dev/null", "", 0o666, b"")
        .raw(EntryType::Block, "dev/sda", "", 0o660, b"")
        .raw(EntryType::Fifo, "run/fifo", "", 0o600, b"");
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(2);
    h.set_mode(0o600);
    h.set_uid(1000);
    h.set_gid(1000);
    l1.builder
        .append_data(&mut h, "home/user/notes", &b"hi"[..])
        .unwrap();
    let image = oci_image(&[(l1.build(), Comp::Zstd)]);
    let got = place.unpack(&image.write_tar(&place.input)).unwrap();
    let mode = |p: &str| {
        std::fs::symlink_metadata(place.dest().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/su"), 0o755);
    assert_eq!(mode("bin/wall"), 0o755);
    assert_eq!(mode("tmp"), 0o1777, "the sticky bit is kept");
    assert_eq!(mode("etc/shadow"), 0o640);
    assert!(!place.exists("dev/null") && !place.exists("dev/sda") && !place.exists("run/fifo"));
    assert_eq!(got.stats.setid_stripped, 2);
    assert_eq!(got.stats.skipped_devices, 3);
    assert_eq!(got.stats.non_root_owned, 1);
    assert_eq!(got.owners.get("home/user/notes"), Some(&(1000, 1000)));
    // Owned by whoever unpacked, not by the image's uid.
    let meta = std::fs::metadata(place.dest().join("home/user/notes")).unwrap();
    assert_eq!(meta.uid(), std::fs::metadata(&place.out).unwrap().uid());
}

// ---------------------------------------------------------------- caps

fn expect_cap(result: Result<UnpackedImage, ImageError>, what: &str) {
    match result {
        Err(ImageError::Cap { what: w, .. }) => assert!(w.contains(what), "{w} (wanted {what})"),
        Err(other) => panic!("wanted a cap on {what}, got {other}"),
        Ok(_) => panic!("wanted a cap on {what}, got success"),
    }
}

#[test]
fn caps_refuse_oversize_images() {
    let image = oci_image(&[(base_layer(), Comp::Gzip), (second_layer(), Comp::Zstd)]);
    let cases: Vec<(Limits, &str)> = vec![
        (
            Limits {
                max_archive_bytes: 1024,
                ..Limits::default()
            },
            "archive size",
        ),
        (
            Limits {
                max_archive_entries: 3,
                ..Limits::default()
            },
            "entries in the archive",
        ),
        (
            Limits {
                max_json_bytes: 64,
                ..Limits::default()
            },
            "index.json",
        ),
        (
            Limits {
                max_layers: 1,
                ..Limits::default()
            },
            "layers",
        ),
        (
            Limits {
                max_entries: 4,
                ..Limits::default()
            },
            "entries in all layers",
        ),
        (
            Limits {
                max_unpacked_bytes: 4096,
                ..Limits::default()
            },
            "uncompressed layer bytes",
        ),
    ];
    for (limits, what) in cases {
        let place = Place::new();
        expect_cap(
            place.unpack_with(&image.write_tar(&place.input), &limits),
            what,
        );
        place.assert_nothing_left();
    }
}

/// 64 MiB of zeros compress to a few kilobytes: a bomb is stopped at the cap.
#[test]
fn a_decompression_bomb_stops_at_the_cap() {
    let zeros = vec![0u8; 64 << 20];
    let bomb = LayerTar::new().file("zeros", &zeros).build();
    drop(zeros);
    for comp in [Comp::Gzip, Comp::Zstd] {
        let place = Place::new();
        let image = oci_image(&[(bomb.clone(), comp)]);
        let archive = image.write_tar(&place.input);
        assert!(std::fs::metadata(&archive).unwrap().len() < 1 << 20);
        let limits = Limits {
            max_unpacked_bytes: 8 << 20,
            ..Limits::default()
        };
        expect_cap(
            place.unpack_with(&archive, &limits),
            "uncompressed layer bytes",
        );
        place.assert_nothing_left();
    }
}

#[test]
fn long_paths_are_capped() {
    let long = format!("{}/file", "d".repeat(200));
    let l1 = LayerTar::new().long_file(&long, b"x").build();
    let image = oci_image(&[(l1, Comp::Gzip)]);
    let place = Place::new();
    let limits = Limits {
        max_path_bytes: 128,
        ..Limits::default()
    };
    expect_cap(
        place.unpack_with(&image.write_tar(&place.input), &limits),
        "path length",
    );
    place.assert_nothing_left();
    // Within the default cap it unpacks.
    let place = Place::new();
    place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_eq!(place.read(&long), b"x");
}

#[test]
fn the_baseline_amd64_is_preferred_over_a_variant() {
    let place = Place::new();
    let mut files = BTreeMap::new();
    let v3 = LayerTar::new().file("which", b"v3").build();
    let base = LayerTar::new().file("which", b"baseline").build();
    let (m_v3, _, _) = add_manifest(&mut files, &[(v3, Comp::Gzip)]);
    let (m_base, _, _) = add_manifest(&mut files, &[(base, Comp::Gzip)]);
    let mut d1 = descriptor(OCI_MANIFEST, &m_v3);
    d1["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64", "variant": "v3"});
    let mut d2 = descriptor(OCI_MANIFEST, &m_base);
    d2["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut d3 = descriptor(OCI_MANIFEST, &m_base);
    d3["platform"] = serde_json::json!({"os": "unknown", "architecture": "unknown"});
    files.insert(
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [d1, d2, d3]}))
            .unwrap(),
    );
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let image = Image {
        files,
        manifest_digest: sha256(&m_base),
        config_digest: String::new(),
        layer_blobs: vec![],
    };
    let got = place.unpack(&image.write_dir(&place.input)).unwrap();
    assert_eq!(
        got.manifest_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(place.read("which"), b"baseline");
}

/// A directory removed by a later layer and made again implicitly does not
/// get the removed one's mode back; a read-only directory in a lower layer
/// does not stop a higher one from writing into it.
#[test]
fn directory_modes_are_applied_at_the_end() {
    let place = Place::new();
    let l1 = LayerTar::new()
        .dir("ro/", 0o555)
        .dir("gone/", 0o700)
        .build();
    let l2 = LayerTar::new()
        .file("ro/new", b"n")
        .file(".wh.gone", b"")
        .file("gone/again", b"a")
        .build();
    let image = oci_image(&[(l1, Comp::Gzip), (l2, Comp::Gzip)]);
    place.unpack(&image.write_tar(&place.input)).unwrap();
    let mode = |p: &str| {
        std::fs::symlink_metadata(place.dest().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(place.read("ro/new"), b"n");
    assert_ne!(mode("gone"), 0o700);
}

// ---------------------------------------------------------------- property

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Names unlikely to exist at the host's `/`, so an escape is visible.
    const NAMES: [&str; 3] = ["lhq1", "lhq2", "lhq3"];

    #[derive(Debug, Clone)]
    enum Op {
        Dir(Vec<usize>),
        File(Vec<usize>),
        Symlink(Vec<usize>, usize),
        Hardlink(Vec<usize>, Vec<usize>),
        Whiteout(Vec<usize>),
        Opaque(Vec<usize>),
    }

    fn path() -> impl Strategy<Value = Vec<usize>> {
        // 0..3: a name; 4: the outside directory's absolute path. (`..` in
        // an entry name is always refused, tested above: it would only make
        // most cases stop at the first entry. Symlink targets climb.)
        prop::collection::vec(prop_oneof![8 => 0usize..3, 1 => Just(4usize)], 1..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => path().prop_map(Op::Dir),
            4 => path().prop_map(Op::File),
            4 => (path(), 0usize..7).prop_map(|(p, t)| Op::Symlink(p, t)),
            1 => (path(), path()).prop_map(|(p, t)| Op::Hardlink(p, t)),
            1 => path().prop_map(Op::Whiteout),
            1 => path().prop_map(Op::Opaque),
        ]
    }

    fn render(p: &[usize], outside: &str) -> String {
        p.iter()
            .map(|&i| match i {
                0..=2 => NAMES[i].to_owned(),
                _ => outside.trim_start_matches('/').to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    fn target(t: usize, outside: &str) -> String {
        match t {
            0 => "lhq1".to_owned(),
            1 => "../..".to_owned(),
            2 => "../".repeat(20),
            3 => outside.to_owned(),
            4 => format!("{outside}/lhq1"),
            5 => "lhq2/lhq3".to_owned(),
            _ => ".".to_owned(),
        }
    }

    fn layer(ops: &[Op], outside: &str) -> Vec<u8> {
        let mut t = LayerTar::new();
        for op in ops {
            t = match op {
                Op::Dir(p) => t.dir(&render(p, outside), 0o755),
                // Files get their own leaf name, so that the names above are
                // left to directories and symlinks, the escape routes.
                Op::File(p) => t.file(&format!("{}/lhqf", render(p, outside)), b"x"),
                Op::Symlink(p, to) => t.symlink(&render(p, outside), &target(*to, outside)),
                Op::Hardlink(p, to) => t.hardlink(
                    &format!("{}/lhqh", render(p, outside)),
                    &format!("{}/lhqf", render(to, outside)),
                ),
                Op::Whiteout(p) => {
                    let r = render(p, outside);
                    let (dir, name) = r.rsplit_once('/').unwrap_or(("", &r));
                    let wh = if dir.is_empty() {
                        format!(".wh.{name}")
                    } else {
                        format!("{dir}/.wh.{name}")
                    };
                    t.file(&wh, b"")
                }
                Op::Opaque(p) => t.file(&format!("{}/.wh..wh..opq", render(p, outside)), b""),
            };
        }
        t.build()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Whatever the entries, nothing is written outside the root, and an
        /// error is a refused entry with nothing left behind.
        #[test]
        fn hostile_layers_never_escape(layers in prop::collection::vec(prop::collection::vec(op(), 1..12), 1..4)) {
            let outside = tempfile::tempdir().unwrap();
            let out_str = outside.path().to_str().unwrap().to_owned();
            // Keep paths under the tar header's 100 bytes.
            prop_assume!(out_str.len() < 24);
            let place = Place::new();
            let tars: Vec<_> = layers.iter().map(|ops| (layer(ops, &out_str), Comp::Gzip)).collect();
            let image = oci_image(&tars);
            match place.unpack(&image.write_tar(&place.input)) {
                Ok(_) => {}
                Err(ImageError::Entry { .. }) => place.assert_nothing_left(),
                Err(other) => prop_assert!(false, "unexpected error: {}", other),
            }
            assert_untouched(outside.path());
            for name in NAMES.iter().chain(&["lhqf", "lhqh"]) {
                prop_assert!(!Path::new("/").join(name).exists(), "/{} was written", name);
            }
        }
    }
}

// ---------------------------------------------------------------- T1: real tools

/// T1: archives written by skopeo itself (oci-archive with gzip and zstd
/// layers, docker-archive, oci: layout directory) from a `dir:` image made
/// here. skopeo is a build prerequisite (scripts/install-deps): without it
/// this test fails, saying so, rather than passing without checking.
#[test]
fn real_skopeo_archives() {
    let version = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!("skopeo cannot be run ({e}): scripts/install-deps installs it (apt-get install skopeo)")
        });
    println!("{}", String::from_utf8_lossy(&version.stdout).trim());
    let tmp = tempfile::tempdir().unwrap();
    // A `dir:` transport image: manifest.json, version and blobs by hex.
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let l1 = base_layer();
    let l2 = LayerTar::new()
        .file("etc/.wh.os-release", b"")
        .file("srv/data.txt", b"from skopeo\n")
        .build();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in [&l1, &l2] {
        let (gz, media) = compress(l, Comp::Gzip);
        diff_ids.push(sha256(l));
        layer_descs.push(descriptor(media, &gz));
        std::fs::write(src.join(hex_of(&sha256(&gz))), &gz).unwrap();
    }
    let config = config_json(&diff_ids);
    std::fs::write(src.join(hex_of(&sha256(&config))), &config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layer_descs,
    }))
    .unwrap();
    std::fs::write(src.join("manifest.json"), &manifest).unwrap();
    std::fs::write(src.join("version"), "Directory Transport Version: 1.1\n").unwrap();

    let source = format!("dir:{}", src.display());
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "oci-archive gzip",
            format!("oci-archive:{}/gz.tar:test:1", tmp.path().display()),
            &[],
        ),
        (
            "oci-archive zstd",
            format!("oci-archive:{}/zstd.tar:test:1", tmp.path().display()),
            &["--dest-compress-format", "zstd", "--dest-compress"],
        ),
        (
            "docker-archive",
            format!("docker-archive:{}/docker.tar:test:1", tmp.path().display()),
            &[],
        ),
        (
            "oci layout",
            format!("oci:{}/layout:test", tmp.path().display()),
            &[],
        ),
    ];
    for (label, dest, extra) in cases {
        let status = std::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .args(extra)
            .arg(&source)
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success(), "{label}: skopeo copy failed");
        let input = dest.split(':').nth(1).unwrap();
        if label.contains("zstd") {
            // The manifest inside the archive is plain JSON: the layers were
            // recompressed with zstd.
            let bytes = std::fs::read(input).unwrap();
            let needle = b"application/vnd.oci.image.layer.v1.tar+zstd";
            assert!(
                bytes.windows(needle.len()).any(|w| w == needle),
                "{label}: no zstd layer"
            );
        }
        let place = Place::new();
        let got = place
            .unpack(Path::new(input))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        println!(
            "{label}: {:?}, {} layers, {} files",
            got.format, got.stats.layers, got.stats.files
        );
        assert_eq!(got.config.entrypoint, vec!["/bin/app"], "{label}");
        assert_eq!(got.diff_ids, diff_ids, "{label}");
        assert_eq!(place.read("bin/app"), b"#!/bin/sh\necho hi\n", "{label}");
        assert_eq!(place.read("srv/data.txt"), b"from skopeo\n", "{label}");
        assert!(!place.exists("etc/os-release"), "{label}: whiteout applied");
    }
}

/// The input sits in a tenant's inbox: a symlink there (to any file the
/// agent could read) or a FIFO (which would block the agent) is refused.
#[test]
fn a_symlink_or_fifo_as_input_is_refused() {
    let place = Place::new();
    let real = oci_image(&[(base_layer(), Comp::Gzip)]).write_tar(&place.input);
    let link = place.input.join("link.tar");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = place.unpack(&link).unwrap_err();
    assert!(
        matches!(err, ImageError::BadArchive { ref reason, .. } if reason.contains("symbolic link")),
        "{err}"
    );
    let fifo = place.input.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = place.unpack(&fifo).unwrap_err();
    assert!(matches!(err, ImageError::BadArchive { .. }), "{err}");
    place.assert_nothing_left();
}

#[test]
fn whiteouts_of_dot_or_dotdot_are_refused() {
    for name in ["etc/.wh..", "etc/.wh...", ".wh."] {
        let place = Place::new();
        let l2 = LayerTar::new().file(name, b"").build();
        let image = oci_image(&[(base_layer(), Comp::Gzip), (l2, Comp::Gzip)]);
        let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
        assert!(
            matches!(err, ImageError::Entry { layer: 2, .. }),
            "{name}: {err}"
        );
        place.assert_nothing_left();
    }
}

/// PAX records (what Go's archive/tar, hence Docker and BuildKit, writes
/// for long or non-ASCII names) set the path and link target; a PAX `path`
/// with `..` is refused like any other; a PAX `size` that disagrees with the
/// header is refused.
#[test]
fn pax_records_are_applied_and_checked() {
    let name = format!("srv/{}/é-file", "p".repeat(150));
    let mut l1 = LayerTar::new();
    l1.builder
        .append_pax_extensions([("path", name.as_bytes())])
        .unwrap();
    l1 = l1.file("placeholder", b"pax");
    l1.builder
        .append_pax_extensions([("linkpath", name.as_bytes())])
        .unwrap();
    l1 = l1.symlink("link", "placeholder");
    let image = oci_image(&[(l1.build(), Comp::Gzip)]);
    let place = Place::new();
    place.unpack(&image.write_tar(&place.input)).unwrap();
    assert_eq!(place.read(&name), b"pax");
    assert!(!place.exists("placeholder"));
    assert_eq!(
        std::fs::read_link(place.dest().join("link")).unwrap(),
        Path::new(&name)
    );

    let mut l1 = LayerTar::new();
    l1.builder
        .append_pax_extensions([("path", &b"a/../../escape"[..])])
        .unwrap();
    let image = oci_image(&[(l1.file("harmless", b"x").build(), Comp::Gzip)]);
    let place = Place::new();
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(
        matches!(err, ImageError::Entry { ref entry, .. } if entry == "a/../../escape"),
        "{err}"
    );
    place.assert_nothing_left();

    let mut l1 = LayerTar::new();
    l1.builder
        .append_pax_extensions([("size", &b"9999999999999"[..])])
        .unwrap();
    let image = oci_image(&[(l1.file("f", b"x").build(), Comp::Gzip)]);
    let place = Place::new();
    assert!(place.unpack(&image.write_tar(&place.input)).is_err());
    place.assert_nothing_left();
}

#[test]
fn a_blob_missing_from_the_archive_is_named() {
    let place = Place::new();
    let mut image = oci_image(&[(base_layer(), Comp::Gzip)]);
    let name = image.layer_blobs[0].clone();
    image.files.remove(&name);
    let err = place.unpack(&image.write_tar(&place.input)).unwrap_err();
    assert!(
        matches!(err, ImageError::Missing { name: ref n } if *n == name),
        "{err}"
    );
    place.assert_nothing_left();
}

/// An unpack stopped by its flag ends with `Aborted` and leaves nothing:
/// the flag set before (nothing is made), and set while it writes (when
/// the staging directory appears, seen through inotify).
#[test]
fn an_abort_stops_the_unpack_and_leaves_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use leasehold_engines::image::unpack_image_abortable;
    use rustix::fs::inotify;

    let place = Place::new();
    let mut layer = LayerTar::new();
    for i in 0..50_000 {
        layer = layer.file(&format!("d/f{i}"), b"x");
    }
    let image = oci_image(&[(layer.build(), Comp::Gzip)]);
    let archive = image.write_tar(&place.input);

    let set = AtomicBool::new(true);
    let r = unpack_image_abortable(&archive, &place.dest(), &Limits::default(), &set);
    assert!(matches!(r, Err(ImageError::Aborted)), "{r:?}");
    assert_eq!(
        ImageError::Aborted.to_string(),
        "stopped before it finished; nothing was kept"
    );
    place.assert_nothing_left();

    let abort = Arc::new(AtomicBool::new(false));
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, &place.out, inotify::WatchFlags::CREATE).unwrap();
    let watcher = {
        let abort = abort.clone();
        std::thread::spawn(move || {
            let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
            let mut events = inotify::Reader::new(&fd, &mut buf);
            let name = events.next().unwrap().file_name().map(|n| n.to_owned());
            abort.store(true, Ordering::SeqCst);
            name
        })
    };
    let r = unpack_image_abortable(&archive, &place.dest(), &Limits::default(), &abort);
    let created = watcher.join().unwrap();
    assert!(
        format!("{created:?}").contains(".rootfs.unpacking-"),
        "{created:?}"
    );
    assert!(matches!(r, Err(ImageError::Aborted)), "{r:?}");
    place.assert_nothing_left();
}
