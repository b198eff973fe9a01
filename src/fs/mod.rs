//! The remote filesystem: FUSE mounts of eStargz layers, registry range
//! reads, and the chunk caches. See ARCHITECTURE.md for the thread model.
//!
//! - [`prewarm`]: blob size and tail of the layers above, fetched ahead.
//! - [`status`]: the daemon's `/status` and `/metrics` HTTP endpoint.
//! - [`lazy`]: [`lazy::LazyFs`], the snapshotter's `RemoteFs`: labels → layer → FUSE mount.
//! - [`fuse`]: the read-only FUSE filesystem of a layer (fuser), and the
//!   daemon's single mount multiplexing all layers.
//! - [`slots`]: durable slot number of each mounted layer.
//! - [`handover`]: the holder process that keeps the FUSE connection open
//!   across daemon restarts, and taking it over.
//! - [`tail_cache`]: footer and TOC of each layer on disk, so a restart
//!   does not fetch them again.
//! - [`content`]: the [`ContentSource`] seam the FUSE filesystem reads from.
//! - [`layer`]: one opened blob: TOC check, single-flight verified chunk
//!   fetches, prefetch, background fetch, read-ahead, stats
//!   (docs/layer.md).
//! - [`cache`]: memory and disk chunk caches shared by all layers.
//! - [`registry`]: the registry client ([`registry::RangeFetcher`]).

pub mod cache;
pub mod content;
pub mod fuse;
pub mod handover;
pub mod layer;
pub mod lazy;
pub mod prewarm;
pub mod registry;
pub mod slots;
pub mod status;
pub mod tail_cache;

pub use content::{ContentSource, ReadError, ReadFuture};

/// Returns free heap memory to the system: glibc keeps what was freed in
/// its arenas, so after the last layer goes an idle daemon would otherwise
/// stay as big as it was at its busiest. Takes a few milliseconds.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory no allocation refers to.
    unsafe {
        libc::malloc_trim(0);
    }
}
