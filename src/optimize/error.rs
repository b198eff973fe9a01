//! Typed errors of the optimizer's library parts.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: {reason}")]
    Unpack { layer: usize, reason: String },
    #[error("overlay mount on {}: {reason}", path.display())]
    Mount { path: PathBuf, reason: String },
    #[error("fanotify: {0}")]
    Fanotify(String),
    #[error("no workload: {0}")]
    NoWorkload(String),
    #[error("workload executable {0:?} not found in the image{1}")]
    ExecutableNotFound(String, String),
    #[error("runc: {0}")]
    Runtime(String),
    #[error("recording: {0}")]
    Recording(String),
    #[error("the recording does not match the source image: {0}")]
    RecordingMismatch(String),
    #[error("interrupted")]
    Interrupted,
}

impl OptimizeError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        OptimizeError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, OptimizeError>;
