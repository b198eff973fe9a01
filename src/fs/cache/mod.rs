//! Chunk caches shared by every layer of the daemon.
//!
//! - [`memory`]: [`MemoryCache`], byte-bounded, in memory (quick_cache).
//! - [`disk`]: [`DiskCache`], byte-bounded with LRU eviction, survives
//!   restarts, verified on read.
//! - [`files`]: [`CompleteFiles`], whole files written out from verified
//!   chunks, backing FUSE passthrough.
//!
//! Both hold only verified, uncompressed chunks keyed by `chunkDigest`, so
//! identical chunks of different layers and images are stored once.
//! [`Caches`] bundles them for [`crate::fs::layer`].

pub mod disk;
pub mod files;
pub mod memory;

use std::sync::Arc;

pub use disk::{DiskCache, DiskCacheStats};
pub use files::CompleteFiles;
pub use memory::MemoryCache;

/// The caches a layer reads through. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pub memory: Arc<MemoryCache>,
    /// `None` when no disk cache is configured.
    pub disk: Option<Arc<DiskCache>>,
}

/// Usage and counters of the shared caches, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStatus {
    pub memory_bytes: u64,
    pub memory_capacity: u64,
    pub memory_entries: u64,
    pub disk_bytes: u64,
    pub disk_capacity: u64,
    pub disk_entries: u64,
    pub disk_hits: u64,
    pub disk_misses: u64,
    pub disk_writes: u64,
    pub disk_write_errors: u64,
    pub disk_writes_skipped: u64,
    pub disk_corrupt: u64,
    pub disk_evictions: u64,
}

impl Caches {
    /// A snapshot of both caches' usage and counters.
    pub fn status(&self) -> CacheStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let mut s = CacheStatus {
            memory_bytes: self.memory.weight(),
            memory_capacity: self.memory.capacity(),
            memory_entries: self.memory.len() as u64,
            ..CacheStatus::default()
        };
        if let Some(d) = &self.disk {
            s.disk_bytes = d.used();
            s.disk_capacity = d.capacity();
            s.disk_entries = d.len() as u64;
            s.disk_hits = d.stats.hits.load(Relaxed);
            s.disk_misses = d.stats.misses.load(Relaxed);
            s.disk_writes = d.stats.writes.load(Relaxed);
            s.disk_write_errors = d.stats.write_errors.load(Relaxed);
            s.disk_writes_skipped = d.stats.writes_skipped.load(Relaxed);
            s.disk_corrupt = d.stats.corrupt.load(Relaxed);
            s.disk_evictions = d.stats.evictions.load(Relaxed);
        }
        s
    }

    /// Memory cache only.
    pub fn memory_only(bytes: u64) -> Self {
        Caches {
            memory: Arc::new(MemoryCache::new(bytes)),
            disk: None,
        }
    }

    /// Builds the caches from a configuration. A disk cache that cannot be
    /// opened is an error (the daemon decides whether to go on without).
    /// Blocking: scans the disk cache directory; call it from a blocking
    /// thread or before the runtime starts.
    pub fn from_config(cfg: &crate::fs::layer::LayerConfig) -> std::io::Result<Self> {
        let disk = match &cfg.disk_cache_dir {
            Some(dir) if cfg.disk_cache_bytes > 0 => {
                Some(Arc::new(DiskCache::open(dir, cfg.disk_cache_bytes)?))
            }
            _ => None,
        };
        Ok(Caches {
            memory: Arc::new(MemoryCache::new(cfg.memory_cache_bytes)),
            disk,
        })
    }
}
