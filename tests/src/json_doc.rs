//! docs/json.md read as a schema: its command table and its type tables,
//! and a checker of JSON values against them (tests/tests/json_doc.rs).
//! The document's notation is its "Notation" section.

use std::collections::BTreeMap;

use serde_json::Value;

/// A type expression of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ty {
    String,
    Integer,
    Boolean,
    /// A free-form object (a document of its own).
    Object,
    Array(Box<Ty>),
    Nullable(Box<Ty>),
    /// A type of the document's "Types" section.
    Named(String),
}

impl Ty {
    /// `string`, `integer?`, `[Flow]`, `[[Protocol]?]`, `NodeInfo`.
    pub fn parse(s: &str) -> Result<Ty, String> {
        let s = s.trim();
        if let Some(inner) = s.strip_suffix('?') {
            return Ok(Ty::Nullable(Box::new(Ty::parse(inner)?)));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return Ok(Ty::Array(Box::new(Ty::parse(inner)?)));
        }
        Ok(match s {
            "string" => Ty::String,
            "integer" => Ty::Integer,
            "boolean" => Ty::Boolean,
            "object" => Ty::Object,
            n if n.starts_with(|c: char| c.is_ascii_uppercase())
                && n.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                Ty::Named(n.to_owned())
            }
            other => return Err(format!("unknown type {other:?}")),
        })
    }

    fn named(&self, out: &mut Vec<String>) {
        match self {
            Ty::Array(t) | Ty::Nullable(t) => t.named(out),
            Ty::Named(n) => out.push(n.clone()),
            _ => {}
        }
    }
}

/// A field of a type table.
#[derive(Debug, Clone)]
pub struct Field {
    pub ty: Ty,
    /// Marked *(may be absent)*.
    pub optional: bool,
}

/// The schema docs/json.md states.
#[derive(Debug, Default)]
pub struct JsonDoc {
    /// `landlordctl boundary set` → what it prints.
    pub commands: BTreeMap<String, Ty>,
    /// Type name → its fields.
    pub types: BTreeMap<String, BTreeMap<String, Field>>,
    /// A type that is one of several, told apart by its `kind` field (a
    /// `| kind | type |` table): type name → kind → the type it then is.
    pub variants: BTreeMap<String, BTreeMap<String, Ty>>,
}

/// The backticked text of a table cell: `` `x` (…) `` → x.
fn code(cell: &str) -> Option<&str> {
    let rest = cell.trim().strip_prefix('`')?;
    Some(&rest[..rest.find('`')?])
}

fn cells(line: &str) -> Vec<&str> {
    let t = line.trim();
    let t = t.strip_prefix('|').unwrap_or(t);
    let t = t.strip_suffix('|').unwrap_or(t);
    t.split('|').collect()
}

