//! From a blob's tail to an [`Index`] in at most two range reads, without
//! doing I/O itself, so sync and async callers share one path:
//!
//! ```text
//! tail = read(size - tail_len(size, opts) .. size)
//! match index_from_tail(&tail, size, opts, expected)? {
//!     TailOutcome::Ready(index) => index,
//!     TailOutcome::NeedMember(loc) => index_from_member(&read(loc.member), &loc, opts, expected)?,
//! }
//! ```

use super::ReaderOptions;
use super::index::Index;
use super::locate::{TocLocation, locate_toc};
use super::toc_member::parse_toc_member;
use crate::estargz::digest::Digest;
use crate::estargz::error::Result;

/// What a tail read yielded.
#[derive(Debug)]
pub enum TailOutcome {
    /// The tail held the whole TOC member.
    Ready(Index),
    /// Read `loc.member` and call [`index_from_member`].
    NeedMember(TocLocation),
}

/// Parses the footer from `tail` (the last bytes of a blob of `blob_size`
/// bytes) and, if the tail covers the TOC member, the TOC and index too.
pub fn index_from_tail(
    tail: &[u8],
    blob_size: u64,
    opts: &ReaderOptions,
    expected_toc: Option<&Digest>,
) -> Result<TailOutcome> {
    let loc = locate_toc(tail, blob_size, opts)?;
    match loc.member_in_tail(tail) {
        Some(member) => index_from_member(member, &loc, opts, expected_toc).map(TailOutcome::Ready),
        None => Ok(TailOutcome::NeedMember(loc)),
    }
}

/// Parses the TOC member (the bytes of `loc.member`) and builds the index.
/// A different TOC digest than `expected_toc` fails with
/// `TocDigestMismatch`; the digest is kept in [`Index::toc_digest`].
pub fn index_from_member(
    member: &[u8],
    loc: &TocLocation,
    opts: &ReaderOptions,
    expected_toc: Option<&Digest>,
) -> Result<Index> {
    let raw = parse_toc_member(member, opts, expected_toc)?;
    let mut index = Index::build(&raw.toc, loc.footer.toc_offset, opts)?;
    index.toc_digest = Some(raw.digest);
    // parse_toc_member failed on a mismatch, so a given digest matched.
    index.toc_verified = expected_toc.is_some();
    Ok(index)
}
