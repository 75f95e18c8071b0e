//! The CLIs' man pages: one page per program with every subcommand in it
//! (no `landlordctl-info(1)` pages to point to), plus EXIT STATUS,
//! ENVIRONMENT, FILES and SEE ALSO. The head (NAME, SYNOPSIS, DESCRIPTION,
//! OPTIONS) is clap_mangen's; the rest is written here from the same
//! `clap::Command`, so a new subcommand or option appears without edits.

use std::fmt::Write as _;

/// Escapes text for roff: backslashes, hyphens (so they stay ASCII in
/// copy-paste and searches), and a leading control character.
fn esc(s: &str) -> String {
    let mut out = s.replace('\\', "\\e").replace('-', "\\-");
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// A paragraph of plain text (lines kept; blank lines break).
fn text(out: &mut String, s: &str) {
    for line in s.lines() {
        if line.trim().is_empty() {
            out.push_str(".br\n");
        } else {
            out.push_str(&esc(line.trim()));
            out.push('\n');
        }
    }
}

/// Arguments a subcommand documents itself: not hidden, not the global
/// flags (on the main page) and not the automatic help flag.
fn own_args(cmd: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set())
        .filter(|a| a.get_id() != "help" && a.get_id() != "version")
}

fn arg_entry(out: &mut String, a: &clap::Arg) {
    out.push_str(".TP\n");
    let value = a
        .get_value_names()
        .map(|v| v.join(" "))
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    if a.is_positional() {
        let _ = writeln!(out, "\\fI{}\\fR", esc(&value));
    } else {
        let mut names = Vec::new();
        if let Some(s) = a.get_short() {
            names.push(format!("\\fB\\-{}\\fR", esc(&s.to_string())));
        }
        if let Some(l) = a.get_long() {
            names.push(format!("\\fB\\-\\-{}\\fR", esc(l)));
        }
        let takes = a.get_num_args().is_some_and(|n| n.takes_values());
        let value = if takes {
            format!(" \\fI{}\\fR", esc(&value))
        } else {
            String::new()
        };
        let _ = writeln!(out, "{}{value}", names.join(", "));
    }
    if let Some(h) = a.get_long_help().or_else(|| a.get_help()) {
        text(out, &h.to_string());
    }
    let values: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_owned())
        .collect();
    if !values.is_empty() && a.get_num_args().is_some_and(|n| n.takes_values()) {
        let _ = writeln!(out, ".br\nOne of: {}.", esc(&values.join(", ")));
    }
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() && a.get_num_args().is_some_and(|n| n.takes_values()) {
        let _ = writeln!(out, ".br\nDefault: {}.", esc(&defaults.join(" ")));
    }
}

/// Every visible subcommand under `cmd`, depth first, each with its usage,
/// description and own arguments.
fn commands(out: &mut String, cmd: &clap::Command, path: &str) {
    // clap's generated `help` subcommand repeats what the page says.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{path} {}", sub.get_name());
        if sub.has_subcommands() {
            let _ = writeln!(out, ".SS \"{}\"", esc(&name));
            if let Some(a) = sub.get_long_about().or_else(|| sub.get_about()) {
                text(out, &a.to_string());
            }
            commands(out, sub, &name);
            continue;
        }
        out.push_str(".TP\n");
        let usage = sub.clone().render_usage().to_string();
        // "Usage: landlordctl volume init [OPTIONS] <DEVICE>": the name in
        // bold, the rest as clap prints it.
        let rest = usage
            .trim()
            .trim_start_matches("Usage:")
            .trim()
            .strip_prefix(name.as_str())
            .unwrap_or("")
            .trim()
            .to_owned();
        let _ = writeln!(out, "\\fB{}\\fR {}", esc(&name), esc(&rest));
        if let Some(a) = sub.get_long_about().or_else(|| sub.get_about()) {
            text(out, &a.to_string());
        }
        let args: Vec<&clap::Arg> = own_args(sub).collect();
        if !args.is_empty() {
            out.push_str(".RS\n");
            for a in args {
                arg_entry(out, a);
            }
            out.push_str(".RE\n");
        }
    }
}

