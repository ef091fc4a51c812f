//! A JSON document that borrows its strings from the body it was parsed from.
//!
//! `serde_json::Value` copies every string and puts every object in a `BTreeMap`: on the
//! request inspection path that was about a third of the time (allocation, copies, tree
//! inserts) for bodies of which only a few strings are read. [`Json`] keeps the strings
//! that have no escape as slices of the body and objects as lists of members, and answers
//! the same questions the same way: a duplicated key is the last one (as `Value`, whose map
//! keeps the last insert), numbers are `serde_json::Number`s, and [`Json::to_value`] gives
//! the `Value` the body would have parsed to (for texts scanned as JSON text).

use std::{borrow::Cow, fmt, marker::PhantomData};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A parsed JSON value; strings without escapes borrow from the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members in document order, duplicates kept ([`Json::get`] takes the last).
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// Parse `body` (the same errors as `serde_json::from_slice::<Value>`).
    pub fn parse(body: &'a [u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(body)
    }

    /// The member `key` of an object (the last one when it is repeated).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at a JSON pointer of object keys and array indexes (`/a/0/b`), read as
    /// `Value::pointer` reads it, without `~` escapes (the pointers the agent asks for).
    pub fn pointer(&self, pointer: &str) -> Option<&Json<'a>> {
        pointer.split('/').skip(1).try_fold(self, |v, key| match v {
            Json::Array(items) => items.get(array_index(key)?),
            _ => v.get(key),
        })
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json<'a>]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The `serde_json::Value` of the same document.
    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(members) => {
                let mut map = Map::new();
                for (k, v) in members {
                    map.insert(k.to_string(), v.to_value());
                }
                Value::Object(map)
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor(PhantomData))
    }
}

struct JsonVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for JsonVisitor<'a> {
    type Value = Json<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json<'a>, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Json<'a>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Json<'a>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Json<'a>, E> {
        // As `Value`: a float JSON cannot hold is null.
        Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(s)))
    }

    fn visit_none<E>(self) -> Result<Json<'a>, E> {
        Ok(Json::Null)
    }

    fn visit_unit<E>(self) -> Result<Json<'a>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'a>, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'a>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'a>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(Json::Object(members))
    }
}

/// A pointer's token as an array index, as RFC 6901 (and `Value::pointer`) reads it:
/// digits, no leading zero but in "0" itself, no sign.
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// An object key, borrowed when it has no escape (serde's `Cow<str>` always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for KeyVisitor<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(KeyVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the document, [`Json`] parses what `Value` parses, to the same value, and
    /// fails where it fails: escapes, duplicate keys (the last wins), numbers of every kind,
    /// nesting, invalid UTF-8 and truncation.
    #[test]
    fn parses_as_value_does() {
        let docs: &[&[u8]] = &[
            br#"{"a":"x","b":[1,-2,3.5,1e400,true,null,{"c":"d\"e\u00e9\n"}],"a":"last"}"#,
            br#"{"k\u0041y":{"nested":{"deep":[[[]]]}},"n":18446744073709551615,"m":-9223372036854775808}"#,
            br#"[] "#,
            br#""just a string""#,
            br#"{"a":1,}"#,
            br#"{"a":"bad utf8 \xff"}"#,
            br#"{"a":"\ud800"}"#,
            br#"{"messages":[{"role":"user","content":"hi"#,
            b"",
            br#"{"a":1} trailing"#,
        ];
        for doc in docs {
            let value = serde_json::from_slice::<Value>(doc);
            let json = Json::parse(doc);
            assert_eq!(
                json.as_ref().ok().map(Json::to_value),
                value.as_ref().ok().cloned(),
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(Json::parse(deep.as_bytes()).is_err() && serde_json::from_slice::<Value>(deep.as_bytes()).is_err());
    }

    #[test]
    fn strings_without_escapes_borrow_and_the_last_key_wins() {
        let body = br#"{"role":"user","role":"system","content":"plain","escaped":"a\nb","o":{"p":{"q":"r"}}}"#;
        let json = Json::parse(body).unwrap();
        assert_eq!(json.get("role").and_then(Json::as_str), Some("system"));
        assert!(matches!(json.get("content"), Some(Json::String(Cow::Borrowed("plain")))));
        assert!(matches!(json.get("escaped"), Some(Json::String(Cow::Owned(s))) if s == "a\nb"));
        assert_eq!(json.pointer("/o/p/q").and_then(Json::as_str), Some("r"));
        assert_eq!(json.pointer("/o/x/q"), None);
        assert_eq!(json.get("missing"), None);
        assert_eq!(Json::parse(b"[1]").unwrap().get("a"), None);
    }

    /// Pointers read what `Value::pointer` reads: keys, array indexes (no sign, no leading
    /// zero, in range), an index on an object as a key, a key on an array as nothing.
    #[test]
    fn pointers_read_as_value_pointers_do() {
        let body =
            br#"{"choices":[{"finish_reason":"stop","d":{"0":"key zero"}},{"x":[10,20]}],"0":"top","":{"":"e"}}"#;
        let (json, value) = (Json::parse(body).unwrap(), serde_json::from_slice::<Value>(body).unwrap());
        for pointer in [
            "",
            "/choices",
            "/choices/0/finish_reason",
            "/choices/1/x/1",
            "/choices/2",
            "/choices/00",
            "/choices/01",
            "/choices/+1",
            "/choices/-1",
            "/choices/x",
            "/choices/0/d/0",
            "/0",
            "/",
            "//",
            "/choices/1/x/18446744073709551616",
        ] {
            assert_eq!(json.pointer(pointer).map(Json::to_value).as_ref(), value.pointer(pointer), "{pointer:?}");
        }
        assert_eq!(json.pointer("/choices/1/x/0").and_then(Json::as_u64), Some(10));
        assert_eq!(json.pointer("/choices/0/finish_reason").and_then(Json::as_u64), None);
    }
}
