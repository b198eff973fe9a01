//! The seam between the FUSE filesystem and the layer's byte source.
//!
//! FUSE worker threads never wait on the network: a read is handed to the
//! tokio runtime as a [`ReadFuture`], and the FUSE reply is sent from the task
//! when the future resolves. The source returns only verified bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::estargz::reader::NodeId;

/// A pending read of verified file content.
pub type ReadFuture = Pin<Box<dyn Future<Output = Result<Bytes, ReadError>> + Send + 'static>>;

/// Verified file content of one mounted layer.
pub trait ContentSource: Send + Sync + 'static {
    /// Reads up to `size` bytes of regular file `node` from `offset`. A short
    /// result means end of file. Only bytes that passed verification are
    /// returned.
    fn read(self: Arc<Self>, node: NodeId, offset: u64, size: u32) -> ReadFuture;

    /// The read answered at once from memory, or `None` when that would
    /// need to wait (then [`ContentSource::read`] is used). Called on FUSE
    /// threads: it must never block.
    fn read_now(&self, _node: NodeId, _offset: u64, _size: u32) -> Option<Bytes> {
        None
    }

    /// Whether every chunk has been fetched (and cached) already, so that
    /// writing whole files out for passthrough costs no network.
    fn complete(&self) -> bool {
        false
    }
}

/// Why a read failed. Every variant answers `EIO` except where noted, but
/// they are kept apart for logs and metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("node is not a regular file")]
    NotAFile,
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("layer is shutting down")]
    Closed,
}

impl ReadError {
    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ReadError::NotAFile => libc::EISDIR,
            ReadError::Timeout(_) => libc::EIO,
            _ => libc::EIO,
        }
    }
}
