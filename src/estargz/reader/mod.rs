//! Reading eStargz blobs: from a blob's tail to verified file content.
//!
//! The steps are split so that an asynchronous caller (the FUSE filesystem,
//! fetching ranges over HTTP) decides *when* bytes arrive, and this module
//! only says *which* bytes it needs and parses them:
//!
//! - [`locate`]: footer → the compressed range of the TOC member, and
//!   whether a tail read already holds it.
//! - [`toc_member`]: gzip + tar + JSON of the TOC, bounded, with its digest.
//! - [`open`]: tail → index in at most two reads, I/O left to the caller.
//! - [`index`]: the checked, typed tree ([`Index`]) built from the JSON
//!   (by `build`), with names checked by [`name`].
//! - [`chunk`]: which compressed range holds a file offset ([`ChunkRef`]),
//!   and bomb-safe decoding plus digest verification of one chunk.
//! - [`blob`]: [`BlobReader`], a sync convenience over a [`ReadAt`] source.
//! - [`read_at`]: the [`ReadAt`] trait for files and byte slices.
//!
//! An asynchronous reader (FUSE) uses it as: fetch the last
//! [`tail_len`] bytes → [`index_from_tail`] (maybe one more fetch of the TOC
//! member → [`index_from_member`]); then per read, [`Index::chunk_for`] →
//! fetch `[compressed_offset, compressed_end)` → [`decode_chunk`], which has
//! verified the chunk digest before returning. [`Index`] is `Send + Sync`;
//! node ids are dense from 0 (root), so `inode = id + 1` works.

// Offsets and sizes come from untrusted blobs: no silent truncating casts.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod blob;
mod build;
pub mod chunk;
pub mod index;
pub mod locate;
pub mod name;
pub mod open;
pub mod read_at;
pub mod toc_member;

pub use blob::{BlobReader, VerifyReport};
pub use chunk::{ChunkRef, decode_chunk, decode_chunk_into};
pub use index::{Index, Node, NodeId, NodeKind, Prefetch};
pub use locate::{TocLocation, locate_toc, tail_len};
pub use open::{TailOutcome, index_from_member, index_from_tail};
pub use read_at::ReadAt;
pub use toc_member::{RawToc, parse_toc_member};

/// Whether content without a `chunkDigest` may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestPolicy {
    /// Every non-empty file and chunk must carry a `chunkDigest` (eStargz).
    #[default]
    RequireChunkDigests,
    /// Legacy stargz: chunks without a digest are accepted; a file's whole
    /// `digest` is still checked when present. The caller opts in.
    AllowMissing,
}

/// Limits and policy for reading a blob. Every limit bounds memory or work
/// a hostile blob could otherwise demand.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// Largest uncompressed TOC JSON accepted (and roughly the largest
    /// compressed TOC member read).
    pub max_toc_size: u64,
    /// Largest number of TOC entries (chunks included).
    pub max_entries: u64,
    /// How many bytes to read from a blob's end first, so that the footer and
    /// a typical TOC arrive in one range read.
    pub tail_size: u64,
    pub digest_policy: DigestPolicy,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            max_toc_size: 256 << 20,
            max_entries: 1_000_000,
            tail_size: 512 << 10,
            digest_policy: DigestPolicy::RequireChunkDigests,
        }
    }
}
