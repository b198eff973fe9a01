//! The TOC member: one gzip member holding a tar stream whose only entry is
//! `stargz.index.json`, then the tar end-of-archive.
//!
//! Decompression is capped so a gzip bomb cannot exhaust memory, and the
//! digest is taken over the JSON bytes exactly as stored (never
//! re-serialized), which is what the `toc.digest` annotation covers.

use std::io::{self, Read};

use flate2::read::GzDecoder;

use super::ReaderOptions;
use crate::estargz::TOC_TAR_NAME;
use crate::estargz::digest::Digest;
use crate::estargz::error::{Error, Result};
use crate::estargz::toc::{JsonToc, TOC_VERSION};

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
    let toc = parse_json(&json)?;
    Ok(RawToc {
        toc,
        digest,
        json_len: json.len() as u64,
    })
}

/// Parses TOC JSON and checks its version.
pub fn parse_json(json: &[u8]) -> Result<JsonToc> {
    let toc: JsonToc =
        serde_json::from_slice(json).map_err(|e| Error::InvalidToc(format!("TOC JSON: {e}")))?;
    if toc.version != TOC_VERSION {
        return Err(Error::UnsupportedVersion(toc.version));
    }
    Ok(toc)
}

/// Returns the raw payload of `stargz.index.json` from the TOC member.
pub fn extract_json(member: &[u8], max_toc_size: u64) -> Result<Vec<u8>> {
    let limit = max_toc_size.saturating_add(TAR_OVERHEAD);
    let mut capped = Capped {
        inner: GzDecoder::new(member),
        left: limit,
        hit: false,
    };
    let res = read_tar(&mut capped, max_toc_size);
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
