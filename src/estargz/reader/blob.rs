//! [`BlobReader`]: the whole read path over a synchronous [`ReadAt`], for
//! the CLI and tests. The FUSE side composes the same steps asynchronously.

use std::io::Write;

use super::ReaderOptions;
use super::chunk::{ChunkRef, decode_chunk_into};
use super::index::{Index, NodeId, NodeKind};
use super::locate::{TocLocation, locate_toc, tail_len};
use super::open::{TailOutcome, index_from_member, index_from_tail};
use super::read_at::{RangeReader, ReadAt};
use crate::estargz::digest::{Digest, Hasher};
use crate::estargz::error::{Error, Result};
use crate::estargz::footer::FooterKind;

/// Chunks up to this size are decoded into memory and checked before any
/// byte is written out; larger ones are streamed.
const BUFFERED_CHUNK_MAX: u64 = 64 << 20;

/// An opened blob: its footer, TOC digest and checked index.
pub struct BlobReader<R> {
    src: R,
    index: Index,
    location: TocLocation,
    toc_digest: Digest,
}

/// What [`BlobReader::verify_all`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// TOC entries, chunk entries included.
    pub entries: u64,
    /// Regular files (distinct nodes).
    pub files: u64,
    pub chunks: u64,
    /// Uncompressed bytes decoded and hashed.
    pub bytes: u64,
    /// Chunks read without a digest (legacy blobs only).
    pub unverified_chunks: u64,
}

impl<R: ReadAt> BlobReader<R> {
    /// Reads the footer and TOC (one tail read, plus one more if the TOC is
    /// larger than the tail) and builds the index. With `expected_toc`, a
    /// different TOC digest fails with `TocDigestMismatch`.
    pub fn open(src: R, opts: &ReaderOptions, expected_toc: Option<&Digest>) -> Result<Self> {
        let size = src.size()?;
        let n = tail_len(size, opts);
        let mut tail = vec![0u8; n as usize];
        src.read_exact_at(size - n, &mut tail)?;
        let index = match index_from_tail(&tail, size, opts, expected_toc)? {
            TailOutcome::Ready(index) => index,
            TailOutcome::NeedMember(loc) => {
                // locate_toc bounded the member's length by the TOC limit.
                let mut member = vec![0u8; loc.member_len() as usize];
                src.read_exact_at(loc.member.start, &mut member)?;
                index_from_member(&member, &loc, opts, expected_toc)?
            }
        };
        let toc_digest = index.toc_digest.expect("set by index_from_member");
        let location = locate_toc(&tail, size, opts)?;
        Ok(BlobReader {
            src,
            index,
            location,
            toc_digest,
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn toc_digest(&self) -> &Digest {
        &self.toc_digest
    }

    pub fn footer_kind(&self) -> FooterKind {
        self.location.footer.kind
    }

    pub fn blob_size(&self) -> u64 {
        self.location.blob_size
    }

    /// Reads and decodes one chunk, verifying its digest. The compressed
    /// range is streamed (only what decoding needs is read), and the result
    /// grows only as real data inflates, whatever size the TOC claims.
    pub fn read_chunk(&self, chunk: &ChunkRef) -> Result<Vec<u8>> {
        let src = RangeReader::new(&self.src, chunk.compressed_offset, chunk.compressed_end);
        let mut out = Vec::with_capacity(chunk.chunk_size.min(1 << 20) as usize);
        decode_chunk_into(src, chunk, &mut out)?;
        Ok(out)
    }

    /// Writes a regular file's content to `out`, chunk by chunk, verifying
    /// every chunk and then the whole-file digest. Returns the byte count.
    pub fn copy_file<W: Write>(&self, path: &str, out: W) -> Result<u64> {
        let id = self.file(path)?;
        self.copy_node(id, out)
    }

    /// A regular file's whole content, verified.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.copy_file(path, &mut v)?;
        Ok(v)
    }

    fn file(&self, path: &str) -> Result<NodeId> {
        let id = self
            .index
            .lookup(path)
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        match self.index.node(id).map(|n| &n.kind) {
            Some(NodeKind::Reg { .. }) => Ok(id),
            _ => Err(Error::NotAFile {
                path: path.to_string(),
            }),
        }
    }

    fn copy_node<W: Write>(&self, id: NodeId, mut out: W) -> Result<u64> {
        let mut file_hash = Hasher::new();
        let mut total = 0u64;
        for c in self.index.chunks_of(id) {
            if c.chunk_size <= BUFFERED_CHUNK_MAX {
                let data = self.read_chunk(&c)?;
                file_hash.update(&data);
                out.write_all(&data)?;
            } else {
                let src = RangeReader::new(&self.src, c.compressed_offset, c.compressed_end);
                decode_chunk_into(src, &c, Tee(&mut out, &mut file_hash))?;
            }
            total += c.chunk_size;
        }
        let node = &self.index.nodes[id.0 as usize];
        if let NodeKind::Reg {
            digest: Some(expected),
            ..
        } = &node.kind
        {
            let actual = file_hash.finish();
            if *expected != actual {
                return Err(Error::FileDigestMismatch {
                    name: node.path.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(total)
    }

    /// Decodes every file, checking every chunk digest and every whole-file
    /// digest. Fails on the first bad file or chunk, naming it.
    pub fn verify_all(&self) -> Result<VerifyReport> {
        let mut r = VerifyReport {
            entries: self.index.toc_entries,
            ..Default::default()
        };
        let mut files: Vec<(u32, NodeId)> = self
            .index
            .nodes()
            .filter_map(|(id, n)| match &n.kind {
                NodeKind::Reg { chunks, .. } => Some((chunks.start, id)),
                _ => None,
            })
            .collect();
        files.sort();
        for (_, id) in files {
            r.files += 1;
            r.bytes += self.copy_node(id, std::io::sink())?;
            for c in self.index.chunks_of(id) {
                r.chunks += 1;
                if c.chunk_digest.is_none() {
                    r.unverified_chunks += 1;
                }
            }
        }
        Ok(r)
    }
}

/// Writes to `out` and hashes what it writes.
struct Tee<'a, W>(&'a mut W, &'a mut Hasher);

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
