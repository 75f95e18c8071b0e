//! `receipts list`, `receipts show ID` and `verify-receipt` of both CLIs
//! (docs/cli.md "Receipts").

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::{Args, Subcommand};
use leasehold_dbus_api::{receipt_json, LandlordProxy, ReceiptInfo, TenantProxy};
use serde_json::{json, Value};
use zbus::Connection;

use crate::boundary::unix_time_text;
use crate::output::emit;
use crate::{exit, read_arg_file, read_pem_file, CliError};

/// Exit status of `verify-receipt` when the receipt was not signed by the
/// node's key: its signer is another key than the one given or fetched
/// (`--node-fingerprint`, the node's `receipt-key`), or the body names
/// another signer than the key that signed it. A signature that does not
/// match (a modified receipt) is 1.
pub const NOT_NODE_KEY: u8 = exit::NOT_NODE_KEY;

/// `receipts ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ReceiptsCommand {
    /// List the erase receipts this role may see (oldest first).
    #[command(alias = "ls")]
    List,
    /// Print one receipt; --json (or --out) gives the document
    /// `verify-receipt` checks.
    Show {
        /// Receipt id (from `receipts list`).
        id: String,
        /// Write the receipt document (JSON) to FILE.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

// `verify-receipt` arguments. No doc comment: the arguments of its
// subcommand are deferred, and once built the struct's about would replace
// the variant's (docs/cli.md, "Start-up").
#[allow(missing_docs)]
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Receipt file (JSON): the --json output of a key change or of
    /// `receipts show`.
    pub receipt: PathBuf,
    /// The node's signing key (PEM, from `receipt-key`). Without it the
    /// key is fetched from the node.
    #[arg(long, value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// The node's signing-key fingerprint (hex, from `receipt-key --json`):
    /// a receipt signed by any other key fails with exit status 7.
    #[arg(long, value_name = "HEX")]
    pub node_fingerprint: Option<String>,
}

