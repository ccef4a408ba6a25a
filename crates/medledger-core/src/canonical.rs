//! The canonical encoding of everything the ledger hashes or signs.
//!
//! It is RFC 8785 (JSON Canonicalization Scheme) restricted to the values the ledger uses:
//! objects with keys sorted by their UTF-16 code units, no insignificant whitespace,
//! strings escaped as ECMAScript's `JSON.stringify` escapes them, and numbers limited to
//! integers in the range a browser represents exactly (|n| ≤ 2^53 − 1), which JCS then
//! prints as plain decimal digits. Floats are refused rather than canonicalised, so no
//! implementation has to reproduce ECMAScript's float printing. `docs/transactions.md`
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
///
/// The value is written straight from its `Serialize` impl, without building a
/// `serde_json::Value`, and the result is byte for byte that of `reference_bytes`
/// (`canonical_value_bytes(&serde_json::to_value(value)?)`), the definition. The direct
/// writer encodes only what that definition accepts and encodes plainly; on anything else
/// (a number or a nesting the encoding refuses, a value `to_value` refuses, a float map
/// key, a serde_json private token, an error raised by a `Serialize` impl) it gives up and
/// `reference_bytes` produces the exact result, error message included. The ledger's own
/// values never take that detour.
pub fn to_canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    match direct_bytes(value) {
        Ok(bytes) => Ok(bytes),
        Err(Detour) => reference_bytes(value),
    }
}

/// What `to_canonical_bytes` means: the canonical bytes of the `Value` serde_json makes.
fn reference_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(value).map_err(|e| CanonicalError::NotJson(e.to_string()))?;
    canonical_value_bytes(&value)
}

/// The direct writer alone: Err(Detour) wherever `reference_bytes` must decide.
fn direct_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Detour> {
    let mut encoder = Encoder {
        out: Vec::with_capacity(512),
        entries: Vec::with_capacity(32),
        keys: String::new(),
    };
    value.serialize(Direct {
        encoder: &mut encoder,
        depth: 0,
    })?;
    // Every object pops what it pushed, so a finished value leaves both stacks empty.
    assert!(encoder.entries.is_empty() && encoder.keys.is_empty());
    Ok(encoder.out)
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

// ---- the direct writer ----------------------------------------------------------------
//
// It mirrors `serde_json::value::Serializer` (what `to_value` runs) shape for shape, and
// writes each shape as `write_value` would write the `Value` that serializer builds:
//
// | serde shape                 | `to_value` builds              | written here         |
// |-----------------------------|--------------------------------|----------------------|
// | unit, unit struct, None     | null                           | `null`               |
// | Some(v), newtype struct     | v                              | v                    |
// | unit variant `V`            | "V"                            | `"V"`                |
// | newtype variant `V(v)`      | {"V": v}                       | `{"V":v}`            |
// | seq, tuple, tuple struct    | array                          | `[..]`               |
// | tuple variant `V(..)`       | {"V": [..]}                    | `{"V":[..]}`         |
// | map, struct                 | object, a repeated key's last  | sorted, last kept    |
// | struct variant `V {..}`     | {"V": {..}}                    | `{"V":{..}}`         |
// | char, str                   | string                         | escaped string       |
// | bytes                       | array of numbers               | `[n,..]`             |
// | f32/f64 NaN or infinite     | null                           | `null`               |
//
// Finite floats, integers beyond ±(2^53 − 1) and values deeper than `DEPTH_MAX` are
// errors in the reference path, so they detour. Map keys follow serde_json's
// `MapKeySerializer`: strings, chars, bools, integers and unit variants become strings;
// float keys (printed by serde_json's own float formatter) detour, anything else is
// refused by `to_value` and detours too.

/// The direct writer's only error: "let the reference path decide".
#[derive(Debug)]
struct Detour;

impl std::fmt::Display for Detour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the value needs the reference encoding path")
    }
}

impl std::error::Error for Detour {}

impl serde::ser::Error for Detour {
    fn custom<M: std::fmt::Display>(_message: M) -> Self {
        Detour
    }
}

/// Struct names serde_json gives special meaning to (`arbitrary_precision` numbers and
/// `RawValue`), depending on its features: the reference path handles them either way.
const SERDE_JSON_TOKENS: [&str; 2] = [
    "$serde_json::private::Number",
    "$serde_json::private::RawValue",
];

/// The output and the working stacks shared by every level of one value.
struct Encoder {
    out: Vec<u8>,
    /// Members of the objects being written, innermost object last.
    entries: Vec<Entry>,
    /// The text of map keys the entries name (struct field names are static).
    keys: String,
}

/// One object member already written to `out[start..end]` as `"key":value,`.
struct Entry {
    key: Key,
    start: usize,
    end: usize,
}

enum Key {
    Static(&'static str),
    /// `Encoder::keys[start..end]`.
    Map {
        start: usize,
        end: usize,
    },
}

impl Key {
    fn text<'k>(&self, keys: &'k str) -> &'k str {
        match *self {
            Key::Static(text) => text,
            Key::Map { start, end } => &keys[start..end],
        }
    }
}

/// RFC 8785 §3.2.3: compares keys by their UTF-16 code units. At the first differing byte
/// UTF-8 order is code-point order, and UTF-16 order differs from code-point order only
/// between U+E000..U+FFFF and U+10000.. (surrogate pairs), whose UTF-8 lead bytes are all
/// 0xEE or above: only there is the UTF-16 comparison needed.
fn compare_utf16(a: &str, b: &str) -> std::cmp::Ordering {
    let (a_bytes, b_bytes) = (a.as_bytes(), b.as_bytes());
    match a_bytes.iter().zip(b_bytes).position(|(x, y)| x != y) {
        None => a_bytes.len().cmp(&b_bytes.len()),
        Some(i) if a_bytes[i] >= 0xEE && b_bytes[i] >= 0xEE => {
            a.encode_utf16().cmp(b.encode_utf16())
        }
        Some(i) => a_bytes[i].cmp(&b_bytes[i]),
    }
}

