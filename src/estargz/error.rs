//! Errors of the format library. Every way a hostile or broken blob can fail
//! has its own variant, so callers (CLI, FUSE, tests) can tell them apart.

use std::io;

/// An error reading, verifying or writing an eStargz blob.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("blob too small ({size} bytes) to hold a footer")]
    TooSmall { size: u64 },
    #[error("invalid footer: {0}")]
    InvalidFooter(&'static str),
    #[error("TOC offset {offset} is outside the blob of {size} bytes")]
    TocOffsetOutOfRange { offset: u64, size: u64 },
    #[error("TOC is {size} bytes, over the limit of {limit}")]
    TocTooLarge { size: u64, limit: u64 },
    #[error("invalid TOC: {0}")]
    InvalidToc(String),
    #[error("TOC digest mismatch: expected {expected}, got {actual}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("invalid entry {name:?}: {reason}")]
    InvalidEntry { name: String, reason: String },
    #[error("no such file in TOC: {0}")]
    NotFound(String),
    #[error(
        "chunk of {name:?} at offset {offset}: digest mismatch (expected {expected}, got {actual})"
    )]
    ChunkDigestMismatch {
        name: String,
        offset: u64,
        expected: String,
        actual: String,
    },
    #[error("file {name:?}: digest mismatch (expected {expected}, got {actual})")]
    FileDigestMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("chunk of {name:?} at offset {offset}: {reason}")]
    BadChunk {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("invalid input tar: {0}")]
    InvalidTar(String),
    #[error("prioritized file not found in the input: {0}")]
    PrioritizedNotFound(String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("unsupported TOC version {0} (only 1 exists)")]
    UnsupportedVersion(i64),
    #[error("TOC has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("hardlink {name:?} -> {target:?}: {reason}")]
    BrokenHardlink {
        name: String,
        target: String,
        reason: &'static str,
    },
    #[error("{name:?} has no chunk digest, and unverified (legacy) content is not allowed")]
    Unverifiable { name: String },
    #[error("{path:?} is not a regular file")]
    NotAFile { path: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
