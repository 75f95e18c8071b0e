//! Human and JSON output of API results.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use leasehold_dbus_api::{KeyChange, NodeInfo, PublicKey, SecretInfo, VolumeInfo};
use serde_json::{json, Value};

use crate::exit;

/// `-q`/`--quiet`, set once from the command line before any output.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `-q`/`--quiet` for this process (docs/cli.md, "Quiet"): what
/// [`emit_done`], [`note`] and the progress line print depends on it;
/// [`emit`] (a query's result), warnings and errors do not.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q`/`--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Prints the outcome of a change: JSON always; the text summary unless
/// `--quiet` (then the exit status is the result, as with `systemctl -q`).
pub fn emit_done(as_json: bool, v: Value, human: impl FnOnce() -> String) {
    if as_json || !quiet() {
        emit(as_json, v, human);
    }
}

/// `text` with every control character but newline and tab escaped (`\r`,
/// `\u001b`, `\u009b`: valid in a JSON string too): what a node answers reaches the terminal, and a
/// hostile node must not move the cursor, rewrite a line, set the
/// clipboard (OSC 52) or fake a prompt with it (review: only engine logs
/// were escaped). Everything this CLI prints goes through it.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => out.push_str("\\r"),
            // JSON's own escape: `--json` output stays valid JSON (serde
            // leaves DEL and the C1 controls raw).
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// [`terminal_safe`] on one line: a newline shown as `\n` too (a line the
/// text starts could pose as this CLI's own).
pub fn one_line(text: &str) -> String {
    terminal_safe(text).replace('\n', "\\n")
}

/// A `note: …` line on stderr: information, left out with `--quiet`
/// (warnings and errors never are).
pub fn note(text: &str) {
    if !quiet() {
        eprintln!("note: {}", terminal_safe(text));
    }
}

/// Prints `v` as JSON, or `human` as text: the result of a query, printed
/// also with `--quiet` (it is what was asked for).
pub fn emit(as_json: bool, v: Value, human: impl FnOnce() -> String) {
    if as_json {
        print_line(&v.to_string());
    } else {
        let text = human();
        if !text.is_empty() {
            print_line(&text);
        }
    }
}

/// Writes `text` and a newline to stdout; all of the CLIs' own output goes
/// through here (help and version are printed by clap, whose write errors
/// `main` ignores).
///
/// `println!` panics when the reader has gone away (`landlordctl info |
/// head -1`): Rust ignores SIGPIPE, and restoring it would need `unsafe`,
/// which the workspace forbids. Instead a closed pipe ends the program here,
/// quietly and with status 0: output is only written after the operation
/// succeeded, and the reader chose to stop reading. Any other write error is
/// reported and exits 1.
pub fn print_line(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{}", terminal_safe(text)).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(exit::OK));
        }
        // Not eprintln!: it panics too if stderr is gone.
        let _ = writeln!(
            std::io::stderr(),
            "error: cannot write to standard output: {e}"
        );
        std::process::exit(i32::from(exit::FAILURE));
    }
}

/// Node info as JSON (docs/json.md "info"). Generations are integers in
/// fields that name whose and which (`*_generation`: the key pair,
/// `*_key_generation`: the symmetric key), as in every other command.
pub fn node_info_json(i: &NodeInfo) -> Value {
    json!({
        "node_id": i.node_id,
        "tpm_kind": i.tpm_kind,
        "landlord_generation": i.landlord_generation,
        "landlord_fingerprint": i.landlord_fingerprint,
        "assigned": i.assigned,
        "tenant_name": i.tenant_name,
        "tenant_generation": i.tenant_generation,
        "tenant_key_generation": i.tenant_key_generation,
        "tenant_fingerprint": i.tenant_fingerprint,
        "consoles": i.consoles.iter().flatten().map(|c| console_json(c)).collect::<Vec<_>>(),
        "api_version": i.api_version,
        "agent_version": i.agent_version,
        "engine_count": i.engine_count,
        "running": i.running,
        "tpm_health": i.tpm_health,
        "tpm_error": i.tpm_error,
    })
}

/// A registered console, `{"name", "fingerprint"}` (the shape
/// `register-console --json` prints), from the agent's `NAME FINGERPRINT`
/// line. Console names never hold a space (`leasehold_envelope::valid_name`).
pub fn console_json(line: &str) -> Value {
    let (name, fp) = line.split_once(' ').unwrap_or((line, ""));
    json!({"name": name, "fingerprint": (!fp.is_empty()).then_some(fp)})
}

fn line(out: &mut String, label: &str, v: Option<String>) {
    if let Some(v) = v {
        out.push_str(&format!("{label:<23}{v}\n"));
    }
}

