//! Documents written by people (TOML or JSON) read into typed values: the
//! scaffolding boundary documents and engine specs share. A size cap
//! checked before parsing, the field path of an error
//! (`allow[2].peers[0]`, `document` for the text as a whole), the line and
//! column where the parser stopped, and one error type.
//!
//! Messages never quote the document's text around the error (the TOML
//! crate's own rendering does): a spec's environment values may be secrets.

use std::fmt;

use serde::de::DeserializeOwned;

/// Longest field path in an error (bytes); a longer one (a huge map key)
/// is cut and ends with `…`.
pub const MAX_FIELD: usize = 200;

/// Where in the text an error is: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` of `text` (clamped to the text).
    pub fn of(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// Why a document was refused; `field` is a path like `allow[2].peers[0]`
/// (`document` for the text as a whole). Errors of the text itself (syntax,
/// types) also carry the [`Location`] where the parser stopped; the
/// message then starts with it: `line 3, column 9: allow[0].peers: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocError {
    /// Where, as a field path.
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// Where in the text, for errors found while parsing.
    pub location: Option<Location>,
}

impl DocError {
    /// An error of `field` (cut to [`MAX_FIELD`] bytes), without a location.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> DocError {
        let mut field = field.into();
        if field.len() > MAX_FIELD {
            let mut cut = MAX_FIELD;
            while !field.is_char_boundary(cut) {
                cut -= 1;
            }
            field.truncate(cut);
            field.push('…');
        }
        DocError {
            field,
            reason: reason.into(),
            location: None,
        }
    }

    /// The same error at `location`.
    pub fn at(self, location: Location) -> DocError {
        DocError {
            location: Some(location),
            ..self
        }
    }
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.location {
            write!(f, "line {}, column {}: ", l.line, l.column)?;
        }
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for DocError {}

/// Longest piece of caller input echoed back in an error (characters).
pub const ECHO_LIMIT: usize = 64;

/// Caller input as shown in an error: quoted, at most [`ECHO_LIMIT`]
/// characters, then the length of the rest.
pub fn shown(s: &str) -> String {
    if s.chars().count() <= ECHO_LIMIT {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(ECHO_LIMIT).collect();
    format!("{head:?}… ({} bytes)", s.len())
}

/// For `#[serde(deserialize_with = "…")]`: a map whose keys must be
/// distinct. JSON allows a key twice and a plain map keeps the last one
/// silently (TOML parsers refuse it themselves).
pub fn unique_keys<'de, D, V>(d: D) -> Result<std::collections::BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: serde::Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = std::collections::BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table (map) with each key once")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some(k) = m.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "duplicate key {}",
                        shown(&k)
                    )));
                }
                let v = m.next_value()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// Refuses a document text over `max` bytes (field `document`).
pub fn check_size(text: &str, max: usize) -> Result<(), DocError> {
    if text.len() > max {
        return Err(DocError::new(
            "document",
            format!("{} bytes, at most {max}", text.len()),
        ));
    }
    Ok(())
}

fn field_of(path: &serde_path_to_error::Path) -> Option<String> {
    let path = path.to_string();
    (path != ".").then_some(path)
}

/// Parses a TOML document of at most `max` bytes into `T`.
pub fn from_toml<T: DeserializeOwned>(text: &str, max: usize) -> Result<T, DocError> {
    check_size(text, max)?;
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = field_of(e.path());
        let inner = e.into_inner();
        let mut start = inner.span().map(|s| s.start);
        let field = match field {
            Some(f) => f,
            // A syntax error stops before any field is reached: the table
            // and key being written at that point name it instead. (Parsed
            // again only on this error path, to tell syntax from types.)
            None if text.parse::<toml::Table>().is_err() => start
                .and_then(|s| toml_path_at(text, s))
                .unwrap_or_else(|| "document".into()),
            // The document as a whole (a missing top-level field): its
            // span is all of it, no place to point at.
            None => {
                start = None;
                "document".into()
            }
        };
        // One line: the parser's message may add `expected …` below it.
        let message: Vec<&str> = inner
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let err = DocError::new(field, message.join("; "));
        match start {
            Some(s) => err.at(Location::of(text, s)),
            None => err,
        }
    })
}