/// A connection to the node for one role.
pub enum Node<'a> {
    /// The landlord's interface.
    Landlord(&'a Connection),
    /// The tenant's interface.
    Tenant(&'a Connection),
    /// The tenant's corrective-action records (`tenantctl actions`), read
    /// through `TenantEngines1.ListActionRecords`.
    TenantActions(&'a Connection),
}

fn unavailable(e: zbus::Error) -> CliError {
    CliError::new(exit::UNAVAILABLE, e.to_string())
}

impl Node<'_> {
    async fn list(&self) -> Result<Vec<ReceiptInfo>, CliError> {
        Ok(match self {
            Node::Landlord(c) => {
                LandlordProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .list_receipts()
                    .await?
            }
            Node::Tenant(c) => {
                TenantProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .list_receipts()
                    .await?
            }
            Node::TenantActions(c) => {
                leasehold_dbus_api::tenant_engines::TenantEnginesProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .list_action_records()
                    .await?
            }
        })
    }

    async fn get(&self, id: &str) -> Result<ReceiptInfo, CliError> {
        Ok(match self {
            Node::Landlord(c) => {
                LandlordProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .get_receipt(id)
                    .await?
            }
            Node::Tenant(c) => {
                TenantProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .get_receipt(id)
                    .await?
            }
            // The list carries every body (at most 256 records).
            Node::TenantActions(_) => self
                .list()
                .await?
                .into_iter()
                .find(|r| r.id.as_deref() == Some(id))
                .ok_or_else(|| {
                    CliError::new(
                        exit::NOT_FOUND,
                        format!("no action record {id:?} (see `actions list`)"),
                    )
                })?,
        })
    }

    async fn receipt_key(&self) -> Result<leasehold_dbus_api::PublicKey, CliError> {
        Ok(match self {
            Node::Landlord(c) => {
                LandlordProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .get_receipt_key()
                    .await?
            }
            Node::Tenant(c) | Node::TenantActions(c) => {
                TenantProxy::new(c)
                    .await
                    .map_err(unavailable)?
                    .get_receipt_key()
                    .await?
            }
        })
    }
}

/// The document `receipts show --json` prints and `verify-receipt` reads:
/// the receipt as an object ([`crate::output::receipt_object`]).
fn document(r: &ReceiptInfo) -> Result<Value, CliError> {
    let body = r
        .receipt
        .as_deref()
        .map(crate::output::receipt_object)
        .transpose()
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    Ok(json!({
        "id": r.id, "time": r.time, "change": r.change, "role": r.role, "signer": r.signer,
        receipt_json::BODY: body, receipt_json::SIGNATURE: r.receipt_signature,
    }))
}

/// One receipt of `receipts list`.
fn summary(r: &ReceiptInfo) -> Value {
    json!({"id": r.id, "time": r.time, "change": r.change, "role": r.role, "signer": r.signer})
}

/// Runs `receipts ...`.
pub async fn run(node: Node<'_>, json: bool, cmd: ReceiptsCommand) -> Result<(), CliError> {
    match cmd {
        ReceiptsCommand::List => {
            let list = node.list().await?;
            let v = Value::Array(list.iter().map(summary).collect());
            emit(json, v, || {
                if list.is_empty() {
                    return "no receipts".into();
                }
                list.iter()
                    .map(|r| {
                        if r.change.as_deref() == Some("health-action") {
                            return format!(
                                "{}  corrective action {}, {}",
                                r.id.as_deref().unwrap_or("?"),
                                r.role.as_deref().unwrap_or("?"),
                                r.time.map_or_else(|| "?".into(), unix_time_text)
                            );
                        }
                        format!(
                            "{}  {} of {} keys, {}",
                            r.id.as_deref().unwrap_or("?"),
                            r.change.as_deref().unwrap_or("?"),
                            r.role.as_deref().unwrap_or("?"),
                            r.time.map_or_else(|| "?".into(), unix_time_text)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ReceiptsCommand::Show { id, out } => {
            let r = node.get(&id).await?;
            let doc = document(&r)?;
            if let Some(path) = &out {
                std::fs::write(path, format!("{doc}\n")).map_err(|e| {
                    CliError::new(exit::FAILURE, format!("{}: {e}", path.display()))
                })?;
            }
            emit(json, doc, || {
                let body: Value = r
                    .receipt
                    .as_deref()
                    .and_then(|b| serde_json::from_str(b).ok())
                    .unwrap_or(Value::Null);
                let mut s = serde_json::to_string_pretty(&body).unwrap_or_default();
                s.push_str(&format!(
                    "\nsignature: {}",
                    r.receipt_signature.as_deref().unwrap_or("?")
                ));
                if let Some(p) = &out {
                    s.push_str(&format!(
                        "\nwritten to {} (check it with verify-receipt)",
                        p.display()
                    ));
                } else {
                    s.push_str("\n(--json or --out FILE gives the document verify-receipt checks)");
                }
                s
            });
        }
    }
    Ok(())
}

/// The body (the exact bytes signed) and signature of a receipt file: the
/// body is an object (written back compactly in its own field order, which
/// gives the signed bytes: [`crate::output::receipt_object`]) or, as
/// older CLIs and the agent's `receipts/` files have it, a string; the
/// signature under its current or its legacy name.
fn read_receipt(path: &Path) -> Result<(String, Vec<u8>), CliError> {
    let text = read_arg_file("receipt", path)?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| {
        CliError::new(
            exit::INVALID,
            format!("receipt {}: not JSON: {e}", path.display()),
        )
    })?;
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let body = match v.get(receipt_json::BODY) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(o @ Value::Object(_)) => Some(o.to_string()),
        _ => None,
    };
    let sig = field(receipt_json::SIGNATURE).or_else(|| field(receipt_json::LEGACY_SIGNATURE));
    let (Some(body), Some(sig)) = (body, sig) else {
        return Err(CliError::new(
            exit::INVALID,
            format!(
                "receipt {}: needs \"{}\" (an object) and \"{}\" (or \"{}\")",
                path.display(),
                receipt_json::BODY,
                receipt_json::SIGNATURE,
                receipt_json::LEGACY_SIGNATURE
            ),
        ));
    };
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|e| {
            CliError::new(
                exit::INVALID,
                format!(
                    "receipt {}: {}: not base64: {e}",
                    path.display(),
                    receipt_json::SIGNATURE
                ),
            )
        })?;
    Ok((body, sig))
}

fn fingerprint(what: &str, pem: &str) -> Result<String, CliError> {
    leasehold_envelope::RecipientKey::from_pem(pem)
        .map(|k| k.fingerprint_hex())
        .map_err(|e| CliError::new(exit::INVALID, format!("{what}: {e}")))
}

/// `verify-receipt`: checks the signature with the given or the node's key
/// and that the key is the node's; reports the signer's fingerprint.
/// `node` connects when no `--key` is given.
pub async fn verify<F, Fut>(json: bool, a: &VerifyArgs, connect: F) -> Result<(), CliError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(Connection, bool), CliError>>,
{
    let (body, sig) = read_receipt(&a.receipt)?;
    let expected = match &a.node_fingerprint {
        Some(f) => {
            let f = f.trim().to_ascii_lowercase().replace(':', "");
            if f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(CliError::new(
                    exit::INVALID,
                    "--node-fingerprint: expected 64 hex digits (SHA-256 of the key, from `receipt-key --json`)",
                ));
            }
            Some(f)
        }
        None => None,
    };
    let (pem, source) = match &a.key {
        Some(path) => (read_pem_file("node key", path)?, "given"),
        None => {
            let (conn, landlord) = connect().await?;
            let node = if landlord {
                Node::Landlord(&conn)
            } else {
                Node::Tenant(&conn)
            };
            let k = node.receipt_key().await?;
            (k.pem.unwrap_or_default(), "the node's")
        }
    };
    let key_fp = fingerprint("node key", &pem)?;
    let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let claimed = doc.get("signer").and_then(Value::as_str).map(str::to_owned);
    // The key the receipt must be signed with: the one asked for, else the
    // given or fetched key.
    let want = expected.clone().unwrap_or_else(|| key_fp.clone());
    if let Some(c) = &claimed {
        if *c != want {
            return Err(CliError::new(
                NOT_NODE_KEY,
                format!("the receipt was NOT signed by the node's key: it names signer {c}, the node's key is {want}"),
            ));
        }
    }
    if key_fp != want {
        return Err(CliError::new(
            NOT_NODE_KEY,
            format!("the key given ({key_fp}) is NOT the node's key ({want})"),
        ));
    }
    leasehold_envelope::verify_signature(&pem, body.as_bytes(), &sig)
        .map_err(|e| CliError::new(exit::FAILURE, format!("the receipt does NOT verify: {e}")))?;
    emit(
        json,
        json!({"verified": true, "signer": key_fp, "key": source, "receipt": doc}),
        || {
            format!(
                "receipt verified: signed by {source} key {key_fp}\n{}",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            )
        },
    );
    Ok(())
}
