//! Footers: where a reader finds the TOC.
//!
//! An eStargz blob ends with an empty gzip member whose gzip "extra" field
//! carries the compressed offset of the TOC member. The 51 bytes are:
//!
//! ```text
//!  0..10  1f 8b 08 04 00 00 00 00 00 ff   gzip magic, CM=deflate, FLG=FEXTRA,
//!                                         MTIME=0, XFL=0, OS=255
//! 10..12  1a 00                           XLEN = 26 (little-endian)
//! 12..14  'S' 'G'                         extra subfield id
//! 14..16  16 00                           subfield length = 22
//! 16..38  "%016x" offset + "STARGZ"       16 lowercase hex digits, then STARGZ
//! 38..43  01 00 00 ff ff                  final stored deflate block, empty
//! 43..51  00 * 8                          CRC32 = 0, ISIZE = 0
//! ```
//!
//! The legacy (CRFS) stargz footer is 47 bytes: the same, except XLEN = 22
//! and the 22-byte extra is the raw `"%016xSTARGZ"` without `SG` + length.
//! Readers try the eStargz footer first, then the legacy one.

use super::error::{Error, Result};

/// Size of the eStargz footer.
pub const FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: usize = 47;
/// The largest footer; read at least this much from a blob's tail.
pub const MAX_FOOTER_SIZE: usize = FOOTER_SIZE;

const GZIP_HEADER_PREFIX: [u8; 4] = [0x1f, 0x8b, 0x08, 0x04];
const GZIP_HEADER_REST: [u8; 6] = [0, 0, 0, 0, 0, 0xff];
const EMPTY_STORED_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];
const MAGIC: &[u8; 6] = b"STARGZ";

/// Which footer a blob ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterKind {
    /// 51-byte eStargz footer.
    Estargz,
    /// 47-byte legacy stargz (CRFS) footer.
    Legacy,
}

