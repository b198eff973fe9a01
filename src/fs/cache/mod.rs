//! Chunk caches shared by every layer of the daemon.
//!
//! - [`memory`]: [`MemoryCache`], byte-bounded, in memory (quick_cache).
//! - [`disk`]: [`DiskCache`], byte-bounded with LRU eviction, survives
//!   restarts, verified on read.
//!
//! Both hold only verified, uncompressed chunks keyed by `chunkDigest`, so
//! identical chunks of different layers and images are stored once.
//! [`Caches`] bundles them for [`crate::fs::layer`].

pub mod disk;
pub mod memory;

use std::sync::Arc;

pub use disk::{DiskCache, DiskCacheStats};
pub use memory::MemoryCache;

/// The caches a layer reads through. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pub memory: Arc<MemoryCache>,
    /// `None` when no disk cache is configured.
    pub disk: Option<Arc<DiskCache>>,
}

impl Caches {
    /// Memory cache only.
    pub fn memory_only(bytes: u64) -> Self {
        Caches {
            memory: Arc::new(MemoryCache::new(bytes)),
            disk: None,
        }
    }

    /// Builds the caches from a configuration. A disk cache that cannot be
    /// opened is an error (the daemon decides whether to go on without).
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
