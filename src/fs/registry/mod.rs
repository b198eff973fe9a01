//! The registry client for lazy reads.
//!
//! Parts:
//! - [`reference`]: image references with Docker's defaults.
//! - [`config`]: [`RegistryConfig`] and endpoint lists (containerd's
//!   `certs.d/<host>/hosts.toml` mirrors, plain HTTP for loopback and
//!   insecure hosts).
//! - [`credentials`]: docker `config.json` (`auth`, `username`/`password`,
//!   `identitytoken`).
//! - [`auth`]: `WWW-Authenticate` challenges, the token flow, the token cache.
//! - [`client`]: [`RegistryClient`], shared HTTP machinery, manual redirects,
//!   retries, the in-flight request semaphore.
//! - [`blob`]: [`Blob`], size lookup and verified (multi-)range reads with
//!   redirect caching and single-flight re-resolution; implements
//!   [`RangeFetcher`].
//! - [`range`]: range merging, `Content-Range` and `multipart/byteranges`.
//! - [`retry`]: jittered exponential backoff and `Retry-After`.
//! - [`push`]: whole-blob streaming GETs (digest checked as they stream)
//!   and the push API (blob uploads, `HEAD` to skip, manifest `PUT`).
//! - [`manifest`]: [`RegistryClient::resolve`] for manifests and indexes.
//! - [`error`]: [`RegistryError`], with errno and log-reason mappings.
//! - [`memory`]: [`MemoryBlob`], an in-memory [`RangeFetcher`] for tests.
//!
//! # Why reqwest directly, not `oci-client`
//! `oci-client` 0.18 covers manifests, token auth and single-range blob
//! reads, but a lazy reader needs what it does not expose: multi-range
//! requests and their `multipart/byteranges` answers, verification of every
//! `Content-Range`, control over redirects (no `Authorization` to object
//! storage, cached presigned URLs re-resolved once on expiry), docker's
//! `identitytoken` (OAuth2 refresh tokens), and containerd's `hosts.toml`
//! mirrors. Using it for manifests only would mean two token caches and two
//! auth stacks for one registry, and it brings `chrono`, `regex`, `oci-spec`
//! and more into a 2-core build. Manifest resolution is ~150 lines here,
//! sharing this module's auth, retries and endpoints.
//!
//! # TLS
//! reqwest 0.13 with `rustls-no-provider`; [`RegistryClient::new`] installs
//! rustls' ring provider as the process default (ring builds faster than
//! aws-lc-rs). Certificates are verified with the platform verifier, except
//! for `skip_verify` hosts.

pub mod auth;
pub mod blob;
pub mod client;
pub mod config;
pub mod credentials;
pub mod error;
pub mod manifest;
pub mod memory;
pub mod push;
pub mod range;
pub mod reference;
pub mod retry;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;

pub use blob::Blob;
pub use client::{ClientStats, RegistryClient, ensure_crypto_provider};
pub use config::{Capability, Endpoint, RegistryConfig};
pub use error::RegistryError;
pub use manifest::{Descriptor, Manifest, Resolved, TOC_DIGEST_ANNOTATION};
pub use memory::MemoryBlob;
pub use reference::Reference;

/// The seam between the FUSE layer and the network: verified range reads of
/// one blob. Tests implement it with fakes; [`Blob`] is the real one.
pub trait RangeFetcher: Send + Sync {
    /// Reads each range (`start..end` within the blob). Returns one `Bytes`
    /// per range, in request order, each exactly `end - start` long.
    fn fetch(
        &self,
        ranges: &[Range<u64>],
    ) -> impl Future<Output = Result<Vec<Bytes>, RegistryError>> + Send;

    /// The blob size in bytes.
    fn size(&self) -> impl Future<Output = Result<u64, RegistryError>> + Send;

    /// Reads `range` with one request and sends its bytes to `tx` in order,
    /// in pieces as they arrive (together exactly `end - start` bytes), so
    /// the caller can use the start of a long range before its end is in.
    /// An error after some pieces went out ends the stream; the caller
    /// fetches what it still lacks. A closed `tx` stops the read quietly.
    /// The default reads the range whole with [`RangeFetcher::fetch`].
    fn fetch_stream(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send {
        async move {
            let mut v = self.fetch(std::slice::from_ref(&range)).await?;
            if let Some(b) = v.pop() {
                let _ = tx.send(b).await;
            }
            Ok(())
        }
    }
}

/// A boxed, `Send` future (what [`DynRangeFetcher`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe form of [`RangeFetcher`], for `Arc<dyn DynRangeFetcher>`
/// where the implementation is chosen at run time. Every `RangeFetcher` is
/// one.
pub trait DynRangeFetcher: Send + Sync {
    /// [`RangeFetcher::fetch`], boxed.
    fn fetch_dyn<'a>(
        &'a self,
        ranges: &'a [Range<u64>],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, RegistryError>>;

    /// [`RangeFetcher::size`], boxed.
    fn size_dyn(&self) -> BoxFuture<'_, Result<u64, RegistryError>>;

    /// [`RangeFetcher::fetch_stream`], boxed.
    fn fetch_stream_dyn(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> BoxFuture<'_, Result<(), RegistryError>>;
}

impl<T: RangeFetcher> DynRangeFetcher for T {
    fn fetch_dyn<'a>(
        &'a self,
        ranges: &'a [Range<u64>],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, RegistryError>> {
        Box::pin(self.fetch(ranges))
    }

    fn size_dyn(&self) -> BoxFuture<'_, Result<u64, RegistryError>> {
        Box::pin(self.size())
    }

    fn fetch_stream_dyn(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(self.fetch_stream(range, tx))
    }
}