impl JsonDoc {
    /// docs/json.md of this workspace.
    pub fn load() -> JsonDoc {
        let path = crate::workspace_root().join("docs/json.md");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        JsonDoc::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Reads the "Commands" table and every `### Type` table (a table
    /// whose header is `| field | type | meaning |`).
    pub fn parse(text: &str) -> Result<JsonDoc, String> {
        let mut doc = JsonDoc::default();
        let mut section = String::new();
        let mut heading = String::new();
        let mut in_fields = false;
        let mut in_variants = false;
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}", n + 1);
            if let Some(h) = line.strip_prefix("## ") {
                section = h.trim().to_owned();
                heading.clear();
                in_fields = false;
                in_variants = false;
                continue;
            }
            if let Some(h) = line.strip_prefix("### ") {
                heading = h.trim().to_owned();
                in_fields = false;
                in_variants = false;
                continue;
            }
            if !line.trim_start().starts_with('|') {
                in_fields = false;
                in_variants = false;
                continue;
            }
            let c = cells(line);
            if c.iter().all(|x| x.trim().chars().all(|ch| ch == '-')) {
                continue;
            }
            if c.len() >= 2 && c[0].trim() == "kind" && c[1].trim() == "type" {
                if doc.types.contains_key(&heading) || doc.variants.contains_key(&heading) {
                    return Err(at(format!("type {heading} defined twice")));
                }
                Ty::parse(&heading).map_err(|e| at(format!("heading {heading:?}: {e}")))?;
                doc.variants.insert(heading.clone(), BTreeMap::new());
                in_variants = true;
                continue;
            }
            if in_variants {
                let kind = code(c[0]).ok_or_else(|| at("kind not in backticks".into()))?;
                let ty = code(c.get(1).copied().unwrap_or_default())
                    .ok_or_else(|| at("type not in backticks".into()))?;
                let ty = Ty::parse(ty).map_err(at)?;
                let kinds = doc.variants.get_mut(&heading).expect("table of a type");
                if kinds.insert(kind.to_owned(), ty).is_some() {
                    return Err(at(format!("{heading}: kind {kind} listed twice")));
                }
                continue;
            }
            if c.len() >= 2 && c[0].trim() == "field" && c[1].trim() == "type" {
                if doc.types.contains_key(&heading) || doc.variants.contains_key(&heading) {
                    return Err(at(format!("type {heading} defined twice")));
                }
                Ty::parse(&heading).map_err(|e| at(format!("heading {heading:?}: {e}")))?;
                doc.types.insert(heading.clone(), BTreeMap::new());
                in_fields = true;
                continue;
            }
            if section == "Commands" && c.len() >= 2 && c[0].trim() != "command" {
                let cmd = code(c[0]).ok_or_else(|| at("command not in backticks".into()))?;
                let ty = code(c[1]).ok_or_else(|| at("type not in backticks".into()))?;
                let ty = Ty::parse(ty).map_err(at)?;
                if doc.commands.insert(cmd.to_owned(), ty).is_some() {
                    return Err(at(format!("{cmd} listed twice")));
                }
                continue;
            }
            if in_fields {
                let name = code(c[0]).ok_or_else(|| at("field not in backticks".into()))?;
                let ty = code(c.get(1).copied().unwrap_or_default())
                    .ok_or_else(|| at("type not in backticks".into()))?;
                let field = Field {
                    ty: Ty::parse(ty).map_err(at)?,
                    optional: c[0].contains("(may be absent)"),
                };
                let fields = doc.types.get_mut(&heading).expect("table of a type");
                if fields.insert(name.to_owned(), field).is_some() {
                    return Err(at(format!("{heading}.{name} listed twice")));
                }
            }
        }
        // Every name used is defined.
        let mut used = Vec::new();
        for t in doc.commands.values() {
            t.named(&mut used);
        }
        for fields in doc.types.values() {
            for f in fields.values() {
                f.ty.named(&mut used);
            }
        }
        for kinds in doc.variants.values() {
            for t in kinds.values() {
                t.named(&mut used);
            }
        }
        for u in used {
            if !doc.types.contains_key(&u) && !doc.variants.contains_key(&u) {
                return Err(format!("type {u} is used but not defined"));
            }
        }
        if doc.commands.is_empty() {
            return Err("no Commands table".into());
        }
        Ok(doc)
    }

