//! T0: the Debian package's sources (issue 15 point 16). lintian on the
//! built .deb is run by scripts/test; the upgrade path by the VM lab
//! (`package_upgrade` in vm_lab.rs). These catch the same faults without
//! a release build: man pages that man(1) warns about or that miss an
//! option, maintainer scripts that call systemctl where lintian objects.

use std::path::Path;
use std::process::Command;

use leasehold_tests::{bin, workspace_root};

/// man(1)'s own check, the one lintian runs (its `groff-message` tag).
fn man_warnings(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
        .arg(page)
        .env("MANROFFSEQ", "")
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    assert!(out.status.success(), "man {}", page.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn package_man_pages_have_no_warnings_and_no_missing_references() {
    let dir = tempfile::tempdir().unwrap();
    let mut pages = vec![workspace_root().join("dist/man/agentd.8")];
    for cli in ["landlordctl", "tenantctl"] {
        let out = Command::new(bin(cli))
            .arg("generate")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cli} generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pages.push(dir.path().join(format!("{cli}.1")));
    }
    let shipped = ["agentd(8)", "landlordctl(1)", "tenantctl(1)"];
    for page in &pages {
        let w = man_warnings(page);
        assert!(w.is_empty(), "{}: {w}", page.display());
        let text = std::fs::read_to_string(page).unwrap();
        for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"] {
            assert!(
                text.contains(&format!(".SH \"{section}\""))
                    || text.contains(&format!(".SH {section}\n")),
                "{}: no {section}",
                page.display()
            );
        }
        // References to Leasehold pages name only the pages it ships (no
        // landlordctl-info(1)).
        let plain = text
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\-", "-");
        for name in ["agentd", "landlordctl", "tenantctl"] {
            for (i, _) in plain.match_indices(name) {
                let rest = &plain[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "-()".contains(c)))
                    .unwrap_or(rest.len());
                let word = &rest[..end];
                if word.ends_with(')') && word.contains('(') {
                    assert!(
                        shipped.contains(&word),
                        "{}: refers to {word}, which is not shipped",
                        page.display()
                    );
                }
            }
        }
    }
}

#[test]
fn package_agentd_man_page_documents_every_option() {
    let out = Command::new(bin("agentd")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let page = std::fs::read_to_string(workspace_root().join("dist/man/agentd.8")).unwrap();
    let mut seen = 0;
    for word in help.split_whitespace() {
        // Option names, also where the help text mentions one ("With --dev:").
        let word = word.trim_end_matches([',', ':', '.', ')']);
        if let Some(long) = word.strip_prefix("--") {
            seen += 1;
            let roff = format!("\\fB\\-\\-{}\\fR", long.replace('-', "\\-"));
            assert!(page.contains(&roff), "agentd.8 does not document --{long}");
        }
    }
    assert!(seen >= 4, "{help}");
}

#[test]
fn package_maintainer_scripts_parse_and_leave_systemctl_to_the_helpers() {
    for script in ["postinst", "prerm", "postrm"] {
        let path = workspace_root().join("dist/debian").join(script);
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // lintian's maintainer-script-calls-systemctl: starting, stopping,
        // enabling go through deb-systemd-invoke / deb-systemd-helper
        // (policy-rc.d, the administrator's choices); daemon-reload and
        // read-only queries are fine.
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let code = line.trim_start();
            if code.starts_with('#') {
                continue;
            }
            if let Some(i) = code.find("systemctl ") {
                let call = &code[i..];
                let query = call.starts_with("systemctl show ");
                let reload = call.contains("daemon-reload");
                assert!(query || reload, "{script}: {line}");
            }
        }
    }
    let postinst = std::fs::read_to_string(workspace_root().join("dist/debian/postinst")).unwrap();
    // debhelper's pattern: enable only if it was enabled (true on a first
    // installation), try-restart on upgrade.
    assert!(postinst.contains("deb-systemd-helper --quiet was-enabled"));
    assert!(postinst.contains("deb-systemd-invoke try-restart"));
    assert!(!postinst.contains("systemctl enable"));
    assert!(!postinst.contains("systemctl restart"));
}
