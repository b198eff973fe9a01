//! The TOC (`stargz.index.json`) as it is serialized: field names, JSON types
//! and omission rules follow the eStargz format so that other implementations
//! read what we write and we read theirs. Unknown fields are ignored.
//!
//! This is the wire model only. The reader checks every value from here
//! before it trusts it (see the reader's index); nothing in this module
//! validates.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only TOC version in existence.
pub const TOC_VERSION: i64 = 1;

/// The whole TOC document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JsonToc {
    pub version: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub entries: Vec<JsonEntry>,
}

/// The type of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A continuation piece of the preceding `reg` entry.
    Chunk,
}

/// One TOC entry, field for field as in the JSON. Integer fields are `i64`
/// because that is what the format writes; the reader rejects negatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JsonEntry {
    /// Tar path; directories carry a trailing `/`. Empty for `chunk` entries
    /// (they take the name of the preceding entry).
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub size: i64,
    /// RFC 3339, UTC, whole seconds; omitted for the zero time and the epoch.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub modtime: String,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub link_name: String,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub mode: i64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub uid: i64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub gid: i64,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub user_name: String,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub group_name: String,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub offset: i64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub inner_offset: i64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub dev_major: i64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub dev_minor: i64,
    /// Extended attributes; values are base64 in the JSON.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub xattrs: BTreeMap<String, Xattr>,
    /// `sha256:<hex>` of the whole file (on `reg` entries).
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub digest: String,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub chunk_offset: i64,
    /// Zero or absent for the last chunk and for unchunked files.
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub chunk_size: i64,
    /// `sha256:<hex>` of this chunk's uncompressed bytes.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub chunk_digest: String,
}

impl JsonEntry {
    /// An entry of the given type with every other field empty.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        JsonEntry {
            name: name.into(),
            kind,
            size: 0,
            modtime: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            offset: 0,
            inner_offset: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
        }
    }
}

/// An xattr value: raw bytes, base64 in the JSON (as Go encodes `[]byte`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Xattr(pub Vec<u8>);

impl Serialize for Xattr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Xattr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Xattr)
            .map_err(serde::de::Error::custom)
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Go's decoder leaves a field untouched on JSON `null`; do the same.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_style_entry_and_ignores_unknown_fields() {
        let json = r#"{"version":1,"entries":[
            {"name":"bin/","type":"dir","modtime":"2019-08-20T10:30:43Z","mode":16877,"NumLink":0},
            {"name":"bin/busybox","type":"reg","size":833104,"mode":33261,"uid":1000,
             "userName":"u","offset":126,"digest":"sha256:aa","chunkSize":4194304,
             "chunkDigest":"sha256:bb","xattrs":{"user.a":"aGk="},"accesstime":"x"},
            {"type":"chunk","offset":4000,"chunkOffset":4194304,"chunkDigest":"sha256:cc"}
        ]}"#;
        let toc: JsonToc = serde_json::from_str(json).unwrap();
        assert_eq!(toc.version, 1);
        assert_eq!(toc.entries.len(), 3);
        assert_eq!(toc.entries[1].xattrs["user.a"].0, b"hi");
        assert_eq!(toc.entries[2].kind, EntryType::Chunk);
        assert_eq!(toc.entries[2].name, "");
        assert_eq!(toc.entries[1].user_name, "u");
    }

    #[test]
    fn omits_zero_fields() {
        let e = JsonEntry::new("a", EntryType::Reg);
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"name":"a","type":"reg"}"#);
    }

    #[test]
    fn rejects_unknown_type() {
        let r: Result<JsonToc, _> =
            serde_json::from_str(r#"{"version":1,"entries":[{"name":"a","type":"socket"}]}"#);
        assert!(r.is_err());
    }

    #[test]
    fn null_fields_are_defaults() {
        let toc: JsonToc = serde_json::from_str(
            r#"{"version":1,"entries":[{"name":"a","type":"reg","size":null,"xattrs":null}]}"#,
        )
        .unwrap();
        assert_eq!(toc.entries[0].size, 0);
    }
}
