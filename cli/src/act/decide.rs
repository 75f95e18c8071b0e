//! What `act` does about one alert: once per alert (its fingerprint and
//! `startsAt`), within token buckets per node and fleet-wide, with the
//! state in a file so a restart forgets nothing. Time is a parameter
//! (seconds since the epoch), so tests use a fake clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::inventory::{Action, Inventory, Limits};

/// An alert as Alertmanager's webhook (version 4) sends it; only what
/// `act` reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// `alertname`, `instance`, `severity`, …
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `summary`, …
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the alert started firing (RFC 3339, as Alertmanager wrote it).
    #[serde(rename = "startsAt")]
    pub starts_at: String,
    /// Alertmanager's identity of the label set.
    pub fingerprint: String,
}

impl Alert {
    /// The key an alert is acted on once by.
    pub fn key(&self) -> String {
        format!("{}@{}", self.fingerprint, self.starts_at)
    }

    /// A label, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// What was decided about one alert.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Act now (tokens taken, alert recorded as acted).
    Act {
        /// The node's name.
        node: String,
        /// Its SSH target (None: the local bus).
        host: Option<String>,
        /// What to do.
        action: Action,
    },
    /// This alert (fingerprint and startsAt) was acted on before.
    AlreadyActed {
        /// When (epoch seconds).
        at: u64,
    },
    /// No token left: retried when Alertmanager repeats the alert.
    RateLimited {
        /// The node's name.
        node: String,
        /// `node` or `fleet`: which bucket was empty.
        scope: &'static str,
    },
    /// The alert's `instance` is not in the inventory.
    UnknownInstance,
    /// A resolved alert (nothing to correct).
    Resolved,
}

impl Decision {
    /// The decision's name in records.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Act { .. } => "acted",
            Decision::AlreadyActed { .. } => "already-acted",
            Decision::RateLimited { .. } => "rate-limited",
            Decision::UnknownInstance => "unknown-instance",
            Decision::Resolved => "resolved",
        }
    }
}

/// A token bucket: `tokens` at time `at`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn full(burst: u32, now: f64) -> Self {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Tokens at `now`: refilled one per `refill_secs`, up to `burst`. A
    /// clock set back refills nothing (and never drains). The later time is
    /// kept: counting from a clock set back would refill the same period
    /// twice when it returns, and a flapping clock would undo the fleet's
    /// limit (review of a change that did; a wrong jump forward then holds
    /// the refill until that date, documented).
    fn refilled(self, burst: u32, refill_secs: u64, now: f64) -> Self {
        let gained = (now - self.at).max(0.0) / refill_secs as f64;
        Bucket {
            tokens: (self.tokens + gained).min(f64::from(burst)),
            at: now.max(self.at),
        }
    }
}

/// One alert acted on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Acted {
    /// Epoch seconds.
    pub at: u64,
    /// Node name.
    pub node: String,
    /// `alertname`.
    pub alertname: String,
    /// Action name.
    pub action: String,
    /// `pending` until the action returned, then `ok` or the error.
    pub result: String,
}

/// Alerts acted on are forgotten after this long (Alertmanager resends a
/// firing alert every `repeat_interval`, hours; a week is far beyond).
pub const FORGET_AFTER_SECS: u64 = 7 * 86_400;
/// Most alerts remembered; the oldest go first.
pub const MAX_REMEMBERED: usize = 10_000;

/// What `act` keeps across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Alerts acted on, by [`Alert::key`].
    pub acted: BTreeMap<String, Acted>,
    /// Per node name.
    pub nodes: BTreeMap<String, Bucket>,
    /// Fleet-wide.
    pub fleet: Option<Bucket>,
}

impl State {
    /// Decides about one alert at `now` and records the decision (an
    /// action: the alert as acted, `pending`; its tokens taken).
    pub fn decide(&mut self, inv: &Inventory, alert: &Alert, now: f64) -> Decision {
        if alert.status != "firing" {
            return Decision::Resolved;
        }
        let key = alert.key();
        if let Some(a) = self.acted.get(&key) {
            return Decision::AlreadyActed { at: a.at };
        }
        let Some(node) = inv.nodes.get(alert.label("instance")) else {
            return Decision::UnknownInstance;
        };
        let action = inv.action_for(alert.label("alertname"));
        if action.is_limited() && !self.take(&inv.limits, &node.name, now) {
            let scope = if self.node_bucket(&inv.limits, &node.name, now).tokens < 1.0 {
                "node"
            } else {
                "fleet"
            };
            return Decision::RateLimited {
                node: node.name.clone(),
                scope,
            };
        }
        self.acted.insert(
            key,
            Acted {
                at: secs(now),
                node: node.name.clone(),
                alertname: alert.label("alertname").to_owned(),
                action: action.name().to_owned(),
                result: "pending".into(),
            },
        );
        self.prune(now);
        Decision::Act {
            node: node.name.clone(),
            host: node.host.clone(),
            action,
        }
    }

