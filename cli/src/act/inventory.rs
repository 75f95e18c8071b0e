//! The inventory of `landlordctl act` (docs/health.md, "Corrective
//! actions"): which nodes there are, how to reach each, and what to do
//! about each alert. One TOML file; every error names the file and the
//! field (`node[1].instance: …`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What `act` does about an alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A record line only.
    Notify,
    /// `Landlord1.Reboot` on the node.
    Reboot,
    /// `Landlord1.PowerOff` on the node.
    PowerOff,
    /// Runs a command (no shell) with the alert in its environment.
    Hook {
        /// Program (absolute) and arguments.
        command: Vec<String>,
        /// Killed past this.
        timeout_secs: u64,
    },
}

impl Action {
    /// The action's name in the inventory and in records.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Notify => "notify",
            Action::Reboot => "reboot",
            Action::PowerOff => "poweroff",
            Action::Hook { .. } => "hook",
        }
    }

    /// Whether the action changes something (and so takes a token of the
    /// rate limits); `notify` never does.
    pub fn is_limited(&self) -> bool {
        !matches!(self, Action::Notify)
    }
}

/// A node of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Name in records and hooks.
    pub name: String,
    /// [USER@]HOST[:PORT] for SSH (like `--host`); None: this machine's
    /// system bus.
    pub host: Option<String>,
}

/// Token-bucket limits (docs/health.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Actions one node may take at once.
    pub node_burst: u32,
    /// One more action for a node every this many seconds.
    pub node_refill_secs: u64,
    /// Actions the whole fleet may take at once.
    pub fleet_burst: u32,
    /// One more action for the fleet every this many seconds.
    pub fleet_refill_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            node_burst: 1,
            node_refill_secs: 3600,
            fleet_burst: 3,
            fleet_refill_secs: 600,
        }
    }
}

/// A checked inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Bearer token Alertmanager sends.
    pub token_file: PathBuf,
    /// Where decisions are kept across restarts.
    pub state_file: PathBuf,
    /// Rate limits.
    pub limits: Limits,
    /// Nodes by their Prometheus `instance` label.
    pub nodes: BTreeMap<String, Node>,
    /// Actions by `alertname`; an alert not listed is `notify`.
    pub rules: BTreeMap<String, Action>,
}

impl Inventory {
    /// The action for an alert name.
    pub fn action_for(&self, alertname: &str) -> Action {
        self.rules.get(alertname).cloned().unwrap_or(Action::Notify)
    }
}

/// A bad inventory: the file, and the field with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("inventory {}: {message}", path.display())]
pub struct InventoryError {
    /// The inventory file.
    pub path: PathBuf,
    /// `field: what is wrong` (with the line when TOML says it).
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    token_file: PathBuf,
    state_file: PathBuf,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    node_burst: Option<u32>,
    node_refill_secs: Option<u64>,
    fleet_burst: Option<u32>,
    fleet_refill_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    instance: String,
    host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    alertname: String,
    action: String,
    command: Option<Vec<String>>,
    timeout_secs: Option<u64>,
}

/// Most nodes and rules one inventory may hold (each line of the state
/// and of the records is bounded by them).
pub const MAX_ENTRIES: usize = 10_000;
const MAX_HOOK_TIMEOUT_SECS: u64 = 3600;
const MAX_REFILL_SECS: u64 = 7 * 86_400;

/// Reads and checks an inventory file.
pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let err = |message: String| InventoryError {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(&text).map_err(err)
}

