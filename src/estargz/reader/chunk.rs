//! Chunks: which compressed bytes hold a file range, and how to turn them
//! back into verified content.
//!
//! A chunk's compressed data starts at `compressed_offset` (a gzip member
//! boundary) and ends by `compressed_end` (the next member that starts a
//! payload, or the TOC). Inside the decompressed member, the chunk starts
//! `inner_offset` bytes in. Decoding never inflates more than
//! `inner_offset + chunk_size` bytes, so a chunk that is a gzip bomb costs
//! no more than its declared size.

use std::io::{self, Read, Write};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;

use super::index::{ChunkInfo, Index, NodeId, NodeKind};
use crate::estargz::digest::{Digest, Hasher};
use crate::estargz::error::{Error, Result};

/// Everything needed to fetch and decode one chunk, detached from the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    pub node: NodeId,
    /// Path of the file, for error messages.
    pub name: Arc<str>,
    /// Start of the gzip member holding the chunk.
    pub compressed_offset: u64,
    /// Upper bound of the compressed bytes needed (exclusive).
    pub compressed_end: u64,
    /// Uncompressed bytes to skip from `compressed_offset`.
    pub inner_offset: u64,
    /// Offset of the chunk within the file.
    pub chunk_offset: u64,
    pub chunk_size: u64,
    /// `None` only when the index was built allowing legacy blobs.
    pub chunk_digest: Option<Digest>,
}

impl ChunkRef {
    /// Length of the compressed range `[compressed_offset, compressed_end)`.
    pub fn compressed_len(&self) -> u64 {
        self.compressed_end.saturating_sub(self.compressed_offset)
    }

    /// File offset just past this chunk.
    pub fn chunk_end(&self) -> u64 {
        self.chunk_offset.saturating_add(self.chunk_size)
    }
}

impl Index {
    fn chunk_ref(&self, node: NodeId, c: &ChunkInfo) -> ChunkRef {
        ChunkRef {
            node,
            name: self.nodes[node.0 as usize].path.clone(),
            compressed_offset: c.offset,
            compressed_end: c.next_offset,
            inner_offset: c.inner_offset,
            chunk_offset: c.chunk_offset,
            chunk_size: c.chunk_size,
            chunk_digest: c.digest,
        }
    }

    fn chunk_slice(&self, node: NodeId) -> &[ChunkInfo] {
        match self.node(node).map(|n| &n.kind) {
            Some(NodeKind::Reg { chunks, .. }) => {
                &self.chunks[chunks.start as usize..chunks.end as usize]
            }
            _ => &[],
        }
    }

    /// The chunk holding byte `file_offset` of a regular file; `None` past
    /// the end, for empty files and for non-files.
    pub fn chunk_for(&self, node: NodeId, file_offset: u64) -> Option<ChunkRef> {
        let cs = self.chunk_slice(node);
        // Chunks tile the file in order; find the last starting at or before.
        let i = cs.partition_point(|c| c.chunk_offset <= file_offset);
        let c = cs.get(i.checked_sub(1)?)?;
        (file_offset < c.chunk_offset + c.chunk_size).then(|| self.chunk_ref(node, c))
    }

    /// All chunks of one file, in file order.
    pub fn chunks_of(&self, node: NodeId) -> impl Iterator<Item = ChunkRef> + '_ {
        self.chunk_slice(node)
            .iter()
            .map(move |c| self.chunk_ref(node, c))
    }

    /// Every chunk of every file, once per node, in blob order (for
    /// prefetch and background fetch).
    pub fn all_chunks(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        let mut files: Vec<(NodeId, u32)> = self
            .nodes()
            .filter_map(|(id, n)| match &n.kind {
                NodeKind::Reg { chunks, .. } if !chunks.is_empty() => Some((id, chunks.start)),
                _ => None,
            })
            .collect();
        // The chunk table is in TOC (= blob) order; order files by it.
        files.sort_by_key(|&(_, start)| start);
        files
            .into_iter()
            .flat_map(move |(id, _)| self.chunks_of(id))
    }
}

