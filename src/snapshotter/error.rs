//! The snapshotter's error type and its single mapping onto gRPC status
//! codes.
//!
//! Messages follow containerd's `errdefs` habit of ending in the class
//! (`...: not found`), so containerd's client, which strips that suffix when
//! it rebuilds the typed error, shows a clean message.

use std::io;
use std::path::Path;

/// Every failure the snapshotter reports. The variant decides the gRPC code
/// (see `From<Error> for tonic::Status`), the string is the context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key, name or parent does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A key or committed name is already taken (keys and names share one
    /// namespace), or a remote snapshot was prepared under its target name.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation (remove with
    /// children, commit of a non-active snapshot, mounts of a committed one).
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// The request itself is malformed (empty key, bad filter, bad field
    /// path, oversized label, parent not committed).
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A mount or unmount through the remote filesystem failed.
    #[error("remote filesystem: {0}")]
    Remote(String),
    /// A background task was cancelled or panicked.
    #[error("internal: {0}")]
    Internal(String),
    /// A crash injected by a test at the named step (see
    /// `Snapshotter::set_crash_point`); nothing is undone after it.
    #[error("simulated crash at {0}")]
    SimulatedCrash(&'static str),
}

/// Result alias used across the snapshotter.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and path it concerns.
    pub fn io(what: &str, path: &Path, source: io::Error) -> Self {
        Error::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        match err {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Store(_)
            | Error::Io { .. }
            | Error::Remote(_)
            | Error::Internal(_)
            | Error::SimulatedCrash(_) => tonic::Status::unknown(msg),
        }
    }
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn status_codes() {
        let cases = [
            (Error::NotFound("snapshot a".into()), Code::NotFound),
            (Error::AlreadyExists("a".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::Store("x".into()), Code::Unknown),
        ];
        for (err, code) in cases {
            assert_eq!(tonic::Status::from(err).code(), code);
        }
        let st = tonic::Status::from(Error::AlreadyExists("target snapshot \"t\"".into()));
        assert_eq!(st.message(), "target snapshot \"t\": already exists");
    }
}