/// `write_string`'s escaping, copying the runs between escapes whole and skipping eight
/// bytes at a time while none of them needs escaping.
fn write_escaped(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    out.push(b'"');
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            if !any_byte_needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let byte = bytes[i];
        i += 1;
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[copied..i - 1]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0C => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xF)],
            ]),
        }
        copied = i;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// Whether any of the eight bytes of `word` is below 0x20, `"` or `\`. The tests are the
/// exact "has a byte less than n" (n ≤ 128) and "has a zero byte" word tricks.
fn any_byte_needs_escape(word: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_byte_below =
        |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS != 0;
    has_byte_below(word, 0x20)
        || has_byte_below(word ^ (ONES * u64::from(b'"')), 1)
        || has_byte_below(word ^ (ONES * u64::from(b'\\')), 1)
}

/// Writes a safe integer as `serde_json::Number` prints it; out-of-range ones detour.
fn write_integer(negative: bool, magnitude: u128, out: &mut Vec<u8>) -> Result<(), Detour> {
    if magnitude > u128::from(SAFE_INTEGER_MAX) {
        return Err(Detour);
    }
    let mut n = magnitude as u64;
    let mut digits = [0u8; 20];
    let mut first = digits.len();
    loop {
        first -= 1;
        digits[first] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative && magnitude != 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[first..]);
    Ok(())
}

/// `write_value` refuses a value at a depth over the limit, whatever the value.
fn enter(depth: usize) -> Result<(), Detour> {
    if depth > DEPTH_MAX {
        return Err(Detour);
    }
    Ok(())
}

/// Writes one value, at `depth` as `write_value` counts it.
struct Direct<'a> {
    encoder: &'a mut Encoder,
    depth: usize,
}

impl<'a> Direct<'a> {
    fn scalar(self, bytes: &[u8]) -> Result<(), Detour> {
        enter(self.depth)?;
        self.encoder.out.extend_from_slice(bytes);
        Ok(())
    }

    fn integer(self, negative: bool, magnitude: u128) -> Result<(), Detour> {
        enter(self.depth)?;
        write_integer(negative, magnitude, &mut self.encoder.out)
    }

    fn float(self, finite: bool) -> Result<(), Detour> {
        // `Value::from` turns NaN and the infinities into null; finite floats are refused.
        if finite {
            return Err(Detour);
        }
        self.scalar(b"null")
    }

    fn string(self, text: &str) -> Result<(), Detour> {
        enter(self.depth)?;
        write_escaped(text, &mut self.encoder.out);
        Ok(())
    }

    /// Opens `{"variant":` for the variant forms, whose inner value is one level deeper.
    fn open_variant(&mut self, variant: &str) -> Result<(), Detour> {
        enter(self.depth)?;
        self.encoder.out.push(b'{');
        write_escaped(variant, &mut self.encoder.out);
        self.encoder.out.push(b':');
        Ok(())
    }

    fn array(self, depth: usize, close: &'static [u8]) -> Result<Array<'a>, Detour> {
        enter(depth)?;
        self.encoder.out.push(b'[');
        Ok(Array {
            encoder: self.encoder,
            depth,
            first: true,
            close,
        })
    }

    fn object(self, depth: usize, close_variant: bool) -> Result<Object<'a>, Detour> {
        enter(depth)?;
        let encoder = self.encoder;
        encoder.out.push(b'{');
        Ok(Object {
            body_start: encoder.out.len(),
            entries_base: encoder.entries.len(),
            keys_base: encoder.keys.len(),
            next_key: None,
            in_order: true,
            close_variant,
            depth,
            encoder,
        })
    }
}

