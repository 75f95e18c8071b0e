//! Its own test binary: it sets the process umask, which would race with
//! other tests creating files in the same process.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use leasehold_storage::fs::{ensure_own_dir, make_dirs_searchable, unsearchable_ancestors};

#[test]
fn missing_mount_point_parents_are_made_searchable_under_a_strict_umask() {
    let t = tempfile::tempdir().unwrap();
    let keep = t.path().join("kept");
    std::fs::create_dir(&keep).unwrap();
    std::fs::set_permissions(&keep, std::fs::Permissions::from_mode(0o700)).unwrap();
    let at = keep.join("srv/leasehold/tenant");
    // The agent's unit runs with UMask=0077.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let r = make_dirs_searchable(&at);
    nix::sys::stat::umask(old);
    r.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&keep.join("srv")), 0o755);
    assert_eq!(mode(&keep.join("srv/leasehold")), 0o755);
    assert_eq!(mode(&at), 0o755);
    // An existing directory keeps its mode.
    assert_eq!(mode(&keep), 0o700);
    make_dirs_searchable(&at).unwrap();
    // What the agent warns about: the directory the tenant cannot pass.
    let blocked = unsearchable_ancestors(&at);
    assert!(blocked.contains(&keep), "{blocked:?}");
    assert!(
        !blocked.iter().any(|d| d.starts_with(keep.join("srv"))),
        "{blocked:?}"
    );
}

#[test]
fn the_agents_directory_on_the_volume_is_never_a_planted_one() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("engines");
    ensure_own_dir(&dir).unwrap();
    assert!(std::fs::metadata(&dir).unwrap().is_dir());
    ensure_own_dir(&dir).unwrap();
    // A symlink planted in its place (to somewhere the tenant wants the
    // agent to write) is refused, not followed.
    let planted = t.path().join("planted");
    std::os::unix::fs::symlink(t.path().join("elsewhere"), &planted).unwrap();
    let e = ensure_own_dir(&planted).unwrap_err().to_string();
    assert!(e.contains("a symlink") && e.contains("refused"), "{e}");
    // A directory others may write is refused too.
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(ensure_own_dir(&open).is_err());
    // So is a file.
    let file = t.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(ensure_own_dir(&file).is_err());
}
