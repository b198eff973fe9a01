//! containerd's snapshots gRPC service: metadata store, overlayfs mounts,
//! and the seam through which remote layers are mounted.
//!
//! - [`config`]: the typed configuration (`/etc/rstargz/config.toml`).
//! - [`metadata`]: the durable redb store of snapshot records.
//! - [`overlay`]: snapshot directories, overlayfs mount descriptions, usage.
//! - [`filters`]: containerd's filter language for `List`.
//! - [`remote`]: the [`RemoteFs`] trait lazy pulling plugs into.
//! - [`core`]: [`Snapshotter`], tying the above together, crash-consistently.
//! - [`service`]: the tonic service.
//! - [`error`]: [`Error`] and its one mapping to gRPC status codes.
//! - [`client`]: a client over the unix socket, for tests and tools.
//!
//! Starting the service from a test:
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use rstargz::snapshotter::{Snapshotter, NoRemote, bind_socket, serve};
//! let sn = Snapshotter::open("/tmp/root".as_ref(), Arc::new(NoRemote)).await?;
//! let listener = bind_socket("/tmp/root/s.sock".as_ref())?;
//! let (tx, rx) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(serve(sn, listener, async { let _ = rx.await; }));
//! let mut client = rstargz::snapshotter::client::connect("/tmp/root/s.sock").await?;
//! // ... drive `client` ...
//! # drop(client); let _ = tx.send(()); server.await??;
//! # Ok(()) }
//! ```

pub mod client;
pub mod config;
pub mod core;
pub mod error;
pub mod filters;
pub mod metadata;
pub mod overlay;
pub mod remote;
pub mod service;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use self::config::Config;
pub use self::core::{CrashPoint, Info, Snapshotter};
pub use self::error::Error;
pub use self::metadata::Kind;
pub use self::remote::{NoRemote, RemoteError, RemoteFs};

use crate::proto::snapshots::snapshots_server::SnapshotsServer;

/// Binds a unix socket at `path`: creates its directory with mode 0700 and
/// replaces a stale socket file. Fails if a live server answers on it.
/// Must run inside a tokio runtime.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves the snapshots service on `listener` until `shutdown` resolves,
/// then stops accepting and waits for in-flight requests.
pub async fn serve(
    sn: Arc<Snapshotter>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(service::Service::new(sn)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// The daemon's whole life for an already loaded config: open the store
/// (cleaning crash debris, restoring remote mounts), bind `config.address`,
/// call `ready` once listening, serve until `shutdown`, remove the socket.
pub async fn run(
    config: &Config,
    remote: Arc<dyn RemoteFs>,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let sn = Snapshotter::open(&config.root, remote)
        .await
        .with_context(|| format!("opening snapshotter root {}", config.root.display()))?;
    let listener = bind_socket(&config.address)
        .with_context(|| format!("listening on {}", config.address.display()))?;
    tracing::info!(address = %config.address.display(), root = %config.root.display(), "serving");
    ready();
    // Once `shutdown` fires, in-flight requests get a grace period; clients
    // that keep idle connections open must not hold the exit back forever.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    let grace = std::time::Duration::from_secs(config.shutdown_timeout_secs);
    let deadline = async move {
        if stop_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let server = serve(sn, listener, shutdown);
    let result = tokio::select! {
        r = server => r,
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs(), "connections still open after the shutdown grace period; exiting");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&config.address);
    result.context("gRPC server")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_replaced_live_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/sub/s.sock");
        let live = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );
        let err = bind_socket(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        assert!(path.exists(), "a dead listener leaves its socket file");
        let _again = bind_socket(&path).unwrap();
        let file = d.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(bind_socket(&file).is_err(), "never deletes a non-socket");
    }
}