    /// Records an action's result.
    pub fn finish(&mut self, key: &str, result: String) {
        if let Some(a) = self.acted.get_mut(key) {
            a.result = result;
        }
    }

    fn node_bucket(&self, l: &Limits, node: &str, now: f64) -> Bucket {
        self.nodes
            .get(node)
            .copied()
            .unwrap_or_else(|| Bucket::full(l.node_burst, now))
            .refilled(l.node_burst, l.node_refill_secs, now)
    }

    /// Takes one token from the node's bucket and one from the fleet's,
    /// or none if either is empty.
    fn take(&mut self, l: &Limits, node: &str, now: f64) -> bool {
        let mut n = self.node_bucket(l, node, now);
        let mut f = self
            .fleet
            .unwrap_or_else(|| Bucket::full(l.fleet_burst, now))
            .refilled(l.fleet_burst, l.fleet_refill_secs, now);
        let ok = n.tokens >= 1.0 && f.tokens >= 1.0;
        if ok {
            n.tokens -= 1.0;
            f.tokens -= 1.0;
        }
        // Kept refilled even when refused: the same tokens, and a clock
        // set back is then counted from the time it shows.
        self.nodes.insert(node.to_owned(), n);
        self.fleet = Some(f);
        ok
    }

    fn prune(&mut self, now: f64) {
        let oldest = secs(now).saturating_sub(FORGET_AFTER_SECS);
        self.acted.retain(|_, a| a.at >= oldest);
        while self.acted.len() > MAX_REMEMBERED {
            let Some(k) = self
                .acted
                .iter()
                .min_by_key(|(_, a)| a.at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.acted.remove(&k);
        }
    }
}

fn secs(now: f64) -> u64 {
    // Epoch seconds fit; a clock before 1970 counts as 0.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let s = now.max(0.0) as u64;
    s
}

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("state file {}: {reason}", path.display())]
pub struct StateError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Largest state file read (bounded by [`MAX_REMEMBERED`] and the
/// inventory's size).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Reads the state; a missing file is an empty state. A file that is
/// not a state stops `act` (forgetting what was done could reboot a
/// node twice).
pub fn load(path: &Path) -> Result<State, StateError> {
    let bad = |reason: String| StateError {
        path: path.to_owned(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(bad(e.to_string())),
    };
    if meta.len() > MAX_STATE_BYTES {
        return Err(bad(format!("larger than {MAX_STATE_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "not an act state ({e}); move it away to start afresh, knowing that alerts already acted on may be acted on again"
        ))
    })
}

/// Writes the state atomically (temporary file, fsync, rename, fsync of
/// the directory): a crash leaves the old or the new state.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |reason: String| StateError {
        path: path.to_owned(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| bad("not a file name".into()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let bytes = serde_json::to_vec(state).map_err(|e| bad(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::inventory::parse;

    fn inv(limits: &str) -> Inventory {
        parse(&format!(
            r#"
token_file = "/t"
state_file = "/s"
[limits]
{limits}
[[node]]
name = "n1"
instance = "n1:9464"
host = "landlord@n1"
[[node]]
name = "n2"
instance = "n2:9464"
[[node]]
name = "n3"
instance = "n3:9464"
[[rule]]
alertname = "Hot"
action = "poweroff"
[[rule]]
alertname = "Ecc"
action = "reboot"
"#
        ))
        .unwrap()
    }

    fn alert(name: &str, instance: &str, fp: &str, starts: &str) -> Alert {
        Alert {
            status: "firing".into(),
            labels: [
                ("alertname".to_owned(), name.to_owned()),
                ("instance".to_owned(), instance.to_owned()),
            ]
            .into(),
            annotations: BTreeMap::new(),
            starts_at: starts.into(),
            fingerprint: fp.into(),
        }
    }

    #[test]
    fn maps_instance_and_alertname_to_node_and_action() {
        let inv = inv("");
        let mut s = State::default();
        let d = s.decide(&inv, &alert("Ecc", "n1:9464", "a", "t0"), 1000.0);
        assert_eq!(
            d,
            Decision::Act {
                node: "n1".into(),
                host: Some("landlord@n1".into()),
                action: Action::Reboot
            }
        );
        let d = s.decide(&inv, &alert("Other", "n2:9464", "b", "t0"), 1000.0);
        assert!(
            matches!(&d, Decision::Act { node, host: None, action: Action::Notify } if node == "n2"),
            "{d:?}"
        );
        let d = s.decide(&inv, &alert("Ecc", "n9:9464", "c", "t0"), 1000.0);
        assert_eq!(d, Decision::UnknownInstance);
        let mut resolved = alert("Ecc", "n1:9464", "d", "t0");
        resolved.status = "resolved".into();
        assert_eq!(s.decide(&inv, &resolved, 1000.0), Decision::Resolved);
    }

    #[test]
    fn an_alert_is_acted_on_once_and_again_when_it_fires_anew() {
        let inv = inv("node_burst = 5\nfleet_burst = 5");
        let mut s = State::default();
        let a = alert("Ecc", "n1:9464", "fp1", "2026-12-04T01:00:00Z");
        assert_eq!(s.decide(&inv, &a, 1000.0).name(), "acted");
        // Alertmanager's repeats and retries: the same fingerprint and start.
        for t in [1001.0, 5000.0, 90_000.0] {
            assert_eq!(
                s.decide(&inv, &a, t),
                Decision::AlreadyActed { at: 1000 },
                "{t}"
            );
        }
        // Resolved, then firing again: a new startsAt is a new fault.
        let again = alert("Ecc", "n1:9464", "fp1", "2026-12-05T01:00:00Z");
        assert_eq!(s.decide(&inv, &again, 100_000.0).name(), "acted");
        // Remembered a week, then forgotten (bounded state).
        let later = 1000.0 + FORGET_AFTER_SECS as f64 + 1.0;
        s.decide(&inv, &alert("Other", "n2:9464", "x", "t"), later);
        assert!(!s.acted.contains_key(&a.key()));
        assert!(s.acted.contains_key(&again.key()));
    }

    #[test]
    fn token_buckets_per_node_and_fleet_with_a_fake_clock() {
        // One action per node per hour, three per fleet, one more every 10 min.
        let inv = inv(
            "node_burst = 1\nnode_refill_secs = 3600\nfleet_burst = 3\nfleet_refill_secs = 600",
        );
        let mut s = State::default();
        let t0 = 1_000_000.0;
        let d = |s: &mut State, n: &str, fp: &str, t: f64| {
            s.decide(&inv, &alert("Ecc", &format!("{n}:9464"), fp, "t0"), t)
        };
        assert_eq!(d(&mut s, "n1", "a1", t0).name(), "acted");
        assert_eq!(
            d(&mut s, "n1", "a2", t0),
            Decision::RateLimited {
                node: "n1".into(),
                scope: "node"
            }
        );
        // notify takes no token.
        let n = s.decide(&inv, &alert("Info", "n1:9464", "i1", "t0"), t0);
        assert_eq!(n.name(), "acted");
        assert_eq!(d(&mut s, "n2", "b1", t0).name(), "acted");
        assert_eq!(d(&mut s, "n3", "c1", t0).name(), "acted");
        // A storm: the fleet is out of tokens for every node.
        let mut storm = State {
            fleet: s.fleet,
            ..State::default()
        };
        for i in 0..100 {
            let r = d(&mut storm, "n2", &format!("s{i}"), t0 + 1.0);
            assert_eq!(
                r,
                Decision::RateLimited {
                    node: "n2".into(),
                    scope: "fleet"
                }
            );
        }
        // A limited alert is not recorded: Alertmanager's repeat retries it.
        assert!(storm.acted.is_empty());
        // 10 minutes later the fleet has one token; n1's own bucket is
        // still empty until its hour is up.
        assert_eq!(d(&mut s, "n1", "a2", t0 + 600.0).name(), "rate-limited");
        assert_eq!(d(&mut s, "n2", "b2", t0 + 600.0).name(), "rate-limited");
        assert_eq!(d(&mut s, "n1", "a2", t0 + 3600.0).name(), "acted");
        // A clock set back refills nothing.
        assert_eq!(d(&mut s, "n2", "b3", t0 - 86_400.0).name(), "rate-limited");
        assert_eq!(
            d(&mut s, "n2", "b3", t0 - 86_400.0 + 3600.0).name(),
            "rate-limited"
        );
    }

    #[test]
    fn state_survives_a_restart_and_a_bad_file_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("act.json");
        assert_eq!(load(&path).unwrap(), State::default());
        let inv = inv("");
        let mut s = State::default();
        let a = alert("Ecc", "n1:9464", "fp", "t0");
        assert_eq!(s.decide(&inv, &a, 50.0).name(), "acted");
        s.finish(&a.key(), "ok".into());
        save(&path, &s).unwrap();
        let mut back = load(&path).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.acted[&a.key()].result, "ok");
        // After the restart: still acted once, and n1's token still spent.
        assert_eq!(
            back.decide(&inv, &a, 60.0),
            Decision::AlreadyActed { at: 50 }
        );
        let b = alert("Ecc", "n1:9464", "fp2", "t0");
        assert_eq!(back.decide(&inv, &b, 60.0).name(), "rate-limited");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"{\"acted\": 3}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("act.json") && e.contains("not an act state"),
            "{e}"
        );
    }
}
