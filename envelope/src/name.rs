//! The rule for names of tenants, consoles and secrets, shared by the node
//! (which enforces it) and the CLIs (which check early, before sealing or
//! connecting).

/// The rule in words, for error messages.
pub const NAME_RULE: &str = "use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)";

/// Names of tenants, consoles and secrets: 1-64 characters of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` or `-` (they end up in file
/// names and option lists).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        for ok in ["acme", "db-password", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".hidden",
            "-opt",
            "a/b",
            "..",
            "a b",
            "é",
            "a\n",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    proptest! {
        // Whatever passes is safe as one path component.
        #[test]
        fn valid_names_are_plain_file_names(name in "[A-Za-z0-9._/ -]{0,70}") {
            if valid_name(&name) {
                prop_assert!(!name.contains('/') && name != "." && name != "..");
                prop_assert!(name.len() <= 64 && !name.starts_with('-'));
            }
        }
    }
}
