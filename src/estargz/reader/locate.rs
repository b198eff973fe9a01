//! Finding the TOC from the end of a blob.
//!
//! A caller reads the last [`tail_len`] bytes of the blob (one range read),
//! then [`locate_toc`] parses the footer and says where the compressed TOC
//! member is. When the tail already covers it, [`TocLocation::member_in_tail`]
//! returns it and no second read is needed.

use std::ops::Range;

use super::ReaderOptions;
use crate::estargz::error::{Error, Result};
use crate::estargz::footer::{self, Footer};

/// Where the TOC member of a blob lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLocation {
    pub footer: Footer,
    pub blob_size: u64,
    /// Compressed byte range of the TOC gzip member (footer excluded).
    pub member: Range<u64>,
}

/// How many bytes to read from the end of a blob of `blob_size` bytes.
pub fn tail_len(blob_size: u64, opts: &ReaderOptions) -> u64 {
    opts.tail_size
        .max(footer::MAX_FOOTER_SIZE as u64)
        .min(blob_size)
}

/// Parses the footer at the end of `tail` (the last `tail.len()` bytes of a
/// blob of `blob_size` bytes) and locates the TOC member.
pub fn locate_toc(tail: &[u8], blob_size: u64, opts: &ReaderOptions) -> Result<TocLocation> {
    let footer = footer::parse(tail, blob_size)?;
    let end = blob_size
        .checked_sub(footer.kind.size() as u64)
        .ok_or(Error::TooSmall { size: blob_size })?;
    // footer::parse guarantees toc_offset < end.
    let member = footer.toc_offset..end;
    let compressed = end - footer.toc_offset;
    // A gzip member can be a little larger than its payload (stored blocks),
    // so allow some slack over the uncompressed limit.
    let limit = opts
        .max_toc_size
        .saturating_add(opts.max_toc_size / 8 + 4096);
    if compressed > limit {
        return Err(Error::TocTooLarge {
            size: compressed,
            limit,
        });
    }
    Ok(TocLocation {
        footer,
        blob_size,
        member,
    })
}

impl TocLocation {
    /// The TOC member's bytes if `tail` (the blob's last bytes) covers them.
    pub fn member_in_tail<'a>(&self, tail: &'a [u8]) -> Option<&'a [u8]> {
        let tail_start = self.blob_size.checked_sub(tail.len() as u64)?;
        let start = self.member.start.checked_sub(tail_start)?;
        let len = self.member.end - self.member.start;
        let start = usize::try_from(start).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        tail.get(start..end)
    }

    /// Length of the compressed TOC member.
    pub fn member_len(&self) -> u64 {
        self.member.end - self.member.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_covers_or_not() {
        let mut blob = vec![7u8; 100];
        blob.extend_from_slice(&footer::build(40));
        let size = blob.len() as u64;
        let opts = ReaderOptions::default();
        assert_eq!(tail_len(size, &opts), size);
        let loc = locate_toc(&blob, size, &opts).unwrap();
        assert_eq!(loc.member, 40..100);
        assert_eq!(loc.member_in_tail(&blob).unwrap().len(), 60);
        let short = &blob[blob.len() - 80..];
        assert!(
            locate_toc(short, size, &opts)
                .unwrap()
                .member_in_tail(short)
                .is_none()
        );
        let exact = &blob[40..];
        assert_eq!(loc.member_in_tail(exact).unwrap(), &blob[40..100]);
    }

    #[test]
    fn toc_member_too_large() {
        let mut blob = vec![0u8; 10_000];
        blob.extend_from_slice(&footer::build(1));
        let opts = ReaderOptions {
            max_toc_size: 1000,
            ..Default::default()
        };
        assert!(matches!(
            locate_toc(&blob, blob.len() as u64, &opts),
            Err(Error::TocTooLarge { .. })
        ));
    }
}
