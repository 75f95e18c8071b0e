//! Reading `nft monitor`: for each committed ruleset generation, whether it
//! touched Leasehold's table and which process committed it.
//!
//! The kernel announces every commit on the nftables netlink group: first
//! one line per object changed (`add element inet leasehold s_g1 { … }`),
//! then `# new generation N by process PID (COMM)`. A generation whose
//! lines never name the table cannot have changed it, whoever made it, so
//! the drift check need not read the table's sets back for it (see
//! [`crate::enforce::Enforcer::note_untouched`]); one that names it and is
//! not the agent's own commit is a change behind the agent's back.

/// One committed generation as `nft monitor` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The ruleset generation the commit produced.
    pub gen: u32,
    /// The committing process (absent when nft could not tell).
    pub pid: Option<u32>,
    /// Its command name, as nft printed it.
    pub comm: Option<String>,
    /// The first change of this generation that named the table (at most
    /// [`MAX_LINE`] bytes of it); None: the table was not touched.
    pub touched: Option<String>,
}

/// Bytes of a change line kept to say what touched the table (an element
/// line of a large commit can be megabytes long).
pub const MAX_LINE: usize = 200;

/// Turns `nft monitor` output lines into [`Generation`]s.
#[derive(Debug)]
pub struct Reader {
    needle: String,
    needle_end: String,
    touched: Option<String>,
}

impl Reader {
    /// A reader for the `inet` table named `table`.
    pub fn new(table: &str) -> Self {
        Reader {
            needle: format!(" inet {table} "),
            needle_end: format!(" inet {table}"),
            touched: None,
        }
    }

    /// Feeds one line; returns the generation it closes, if it is a
    /// generation line.
    pub fn line(&mut self, line: &str) -> Option<Generation> {
        if let Some(rest) = line.strip_prefix("# new generation ") {
            let mut words = rest.splitn(2, ' ');
            let gen = words.next()?.parse::<u32>().ok()?;
            // "by process 4567 (nft)"; nft omits it when it cannot tell.
            let (pid, comm) = match words.next().and_then(|r| r.strip_prefix("by process ")) {
                Some(r) => {
                    let (pid, comm) = r.split_once(' ').unwrap_or((r, ""));
                    let comm = comm
                        .trim()
                        .strip_prefix('(')
                        .and_then(|c| c.strip_suffix(')'))
                        .map(str::to_owned);
                    (pid.parse().ok(), comm)
                }
                None => (None, None),
            };
            return Some(Generation {
                gen,
                pid,
                comm,
                touched: self.touched.take(),
            });
        }
        if self.touched.is_none()
            && (line.contains(&self.needle) || line.ends_with(&self.needle_end))
        {
            let mut end = line.len().min(MAX_LINE);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            self.touched = Some(line[..end].to_owned());
        }
        None
    }
}

/// Starts `nft monitor` (every ruleset change and the generation lines;
/// `monitor ruleset` leaves the latter out) with an optional prefix such as
/// `ip netns exec NS`.
pub fn spawn(prefix: &[&str]) -> std::io::Result<std::process::Child> {
    let mut c = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg("nft");
            c
        }
        None => std::process::Command::new("nft"),
    };
    c.arg("monitor")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Reader, text: &str) -> Vec<Generation> {
        text.lines().filter_map(|l| r.line(l)).collect()
    }

    #[test]
    fn generations_say_who_and_whether_the_table_was_touched() {
        let mut r = Reader::new("leasehold");
        let out = feed(
            &mut r,
            "add table ip other\n\
             # new generation 5 by process 17829 (nft)\n\
             add element inet leasehold h4_g2 { 10.0.0.1 }\n\
             # new generation 6 by process 42 (agentd)\n\
             delete chain inet leasehold input\n\
             delete table inet leasehold\n\
             # new generation 7 by process 9 (nft)\n\
             # new generation 8\n\
             add table inet leasehold2\n\
             # new generation 9 by process 10 (nft)\n",
        );
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].gen, 5);
        assert_eq!(out[0].pid, Some(17829));
        assert_eq!(out[0].comm.as_deref(), Some("nft"));
        assert_eq!(out[0].touched, None);
        assert_eq!(
            out[1].touched.as_deref(),
            Some("add element inet leasehold h4_g2 { 10.0.0.1 }")
        );
        assert_eq!(out[1].comm.as_deref(), Some("agentd"));
        // The first line naming the table is the one kept.
        assert_eq!(
            out[2].touched.as_deref(),
            Some("delete chain inet leasehold input")
        );
        assert_eq!(
            (out[3].gen, out[3].pid, out[3].touched.clone()),
            (8, None, None)
        );
        // Another table whose name starts with ours is another table.
        assert_eq!(out[4].touched, None);
    }

    #[test]
    fn a_table_deleted_alone_is_seen_and_long_lines_are_cut() {
        let mut r = Reader::new("leasehold");
        let g = feed(
            &mut r,
            "delete table inet leasehold\n# new generation 3 by process 1 (nft)\n",
        );
        assert!(g[0].touched.is_some());
        let long = format!("add element inet leasehold s {{ {} }}", "é".repeat(500));
        let g = feed(
            &mut r,
            &format!("{long}\n# new generation 4 by process 1 (nft)\n"),
        );
        let t = g[0].touched.as_deref().unwrap();
        assert!(t.len() <= MAX_LINE && long.starts_with(t));
    }

    #[test]
    fn garbage_is_not_a_generation() {
        let mut r = Reader::new("leasehold");
        assert_eq!(r.line("# new generation x by process 1 (nft)"), None);
        assert_eq!(r.line("# new generation "), None);
        assert_eq!(r.line(""), None);
    }
}