impl<'a> serde::Serializer for Direct<'a> {
    type Ok = ();
    type Error = Detour;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, value: bool) -> Result<(), Detour> {
        self.scalar(if value { b"true" } else { b"false" })
    }

    fn serialize_i8(self, value: i8) -> Result<(), Detour> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i16(self, value: i16) -> Result<(), Detour> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i32(self, value: i32) -> Result<(), Detour> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i64(self, value: i64) -> Result<(), Detour> {
        self.integer(value < 0, u128::from(value.unsigned_abs()))
    }

    fn serialize_i128(self, value: i128) -> Result<(), Detour> {
        self.integer(value < 0, value.unsigned_abs())
    }

    fn serialize_u8(self, value: u8) -> Result<(), Detour> {
        self.serialize_u64(u64::from(value))
    }

    fn serialize_u16(self, value: u16) -> Result<(), Detour> {
        self.serialize_u64(u64::from(value))
    }

    fn serialize_u32(self, value: u32) -> Result<(), Detour> {
        self.serialize_u64(u64::from(value))
    }

    fn serialize_u64(self, value: u64) -> Result<(), Detour> {
        self.integer(false, u128::from(value))
    }

    fn serialize_u128(self, value: u128) -> Result<(), Detour> {
        self.integer(false, value)
    }

    fn serialize_f32(self, value: f32) -> Result<(), Detour> {
        self.float(value.is_finite())
    }

    fn serialize_f64(self, value: f64) -> Result<(), Detour> {
        self.float(value.is_finite())
    }

    fn serialize_char(self, value: char) -> Result<(), Detour> {
        self.string(value.encode_utf8(&mut [0u8; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), Detour> {
        self.string(value)
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<(), Detour> {
        enter(self.depth)?;
        if !value.is_empty() {
            enter(self.depth + 1)?;
        }
        let out = &mut self.encoder.out;
        out.push(b'[');
        for (i, byte) in value.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_integer(false, u128::from(*byte), out)?;
        }
        out.push(b']');
        Ok(())
    }

    fn serialize_none(self) -> Result<(), Detour> {
        self.scalar(b"null")
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Detour> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Detour> {
        self.scalar(b"null")
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Detour> {
        self.scalar(b"null")
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result<(), Detour> {
        self.string(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Detour> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Detour> {
        self.open_variant(variant)?;
        value.serialize(Direct {
            encoder: &mut *self.encoder,
            depth: self.depth + 1,
        })?;
        self.encoder.out.push(b'}');
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Array<'a>, Detour> {
        let depth = self.depth;
        self.array(depth, b"]")
    }

    fn serialize_tuple(self, _len: usize) -> Result<Array<'a>, Detour> {
        let depth = self.depth;
        self.array(depth, b"]")
    }

    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Array<'a>, Detour> {
        let depth = self.depth;
        self.array(depth, b"]")
    }

    fn serialize_tuple_variant(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Array<'a>, Detour> {
        self.open_variant(variant)?;
        let depth = self.depth + 1;
        self.array(depth, b"]}")
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, Detour> {
        let depth = self.depth;
        self.object(depth, false)
    }

    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Object<'a>, Detour> {
        if SERDE_JSON_TOKENS.contains(&name) {
            return Err(Detour);
        }
        let depth = self.depth;
        self.object(depth, false)
    }

    fn serialize_struct_variant(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, Detour> {
        self.open_variant(variant)?;
        let depth = self.depth + 1;
        self.object(depth, true)
    }
}

/// An array being written; its elements sit one level below it.
struct Array<'a> {
    encoder: &'a mut Encoder,
    depth: usize,
    first: bool,
    /// `]`, or `]}` for a tuple variant.
    close: &'static [u8],
}

impl Array<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        if !self.first {
            self.encoder.out.push(b',');
        }
        self.first = false;
        value.serialize(Direct {
            encoder: &mut *self.encoder,
            depth: self.depth + 1,
        })
    }

    fn close(self) -> Result<(), Detour> {
        self.encoder.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl serde::ser::SerializeSeq for Array<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        self.element(value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

impl serde::ser::SerializeTuple for Array<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        self.element(value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

impl serde::ser::SerializeTupleStruct for Array<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        self.element(value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

impl serde::ser::SerializeTupleVariant for Array<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        self.element(value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

/// An object being written. Members go to `out` as they come, each as `"key":value,`, and
/// are recorded in `Encoder::entries`; `close` puts them in key order, keeping only the
/// last member of each key as a `serde_json::Map` does, unless they came in order already.
struct Object<'a> {
    encoder: &'a mut Encoder,
    depth: usize,
    /// Where the first member starts in `out`, just after `{`.
    body_start: usize,
    /// This object's entries are `entries[entries_base..]`, its keys `keys[keys_base..]`.
    entries_base: usize,
    keys_base: usize,
    /// The key `serialize_key` gave, waiting for its value.
    next_key: Option<Key>,
    /// Whether every member so far sorts strictly after the previous one.
    in_order: bool,
    /// A struct variant's object closes its `{"variant":` too.
    close_variant: bool,
}

impl Object<'_> {
    fn member<T: Serialize + ?Sized>(&mut self, key: Key, value: &T) -> Result<(), Detour> {
        let encoder = &mut *self.encoder;
        let start = encoder.out.len();
        write_escaped(key.text(&encoder.keys), &mut encoder.out);
        encoder.out.push(b':');
        value.serialize(Direct {
            encoder: &mut *encoder,
            depth: self.depth + 1,
        })?;
        encoder.out.push(b',');
        if self.in_order && encoder.entries.len() > self.entries_base {
            let previous = &encoder.entries[encoder.entries.len() - 1];
            let keys = &encoder.keys;
            self.in_order = compare_utf16(previous.key.text(keys), key.text(keys)).is_lt();
        }
        encoder.entries.push(Entry {
            key,
            start,
            end: encoder.out.len(),
        });
        Ok(())
    }

    fn close(self) -> Result<(), Detour> {
        let Encoder { out, entries, keys } = self.encoder;
        let members = &mut entries[self.entries_base..];
        if members.is_empty() {
            out.push(b'}');
        } else {
            if !self.in_order {
                // A stable sort keeps equal keys in arrival order: the last one wins. The
                // members are copied in order after the written ones, then moved back.
                members.sort_by(|a, b| compare_utf16(a.key.text(keys), b.key.text(keys)));
                let written_end = out.len();
                for (i, entry) in members.iter().enumerate() {
                    let superseded = members
                        .get(i + 1)
                        .is_some_and(|next| next.key.text(keys) == entry.key.text(keys));
                    if !superseded {
                        out.extend_from_within(entry.start..entry.end);
                    }
                }
                out.copy_within(written_end.., self.body_start);
                out.truncate(self.body_start + (out.len() - written_end));
            }
            // Every member ends with a comma: the last one becomes the closing brace.
            let last = out.len() - 1;
            assert_eq!(out[last], b',');
            out[last] = b'}';
        }
        entries.truncate(self.entries_base);
        keys.truncate(self.keys_base);
        if self.close_variant {
            out.push(b'}');
        }
        Ok(())
    }
}

impl serde::ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Detour> {
        let keys = &mut self.encoder.keys;
        let start = keys.len();
        key.serialize(KeyText { keys: &mut *keys })?;
        self.next_key = Some(Key::Map {
            start,
            end: keys.len(),
        });
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Detour> {
        // `to_value` panics on a value without a key: a bug in the `Serialize` impl, which
        // the reference path then reports exactly as it would have.
        let key = self.next_key.take().ok_or(Detour)?;
        self.member(key, value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

impl serde::ser::SerializeStruct for Object<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Detour> {
        self.member(Key::Static(key), value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

impl serde::ser::SerializeStructVariant for Object<'_> {
    type Ok = ();
    type Error = Detour;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Detour> {
        self.member(Key::Static(key), value)
    }

    fn end(self) -> Result<(), Detour> {
        self.close()
    }
}

/// Appends a map key's text as serde_json's `MapKeySerializer` makes it.
struct KeyText<'a> {
    keys: &'a mut String,
}

impl KeyText<'_> {
    fn push(self, text: &str) -> Result<(), Detour> {
        self.keys.push_str(text);
        Ok(())
    }

    fn integer(self, value: impl std::fmt::Display) -> Result<(), Detour> {
        use std::fmt::Write;
        write!(self.keys, "{value}").map_err(|_| Detour)
    }
}

type NoKey = serde::ser::Impossible<(), Detour>;

impl serde::Serializer for KeyText<'_> {
    type Ok = ();
    type Error = Detour;
    type SerializeSeq = NoKey;
    type SerializeTuple = NoKey;
    type SerializeTupleStruct = NoKey;
    type SerializeTupleVariant = NoKey;
    type SerializeMap = NoKey;
    type SerializeStruct = NoKey;
    type SerializeStructVariant = NoKey;

    fn serialize_bool(self, value: bool) -> Result<(), Detour> {
        self.push(if value { "true" } else { "false" })
    }

    fn serialize_i8(self, value: i8) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_i16(self, value: i16) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_i32(self, value: i32) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_i64(self, value: i64) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_i128(self, value: i128) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_u8(self, value: u8) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_u16(self, value: u16) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_u32(self, value: u32) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_u64(self, value: u64) -> Result<(), Detour> {
        self.integer(value)
    }

    fn serialize_u128(self, value: u128) -> Result<(), Detour> {
        self.integer(value)
    }

    /// serde_json prints float keys with its own shortest-round-trip formatter.
    fn serialize_f32(self, _value: f32) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_f64(self, _value: f64) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_char(self, value: char) -> Result<(), Detour> {
        self.push(value.encode_utf8(&mut [0u8; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), Detour> {
        self.push(value)
    }

    fn serialize_bytes(self, _value: &[u8]) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_none(self) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_unit(self) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result<(), Detour> {
        self.push(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Detour> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<(), Detour> {
        Err(Detour)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_tuple(self, _len: usize) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<NoKey, Detour> {
        Err(Detour)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<NoKey, Detour> {
        Err(Detour)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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

    // ---- the direct writer against its definition ----------------------------------

    /// Asserts that `to_canonical_bytes` gives exactly what the reference path gives (bytes,
    /// or the same error with the same message), and that the direct writer on its own
    /// never disagrees: it either matches the reference's bytes or detours.
    fn check_same<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
        let reference = reference_bytes(value);
        assert_eq!(to_canonical_bytes(value), reference);
        if let Ok(direct) = direct_bytes(value) {
            assert_eq!(Ok(direct), reference, "the direct writer diverged");
        }
        reference
    }

    /// One case per serde shape: the value, and the canonical text or the refusal.
    fn check_shape<T: Serialize + ?Sized>(value: &T, expect: &str) {
        let shown = match check_same(value) {
            Ok(bytes) => String::from_utf8(bytes).expect("canonical bytes are UTF-8"),
            Err(CanonicalError::Number(_)) => "refused: number".into(),
            Err(CanonicalError::TooDeep) => "refused: too deep".into(),
            Err(CanonicalError::NotJson(_)) => "refused: not JSON".into(),
        };
        assert_eq!(shown, expect);
    }

    /// Asserts the value is encoded by the direct writer itself, as the reference encodes it.
    fn check_direct<T: Serialize + ?Sized>(value: &T) {
        let reference = canonical_value_bytes(&serde_json::to_value(value).expect("to_value"));
        let reference = reference.expect("the reference encodes it");
        assert_eq!(direct_bytes(value).ok().as_ref(), Some(&reference));
        assert_eq!(to_canonical_bytes(value).as_ref(), Ok(&reference));
    }

    #[derive(Serialize)]
    struct UnitStruct;

    #[derive(Serialize)]
    struct Newtype(u8);

    #[derive(Serialize)]
    struct TupleStruct(u8, &'static str);

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    enum Shape {
        Unit,
        Newtype(u8),
        Tuple(u8, &'static str),
        Struct { b: u8, a: u8 },
    }

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    struct KeyWrapper(&'static str);

    /// Serialises as serde's `bytes` shape.
    struct Bytes(&'static [u8]);

    impl Serialize for Bytes {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    /// A map whose keys are whatever `serialize_key` is given, floats included.
    struct Pairs<K: Serialize, V: Serialize>(Vec<(K, V)>);

    impl<K: Serialize, V: Serialize> Serialize for Pairs<K, V> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }

    /// A `Serialize` impl that fails.
    struct Failing;

    impl Serialize for Failing {
        fn serialize<S: serde::Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refused at line 3 column 4"))
        }
    }

    /// A flattened map can repeat a field's key: the last member wins, as in a `Value`.
    #[derive(Serialize)]
    struct Flattened<A: Serialize> {
        a: A,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        none: Option<u8>,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<&'static str, u8>,
    }

    #[derive(Serialize)]
    #[serde(tag = "t")]
    enum Tagged {
        Holds(u8),
        Fields { x: u8 },
    }

    /// Each level is a newtype variant: `{"Wrap":…}` one level deeper.
    #[derive(Serialize)]
    enum Nest {
        Leaf,
        Wrap(Box<Nest>),
        Pair(Box<Nest>, u8),
        Named { next: Box<Nest> },
        Bytes(Bytes),
        Empty(Vec<u8>),
    }

    /// `levels` wrappers of the kind `wrap` makes around `leaf`.
    fn nest(levels: usize, leaf: Nest, wrap: fn(Box<Nest>) -> Nest) -> Nest {
        (0..levels).fold(leaf, |inner, _| wrap(Box::new(inner)))
    }

    #[test]
    fn every_serde_shape_encodes_as_its_json_value_does() {
        use std::collections::BTreeMap;

        check_shape(&(), "null");
        check_shape(&UnitStruct, "null");
        check_shape(&None::<u8>, "null");
        check_shape(&Some(3u8), "3");
        check_shape(&Newtype(5), "5");
        check_shape(&Shape::Unit, r#""Unit""#);
        check_shape(&Shape::Newtype(7), r#"{"Newtype":7}"#);
        check_shape(&Shape::Tuple(1, "x"), r#"{"Tuple":[1,"x"]}"#);
        check_shape(&Shape::Struct { b: 1, a: 2 }, r#"{"Struct":{"a":2,"b":1}}"#);
        check_shape(&(1u8, "a", true, ()), r#"[1,"a",true,null]"#);
        check_shape(&TupleStruct(1, "b"), r#"[1,"b"]"#);
        check_shape(&Vec::<u8>::new(), "[]");
        check_shape(&'\u{1}', r#""\u0001""#);
        check_shape(&'😀', "\"😀\"");
        check_shape(
            &"\"\\\u{8}\t\n\u{c}\r\u{1f}\u{7f}é",
            "\"\\\"\\\\\\b\\t\\n\\f\\r\\u001f\u{7f}é\"",
        );
        check_shape(&Bytes(&[0, 1, 255]), "[0,1,255]");
        check_shape(&Bytes(&[]), "[]");

        // Integers: every width, up to ±(2^53 − 1); beyond it refused, past i64/u64
        // refused by `to_value` itself.
        check_shape(&i8::MIN, "-128");
        check_shape(&u32::MAX, "4294967295");
        check_shape(&-(SAFE_INTEGER_MAX as i64), "-9007199254740991");
        check_shape(&(SAFE_INTEGER_MAX as i128), "9007199254740991");
        check_shape(&(-(SAFE_INTEGER_MAX as i128)), "-9007199254740991");
        check_shape(&(SAFE_INTEGER_MAX as u128), "9007199254740991");
        check_shape(&0i128, "0");
        check_shape(&(SAFE_INTEGER_MAX + 1), "refused: number");
        check_shape(&i64::MIN, "refused: number");
        check_shape(&u64::MAX, "refused: number");
        check_shape(&((SAFE_INTEGER_MAX + 1) as i128), "refused: number");
        check_shape(&(1i128 << 64), "refused: not JSON");
        check_shape(&(i128::from(i64::MIN) - 1), "refused: not JSON");
        check_shape(&u128::MAX, "refused: not JSON");

        // Floats: refused even when integral; NaN and the infinities are null in a `Value`.
        check_shape(&1.0f64, "refused: number");
        check_shape(&-0.0f64, "refused: number");
        check_shape(&1.5f32, "refused: number");
        check_shape(&f64::NAN, "null");
        check_shape(&f32::INFINITY, "null");
        check_shape(&vec![f64::NEG_INFINITY], "[null]");

        // Map keys as serde_json's `MapKeySerializer` makes them, then sorted as text.
        check_shape(
            &BTreeMap::from([(-1i32, 1u8), (10, 2), (2, 3)]),
            r#"{"-1":1,"10":2,"2":3}"#,
        );
        check_shape(
            &BTreeMap::from([(true, 1u8), (false, 2)]),
            r#"{"false":2,"true":1}"#,
        );
        check_shape(&BTreeMap::from([('b', 1u8), ('a', 2)]), r#"{"a":2,"b":1}"#);
        check_shape(&BTreeMap::from([(Shape::Unit, 1u8)]), r#"{"Unit":1}"#);
        check_shape(&BTreeMap::from([(KeyWrapper("k"), 1u8)]), r#"{"k":1}"#);
        check_shape(
            &BTreeMap::from([(u128::MAX, 1u8)]),
            r#"{"340282366920938463463374607431768211455":1}"#,
        );
        check_shape(
            &Pairs(vec![(1.5f64, 1u8), (-0.0, 2)]),
            r#"{"-0.0":2,"1.5":1}"#,
        );
        check_shape(&Pairs(vec![(f64::NAN, 1u8)]), "refused: not JSON");
        check_shape(&BTreeMap::from([((1u8, 2u8), 1u8)]), "refused: not JSON");
        check_shape(&BTreeMap::from([((), 1u8)]), "refused: not JSON");
        check_shape(&BTreeMap::from([(Some(1u8), 1u8)]), "refused: not JSON");
        check_shape(
            &BTreeMap::from([(Shape::Newtype(1), 1u8)]),
            "refused: not JSON",
        );
        check_shape(&Pairs(vec![(Bytes(b"k"), 1u8)]), "refused: not JSON");
        check_shape(
            &Pairs(vec![
                ("\u{E000}", 1u8),
                ("\u{1F600}", 2),
                ("a", 3),
                ("", 4),
                ("ab", 5),
            ]),
            "{\"\":4,\"a\":3,\"ab\":5,\"\u{1F600}\":2,\"\u{E000}\":1}",
        );

        // Repeated keys: the last member wins, wherever it sorts and whatever the loser held.
        check_shape(
            &Pairs(vec![("b", 1u8), ("a", 2), ("b", 3)]),
            r#"{"a":2,"b":3}"#,
        );
        check_shape(
            &Flattened {
                a: 1u8,
                skipped: None,
                none: None,
                rest: BTreeMap::from([("a", 9), ("b", 2)]),
            },
            r#"{"a":9,"b":2,"none":null}"#,
        );
        check_shape(
            &Flattened {
                a: 1.5f64,
                skipped: Some(1),
                none: Some(2),
                rest: BTreeMap::from([("a", 9)]),
            },
            r#"{"a":9,"none":2,"skipped":1}"#,
        );
        check_shape(&Pairs(vec![("a", 1u8), ("a", 1)]), r#"{"a":1}"#);

        // Internally tagged enums, and the error serde raises inside a `Serialize` impl.
        check_shape(&Tagged::Fields { x: 1 }, r#"{"t":"Fields","x":1}"#);
        check_shape(&Tagged::Holds(1), "refused: not JSON");
        check_shape(&vec![Failing], "refused: not JSON");
        assert_eq!(
            to_canonical_bytes(&Failing),
            Err(CanonicalError::NotJson(
                serde_json::to_value(Failing).unwrap_err().to_string()
            ))
        );

        // With several refusals in one value, the first in canonical order decides.
        check_shape(
            &Pairs(vec![
                ("b", serde_json::json!(1.5)),
                ("a", serde_json::json!(u64::MAX)),
            ]),
            "refused: number",
        );
        let deep = serde_json::to_value(nest(40, Nest::Leaf, Nest::Wrap)).unwrap();
        check_shape(
            &Pairs(vec![("b", serde_json::json!(1.5)), ("a", deep.clone())]),
            "refused: too deep",
        );
        check_shape(&(deep, Failing), "refused: not JSON");
    }

    #[test]
    fn depth_is_counted_as_the_json_value_nests() {
        // Newtype variants add one level each, tuple and struct variants two; the limit
        // applies to leaves and to empty containers alike.
        // Each wrapper with the levels it adds, each leaf with the levels below its top.
        type Wrap = fn(Box<Nest>) -> Nest;
        let wraps: [(Wrap, usize); 3] = [
            (Nest::Wrap, 1),
            (|inner| Nest::Pair(inner, 0), 2),
            (|inner| Nest::Named { next: inner }, 2),
        ];
        let leaves: [(fn() -> Nest, usize); 5] = [
            (|| Nest::Leaf, 0),
            (|| Nest::Bytes(Bytes(&[])), 1),
            (|| Nest::Bytes(Bytes(&[1])), 2),
            (|| Nest::Empty(Vec::new()), 1),
            (|| Nest::Empty(vec![1]), 2),
        ];
        for (wrap, step) in wraps {
            for (leaf, below) in leaves {
                for levels in 0..=DEPTH_MAX + 1 {
                    let result = check_same(&nest(levels, leaf(), wrap));
                    if step * levels + below <= DEPTH_MAX {
                        assert!(result.is_ok(), "{levels} levels of {step} over {below}");
                    } else {
                        assert_eq!(result, Err(CanonicalError::TooDeep));
                    }
                }
            }
        }
        let mut value = serde_json::json!(1);
        for levels in 0..=DEPTH_MAX {
            assert_eq!(check_same(&value).is_ok(), 2 * levels <= DEPTH_MAX);
            value = serde_json::json!({ "k": [value] });
        }
    }

    #[test]
    fn the_ledgers_own_values_take_the_direct_path() {
        use crate::audit::TreeHead;
        use crate::block::{Block, BlockHeader, GenesisConfig, GenesisOrg, TxLeaf};
        use crate::contracts::{Rejection, TxOutcome};
        use crate::crypto::{PublicKey, Signature};
        use crate::hash::Hash;
        use crate::identity::{OrgKind, Role};
        use crate::model::*;
        use crate::tx::{NewRecordVersion, SignedTx, TxBody, TxPayload};

        let key = PublicKey::from_base64url(
            "BPBj9QBQKahWhNBamCtWlN6gWFn-6zv2FhQnLnRUiC8bSPO01JT4evrmUXKxPp2pqbE7uoE-9XLpk1ih194jvFM",
        )
        .unwrap();
        let signature = Signature([7; 64]);
        let hash = |text: &str| Hash::digest(text.as_bytes());
        let scope = Scope {
            resource_types: vec!["Observation".into(), "Condition".into()],
            categories: vec![Category::Medications, Category::Diagnostics],
        };
        let bodies = vec![
            TxBody::ProposeGovernance {
                action: GovernanceAction::AdmitOrg {
                    org: "clinic-b".into(),
                    org_kind: OrgKind::Clinic,
                    ca_certificate: "MIIB".into(),
                    admin_certificate: "MIIC".into(),
                },
            },
            TxBody::ProposeGovernance {
                action: GovernanceAction::SuspendOrg {
                    org: "lab-c".into(),
                },
            },
            TxBody::VoteGovernance {
                proposal_id: 3,
                approve: true,
            },
            TxBody::EnrollUser {
                certificate: "MIID".into(),
            },
            TxBody::RevokeUser {
                user: "ana@hospital-a".into(),
                reason: RevocationReason::KeyCompromise,
            },
            TxBody::RegisterPatient {
                public_key: key.clone(),
            },
            TxBody::CreateRecord {
                patient: "pt-1".into(),
                record_id: "obs-1".into(),
                version: 2,
                resource_type: "Observation".into(),
                cid: "bafkrei".into(),
                commitment: hash("c"),
                deleted: false,
            },
            TxBody::CreateRecord {
                patient: "pt-1".into(),
                record_id: "obs-1".into(),
                version: 3,
                resource_type: "Observation".into(),
                cid: "bafkrei".into(),
                commitment: hash("c"),
                deleted: true,
            },
            TxBody::CreateRecords {
                versions: vec![
                    NewRecordVersion {
                        patient: "pt-1".into(),
                        record_id: "enc-1".into(),
                        version: 1,
                        resource_type: "Encounter".into(),
                        cid: "bafkrei".into(),
                        commitment: hash("e"),
                        deleted: false,
                    },
                    NewRecordVersion {
                        patient: "pt-1".into(),
                        record_id: "obs-1".into(),
                        version: 4,
                        resource_type: "Observation".into(),
                        cid: "bafkrei".into(),
                        commitment: hash("o"),
                        deleted: true,
                    },
                ],
            },
            TxBody::Grant {
                grantee: Grantee::Role {
                    org: "hospital-a".into(),
                    role: Role::LabTechnician,
                },
                scope: scope.clone(),
                actions: vec![Action::Read, Action::Search],
                purposes: vec![Purpose::Treatment, Purpose::PatientRequest],
                expires_at_ms: Some(SAFE_INTEGER_MAX),
            },
            TxBody::Grant {
                grantee: Grantee::User {
                    user: "ana@hospital-a".into(),
                },
                scope: Scope {
                    resource_types: vec![],
                    categories: vec![Category::Financial],
                },
                actions: vec![],
                purposes: vec![],
                expires_at_ms: None,
            },
            TxBody::Revoke {
                grant_id: hash("g"),
            },
            TxBody::RequestAccess {
                patient: "pt-1".into(),
                scope: scope.clone(),
                actions: vec![Action::Write],
                purpose: Purpose::Research,
            },
            TxBody::ApproveRequest {
                request_id: hash("r"),
                expires_at_ms: Some(0),
            },
            TxBody::ApproveRequest {
                request_id: hash("r"),
                expires_at_ms: None,
            },
            TxBody::DenyRequest {
                request_id: hash("r"),
            },
            TxBody::BreakGlass {
                patient: "pt-1".into(),
                reason: EmergencyReason::UnconsciousPatient,
                justification_commitment: hash("j"),
                duration_ms: 3_600_000,
            },
            TxBody::ReviewBreakGlass {
                break_glass_id: hash("b"),
                verdict: BreakGlassVerdict::Unjustified,
            },
            TxBody::LogAccess {
                actor: "ana@hospital-a".into(),
                patient: "pt-1".into(),
                action: Action::Search,
                records: vec![],
                resource_types: vec!["Observation".into()],
                custodians: vec!["hospital-a".into(), "lab".into()],
                purpose: Purpose::Emergency,
                custodian_denial: Some(DenialReason::NotFound),
                query_commitment: hash("q"),
                answer_commitment: hash("a"),
            },
            TxBody::LogAccess {
                actor: "ana@hospital-a".into(),
                patient: "pt-1".into(),
                action: Action::Read,
                records: vec!["hospital-a/obs-1".into()],
                resource_types: vec![],
                custodians: vec![],
                purpose: Purpose::Treatment,
                custodian_denial: None,
                query_commitment: hash("q"),
                answer_commitment: hash("a"),
            },
        ];
        let decisions = vec![
            AccessDecision::Granted {
                basis: AccessBasis::Patient,
            },
            AccessDecision::Granted {
                basis: AccessBasis::Consent {
                    consent_id: hash("c"),
                },
            },
            AccessDecision::Granted {
                basis: AccessBasis::BreakGlass {
                    break_glass_id: hash("b"),
                },
            },
            AccessDecision::Denied {
                denial: AccessDenial::UnknownActor,
            },
            AccessDecision::Denied {
                denial: AccessDenial::RoleNotPermitted,
            },
            AccessDecision::Denied {
                denial: AccessDenial::NoConsent {
                    resource_type: "Claim".into(),
                },
            },
            AccessDecision::Denied {
                denial: AccessDenial::Custodian {
                    denial: DenialReason::Unauthenticated,
                },
            },
        ];
        let mut outcomes: Vec<TxOutcome> = decisions
            .iter()
            .map(|decision| TxOutcome::Committed {
                access: Some(decision.clone()),
            })
            .collect();
        outcomes.push(TxOutcome::Committed { access: None });
        outcomes.push(TxOutcome::Rejected {
            rejection: Rejection::BadSignature,
        });
        outcomes.push(TxOutcome::Rejected {
            rejection: Rejection::StaleNonce { nonce: 1, last: 2 },
        });
        outcomes.push(TxOutcome::Rejected {
            rejection: Rejection::Invalid {
                field: "scope".into(),
                detail: "empty \"scope\"\n".into(),
            },
        });
        let txs: Vec<SignedTx> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| SignedTx {
                payload: TxPayload {
                    chain_id: "medledger-test".into(),
                    signer: "pt-c43886833d68409aedabc77cc435967d81f9d485".into(),
                    nonce: i as u64 + 1,
                    expires_at_ms: 1_767_225_600_000,
                    body: body.clone(),
                },
                signature,
            })
            .collect();
        let header = BlockHeader {
            chain_id: "medledger-test".into(),
            height: 7,
            prev_hash: hash("p"),
            time_ms: 1_767_225_000_000,
            proposer: "node@hospital-a".into(),
            tx_count: txs.len() as u64,
            tx_root: hash("t"),
            log_size: 99,
            log_root: hash("l"),
            state_hash: hash("s"),
        };
        let genesis = GenesisConfig {
            chain_id: "medledger-test".into(),
            time_ms: 1,
            root_certificate: "MIIR".into(),
            organisations: vec![GenesisOrg {
                id: "hospital-a".into(),
                kind: OrgKind::Hospital,
                ca_certificate: "MIIA".into(),
                members: vec!["MIIM".into(), "MIIN".into()],
            }],
        };
        let block = Block {
            header: header.clone(),
            genesis: Some(genesis),
            outcomes: txs
                .iter()
                .zip(outcomes.iter().cycle())
                .map(|(_, outcome)| outcome.clone())
                .collect(),
            txs: txs.clone(),
        };
        let audit_event = |decision: Option<AccessDecision>, full: bool| AuditEvent {
            leaf_index: 12,
            height: 7,
            tx_id: hash("x"),
            kind: "log_access".into(),
            signer: "node@hospital-a".into(),
            time_ms: 5,
            actor: full.then(|| "ana@hospital-a".into()),
            patient: full.then(|| "pt-1".into()),
            records: if full {
                vec!["hospital-a/obs-1".into()]
            } else {
                vec![]
            },
            resource_types: if full {
                vec!["Observation".into()]
            } else {
                vec![]
            },
            custodians: if full {
                vec!["hospital-a".into()]
            } else {
                vec![]
            },
            action: full.then_some(Action::Read),
            purpose: full.then_some(Purpose::Operations),
            decision,
            flagged: full,
            rejected: full.then(|| "no_consent".into()),
        };
        let consent = Consent {
            id: hash("g"),
            patient: "pt-1".into(),
            grantee: Grantee::Org {
                org: "lab-c".into(),
            },
            scope,
            actions: vec![Action::Read],
            purposes: vec![Purpose::Payment],
            expires_at_ms: Some(10),
            granted_at_ms: 1,
            revoked_at_ms: Some(2),
            request_id: Some(hash("r")),
        };
        let proposal = Proposal {
            id: 4,
            action: GovernanceAction::RemoveOrg {
                org: "lab-c".into(),
            },
            proposer: "admin@hospital-a".into(),
            opened_at_ms: 1,
            closes_at_ms: 2,
            votes: [("hospital-a", true), ("clinic-b", false), ("lab-c", true)]
                .into_iter()
                .map(|(org, vote)| (org.to_string(), vote))
                .collect(),
            status: ProposalStatus::Open,
        };

        for body in &bodies {
            check_direct(body);
        }
        for tx in &txs {
            check_direct(&tx.payload);
            check_direct(tx);
        }
        for decision in &decisions {
            check_direct(decision);
            check_direct(&audit_event(Some(decision.clone()), true));
        }
        for outcome in &outcomes {
            check_direct(outcome);
            check_direct(&TxLeaf {
                height: 7,
                position: 3,
                tx: txs[0].clone(),
                outcome: outcome.clone(),
            });
        }
        check_direct(&audit_event(None, false));
        check_direct(&block);
        check_direct(&header);
        check_direct(&consent);
        check_direct(&proposal);
        check_direct(&TreeHead {
            chain_id: "medledger-test".into(),
            height: 7,
            log_size: 99,
            log_root: hash("l"),
            time_ms: 5,
        });
    }

    #[test]
    fn the_word_test_finds_every_byte_that_needs_escaping() {
        // Proves the eight-byte test exact for one byte of each value at each position,
        // among neighbours on either side of every threshold the arithmetic relies on.
        for filler in [b'a', 0x00, 0x1F, 0x20, 0x21, 0x22, 0x5C, 0x7F, 0x80, 0xFF] {
            for byte in 0..=u8::MAX {
                for position in 0..8 {
                    let mut word = [filler; 8];
                    word[position] = byte;
                    let expect = word.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
                    assert_eq!(any_byte_needs_escape(u64::from_le_bytes(word)), expect);
                }
            }
        }
    }

    /// Characters that exercise escaping and UTF-16 ordering more often than chance would.
    fn tricky_char() -> impl Strategy<Value = char> {
        prop_oneof![
            any::<char>(),
            (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
            Just('"'),
            Just('\\'),
            Just('\u{7f}'),
            (0xE000u32..=0xFFFF).prop_map(|c| char::from_u32(c).unwrap()),
            (0x10000u32..=0x10FFFF).prop_map(|c| char::from_u32(c).unwrap()),
            proptest::char::range('a', 'c'),
        ]
    }

    fn tricky_string(length_max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(tricky_char(), 0..=length_max)
            .prop_map(|chars| chars.into_iter().collect())
    }

    fn arbitrary_number() -> impl Strategy<Value = Value> {
        let max = SAFE_INTEGER_MAX as i64;
        prop_oneof![
            (-max..=max).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-3i64..=3).prop_map(move |d| Value::from(max + d)),
            (-3i64..=3).prop_map(move |d| Value::from(-max + d)),
            prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0)].prop_map(Value::from),
            Just(Value::from(u64::MAX)),
            any::<f64>().prop_map(Value::from),
            (-3i32..=3).prop_map(|n| Value::from(f64::from(n))),
            Just(Value::from(-0.0)),
        ]
    }

    fn arbitrary_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            arbitrary_number(),
            tricky_string(24).prop_map(Value::String),
        ];
        let tree = leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((tricky_string(3), inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        });
        // Wrap the tree in up to 40 single-member levels, so depths around the limit are
        // reached as often as shallow ones.
        let wrappers = proptest::collection::vec(proptest::option::of(tricky_string(3)), 0..=40);
        (tree, wrappers).prop_map(|(tree, wrappers)| {
            wrappers.into_iter().fold(tree, |inner, key| match key {
                Some(key) => Value::Object([(key, inner)].into_iter().collect()),
                None => Value::Array(vec![inner]),
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn direct_encoding_equals_the_value_encoding(value in arbitrary_value()) {
            // Proves the direct writer is canonical_value_bytes for every JSON value: same
            // bytes when accepted, same error otherwise, and never a detour when accepted.
            let reference = canonical_value_bytes(&value);
            prop_assert_eq!(to_canonical_bytes(&value), reference.clone());
            prop_assert_eq!(direct_bytes(&value).ok(), reference.ok());
        }

        #[test]
        fn strings_escape_as_write_string_does(text in tricky_string(40)) {
            // Proves the word-at-a-time escaping writes what the reference writes.
            let (mut direct, mut reference) = (Vec::new(), Vec::new());
            write_escaped(&text, &mut direct);
            write_string(&text, &mut reference);
            prop_assert_eq!(direct, reference);
        }

        #[test]
        fn keys_compare_as_utf16_code_units(a in tricky_string(4), b in tricky_string(4)) {
            // Proves the byte-wise shortcut orders keys exactly as the UTF-16 definition.
            prop_assert_eq!(compare_utf16(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
        }
    }
}