/// Decodes one chunk from `compressed` (bytes starting at the chunk's
/// `compressed_offset`; the range up to `compressed_end` is always enough)
/// and verifies its digest.
pub fn decode_chunk(compressed: &[u8], chunk: &ChunkRef) -> Result<Vec<u8>> {
    // Preallocate only what the input could plausibly inflate to.
    let cap = chunk
        .chunk_size
        .min(16 << 20)
        .min((compressed.len() as u64).saturating_mul(8));
    let mut out = Vec::with_capacity(cap as usize);
    decode_chunk_into(compressed, chunk, &mut out)?;
    Ok(out)
}

/// Streaming form of [`decode_chunk`]: decodes from `src` (positioned at the
/// chunk's `compressed_offset`) into `out`. Returns the chunk's digest.
/// On a digest mismatch, `out` has already received the bad bytes; callers
/// that must not expose them write into a buffer first.
pub fn decode_chunk_into<R: Read, W: Write>(
    src: R,
    chunk: &ChunkRef,
    mut out: W,
) -> Result<Digest> {
    let bad = |reason: String| Error::BadChunk {
        name: chunk.name.to_string(),
        offset: chunk.chunk_offset,
        reason,
    };
    let mut gz = MultiGzDecoder::new(src);
    let skipped = io::copy(&mut (&mut gz).take(chunk.inner_offset), &mut io::sink())
        .map_err(|e| bad(format!("decompressing: {e}")))?;
    if skipped != chunk.inner_offset {
        return Err(bad("member ends before innerOffset".into()));
    }
    let mut hasher = Hasher::new();
    let mut left = chunk.chunk_size;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = match gz.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(bad(format!(
                    "data ends {left} bytes short of the chunk size"
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(format!("decompressing: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let actual = hasher.finish();
    if let Some(expected) = chunk.chunk_digest
        && expected != actual
    {
        return Err(Error::ChunkDigestMismatch {
            name: chunk.name.to_string(),
            offset: chunk.chunk_offset,
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn chunk(inner: u64, size: u64, data: Option<&[u8]>) -> ChunkRef {
        ChunkRef {
            node: NodeId(1),
            name: "f".into(),
            compressed_offset: 0,
            compressed_end: 1 << 20,
            inner_offset: inner,
            chunk_offset: 0,
            chunk_size: size,
            chunk_digest: data.map(Digest::of),
        }
    }

    #[test]
    fn inner_offset_and_member_boundaries() {
        let mut member = gz(b"0123456789");
        member.extend_from_slice(&gz(b"abcdef"));
        assert_eq!(
            decode_chunk(&member, &chunk(3, 4, Some(b"3456"))).unwrap(),
            b"3456"
        );
        // Reading across a member boundary works (multi-member aware).
        assert_eq!(
            decode_chunk(&member, &chunk(8, 4, Some(b"89ab"))).unwrap(),
            b"89ab"
        );
        assert_eq!(decode_chunk(&member, &chunk(0, 2, None)).unwrap(), b"01");
    }

    #[test]
    fn short_corrupt_and_mismatched() {
        let member = gz(b"0123456789");
        assert!(matches!(
            decode_chunk(&member, &chunk(8, 4, None)),
            Err(Error::BadChunk { .. })
        ));
        assert!(matches!(
            decode_chunk(&member, &chunk(11, 1, None)),
            Err(Error::BadChunk { .. })
        ));
        assert!(matches!(
            decode_chunk(&member, &chunk(0, 4, Some(b"0124"))),
            Err(Error::ChunkDigestMismatch { .. })
        ));
        assert!(matches!(
            decode_chunk(b"not gzip", &chunk(0, 4, None)),
            Err(Error::BadChunk { .. })
        ));
        assert!(matches!(
            decode_chunk(&[], &chunk(0, 1, None)),
            Err(Error::BadChunk { .. })
        ));
    }
}
