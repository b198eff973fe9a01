//! The TOC member: one gzip member holding a tar stream whose only entry is
//! `stargz.index.json`, then the tar end-of-archive.
//!
//! Decompression is capped so a gzip bomb cannot exhaust memory, and the
//! digest is taken over the JSON bytes exactly as stored (never
//! re-serialized), which is what the `toc.digest` annotation covers.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};

use flate2::read::GzDecoder;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::ReaderOptions;
use crate::estargz::TOC_TAR_NAME;
use crate::estargz::digest::Digest;
use crate::estargz::error::{Error, Result};
use crate::estargz::toc::{JsonEntry, JsonToc, TOC_VERSION};

/// Room for tar headers (and PAX records) around the JSON payload.
const TAR_OVERHEAD: u64 = 64 << 10;

/// A parsed TOC with the digest of its raw JSON bytes.
#[derive(Debug, Clone)]
pub struct RawToc {
    pub toc: JsonToc,
    /// `sha256` of the JSON bytes as stored in the tar entry.
    pub digest: Digest,
    /// Length of the JSON in bytes.
    pub json_len: u64,
}

/// Decompresses and parses a TOC member (`member` is exactly the compressed
/// bytes from the TOC offset up to the footer). Checks the version and, when
/// given, the expected TOC digest.
pub fn parse_toc_member(
    member: &[u8],
    opts: &ReaderOptions,
    expected: Option<&Digest>,
) -> Result<RawToc> {
    let json = extract_json(member, opts.max_toc_size)?;
    let digest = Digest::of(&json);
    if let Some(want) = expected
        && *want != digest
    {
        return Err(Error::TocDigestMismatch {
            expected: want.to_string(),
            actual: digest.to_string(),
        });
    }
    let toc = parse_json_bounded(&json, opts.max_entries)?;
    Ok(RawToc {
        toc,
        digest,
        json_len: json.len() as u64,
    })
}

/// Parses TOC JSON and checks its version.
pub fn parse_json(json: &[u8]) -> Result<JsonToc> {
    parse_json_bounded(json, u64::MAX)
}

/// Like [`parse_json`], but stops with `TooManyEntries` as soon as the
/// entry count passes `max_entries`, before the rest is held in memory.
pub fn parse_json_bounded(json: &[u8], max_entries: u64) -> Result<JsonToc> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed = TocSeed {
        max_entries,
        over: &over,
    }
    .deserialize(&mut de)
    .and_then(|toc| de.end().map(|()| toc));
    let toc = match parsed {
        Ok(toc) => toc,
        Err(_) if over.get() => return Err(Error::TooManyEntries { limit: max_entries }),
        Err(e) => return Err(Error::InvalidToc(format!("TOC JSON: {e}"))),
    };
    if toc.version != TOC_VERSION {
        return Err(Error::UnsupportedVersion(toc.version));
    }
    Ok(toc)
}

