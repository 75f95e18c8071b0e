//! R12, issue 6: the disk-key chain takes one more link (a sub-tenant key)
//! without a new design, and a volume made under a three-link key accepts
//! that key only: not the two-link key, not another sub-tenant key, not
//! the links in another order or of another generation. The check is the
//! volume's key check value, which the agent tests before it maps the
//! device (`VolumeMeta::check_key`), so a refused key writes nothing.

use leasehold_storage::meta::{VolumeMeta, VolumeState, FORMAT};
use leasehold_tpm::chain::{derive_disk_key, Link};
use leasehold_tpm::SymmetricKey;

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes([b; 32])
}

fn link<'a>(label: &'a str, key_generation: u64, key: &'a SymmetricKey) -> Link<'a> {
    Link {
        label,
        key_generation,
        key,
    }
}

#[test]
fn a_third_link_opens_the_volume_only_with_all_three() {
    let node = b"node-0123456789a";
    let (kl, kt, ks, other) = (key(1), key(2), key(3), key(4));
    let three = [
        link("landlord", 1, &kl),
        link("tenant", 2, &kt),
        link("sub-tenant", 1, &ks),
    ];
    let disk = derive_disk_key(node, &three).unwrap();
    let generations: Vec<(String, u64)> = three
        .iter()
        .map(|l| (l.label.to_owned(), l.key_generation))
        .collect();
    let meta = VolumeMeta {
        signatures_checked: false,
        init_signature: None,
        tail_mark: None,
        format: FORMAT,
        id: "0f0e0d0c0b0a09080706050403020100".into(),
        node_id: hex_node(node),
        device: "/dev/disk/by-id/virtio-leasehold-tenant".into(),
        size_bytes: 512 << 20,
        sector_size: 4096,
        cipher: "aes-xts-plain64".into(),
        key_bytes: 64,
        options: vec!["sector_size:4096".into()],
        filesystem: "ext4".into(),
        key_generations: generations.clone(),
        kcv: leasehold_storage::kcv(disk.expose_secret(), "0f0e0d0c0b0a09080706050403020100"),
        state: VolumeState::Ready,
        created: 1,
        made: 1,
        made_by: None,
    };
    meta.check_key(disk.expose_secret(), &generations).unwrap();

    let refused = |links: &[Link<'_>], what: &str| {
        let k = derive_disk_key(node, links).unwrap();
        let e = meta
            .check_key(k.expose_secret(), &generations)
            .expect_err(what)
            .to_string();
        assert!(
            e.contains("does not match the volume's key check value"),
            "{what}: {e}"
        );
        assert!(e.contains("landlord 1, tenant 2, sub-tenant 1"), "{e}");
    };
    refused(&three[..2], "landlord and tenant only");
    refused(&three[..1], "landlord only");
    refused(
        &[
            link("landlord", 1, &kl),
            link("tenant", 2, &kt),
            link("sub-tenant", 1, &other),
        ],
        "another sub-tenant key",
    );
    refused(
        &[
            link("landlord", 1, &kl),
            link("sub-tenant", 1, &ks),
            link("tenant", 2, &kt),
        ],
        "links in another order",
    );
    refused(
        &[
            link("landlord", 1, &kl),
            link("tenant", 2, &kt),
            link("sub-tenant", 2, &ks),
        ],
        "a sub-tenant key of another generation",
    );
    refused(
        &[
            link("landlord", 1, &kt),
            link("tenant", 2, &kl),
            link("sub-tenant", 1, &ks),
        ],
        "landlord and tenant keys swapped",
    );
    // A fourth link is as easy, and again changes the key.
    let four = [
        link("landlord", 1, &kl),
        link("tenant", 2, &kt),
        link("sub-tenant", 1, &ks),
        link("sub-sub-tenant", 1, &other),
    ];
    refused(&four, "one link more");
}

fn hex_node(n: &[u8]) -> String {
    n.iter().map(|b| format!("{b:02x}")).collect()
}