impl FooterKind {
    /// Size of this footer in bytes.
    pub fn size(self) -> usize {
        match self {
            FooterKind::Estargz => FOOTER_SIZE,
            FooterKind::Legacy => LEGACY_FOOTER_SIZE,
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub kind: FooterKind,
    /// Compressed offset of the gzip member holding the TOC tar entry.
    pub toc_offset: u64,
}

/// Builds the 51-byte eStargz footer for a TOC at `toc_offset`.
pub fn build(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut out = [0u8; FOOTER_SIZE];
    out[0..4].copy_from_slice(&GZIP_HEADER_PREFIX);
    out[4..10].copy_from_slice(&GZIP_HEADER_REST);
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12..14].copy_from_slice(b"SG");
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    out[16..32].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    out[32..38].copy_from_slice(MAGIC);
    out[38..43].copy_from_slice(&EMPTY_STORED_BLOCK);
    // 43..51 stay zero: CRC32 and ISIZE of the empty payload.
    out
}

/// Parses the footer at the end of `tail` (the last bytes of a blob; at least
/// [`LEGACY_FOOTER_SIZE`] of them). `blob_size` bounds the TOC offset.
pub fn parse(tail: &[u8], blob_size: u64) -> Result<Footer> {
    if (tail.len() as u64) > blob_size {
        return Err(Error::InvalidFooter("tail longer than the blob"));
    }
    if tail.len() < LEGACY_FOOTER_SIZE {
        return Err(Error::TooSmall { size: blob_size });
    }
    let mut first_err = None;
    if tail.len() >= FOOTER_SIZE {
        match parse_estargz(&tail[tail.len() - FOOTER_SIZE..]) {
            Ok(off) => return check_offset(FooterKind::Estargz, off, blob_size),
            Err(e) => first_err = Some(e),
        }
    }
    match parse_legacy(&tail[tail.len() - LEGACY_FOOTER_SIZE..]) {
        Ok(off) => check_offset(FooterKind::Legacy, off, blob_size),
        Err(e) => Err(first_err.unwrap_or(e)),
    }
}

fn check_offset(kind: FooterKind, toc_offset: u64, blob_size: u64) -> Result<Footer> {
    // The TOC member must lie strictly before the footer.
    let limit = blob_size.saturating_sub(kind.size() as u64);
    if toc_offset >= limit {
        return Err(Error::TocOffsetOutOfRange {
            offset: toc_offset,
            size: blob_size,
        });
    }
    Ok(Footer { kind, toc_offset })
}

fn parse_estargz(b: &[u8]) -> Result<u64> {
    check_gzip_frame(b, 26)?;
    if &b[12..14] != b"SG" {
        return Err(Error::InvalidFooter("extra subfield id is not SG"));
    }
    if u16::from_le_bytes([b[14], b[15]]) != 22 {
        return Err(Error::InvalidFooter("extra subfield length is not 22"));
    }
    parse_offset_magic(&b[16..38])
}

fn parse_legacy(b: &[u8]) -> Result<u64> {
    check_gzip_frame(b, 22)?;
    parse_offset_magic(&b[12..34])
}

/// Checks the gzip header up to XLEN and the empty member after the extra.
fn check_gzip_frame(b: &[u8], xlen: u16) -> Result<()> {
    if b[0..4] != GZIP_HEADER_PREFIX {
        return Err(Error::InvalidFooter("not a gzip header with FEXTRA"));
    }
    if u16::from_le_bytes([b[10], b[11]]) != xlen {
        return Err(Error::InvalidFooter("unexpected gzip extra length"));
    }
    let body = &b[12 + usize::from(xlen)..];
    if body[..5] != EMPTY_STORED_BLOCK || body[5..].iter().any(|&x| x != 0) {
        return Err(Error::InvalidFooter("footer member is not empty"));
    }
    Ok(())
}

fn parse_offset_magic(b: &[u8]) -> Result<u64> {
    if &b[16..22] != MAGIC {
        return Err(Error::InvalidFooter("missing STARGZ magic"));
    }
    let hex = std::str::from_utf8(&b[..16])
        .map_err(|_| Error::InvalidFooter("TOC offset is not ASCII"))?;
    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::InvalidFooter("TOC offset is not hex"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| Error::InvalidFooter("TOC offset is not hex"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn roundtrip_estargz() {
        let f = build(0x1234);
        assert_eq!(&f[16..38], b"0000000000001234STARGZ");
        let p = parse(&f, 10_000).unwrap();
        assert_eq!(
            p,
            Footer {
                kind: FooterKind::Estargz,
                toc_offset: 0x1234
            }
        );
    }

    #[test]
    fn footer_is_a_valid_empty_gzip_member() {
        let f = build(77);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn legacy_footer() {
        let mut f = Vec::new();
        f.extend_from_slice(&GZIP_HEADER_PREFIX);
        f.extend_from_slice(&GZIP_HEADER_REST);
        f.extend_from_slice(&22u16.to_le_bytes());
        f.extend_from_slice(b"00000000000000ffSTARGZ");
        f.extend_from_slice(&EMPTY_STORED_BLOCK);
        f.extend_from_slice(&[0; 8]);
        assert_eq!(f.len(), LEGACY_FOOTER_SIZE);
        let mut blob = vec![0u8; 300];
        blob.extend_from_slice(&f);
        let p = parse(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!(
            p,
            Footer {
                kind: FooterKind::Legacy,
                toc_offset: 0xff
            }
        );
    }

    #[test]
    fn rejects_offset_past_footer() {
        let f = build(10);
        assert!(matches!(
            parse(&f, 51),
            Err(Error::TocOffsetOutOfRange {
                offset: 10,
                size: 51
            })
        ));
    }

    #[test]
    fn rejects_bad_magic_and_hex() {
        let mut f = build(5);
        f[33] = b'X';
        assert!(parse(&f, 1000).is_err());
        let mut f = build(5);
        f[20] = b'g';
        assert!(parse(&f, 1000).is_err());
        let mut f = build(5);
        f[40] = 1;
        assert!(parse(&f, 1000).is_err());
    }

    #[test]
    fn rejects_short_tail() {
        assert!(matches!(
            parse(&[0u8; 10], 10),
            Err(Error::TooSmall { size: 10 })
        ));
    }
}