/// Deserializes a [`JsonToc`] (same rules as its derive: `version`
/// required, `entries` may be null or absent, unknown keys ignored) while
/// counting entries.
struct TocSeed<'a> {
    max_entries: u64,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for TocSeed<'_> {
    type Value = JsonToc;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsonToc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TocSeed<'_> {
    type Value = JsonToc;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonToc, A::Error> {
        let mut version = None;
        let mut entries = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "version" if version.is_some() => {
                    return Err(de::Error::duplicate_field("version"));
                }
                "version" => version = Some(map.next_value::<i64>()?),
                "entries" if entries.is_some() => {
                    return Err(de::Error::duplicate_field("entries"));
                }
                "entries" => {
                    let seed = EntriesSeed {
                        max_entries: self.max_entries,
                        over: self.over,
                    };
                    entries = Some(map.next_value_seed(seed)?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(JsonToc {
            version: version.ok_or_else(|| de::Error::missing_field("version"))?,
            entries: entries.unwrap_or_default(),
        })
    }
}

struct EntriesSeed<'a> {
    max_entries: u64,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<JsonEntry>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<JsonEntry>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<JsonEntry>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of TOC entries or null")
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<JsonEntry>, E> {
        Ok(Vec::new())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<JsonEntry>, E> {
        Ok(Vec::new())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<JsonEntry>, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<JsonEntry>, A::Error> {
        let mut out = Vec::new();
        while let Some(e) = seq.next_element::<JsonEntry>()? {
            if out.len() as u64 >= self.max_entries {
                self.over.set(true);
                return Err(de::Error::custom("too many TOC entries"));
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// Returns the raw payload of `stargz.index.json` from the TOC member.
pub fn extract_json(member: &[u8], max_toc_size: u64) -> Result<Vec<u8>> {
    let limit = max_toc_size.saturating_add(TAR_OVERHEAD);
    let mut capped = Capped {
        inner: GzDecoder::new(member),
        left: limit,
        hit: false,
    };
    let res = read_tar(&mut capped, max_toc_size).and_then(|json| {
        // Read the rest of the member (tar padding, within the cap) so the
        // gzip CRC and length trailer are checked too.
        io::copy(&mut capped, &mut io::sink())
            .map_err(|e| Error::InvalidToc(format!("TOC member: {e}")))?;
        Ok(json)
    });
    if capped.hit {
        return Err(Error::TocTooLarge {
            size: limit.saturating_add(1),
            limit,
        });
    }
    res
}

fn read_tar<R: Read>(src: R, max_toc_size: u64) -> Result<Vec<u8>> {
    let bad = |what: &str, e: io::Error| Error::InvalidToc(format!("{what}: {e}"));
    let mut ar = tar::Archive::new(src);
    let mut entries = ar.entries().map_err(|e| bad("TOC tar", e))?;
    let mut entry = match entries.next() {
        Some(e) => e.map_err(|e| bad("TOC tar header", e))?,
        None => return Err(Error::InvalidToc("TOC tar stream is empty".into())),
    };
    let path = entry.path_bytes();
    if &*path != TOC_TAR_NAME.as_bytes() {
        return Err(Error::InvalidToc(format!(
            "TOC tar entry is {:?}, expected {TOC_TAR_NAME}",
            String::from_utf8_lossy(&path)
                .chars()
                .take(200)
                .collect::<String>()
        )));
    }
    if !entry.header().entry_type().is_file() {
        return Err(Error::InvalidToc(
            "TOC tar entry is not a regular file".into(),
        ));
    }
    let size = entry.size();
    if size > max_toc_size {
        return Err(Error::TocTooLarge {
            size,
            limit: max_toc_size,
        });
    }
    // The claimed size is bounded above, but only allocate what arrives.
    let mut json = Vec::with_capacity(usize::try_from(size.min(1 << 20)).unwrap_or(0));
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad("TOC JSON payload", e))?;
    if json.len() as u64 != size {
        return Err(Error::InvalidToc("TOC JSON payload is truncated".into()));
    }
    drop(entry);
    match entries.next() {
        None => Ok(json),
        Some(Ok(e)) => Err(Error::InvalidToc(format!(
            "unexpected second entry {:?} in the TOC tar",
            String::from_utf8_lossy(&e.path_bytes())
                .chars()
                .take(200)
                .collect::<String>()
        ))),
        Some(Err(e)) => Err(bad("TOC tar end", e)),
    }
}

/// A reader that fails once more than `left` bytes would be produced.
struct Capped<R> {
    inner: R,
    left: u64,
    hit: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Probe for one more byte: if it exists, the limit was exceeded.
            let mut one = [0u8; 1];
            return match self.inner.read(&mut one)? {
                0 => Ok(0),
                _ => {
                    self.hit = true;
                    Err(io::Error::other("TOC over the size limit"))
                }
            };
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_json_matches_the_derive() {
        let docs: [&[u8]; 6] = [
            br#"{"version":1,"entries":[{"name":"a","type":"fifo"}],"extra":{"x":[1]}}"#,
            br#"{"entries":null,"version":1}"#,
            br#"{"version":1}"#,
            br#"{"entries":[]}"#,
            br#"{"version":1,"version":1}"#,
            br#"{"version":1} trailing"#,
        ];
        for doc in docs {
            let derived = serde_json::from_slice::<JsonToc>(doc).ok();
            let ours = parse_json(doc).ok();
            assert_eq!(derived, ours, "{}", String::from_utf8_lossy(doc));
        }
        let three = br#"{"version":1,"entries":[{"type":"fifo","name":"a"},{"type":"fifo","name":"b"},{"type":"fifo","name":"c"}]}"#;
        assert_eq!(parse_json_bounded(three, 3).unwrap().entries.len(), 3);
        assert!(matches!(
            parse_json_bounded(three, 2),
            Err(Error::TooManyEntries { limit: 2 })
        ));
    }
}
