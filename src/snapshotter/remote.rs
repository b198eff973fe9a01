//! The seam through which layers are mounted lazily.
//!
//! The snapshotter knows nothing about FUSE, registries or eStargz: when
//! `Prepare` carries `containerd.io/snapshot.ref=<chainID>` it asks a
//! [`RemoteFs`] to mount the layer on the new snapshot's `fs` directory. If
//! that works the snapshot is committed under the chain ID, labelled
//! [`REMOTE_LABEL`], and containerd skips fetching and unpacking the layer.
//! If it declines, the snapshot is an ordinary active snapshot and
//! containerd unpacks into it.
//!
//! [`NoRemote`] is the default and always declines; `src/fs/` provides the
//! real implementation.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;

/// Label containerd's unpacker sets on `Prepare`: the chain ID the prepared
/// snapshot would be committed as.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Label marking a snapshot whose `fs` directory is a remote mount.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
/// Value of [`REMOTE_LABEL`].
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";

/// Why a remote mount, check or unmount failed. The message is logged as
/// the `reason` of a fallback, so it should say what a user can fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

impl RemoteError {
    pub fn new(msg: impl Into<String>) -> Self {
        RemoteError(msg.into())
    }
}

/// Mounts remote layers. Implementations must be cheap to share between
/// tasks; every method may be called concurrently for different
/// mountpoints.
#[async_trait]
pub trait RemoteFs: Send + Sync {
    /// Mounts the layer described by `labels` on `mountpoint` (an existing,
    /// empty directory). An error means "not prepared remotely"; the caller
    /// falls back to a normal pull.
    async fn mount(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError>;

    /// Checks that the layer mounted on `mountpoint` is still usable.
    async fn check(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError>;

    /// Unmounts `mountpoint`. Called before a remote snapshot is removed.
    async fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError>;

    /// Every remote snapshot has been through `check`/`mount` at start;
    /// called once, before the daemon serves.
    async fn restored(&self) {}
}

/// The default [`RemoteFs`]: nothing is ever mounted remotely.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRemote;

#[async_trait]
impl RemoteFs for NoRemote {
    async fn mount(
        &self,
        _mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        Err(RemoteError::new("remote snapshots are not enabled"))
    }

    async fn check(
        &self,
        _mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        Err(RemoteError::new("remote snapshots are not enabled"))
    }

    async fn unmount(&self, _mountpoint: &Path) -> Result<(), RemoteError> {
        Ok(())
    }
}
