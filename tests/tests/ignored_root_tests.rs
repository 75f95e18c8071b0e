//! T0: every test whose body calls `require_root()` or starts the harness
//! `Lab` carries `#[ignore = "needs …"]`, so a normal user's `cargo test`
//! lists it as ignored instead of failing (docs/lab.md, "Ignored tests").
//! A source check: it sees direct calls only; running the test binaries as
//! a normal user (docs/lab.md) catches the rest.

use std::path::{Path, PathBuf};

use leasehold_tests::workspace_root;

/// Calls that need root.
const ROOT_CALLS: [&str; 3] = ["require_root()", "Lab::start", "Lab::new("];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" && name != "benches" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(test name, calls root, has an ignore attribute)` for each `#[test]`
/// in rustfmt'd source: attributes up to the `fn`, the body up to the
/// closing brace at the `fn`'s indentation.
fn tests_in(src: &str) -> Vec<(String, bool, bool)> {
    let lines: Vec<&str> = src.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.trim() != "#[test]" {
            continue;
        }
        let Some(f) = (i + 1..lines.len()).find(|&j| !lines[j].trim_start().starts_with("#["))
        else {
            continue;
        };
        let head = lines[f].trim_start();
        let Some(rest) = head
            .strip_prefix("fn ")
            .or_else(|| head.strip_prefix("async fn "))
        else {
            continue;
        };
        let name = rest.split('(').next().unwrap_or_default().to_owned();
        let ignored = lines[i + 1..f]
            .iter()
            .any(|a| a.trim_start().starts_with("#[ignore"));
        let indent = &lines[f][..lines[f].len() - head.len()];
        let end = (f + 1..lines.len())
            .find(|&j| lines[j] == format!("{indent}}}"))
            .unwrap_or(lines.len());
        let body = lines[f..end].join("\n");
        let root = ROOT_CALLS.iter().any(|c| body.contains(c));
        found.push((name, root, ignored));
    }
    found
}

#[test]
fn the_source_check_sees_attributes_and_calls() {
    // Split so that this test's own body is not a match.
    let src = concat!(
        "#[test]\n#[ignore = \"needs root: x\"]\nfn a() {\n    require_",
        "root();\n}\n\n#[test]\nfn b() {\n    let lab = Lab::",
        "start();\n}\n\nmod m {\n    #[test]\n    fn c() {\n        plain();\n    }\n}\n"
    );
    assert_eq!(
        tests_in(src),
        [
            ("a".to_owned(), true, true),
            ("b".to_owned(), true, false),
            ("c".to_owned(), false, false),
        ]
    );
}

#[test]
fn root_tests_are_ignored_with_a_reason() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut missing = Vec::new();
    let mut seen = 0;
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        for (name, needs_root, ignored) in tests_in(&src) {
            if needs_root {
                seen += 1;
                if !ignored {
                    let rel = f.strip_prefix(&root).unwrap_or(f);
                    missing.push(format!("{}: {name}", rel.display()));
                }
            }
        }
    }
    eprintln!("{seen} root tests found by the scan");
    assert!(
        seen > 10,
        "found only {seen} root tests: the scan is broken"
    );
    assert!(
        missing.is_empty(),
        "root tests without #[ignore = \"needs root: …\"] (docs/lab.md, \"Ignored tests\"):\n{}",
        missing.join("\n")
    );
}
