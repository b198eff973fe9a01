//! The memory chunk cache: verified, uncompressed chunks keyed by their
//! `chunkDigest`, bounded in bytes. Keys are content addresses, so one
//! cache shared by every layer deduplicates identical chunks across layers
//! and images.

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

use crate::estargz::digest::Digest;

/// Weighs an entry by its length, plus a small per-entry overhead so that
/// many empty-ish entries still count.
#[derive(Clone, Copy, Default)]
struct ByteWeighter;

/// Bookkeeping bytes charged to every entry.
const ENTRY_OVERHEAD: u64 = 64;

impl Weighter<Digest, Bytes> for ByteWeighter {
    fn weight(&self, _key: &Digest, val: &Bytes) -> u64 {
        val.len() as u64 + ENTRY_OVERHEAD
    }
}

/// A concurrent, byte-bounded cache of verified chunks.
pub struct MemoryCache {
    cache: Cache<Digest, Bytes, ByteWeighter>,
    capacity: u64,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes (content plus a small
    /// per-entry overhead). Zero disables it.
    pub fn new(capacity: u64) -> Self {
        // quick_cache splits the capacity evenly between shards; keep each
        // shard at 64 MiB or more so that big chunks still fit in one.
        let shards = usize::try_from((capacity / (64 << 20)).clamp(1, 16)).unwrap_or(1);
        // An estimate only (of 64 KiB entries); it sizes tables up front.
        let items = usize::try_from((capacity / (64 << 10)).clamp(32, 1 << 16)).unwrap_or(32);
        let cache = OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(items)
            .weight_capacity(capacity.max(1))
            .build()
            .map(|o| Cache::with_options(o, ByteWeighter, Default::default(), Default::default()))
            .unwrap_or_else(|_| Cache::with_weighter(items, capacity.max(1), ByteWeighter));
        MemoryCache { cache, capacity }
    }

    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        if self.capacity == 0 {
            return None;
        }
        self.cache.get(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.capacity > 0 && self.cache.contains_key(digest)
    }

    /// Inserts verified content. Entries larger than the whole capacity are
    /// not kept.
    pub fn insert(&self, digest: Digest, data: Bytes) {
        if (data.len() as u64).saturating_add(ENTRY_OVERHEAD) > self.capacity {
            return;
        }
        self.cache.insert(digest, data);
    }

    pub fn remove(&self, digest: &Digest) {
        self.cache.remove(digest);
    }

    /// Bytes currently charged (content plus per-entry overhead).
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes() {
        let c = MemoryCache::new(1 << 20);
        for i in 0..100u32 {
            let data = Bytes::from(vec![i as u8; 64 << 10]);
            c.insert(Digest::of(&i.to_le_bytes()), data);
            assert!(c.weight() <= 1 << 20, "weight {}", c.weight());
        }
        assert!(c.len() <= 16);
        // Too big for the cache at all: not kept.
        let big = Digest::of(b"big");
        c.insert(big, Bytes::from(vec![0; 2 << 20]));
        assert!(c.get(&big).is_none());
        // Disabled.
        let off = MemoryCache::new(0);
        off.insert(big, Bytes::from_static(b"x"));
        assert!(off.get(&big).is_none());
    }
}