/// EXIT STATUS from the exit code text the CLI prints after `--help`
/// (crate::EXIT_CODES_HELP): "  N   meaning" items, indented continuation
/// lines, other lines as paragraphs.
fn exit_status(out: &mut String, help: &str) {
    out.push_str(".SH \"EXIT STATUS\"\n");
    for line in help.lines() {
        let t = line.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("exit status:") {
            continue;
        }
        let code = t.split_whitespace().next().unwrap_or("");
        if line.starts_with("  ") && !line.starts_with("    ") && code.parse::<u8>().is_ok() {
            let _ = writeln!(out, ".TP\n\\fB{code}\\fR");
            text(out, t[code.len()..].trim());
        } else if line.starts_with("    ") {
            text(out, t);
        } else {
            out.push_str(".PP\n");
            text(out, t);
        }
    }
}

fn environment(out: &mut String, cmd: &clap::Command) {
    out.push_str(".SH ENVIRONMENT\n");
    out.push_str(".TP\n\\fBDBUS_SYSTEM_BUS_ADDRESS\\fR\n");
    text(
        out,
        "The system bus to reach the agent on (default: unix:path=/run/dbus/system_bus_socket).",
    );
    if cmd.get_arguments().any(|a| a.get_long() == Some("host")) {
        out.push_str(".TP\n\\fBLEASEHOLD_SSH\\fR\n");
        text(
            out,
            "With --host (and for landlordctl act, each node's host): the SSH command and its \
             options (split on white space; default: ssh). The CLI adds -xT, -p PORT if given, \
             the target and systemd-stdio-bridge.",
        );
    }
}

fn files(out: &mut String, name: &str) {
    out.push_str(".SH FILES\n");
    let mut entries = vec![
        (
            "/usr/share/dbus-1/system.d/org.leasehold.Agent1.conf",
            "Who may talk to the agent on the system bus.",
        ),
        (
            "/usr/share/polkit-1/rules.d/50-leasehold.rules",
            "Members of leasehold-landlord get the landlord's actions, members of leasehold-tenant the tenant's.",
        ),
        (
            "/srv/leasehold/tenant",
            "The tenant's encrypted volume, mounted by the agent (storage.mount).",
        ),
    ];
    if name == "landlordctl" {
        entries.insert(
            0,
            (
                "/etc/leasehold/agentd.toml",
                "The agent's configuration; storage.device names the only device volume init accepts.",
            ),
        );
        entries.push((
            "/var/lib/leasehold",
            "The agent's state (keys manifest, volume metadata, receipts); root only.",
        ));
        entries.push((
            "/usr/share/doc/leasehold/examples/prometheus",
            "Scrape config, alert rules and the Alertmanager route that calls landlordctl act.",
        ));
    }
    for (path, what) in entries {
        let _ = writeln!(out, ".TP\n\\fI{}\\fR", esc(path));
        text(out, what);
    }
}

fn see_also(out: &mut String, name: &str) {
    out.push_str(".SH \"SEE ALSO\"\n");
    let other = if name == "landlordctl" {
        "tenantctl"
    } else {
        "landlordctl"
    };
    let _ = writeln!(
        out,
        "\\fB{}\\fR(1), \\fBagentd\\fR(8), \\fBpolkit\\fR(8), \\fBssh\\fR(1)",
        esc(other)
    );
    out.push_str(".PP\n");
    text(
        out,
        "/usr/share/doc/leasehold/cli.md (commands, JSON output), agentd.md, dbus.md.",
    );
}