/// Parses and checks inventory text; the error is `field: what`.
pub fn parse(text: &str) -> Result<Inventory, String> {
    let de = toml::Deserializer::new(text);
    let raw: Raw = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let mut m = String::new();
        if let Some(l) = line {
            m.push_str(&format!("line {l}: "));
        }
        if key != "." && !key.is_empty() {
            m.push_str(&format!("{key}: "));
        }
        m.push_str(inner.message());
        m
    })?;
    for (field, p) in [
        ("token_file", &raw.token_file),
        ("state_file", &raw.state_file),
    ] {
        if !p.is_absolute() {
            return Err(format!("{field}: {} is not an absolute path", p.display()));
        }
    }
    let d = Limits::default();
    let limits = Limits {
        node_burst: raw.limits.node_burst.unwrap_or(d.node_burst),
        node_refill_secs: raw.limits.node_refill_secs.unwrap_or(d.node_refill_secs),
        fleet_burst: raw.limits.fleet_burst.unwrap_or(d.fleet_burst),
        fleet_refill_secs: raw.limits.fleet_refill_secs.unwrap_or(d.fleet_refill_secs),
    };
    for (field, v) in [
        ("limits.node_burst", limits.node_burst),
        ("limits.fleet_burst", limits.fleet_burst),
    ] {
        if !(1..=1000).contains(&v) {
            return Err(format!("{field}: {v} is outside 1..=1000"));
        }
    }
    for (field, v) in [
        ("limits.node_refill_secs", limits.node_refill_secs),
        ("limits.fleet_refill_secs", limits.fleet_refill_secs),
    ] {
        if !(1..=MAX_REFILL_SECS).contains(&v) {
            return Err(format!("{field}: {v} is outside 1..={MAX_REFILL_SECS}"));
        }
    }
    if raw.node.len() > MAX_ENTRIES || raw.rule.len() > MAX_ENTRIES {
        return Err(format!("more than {MAX_ENTRIES} nodes or rules"));
    }
    let mut nodes = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, n) in raw.node.into_iter().enumerate() {
        let f = |k: &str| format!("node[{i}].{k}");
        if !crate::act::valid_word(&n.name) {
            return Err(format!(
                "{}: {:?}: 1-253 letters, digits, '.', '-', '_'",
                f("name"),
                n.name
            ));
        }
        if !names.insert(n.name.clone()) {
            return Err(format!("{}: {:?} is listed twice", f("name"), n.name));
        }
        if n.instance.is_empty() || n.instance.chars().any(|c| c.is_control()) {
            return Err(format!(
                "{}: {:?}: expected the Prometheus target (HOST:PORT)",
                f("instance"),
                n.instance
            ));
        }
        if let Some(h) = &n.host {
            crate::ssh_transport(h, None).map_err(|e| format!("{}: {}", f("host"), e.message))?;
        }
        if nodes.contains_key(&n.instance) {
            return Err(format!(
                "{}: {:?} is listed twice",
                f("instance"),
                n.instance
            ));
        }
        nodes.insert(
            n.instance,
            Node {
                name: n.name,
                host: n.host,
            },
        );
    }
    let mut rules = BTreeMap::new();
    for (i, r) in raw.rule.into_iter().enumerate() {
        let f = |k: &str| format!("rule[{i}].{k}");
        if r.alertname.is_empty() || r.alertname.chars().any(|c| c.is_control()) {
            return Err(format!("{}: empty or not printable", f("alertname")));
        }
        let hook_only = |what: &str| {
            format!(
                "{}: only for action \"hook\" (action is {:?})",
                f(what),
                r.action
            )
        };
        let action = match r.action.as_str() {
            "notify" | "reboot" | "poweroff" => {
                if r.command.is_some() {
                    return Err(hook_only("command"));
                }
                if r.timeout_secs.is_some() {
                    return Err(hook_only("timeout_secs"));
                }
                match r.action.as_str() {
                    "notify" => Action::Notify,
                    "reboot" => Action::Reboot,
                    _ => Action::PowerOff,
                }
            }
            "hook" => {
                let command = r
                    .command
                    .ok_or_else(|| format!("{}: required for action \"hook\"", f("command")))?;
                match command.first() {
                    Some(p) if Path::new(p).is_absolute() => {}
                    Some(p) => {
                        return Err(format!(
                            "{}: {p:?} is not an absolute path",
                            f("command[0]")
                        ))
                    }
                    None => return Err(format!("{}: empty", f("command"))),
                }
                let timeout_secs = r.timeout_secs.unwrap_or(60);
                if !(1..=MAX_HOOK_TIMEOUT_SECS).contains(&timeout_secs) {
                    return Err(format!(
                        "{}: {timeout_secs} is outside 1..={MAX_HOOK_TIMEOUT_SECS}",
                        f("timeout_secs")
                    ));
                }
                Action::Hook {
                    command,
                    timeout_secs,
                }
            }
            other => {
                return Err(format!(
                    "{}: {other:?}: expected notify, reboot, poweroff or hook",
                    f("action")
                ))
            }
        };
        if rules.insert(r.alertname.clone(), action).is_some() {
            return Err(format!(
                "{}: {:?} is listed twice",
                f("alertname"),
                r.alertname
            ));
        }
    }
    Ok(Inventory {
        token_file: raw.token_file,
        state_file: raw.state_file,
        limits,
        nodes,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
token_file = "/etc/leasehold/act.token"
state_file = "/var/lib/leasehold/act.json"
[limits]
node_burst = 2
[[node]]
name = "node1"
instance = "node1.example:9464"
host = "landlord@node1.example"
[[node]]
name = "here"
instance = "127.0.0.1:9464"
[[rule]]
alertname = "LeaseholdMemoryUncorrected"
action = "reboot"
[[rule]]
alertname = "LeaseholdNodeDown"
action = "hook"
command = ["/usr/local/sbin/standby", "--for"]
"#;

    #[test]
    fn mapping_by_instance_and_alertname() {
        let inv = parse(GOOD).unwrap();
        assert_eq!(inv.limits.node_burst, 2);
        assert_eq!(inv.limits.fleet_burst, Limits::default().fleet_burst);
        let n = &inv.nodes["node1.example:9464"];
        assert_eq!(n.name, "node1");
        assert_eq!(n.host.as_deref(), Some("landlord@node1.example"));
        assert_eq!(inv.nodes["127.0.0.1:9464"].host, None);
        assert_eq!(inv.action_for("LeaseholdMemoryUncorrected"), Action::Reboot);
        assert_eq!(
            inv.action_for("LeaseholdNodeDown"),
            Action::Hook {
                command: vec!["/usr/local/sbin/standby".into(), "--for".into()],
                timeout_secs: 60
            }
        );
        // Not mapped: a record only.
        assert_eq!(inv.action_for("Whatever"), Action::Notify);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, &str); 11] = [
            ("", "token_file"),
            (
                "token_file = \"rel\"\nstate_file = \"/s\"",
                "token_file: rel is not an absolute path",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\nbogus = 1",
                "unknown field `bogus`",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[limits]\nnode_burst = 0",
                "limits.node_burst: 0 is outside 1..=1000",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[limits]\nfleet_burst = \"x\"",
                "limits.fleet_burst",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[node]]\nname = \"a\"\ninstance = \"i:1\"\n[[node]]\nname = \"b\"\ninstance = \"i:1\"",
                "node[1].instance: \"i:1\" is listed twice",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[node]]\nname = \"a\"\ninstance = \"i:1\"\nhost = \"-oProxyCommand=x\"",
                "node[0].host: --host",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[node]]\nname = \"a b\"\ninstance = \"i:1\"",
                "node[0].name",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[rule]]\nalertname = \"A\"\naction = \"explode\"",
                "rule[0].action: \"explode\": expected notify, reboot, poweroff or hook",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[rule]]\nalertname = \"A\"\naction = \"hook\"\ncommand = [\"standby\"]",
                "rule[0].command[0]: \"standby\" is not an absolute path",
            ),
            (
                "token_file = \"/t\"\nstate_file = \"/s\"\n[[rule]]\nalertname = \"A\"\naction = \"reboot\"\ncommand = [\"/bin/true\"]",
                "rule[0].command: only for action \"hook\"",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
        let e = load(Path::new("/nonexistent/act.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("inventory /nonexistent/act.toml: "),
            "{e}"
        );
    }
}
