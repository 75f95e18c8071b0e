//! OCI image archives made in a test, no registry: one uncompressed layer
//! from a directory, a config, a manifest and an index, tarred as
//! `skopeo copy oci-archive:` would write them.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn tar(dir: &Path, out: &Path, what: &[String]) {
    let o = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(what)
        .output()
        .expect("tar");
    assert!(
        o.status.success(),
        "tar {}: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes `<work>/image.tar`, an OCI archive whose one layer holds the
/// files under `root` (linux/amd64, `PATH=/bin:/usr/bin:/usr/sbin`), and
/// returns its path. `work` is emptied first and must not contain `root`.
pub fn archive(work: &Path, root: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).unwrap();
    let layer_tar = work.join("layer.tar");
    let mut top: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    tar(root, &layer_tar, &top);
    let layer = std::fs::read(&layer_tar).unwrap();
    let desc = |media: &str, b: &[u8]| serde_json::json!({"mediaType": media, "digest": format!("sha256:{}", sha256_hex(b)), "size": b.len()});
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin:/usr/sbin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    let oci = work.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(oci.join("index.json"), &index).unwrap();
    for b in [&layer, &config, &manifest] {
        std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
    }
    let out = work.join("image.tar");
    tar(
        &oci,
        &out,
        &["oci-layout".into(), "index.json".into(), "blobs".into()],
    );
    out
}
