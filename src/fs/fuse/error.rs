//! The one place where a failed operation becomes an errno.

use fuser::Errno;

use crate::fs::content::ReadError;

/// Why an operation on the mounted layer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FsError {
    #[error("no such inode or name")]
    NotFound,
    /// Any attempt to modify the layer.
    #[error("read-only layer")]
    ReadOnly,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    /// The operation does not apply to this kind of node.
    #[error("invalid for this node")]
    Invalid,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl FsError {
    pub(crate) fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::ReadOnly => Errno::EROFS,
            FsError::NotDir => Errno::ENOTDIR,
            FsError::IsDir => Errno::EISDIR,
            FsError::Invalid => Errno::EINVAL,
            FsError::NoAttr => Errno::from_i32(libc::ENODATA),
            FsError::Range => Errno::ERANGE,
            FsError::Read(e) => Errno::from_i32(e.errno()),
        }
    }
}
