//! The eStargz writer: tar (plain or gzip) in, eStargz blob out.
//!
//! - `input`: spools the input to a temp file and scans its headers.
//! - `order`: duplicates, landmarks and prioritized files.
//! - `layout`: chunking and member boundaries (uncompressed sizes only).
//! - [`compress`]: gzip members on a thread pool, written back in order.
//! - [`meta`]: tar metadata to TOC fields.
//!
//! Memory stays O(threads x chunk size) plus per-entry metadata: payloads
//! are read from the spool one chunk at a time. The output bytes depend only
//! on the input and [`BuildOptions`], never on `threads`.
//!
//! Where we deliberately differ from the Go reference writer (readers,
//! including the Go library, accept both; `tests/interop_go.rs` checks that
//! the TOCs agree field by field):
//! - tar headers are copied byte for byte from the input (PAX and GNU
//!   long-name records included) instead of being re-encoded, so the DiffID
//!   differs from Go's, but the stream is the input's own headers;
//! - `min_chunk_size` sharing is decided on uncompressed bytes, so member
//!   boundaries never depend on compression (Go counts compressed bytes and
//!   falls back to one thread);
//! - a run of headers without payload (many dirs, empty files) is cut into
//!   extra members once it reaches the chunk size, bounding member size;
//! - missing parents of prioritized files are synthesized (mode 0755)
//!   instead of failing; `..` that escapes the root is an error instead of
//!   being clamped; landmarks have mode 0644 rather than 0.

pub mod compress;
mod input;
mod layout;
pub mod meta;
mod order;

use std::fs::File;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};

pub use compress::{Backend, MemberCompressor};
pub use input::normalize_name;

use super::error::{Error, Result};
use super::toc::{JsonToc, TOC_VERSION};
use super::{DEFAULT_CHUNK_SIZE, TOC_TAR_NAME, footer};

/// Options of a build. `Default` gives the reference writer's defaults.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Uncompressed chunk size; 0 means [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: u64,
    /// When > 0, payload pieces share the current gzip member while fewer
    /// than this many uncompressed bytes are in it (`innerOffset` layout).
    pub min_chunk_size: u64,
    /// Compression level; range depends on [`BuildOptions::backend`].
    pub level: u32,
    /// Paths to put first, in access order.
    pub prioritized_files: Vec<String>,
    /// Skip prioritized paths missing from the input instead of failing.
    pub allow_prioritized_not_found: bool,
    /// Compression threads; 0 means the number of CPUs.
    pub threads: usize,
    pub backend: Backend,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            min_chunk_size: 0,
            level: 9,
            prioritized_files: Vec::new(),
            allow_prioritized_not_found: false,
            threads: 0,
            backend: Backend::default(),
        }
    }
}

/// Largest chunk size accepted; bounds per-thread memory.
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;

impl BuildOptions {
    fn effective_chunk_size(&self) -> Result<u64> {
        let c = if self.chunk_size == 0 {
            DEFAULT_CHUNK_SIZE
        } else {
            self.chunk_size
        };
        if c > MAX_CHUNK_SIZE || self.min_chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::InvalidOption(format!(
                "chunk sizes must be at most {MAX_CHUNK_SIZE}"
            )));
        }
        Ok(c)
    }

    fn effective_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// What a build produced; digests are `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuildResult {
    /// Digest of the TOC JSON (the `toc.digest` annotation).
    pub toc_digest: String,
    /// Digest of the whole uncompressed tar stream.
    pub diff_id: String,
    /// Digest of the blob.
    pub blob_digest: String,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    /// Compressed offset of the TOC member.
    pub toc_offset: u64,
    /// Number of TOC entries (chunks included).
    pub entries: usize,
}

/// Builds from any reader; the input is spooled to an unnamed temp file.
pub fn build<R: Read, W: Write + Send>(
    input: R,
    output: &mut W,
    opts: &BuildOptions,
) -> Result<BuildResult> {
    let spool = input::spool(input)?;
    build_spooled(spool, output, opts)
}

/// Builds from a file: read in place when it is a plain tar, spooled
/// (decompressed) when it is gzip.
pub fn build_file<W: Write + Send>(
    input: File,
    output: &mut W,
    opts: &BuildOptions,
) -> Result<BuildResult> {
    let spool = input::open_seekable(input)?;
    build_spooled(spool, output, opts)
}

fn build_spooled<W: Write + Send>(
    mut spool: File,
    output: &mut W,
    opts: &BuildOptions,
) -> Result<BuildResult> {
    let chunk_size = opts.effective_chunk_size()?;
    let entries = input::scan(&mut spool)?;
    let items = order::order(
        entries,
        &opts.prioritized_files,
        opts.allow_prioritized_not_found,
    )?;
    let params = layout::LayoutParams {
        chunk_size,
        min_chunk_size: opts.min_chunk_size,
    };
    let (laid, written) = compress::run_pipeline(
        opts.effective_threads(),
        opts.backend,
        opts.level,
        output,
        |sub| layout::lay_out(items, &mut spool, &params, sub),
    )?;
    finish(laid, written, output, opts)
}

/// Resolves member offsets, writes the TOC member and the footer.
fn finish<W: Write>(
    mut laid: layout::Laid,
    written: compress::WrittenMembers,
    output: &mut W,
    opts: &BuildOptions,
) -> Result<BuildResult> {
    for &(idx, seq) in &laid.member_of {
        let off = written
            .offsets
            .get(seq)
            .copied()
            .ok_or_else(|| Error::InvalidOption("member offset missing".into()))?;
        laid.entries[idx].offset =
            i64::try_from(off).map_err(|_| Error::InvalidOption("offset over i64".into()))?;
    }
    let toc = JsonToc {
        version: TOC_VERSION,
        entries: laid.entries,
    };
    let json = serde_json::to_vec(&toc).map_err(|e| Error::InvalidToc(e.to_string()))?;
    let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    let toc_tar = toc_tar(&json)?;

    let mut diff = laid.diff_hash;
    diff.update(&toc_tar);
    let uncompressed = laid
        .uncompressed
        .checked_add(toc_tar.len() as u64)
        .ok_or_else(|| Error::InvalidOption("stream too large".into()))?;

    let member = MemberCompressor::new(opts.backend, opts.level)?.compress(&toc_tar)?;
    let foot = footer::build(written.written);
    let mut blob = written.blob_hash;
    blob.update(&member);
    blob.update(foot);
    output.write_all(&member)?;
    output.write_all(&foot)?;
    output.flush()?;
    let compressed = written
        .written
        .checked_add((member.len() + foot.len()) as u64)
        .ok_or_else(|| Error::InvalidOption("output too large".into()))?;
    Ok(BuildResult {
        toc_digest,
        diff_id: format!("sha256:{}", hex::encode(diff.finalize())),
        blob_digest: format!("sha256:{}", hex::encode(blob.finalize())),
        uncompressed_size: uncompressed,
        compressed_size: compressed,
        toc_offset: written.written,
        entries: toc.entries.len(),
    })
}

/// The TOC's tar stream: one `stargz.index.json` entry, then end-of-archive.
fn toc_tar(json: &[u8]) -> Result<Vec<u8>> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o444);
    h.set_size(json.len() as u64);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    let mut b = tar::Builder::new(Vec::with_capacity(json.len() + 2048));
    b.append_data(&mut h, TOC_TAR_NAME, json)?;
    Ok(b.into_inner()?)
}