/// Node info as text.
pub fn node_info_text(i: &NodeInfo) -> String {
    let mut s = String::new();
    line(&mut s, "node id:", i.node_id.clone());
    line(
        &mut s,
        "TPM:",
        i.tpm_kind.as_ref().map(|k| {
            if k == "software" {
                "software TPM (no hardware protection)".to_owned()
            } else {
                format!("{k} TPM")
            }
        }),
    );
    line(
        &mut s,
        "TPM health:",
        i.tpm_health.as_ref().map(|h| match &i.tpm_error {
            Some(e) => format!("{} ({e})", h.to_uppercase()),
            None => h.clone(),
        }),
    );
    line(
        &mut s,
        "landlord generation:",
        i.landlord_generation.map(|g| g.to_string()),
    );
    line(
        &mut s,
        "landlord fingerprint:",
        i.landlord_fingerprint.clone(),
    );
    match i.assigned {
        Some(true) => {
            line(
                &mut s,
                "tenant:",
                i.tenant_name.clone().or(Some("(unnamed)".into())),
            );
            line(
                &mut s,
                "tenant generation:",
                i.tenant_generation.map(|g| g.to_string()),
            );
            line(
                &mut s,
                "tenant key generation:",
                i.tenant_key_generation.map(|g| g.to_string()),
            );
            line(&mut s, "tenant fingerprint:", i.tenant_fingerprint.clone());
        }
        Some(false) => line(&mut s, "tenant:", Some("not assigned".into())),
        None => {}
    }
    for c in i.consoles.iter().flatten() {
        line(&mut s, "console:", Some(c.clone()));
    }
    line(&mut s, "running:", i.running.clone());
    s.trim_end().to_owned()
}

/// Public key as JSON.
pub fn public_key_json(k: &PublicKey) -> Value {
    json!({"role": k.role, "generation": k.generation, "fingerprint": k.fingerprint, "pem": k.pem})
}

/// Key change as JSON. The receipt is an object: the signed body as the
/// node wrote it ([`receipt_object`]).
pub fn change_json(c: &KeyChange) -> Value {
    let mut warnings = c.warnings.clone().unwrap_or_default();
    let receipt = match c.receipt.as_deref().map(receipt_object) {
        None => Value::Null,
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            // The change happened; the receipt is still on the node.
            warnings.push(format!(
                "{e}; `receipts show ID --out FILE` gets the stored copy"
            ));
            Value::Null
        }
    };
    json!({
        "kind": c.kind,
        "role": c.role,
        "generation_before": c.generation_before,
        "generation_after": c.generation_after,
        "data_destroyed": c.data_destroyed,
        "fingerprint": c.fingerprint,
        "receipt": receipt,
        "receipt_signature": c.receipt_signature,
        "warnings": warnings,
    })
}

/// A receipt body (the exact bytes the node signed) as a JSON object.
/// The agent writes the body compactly (serde_json, fields in order), and
/// serde_json here keeps field order (`preserve_order`), so writing the
/// object back compactly gives the signed bytes again: `verify-receipt`
/// relies on that, and it is checked here so that a body that would not
/// come back byte for byte is never printed as an object.
pub fn receipt_object(body: &str) -> Result<Value, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the node's receipt is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the node's receipt is not a JSON object".into());
    }
    // Not `v != body`: that compares a JSON value with a JSON string.
    let compact = v.to_string();
    if compact != body {
        return Err("the node's receipt is not in compact form: it cannot be printed as an object that still verifies".into());
    }
    Ok(v)
}

/// Prints a key change: warnings (what failed after the change committed;
/// the change stands, so the exit status stays 0) on stderr, the change on
/// stdout (its text not with `--quiet`).
pub fn emit_change(as_json: bool, c: &KeyChange, human: impl FnOnce() -> String) {
    let v = change_json(c);
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for w in &warnings {
        eprintln!("warning: {}", terminal_safe(w));
    }
    if !warnings.is_empty() {
        // Exit 0 says the key change happened; this says what did not.
        note(&format!(
            "the key change itself was done (exit status 0); the {} above {} what did not work after it",
            if warnings.len() == 1 { "warning" } else { "warnings" },
            if warnings.len() == 1 { "is" } else { "are" }
        ));
    }
    emit_done(as_json, v.clone(), human);
}

/// Volume state as JSON. The disk key's key generations are integers,
/// `landlord_key_generation` and `tenant_key_generation` (as in `info`),
/// read from the agent's `landlord 1, tenant 2`.
pub fn volume_json(v: &VolumeInfo) -> Value {
    let generation = |level: &str| {
        v.generations.as_deref().and_then(|g| {
            g.split(", ")
                .filter_map(|part| part.split_once(' '))
                .find(|(l, _)| *l == level)
                .and_then(|(_, n)| n.parse::<u64>().ok())
        })
    };
    json!({
        "state": v.state, "device": v.device, "size": v.size, "used": v.used, "total": v.total,
        "mount": v.mount, "filesystem": v.filesystem, "mapping": v.mapping,
        "landlord_key_generation": generation("landlord"),
        "tenant_key_generation": generation("tenant"),
        "created": v.created, "made": v.made, "made_by": v.made_by,
        "event": v.event, "error": v.error, "next": v.next, "progress": v.progress,
    })
}

fn gib(b: u64) -> String {
    // Display only.
    #[allow(clippy::cast_precision_loss)]
    let g = b as f64 / f64::from(1u32 << 30);
    format!("{g:.2} GiB")
}