    /// Checks `v` against `ty`; the error names the path (`.keys.tenant`).
    /// An object of a named type must have exactly the documented fields
    /// (those marked *may be absent* may be missing).
    pub fn check(&self, v: &Value, ty: &Ty, path: &str) -> Result<(), String> {
        let wrong = |want: &str| Err(format!("{path}: expected {want}, got {v}"));
        match ty {
            Ty::Nullable(t) => {
                if v.is_null() {
                    Ok(())
                } else {
                    self.check(v, t, path)
                }
            }
            Ty::String if v.is_string() => Ok(()),
            Ty::String => wrong("a string"),
            Ty::Integer if v.is_u64() || v.is_i64() => Ok(()),
            Ty::Integer => wrong("an integer"),
            Ty::Boolean if v.is_boolean() => Ok(()),
            Ty::Boolean => wrong("a boolean"),
            Ty::Object if v.is_object() => Ok(()),
            Ty::Object => wrong("an object"),
            Ty::Array(t) => match v.as_array() {
                Some(items) => items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, x)| self.check(x, t, &format!("{path}[{i}]"))),
                None => wrong("an array"),
            },
            Ty::Named(n) if self.variants.contains_key(n) => {
                let kinds = &self.variants[n];
                let Some(kind) = v.get("kind").and_then(Value::as_str) else {
                    return wrong(&format!("a {n} object with a string \"kind\""));
                };
                match kinds.get(kind) {
                    Some(t) => self.check(v, t, path),
                    None => Err(format!(
                        "{path}: kind {kind:?} is printed but not documented in docs/json.md ({n})"
                    )),
                }
            }
            Ty::Named(n) => {
                let fields = self
                    .types
                    .get(n)
                    .ok_or_else(|| format!("{path}: type {n} is not documented"))?;
                let Some(obj) = v.as_object() else {
                    return wrong(&format!("a {n} object"));
                };
                for k in obj.keys() {
                    if !fields.contains_key(k) {
                        return Err(format!(
                            "{path}: field {k:?} is printed but not documented in docs/json.md ({n})"
                        ));
                    }
                }
                for (k, f) in fields {
                    match obj.get(k) {
                        Some(x) => self.check(x, &f.ty, &format!("{path}.{k}"))?,
                        None if f.optional => {}
                        None => {
                            return Err(format!(
                                "{path}: documented field {k:?} ({n}) is missing: {v}"
                            ))
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks what `command` printed (`landlordctl boundary show`).
    pub fn check_command(&self, command: &str, v: &Value) -> Result<(), String> {
        let ty = self
            .commands
            .get(command)
            .ok_or_else(|| format!("{command} is not in docs/json.md's Commands table"))?;
        self.check(v, ty, command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DOC: &str = "## Commands\n\n| command | prints |\n|---|---|\n| `x show` | `[A]` |\n\n## Types\n\n### A\n\n| field | type | meaning |\n|---|---|---|\n| `n` | `integer?` | |\n| `b` *(may be absent)* | `[[B]?]` | |\n\n### B\n\n| field | type | meaning |\n|---|---|---|\n| `s` | `string` | |\n";

    #[test]
    fn the_notation_is_checked() {
        let d = JsonDoc::parse(DOC).unwrap();
        assert!(d
            .check_command(
                "x show",
                &json!([{"n": 1}, {"n": null, "b": [null, [{"s": "x"}]]}])
            )
            .is_ok());
        for bad in [
            json!([{"n": "1"}]),
            json!([{}]),
            json!([{"n": 1, "extra": 2}]),
            json!([{"n": 1, "b": [[{"s": 1}]]}]),
            json!({"n": 1}),
        ] {
            assert!(d.check_command("x show", &bad).is_err(), "{bad}");
        }
        assert!(d.check_command("y", &json!(1)).is_err());
        assert!(JsonDoc::parse(&DOC.replace("`[[B]?]`", "`[[C]?]`")).is_err());
    }

    const VARIANTS: &str = "## Commands\n\n| command | prints |\n|---|---|\n| `x` | `[V?]` |\n\n## Types\n\n### V\n\n| kind | type |\n|---|---|\n| `a` | `VA` |\n| `b` | `VB` |\n\n### VA\n\n| field | type | meaning |\n|---|---|---|\n| `kind` | `string` | |\n| `items` | `[integer]` | |\n\n### VB\n\n| field | type | meaning |\n|---|---|---|\n| `kind` | `string` | |\n| `items` | `[string]` | |\n";

    #[test]
    fn variants_are_told_apart_by_kind() {
        let d = JsonDoc::parse(VARIANTS).unwrap();
        assert_eq!(d.variants["V"].len(), 2);
        assert!(d
            .check_command(
                "x",
                &json!([{"kind": "a", "items": [1]}, {"kind": "b", "items": ["s"]}, null])
            )
            .is_ok());
        for bad in [
            json!([{"kind": "a", "items": ["s"]}]),
            json!([{"kind": "b", "items": [1]}]),
            json!([{"kind": "c", "items": []}]),
            json!([{"items": []}]),
            json!([{"kind": "a", "items": [], "extra": 1}]),
        ] {
            assert!(d.check_command("x", &bad).is_err(), "{bad}");
        }
        assert!(JsonDoc::parse(&VARIANTS.replace("`VB` |", "`VC` |")).is_err());
        assert!(JsonDoc::parse(&VARIANTS.replace("| `b` |", "| `a` |")).is_err());
    }
}