/// The man page of `cmd` (section 1), in roff.
pub fn render(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut cmd = cmd;
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man = clap_mangen::Man::new(cmd.clone()).manual("Leasehold");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    // No hyphenation: paths and option names are copied from man pages.
    let mut out = String::from(".nh\n");
    if cmd.has_subcommands() {
        out.push_str(".SH COMMANDS\n");
        commands(&mut out, &cmd, &name);
    }
    if let Some(h) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        exit_status(&mut out, &h.to_string());
    }
    environment(&mut out, &cmd);
    files(&mut out, &name);
    see_also(&mut out, &name);
    if let Some(v) = cmd.get_version() {
        let _ = writeln!(out, ".SH VERSION\n{}", esc(v));
    }
    page.extend_from_slice(out.as_bytes());
    Ok(page)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    fn page(cmd: clap::Command) -> String {
        String::from_utf8(super::render(cmd).unwrap()).unwrap()
    }

    #[test]
    fn one_page_with_every_command_and_the_standard_sections() {
        for (cmd, name) in [
            (crate::landlord::Args::command(), "landlordctl"),
            (<crate::tenant::Args>::command(), "tenantctl"),
        ] {
            let p = page(cmd.clone());
            for section in [
                ".SH NAME",
                ".SH SYNOPSIS",
                ".SH COMMANDS",
                ".SH \"EXIT STATUS\"",
                ".SH ENVIRONMENT",
                ".SH FILES",
                ".SH \"SEE ALSO\"",
            ] {
                assert!(p.contains(section), "{name}: no {section}");
            }
            // No references to per-subcommand pages that are not shipped.
            assert!(!p.contains(&format!("{name}\\-info(")), "{name}");
            assert!(!p.contains(".SH SUBCOMMANDS"), "{name}");
            assert!(!p.contains("generate"), "{name}: hidden command shown");
            assert!(
                !p.contains(" help\\fR"),
                "{name}: clap's help command shown"
            );
            // Every visible leaf command is documented by its full name.
            fn leaves(c: &clap::Command, path: String, out: &mut Vec<String>) {
                for s in c
                    .get_subcommands()
                    .filter(|s| !s.is_hide_set() && s.get_name() != "help")
                {
                    let p = format!("{path} {}", s.get_name());
                    if s.has_subcommands() {
                        leaves(s, p, out);
                    } else {
                        out.push(p);
                    }
                }
            }
            let mut all = Vec::new();
            leaves(&cmd, name.to_owned(), &mut all);
            assert!(all.len() > 5, "{name}: {all:?}");
            for l in all {
                let l = l.replace('-', "\\-");
                assert!(p.contains(&format!("\\fB{l}\\fR")), "{name}: {l} missing");
            }
            // Every exit code of the CLIs has an entry.
            for code in [0, 1, 2, 3, 4, 5, 6, 69, 75] {
                assert!(
                    p.contains(&format!(".TP\n\\fB{code}\\fR\n")),
                    "{name}: {code}"
                );
            }
        }
        let t = page(<crate::tenant::Args>::command());
        assert!(t.contains("LEASEHOLD_SSH"));
        // Subcommands whose arguments are a struct of their own keep their
        // own description: deferred (docs/cli.md, "Start-up"), the
        // struct's doc comment would replace it.
        let l = page(crate::landlord::Args::command());
        for (p, about) in [
            (&t, "Verify an erase receipt"),
            (&t, "Challenge the node"),
            (&t, "Explain whether a flow is allowed"),
            (&l, "Verify an erase receipt"),
            (&l, "Challenge the node"),
            (&l, "Alertmanager webhook receiver"),
            (&l, "Explain whether a flow is allowed"),
        ] {
            assert!(p.contains(about), "{about}");
        }
    }

    /// Every subcommand's descriptions, by path ("help" left out: clap
    /// adds it when it builds).
    fn descriptions(c: &clap::Command, path: &str, out: &mut Vec<String>) {
        for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
            let p = format!("{path} {}", s.get_name());
            out.push(format!(
                "{p}: {:?} / {:?}",
                s.get_about(),
                s.get_long_about()
            ));
            descriptions(s, &p, out);
        }
    }

    #[test]
    fn building_a_tree_keeps_every_description() {
        // Arguments are deferred (docs/cli.md, "Start-up"): built, a
        // subcommand's own struct must not replace what its variant says.
        for (cmd, name) in [
            (crate::landlord::Args::command(), "landlordctl"),
            (<crate::tenant::Args>::command(), "tenantctl"),
        ] {
            let mut before = Vec::new();
            descriptions(&cmd, name, &mut before);
            let mut built = cmd.clone();
            built.build();
            let mut after = Vec::new();
            descriptions(&built, name, &mut after);
            assert!(before.len() > 20, "{before:?}");
            assert_eq!(before, after);
            cmd.debug_assert();
        }
    }

    #[test]
    fn roff_escapes() {
        assert_eq!(super::esc(".x-y\\z"), "\\&.x\\-y\\ez");
        assert_eq!(super::esc("'q"), "\\&'q");
    }
}