/// Volume state as text.
pub fn volume_text(v: &VolumeInfo) -> String {
    let state = v.state.as_deref().unwrap_or("?");
    if state == "none" {
        return "volume: none (landlordctl volume init DEVICE)".to_owned();
    }
    let mut s = format!("volume:      {state}");
    let mut line = |k: &str, val: Option<String>| {
        if let Some(val) = val {
            s.push_str(&format!("\n{k:<12} {val}"));
        }
    };
    line("device:", v.device.clone());
    line("size:", v.size.map(gib));
    line(
        "used:",
        v.used
            .zip(v.total)
            .map(|(u, t)| format!("{} of {}", gib(u), gib(t))),
    );
    line("mount:", v.mount.clone());
    line("filesystem:", v.filesystem.clone());
    line("mapping:", v.mapping.clone());
    line("generations:", v.generations.clone());
    line("made:", v.made_by.clone());
    line("last event:", v.event.clone());
    line("error:", v.error.clone());
    line("next:", v.next.clone());
    line("progress:", v.progress.clone());
    s
}

/// A failed volume makes `volume status` exit 1 (after the status, which
/// says what to do: `next`); the status was printed, so no message.
pub fn volume_exit(v: &VolumeInfo) -> Result<(), crate::CliError> {
    if v.state.as_deref() == Some("error") {
        return Err(crate::CliError::new(exit::FAILURE, ""));
    }
    Ok(())
}

/// Key change as text.
pub fn change_text(c: &KeyChange) -> String {
    let g = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |g| g.to_string());
    let mut s = format!(
        "{} of {} keys: generation {} -> {}",
        c.kind.as_deref().unwrap_or("change"),
        c.role.as_deref().unwrap_or("?"),
        g(c.generation_before),
        g(c.generation_after)
    );
    if c.data_destroyed == Some(true) && c.generation_before.is_some() {
        s.push_str("\ndata encrypted under the previous keys is now unreadable");
    }
    if let Some(fp) = &c.fingerprint {
        s.push_str(&format!("\nnew fingerprint: {fp}"));
    }
    if c.receipt.is_some() {
        s.push_str("\nerase receipt signed by the node's TPM key (get it with --json now or `receipts list` / `receipts show ID --out FILE` later; check it with verify-receipt)");
    }
    s
}

/// One secret as JSON: `{"name", "size", "stored_at"}`.
pub fn secret_json(s: &SecretInfo) -> Value {
    json!({"name": s.name, "size": s.size, "stored_at": s.stored_at})
}

/// Secret list as JSON.
pub fn secrets_json(list: &[SecretInfo]) -> Value {
    Value::Array(list.iter().map(secret_json).collect())
}

/// What `secret put` and `secret rm` print, one shape for both: the
/// secret's object and whether it was removed (`rm`: size and time null).
pub fn secret_change_json(s: &SecretInfo, removed: bool) -> Value {
    let mut v = secret_json(s);
    v["removed"] = Value::Bool(removed);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_text_cannot_drive_the_terminal() {
        assert_eq!(terminal_safe("plain\n\tline é"), "plain\n\tline é");
        assert_eq!(
            terminal_safe("ok\x1b]52;c;ZXZpbA==\x07\rReally\u{9b}2K"),
            "ok\\u001b]52;c;ZXZpbA==\\u0007\\rReally\\u009b2K"
        );
        // In a JSON document (serde leaves DEL and C1 raw): still JSON.
        let doc = serde_json::json!({"m": "a\u{7f}b\u{9b}c\x1bd"}).to_string();
        let safe = terminal_safe(&doc);
        assert!(!safe.chars().any(char::is_control), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["m"], "a\u{7f}b\u{9b}c\x1bd");
    }

    #[test]
    fn receipts_come_back_byte_for_byte() {
        let body = r#"{"format":2,"node_id":"00","change":"release","role":"tenant","time":1,"destroyed":["disk key \"x\" é"],"key_generations_before":[["landlord",1],["tenant",1]],"volume":null,"signer":"node"}"#;
        let v = receipt_object(body).unwrap();
        assert_eq!(v.to_string(), body);
        // Pretty-printed (not what the agent signs) is refused, not reordered.
        assert!(receipt_object("{\"a\": 1}").is_err());
        assert!(receipt_object("[1]").is_err());
        assert!(receipt_object("nope").is_err());
    }

    #[test]
    fn volume_generations_are_integers() {
        let v = volume_json(&VolumeInfo {
            generations: Some("landlord 1, tenant 12".into()),
            ..Default::default()
        });
        assert_eq!(v["landlord_key_generation"], 1);
        assert_eq!(v["tenant_key_generation"], 12);
        let v = volume_json(&VolumeInfo::default());
        assert!(v["tenant_key_generation"].is_null());
    }

    #[test]
    fn consoles_are_objects() {
        assert_eq!(
            console_json("ops ab12"),
            json!({"name": "ops", "fingerprint": "ab12"})
        );
    }
}
