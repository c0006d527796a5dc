//! Maps between byte offsets, lines and field paths (`service[1].table_size`) of a TOML text,
//! so every config error can name its line and field.
use std::ops::Range;

use toml_edit::{Document, Item, Table, Value};

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Line of the deepest part of `path` that exists in the text (a field left at its default
/// points at its table).
pub fn line_of_field(text: &str, path: &str) -> Option<usize> {
    let doc = Document::parse(text).ok()?;
    let mut found: Option<Range<usize>> = None;
    let mut table: &Table = doc.as_table();
    for segment in path.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((k, v)) = table.get_key_value(key) else {
            break;
        };
        found = k.span().or(found);
        if let Some(i) = index {
            match v {
                Item::ArrayOfTables(a) => match a.get(i) {
                    Some(t) => {
                        found = t.span().or(found);
                        table = t;
                        continue;
                    }
                    None => break,
                },
                Item::Value(Value::Array(a)) => {
                    found = a.get(i).and_then(|v| v.span()).or(found);
                    break;
                }
                _ => break,
            }
        }
        match v.as_table() {
            Some(t) => table = t,
            None => break,
        }
    }
    found.map(|r| line_of(text, r.start))
}

/// Path of the field at a byte offset (as reported by the TOML parser), or "" if unknown.
pub fn field_at(text: &str, offset: usize) -> String {
    // Only a document the config's own parser accepts goes to toml_edit: on some invalid
    // ones (found by the config fuzzer) toml_edit panics instead of failing.
    if text.parse::<toml::Table>().is_err() {
        return String::new();
    }
    let Ok(doc) = Document::parse(text) else {
        return String::new();
    };
    let mut best = None;
    visit(doc.as_table(), "", offset, &mut best);
    best.map(|(path, _)| path).unwrap_or_default()
}

/// Depth-first: remembers the key/value containing `offset`, or failing that the last table
/// header before it.
fn visit(table: &Table, prefix: &str, offset: usize, best: &mut Option<(String, bool)>) {
    if let Some(span) = table.span()
        && span.start <= offset
        && !matches!(best, Some((_, true)))
    {
        *best = Some((prefix.to_string(), false));
    }
    for (raw, item) in table.iter() {
        let key = raw;
        // A key that is not bare is shown quoted, so the path stays unambiguous.
        let bare = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let key = if bare && !key.is_empty() {
            key.to_string()
        } else {
            format!("{key:?}")
        };
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match item {
            Item::Table(t) => visit(t, &path, offset, best),
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    visit(t, &format!("{path}[{i}]"), offset, best);
                }
            }
            Item::Value(v) => {
                let start = table.key(raw).and_then(|k| k.span()).map(|s| s.start);
                let end = v.span().map(|s| s.end);
                if let (Some(start), Some(end)) = (start, end)
                    && (start..end).contains(&offset)
                {
                    *best = Some((path, true));
                }
            }
            Item::None => {}
        }
    }
}
