//! The canonical encoding of everything the ledger hashes or signs.
//!
//! It is RFC 8785 (JSON Canonicalization Scheme) restricted to the values the ledger uses:
//! objects with keys sorted by their UTF-16 code units, no insignificant whitespace,
//! strings escaped as ECMAScript's `JSON.stringify` escapes them, and numbers limited to
//! integers in the range a browser represents exactly (|n| ≤ 2^53 − 1), which JCS then
//! prints as plain decimal digits. Floats are refused rather than canonicalised, so no
//! implementation has to reproduce ECMAScript's float printing. `docs/canonical-encoding.md`
//! is the specification a third party implements.

use serde::Serialize;
use serde_json::Value;

/// Largest integer a JavaScript number holds exactly: 2^53 − 1.
pub const SAFE_INTEGER_MAX: u64 = (1 << 53) - 1;

/// Nesting limit: deeper values are refused (no ledger type comes close).
pub const DEPTH_MAX: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("number {0} is not an integer within ±(2^53 − 1); the canonical encoding allows no other numbers")]
    Number(String),
    #[error("value nests deeper than {DEPTH_MAX} levels")]
    TooDeep,
    #[error("value cannot be represented as JSON: {0}")]
    NotJson(String),
}

/// Canonical bytes of any serialisable value.
pub fn to_canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(value).map_err(|e| CanonicalError::NotJson(e.to_string()))?;
    canonical_value_bytes(&value)
}

/// Canonical bytes of a JSON value.
pub fn canonical_value_bytes(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out, 0)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), CanonicalError> {
    if depth > DEPTH_MAX {
        return Err(CanonicalError::TooDeep);
    }
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            let fits = if let Some(n) = number.as_u64() {
                n <= SAFE_INTEGER_MAX
            } else if let Some(n) = number.as_i64() {
                n.unsigned_abs() <= SAFE_INTEGER_MAX
            } else {
                false
            };
            if !fits {
                return Err(CanonicalError::Number(number.to_string()));
            }
            out.extend_from_slice(number.to_string().as_bytes());
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 §3.2.3: sort by the UTF-16 code units of the keys.
            entries.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Escapes as ECMAScript `JSON.stringify`: `"` `\` and the C0 controls; `\b \t \n \f \r`
/// by name, other controls as `\u00xx` with lowercase hex; everything else as UTF-8.
fn write_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in text.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buffer = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One case per rule: the input value and the exact canonical text expected.
    fn check(input: Value, expect: &str) {
        let bytes = canonical_value_bytes(&input).expect("canonical");
        assert_eq!(String::from_utf8(bytes).unwrap(), expect);
    }

    #[test]
    fn objects_sort_by_utf16_code_units_and_drop_whitespace() {
        check(
            json!({"b": 1, "a": [true, false, null]}),
            r#"{"a":[true,false,null],"b":1}"#,
        );
        // U+1F600 sorts after U+E000 by code point and in UTF-8, but before it in UTF-16:
        // the emoji is the surrogate pair 0xD83D 0xDE00, and 0xD83D < 0xE000.
        check(
            json!({"\u{E000}": 2, "\u{1F600}": 1}),
            "{\"\u{1F600}\":1,\"\u{E000}\":2}",
        );
        check(json!({"z": {"y": 1, "x": 2}}), r#"{"z":{"x":2,"y":1}}"#);
    }

    #[test]
    fn strings_escape_like_json_stringify() {
        check(json!("a\"b\\c"), r#""a\"b\\c""#);
        check(json!("\u{8}\t\n\u{c}\r"), r#""\b\t\n\f\r""#);
        check(json!("\u{1}\u{1f}"), r#""\u0001\u001f""#);
        check(json!("é/€\u{7f}"), "\"é/€\u{7f}\"");
    }

    #[test]
    fn only_safe_integers_are_numbers() {
        check(json!(0), "0");
        check(json!(-42), "-42");
        check(json!(SAFE_INTEGER_MAX), "9007199254740991");
        for bad in [
            json!(SAFE_INTEGER_MAX + 1),
            json!(1.5),
            json!(-(1i64 << 53)),
        ] {
            assert!(matches!(
                canonical_value_bytes(&bad),
                Err(CanonicalError::Number(_))
            ));
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused() {
        let mut value = json!(1);
        for _ in 0..=DEPTH_MAX {
            value = json!([value]);
        }
        assert_eq!(canonical_value_bytes(&value), Err(CanonicalError::TooDeep));
    }
}