/// Parses a JSON document (one value, and nothing after it but white
/// space) of at most `max` bytes into `T`.
pub fn from_json<T: DeserializeOwned>(text: &str, max: usize) -> Result<T, DocError> {
    check_size(text, max)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = field_of(e.path()).unwrap_or_else(|| "document".into());
        json_error(text, field, "", e.inner())
    })?;
    de.end()
        .map_err(|e| json_error(text, "document".into(), "content after the document: ", &e))?;
    Ok(v)
}

/// A serde_json error as a [`DocError`]: its location moved out of the
/// message into [`DocError::location`] (in characters, as for TOML).
fn json_error(text: &str, field: String, prefix: &str, e: &serde_json::Error) -> DocError {
    let message = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    let err = DocError::new(field, format!("{prefix}{message}"));
    if e.line() == 0 {
        return err;
    }
    // serde_json counts the column in bytes from 1.
    let line_start = text
        .split_inclusive('\n')
        .take(e.line() - 1)
        .map(str::len)
        .sum::<usize>();
    let loc = Location::of(text, line_start + e.column().saturating_sub(1));
    err.at(loc)
}

/// The table (and key) being written at byte `offset` of a TOML text, as
/// a field path (`allow[1].peers`): read from the `[table]` and
/// `[[array]]` headers before it, for errors the parser reports before any
/// field is reached. `None` at the top level outside any key.
fn toml_path_at(text: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut in_multiline = false;
    let mut at = 0usize;
    let mut key = None;
    for line in text.split_inclusive('\n') {
        let end = at + line.len();
        let here = offset < end || end == text.len();
        let t = line.trim();
        let quotes = t.matches("\"\"\"").count() + t.matches("'''").count();
        if !in_multiline {
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
                let name = name.0.trim().to_owned();
                let n = arrays.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
                // A table under an array of tables resets nested counts.
                arrays.retain(|k, _| !k.starts_with(&format!("{name}.")));
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split_once(']')) {
                let name = name.0.trim().to_owned();
                // `[a.b]` under `[[a]]` belongs to a's last element.
                table = match arrays.get(name.split('.').next().unwrap_or("")) {
                    Some(n) if name.contains('.') => {
                        let (head, rest) = name.split_once('.').unwrap_or((&name, ""));
                        format!("{head}[{}].{rest}", n.saturating_sub(1))
                    }
                    _ => name,
                };
            } else if let Some((k, _)) = t.split_once('=') {
                let k = k.trim().trim_matches('"').trim_matches('\'');
                if !k.is_empty() && !k.starts_with('#') {
                    key = Some(k.to_owned());
                }
            } else if !t.is_empty() && !t.starts_with('#') && here {
                // A bare word: the key being written.
                key = t.split_whitespace().next().map(str::to_owned);
            }
            if t.starts_with('[') {
                key = None;
            }
        }
        if quotes % 2 == 1 {
            in_multiline = !in_multiline;
        }
        if here {
            break;
        }
        at = end;
        // A key's value may continue on the next lines (arrays); a blank
        // line or a new key ends what the path can tell.
        if t.is_empty() {
            key = None;
        }
    }
    match (table.is_empty(), key) {
        (true, None) => None,
        (true, Some(k)) => Some(k),
        (false, None) => Some(table),
        (false, Some(k)) => Some(format!("{table}.{k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        #[serde(default)]
        allow: Vec<Entry>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Entry {
        name: String,
        #[serde(default)]
        ports: Vec<u16>,
    }

    fn toml_err(text: &str) -> DocError {
        from_toml::<Doc>(text, 1 << 20).unwrap_err()
    }

    fn json_err(text: &str) -> DocError {
        from_json::<Doc>(text, 1 << 20).unwrap_err()
    }

    #[test]
    fn toml_syntax_errors_have_line_column_and_the_table() {
        let e = toml_err("[[allow]]\nname = \"a\"\nports = [80,,]\n");
        assert_eq!(
            e.to_string(),
            "line 3, column 13: allow[0].ports: invalid array; expected `]`"
        );
        let e = toml_err("[[allow]]\nname = \"a\"\n\n[[allow]]\nname = \"b\"\nports = [80, \n");
        assert_eq!(e.location.map(|l| l.line), Some(7), "{e}");
        assert!(e.field.starts_with("allow[1]"), "{e}");
        let e = toml_err("[[allow]]\nname = \"a\nports = [1]\n");
        assert_eq!(
            e.location,
            Some(Location {
                line: 2,
                column: 10
            }),
            "{e}"
        );
        assert_eq!(e.field, "allow[0].name", "{e}");
        assert!(!e.reason.contains('\n'), "one line: {e:?}");
        assert!(
            e.to_string()
                .starts_with("line 2, column 10: allow[0].name: "),
            "{e}"
        );
        // A line that is not `key = value` at the top level.
        let e = toml_err("garbage here\n");
        assert_eq!(e.location.map(|l| (l.line, l.column)), Some((1, 9)), "{e}");
        assert_eq!(e.field, "garbage", "{e}");
    }

    #[test]
    fn toml_type_errors_keep_the_field_path_and_gain_a_location() {
        let e = toml_err("[[allow]]\nname = \"a\"\nports = [80, \"x\"]\n");
        assert_eq!(e.field, "allow[0].ports[1]", "{e}");
        assert_eq!(
            e.location,
            Some(Location {
                line: 3,
                column: 14
            }),
            "{e}"
        );
        // The message is the parser's, without its rendering of the text.
        assert!(!e.reason.contains('|'), "{e}");
        // Missing at the top level: the document, nowhere in particular.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            command: Vec<String>,
        }
        let e = from_toml::<Needs>("args = []\n", 100).unwrap_err();
        assert_eq!(e.to_string(), "document: missing field `command`");
        let e = toml_err("[[allow]]\nname = \"a\"\ncolour = 1\n");
        assert!(e.reason.contains("unknown field"), "{e}");
        assert_eq!(e.location.map(|l| l.line), Some(3), "{e}");
    }

    #[test]
    fn json_errors_have_line_and_column_in_characters() {
        let e = json_err("{\"allow\": [\n  {\"name\": \"é\", \"ports\": [80, \"x\"]}\n]}");
        assert_eq!(e.field, "allow[0].ports[1]", "{e}");
        assert_eq!(e.location.map(|l| l.line), Some(2), "{e}");
        // Column in characters ("é" is two bytes): the end of `"x"`.
        assert_eq!(e.location.map(|l| l.column), Some(33), "{e}");
        assert!(!e.reason.contains(" at line "), "{e}");
        let e = json_err("{\"allow\": [}");
        assert_eq!(e.location.map(|l| (l.line, l.column)), Some((1, 12)), "{e}");
        let e = json_err("{}\n x");
        assert_eq!(e.field, "document");
        assert!(e.reason.starts_with("content after the document"), "{e}");
        assert_eq!(e.location.map(|l| (l.line, l.column)), Some((2, 2)), "{e}");
    }

    #[test]
    fn size_cap_and_long_fields() {
        let e = from_json::<Doc>("{}  ", 3).unwrap_err();
        assert_eq!(e.to_string(), "document: 4 bytes, at most 3");
        assert_eq!(e.location, None);
        let e = DocError::new("k".repeat(MAX_FIELD + 10), "x");
        assert_eq!(e.field.len(), MAX_FIELD + '…'.len_utf8());
    }

    #[test]
    fn location_of_offsets() {
        let t = "ab\nçd\n";
        assert_eq!(Location::of(t, 0), Location { line: 1, column: 1 });
        assert_eq!(Location::of(t, 3), Location { line: 2, column: 1 });
        assert_eq!(Location::of(t, 5), Location { line: 2, column: 2 });
        assert_eq!(Location::of(t, 4), Location { line: 2, column: 1 });
        assert_eq!(Location::of(t, 99), Location { line: 3, column: 1 });
    }
}
