//! The disk chunk cache: verified, uncompressed chunks stored as files named
//! by their digest, `<dir>/chunks/ab/abcdef…`, bounded in bytes with LRU
//! eviction.
//!
//! - **Index in memory.** Size and recency of every entry live in a map
//!   rebuilt at [`DiskCache::open`] by scanning the directory (recency from
//!   file mtimes, which hits refresh), so the cache survives a daemon
//!   restart. Leftover temporary files are removed at open.
//! - **Atomic entries.** A write goes to `<dir>/tmp/` and is renamed into
//!   place; a partially written entry is never visible under its name.
//! - **Verified on every read.** The file's sha256 is checked against its
//!   name before the content is returned (sha256 runs at ~1.7 GB/s here, so a
//!   4 MiB chunk costs ~2.5 ms on a blocking thread, far below a registry
//!   round trip). Entries are not fsynced, so after a crash a file may hold
//!   anything; bit rot and tampering are caught the same way. A bad entry is
//!   deleted and reported as a miss, and the caller refetches.
//! - **Failures never fail a read.** Write errors (ENOSPC, EROFS, EACCES…)
//!   are returned to the caller, which logs and counts them and serves the
//!   chunk uncached.
//!
//! All methods do blocking file I/O: call them from blocking threads.
//! Concurrent writers of other entries may push usage above the capacity
//! by at most the size of the chunks being written at that moment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::estargz::digest::Digest;

/// Counters of one disk cache.
#[derive(Debug, Default)]
pub struct DiskCacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Entries whose content did not match their digest (deleted).
    pub corrupt: AtomicU64,
    pub evictions: AtomicU64,
    /// Writes not attempted because an earlier one hit a full, read-only or
    /// forbidden disk less than [`WRITE_PAUSE`] ago.
    pub writes_skipped: AtomicU64,
}

/// How long writes pause after ENOSPC, EROFS or EACCES, so that a full
/// disk is not hit with a doomed temp file per chunk.
pub const WRITE_PAUSE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    tick: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Digest, Entry>,
    /// Recency order: tick → digest, oldest first.
    order: BTreeMap<u64, Digest>,
    total: u64,
    next_tick: u64,
}

impl Lru {
    fn touch(&mut self, d: &Digest) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(d) {
            self.order.remove(&e.tick);
            e.tick = tick;
            self.order.insert(tick, *d);
            self.next_tick += 1;
        }
    }

    fn insert(&mut self, d: Digest, size: u64) {
        if self.entries.contains_key(&d) {
            self.touch(&d);
            return;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(d, Entry { size, tick });
        self.order.insert(tick, d);
        self.total += size;
    }

    fn remove(&mut self, d: &Digest) -> bool {
        match self.entries.remove(d) {
            Some(e) => {
                self.order.remove(&e.tick);
                self.total -= e.size;
                true
            }
            None => false,
        }
    }

    /// Removes the oldest entries until `total <= capacity`; returns them.
    fn evict_to(&mut self, capacity: u64) -> Vec<Digest> {
        let mut out = Vec::new();
        while self.total > capacity {
            let Some((_, d)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&d) {
                self.total -= e.size;
            }
            out.push(d);
        }
        out
    }
}

/// A byte-bounded, restart-surviving cache of verified chunks on disk.
pub struct DiskCache {
    chunks: PathBuf,
    tmp: PathBuf,
    capacity: u64,
    lru: Mutex<Lru>,
    seq: AtomicU64,
    opened: Instant,
    /// Milliseconds since `opened` until which writes are skipped.
    paused_until_ms: AtomicU64,
    pub stats: DiskCacheStats,
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `dir`, indexing what a
    /// previous run left and evicting the oldest entries beyond `capacity`.
    pub fn open(dir: &Path, capacity: u64) -> io::Result<DiskCache> {
        let chunks = dir.join("chunks");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&chunks)?;
        fs::create_dir_all(&tmp)?;
        // Anything in tmp/ is a write that never completed.
        for e in fs::read_dir(&tmp)?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for sub in fs::read_dir(&chunks)?.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let digest = name.to_str().and_then(parse_hex_digest);
                let Ok(meta) = f.metadata() else { continue };
                match digest {
                    Some(d) if meta.is_file() => {
                        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                        found.push((mtime, d, meta.len()));
                    }
                    // Not ours: leave directories alone, drop stray files.
                    _ if meta.is_file() => {
                        let _ = fs::remove_file(f.path());
                    }
                    _ => {}
                }
            }
        }
        found.sort_by_key(|&(t, _, _)| t);
        let mut lru = Lru::default();
        for (_, d, size) in found {
            lru.insert(d, size);
        }
        let cache = DiskCache {
            chunks,
            tmp,
            capacity,
            lru: Mutex::new(Lru::default()),
            seq: AtomicU64::new(0),
            opened: Instant::now(),
            paused_until_ms: AtomicU64::new(0),
            stats: DiskCacheStats::default(),
        };
        let evicted = lru.evict_to(capacity);
        *cache.lru.lock().unwrap_or_else(|p| p.into_inner()) = lru;
        cache.delete(&evicted);
        Ok(cache)
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        let hex = hex::encode(d.0);
        self.chunks.join(&hex[..2]).join(hex)
    }

    fn delete(&self, evicted: &[Digest]) {
        for d in evicted {
            let _ = fs::remove_file(self.path_of(d));
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of content currently indexed.
    pub fn used(&self) -> u64 {
        self.lru().total
    }

    pub fn len(&self) -> usize {
        self.lru().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an entry is indexed (cheap; no I/O).
    pub fn contains(&self, d: &Digest) -> bool {
        self.lru().entries.contains_key(d)
    }

    /// Digests from least to most recently used (for tests and status).
    pub fn lru_order(&self) -> Vec<Digest> {
        self.lru().order.values().copied().collect()
    }

    /// Reads and verifies an entry. A missing, unreadable or corrupt entry
    /// is a miss; a corrupt one is deleted and counted.
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        let size = match self.lru().entries.get(d) {
            Some(e) => e.size,
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let path = self.path_of(d);
        let res = File::open(&path).and_then(|mut f| {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
            f.read_to_end(&mut buf)?;
            // Persist recency for the next start; best effort.
            let _ = f.set_modified(SystemTime::now());
            Ok(buf)
        });
        match res {
            Ok(buf) if Digest::of(&buf) == *d => {
                self.lru().touch(d);
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(buf)
            }
            Ok(_) => {
                tracing::warn!(chunk = %d, path = %path.display(), "disk cache entry corrupt; deleted");
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                self.lru().remove(d);
                let _ = fs::remove_file(&path);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(chunk = %d, error = %e, "disk cache read failed");
                }
                self.lru().remove(d);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Stores verified content under its digest, evicting least recently
    /// used entries beyond the capacity. Content larger than the capacity is
    /// not stored. Errors leave no entry behind; after a full, read-only or
    /// forbidden disk, writes are skipped for [`WRITE_PAUSE`].
    pub fn put(&self, d: &Digest, data: &[u8]) -> io::Result<()> {
        let size = data.len() as u64;
        if size > self.capacity {
            return Ok(());
        }
        if self.now_ms() < self.paused_until_ms.load(Ordering::Relaxed) {
            self.stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        {
            let mut lru = self.lru();
            if lru.entries.contains_key(d) {
                lru.touch(d);
                return Ok(());
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{}.{seq}", hex::encode(&d.0[..8])));
        let dst = self.path_of(d);
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, &dst)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            if matches!(
                e.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::ReadOnlyFilesystem
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::QuotaExceeded
            ) {
                let until = self.now_ms().saturating_add(WRITE_PAUSE.as_millis() as u64);
                self.paused_until_ms.store(until, Ordering::Relaxed);
            }
            return Err(e);
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut lru = self.lru();
            lru.insert(*d, size);
            lru.evict_to(self.capacity)
        };
        self.delete(&evicted);
        Ok(())
    }
}

fn parse_hex_digest(name: &str) -> Option<Digest> {
    if name.len() != 64 || !name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(name, &mut out).ok()?;
    Some(Digest(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u8, len: usize) -> (Digest, Vec<u8>) {
        let data = vec![i; len];
        (Digest::of(&data), data)
    }

    #[test]
    fn lru_eviction_order_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 3000).unwrap();
        let (a, b, x) = (item(1, 1000), item(2, 1000), item(3, 1000));
        c.put(&a.0, &a.1).unwrap();
        c.put(&b.0, &b.1).unwrap();
        c.put(&x.0, &x.1).unwrap();
        assert_eq!(c.used(), 3000);
        // Touch a: b becomes the oldest.
        assert_eq!(c.get(&a.0).unwrap(), a.1);
        let d = item(4, 1000);
        c.put(&d.0, &d.1).unwrap();
        assert!(c.used() <= 3000);
        assert!(!c.contains(&b.0), "b was least recently used");
        assert!(!c.path_of(&b.0).exists());
        assert_eq!(c.lru_order(), vec![x.0, a.0, d.0]);
        // Larger than the capacity: skipped.
        let big = item(5, 4000);
        c.put(&big.0, &big.1).unwrap();
        assert!(!c.contains(&big.0));
    }

    #[test]
    fn reopen_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let a = item(1, 500);
        let b = item(2, 500);
        {
            let c = DiskCache::open(dir.path(), 10_000).unwrap();
            c.put(&a.0, &a.1).unwrap();
            c.put(&b.0, &b.1).unwrap();
        }
        std::fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!dir.path().join("tmp/leftover").exists());
        // Flip a byte of b on disk: detected, deleted, a miss.
        let p = c.path_of(&b.0);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(c.get(&b.0).is_none());
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);
        assert!(!p.exists());
        assert_eq!(c.get(&a.0).unwrap(), a.1);
        // Reopening with a smaller capacity evicts down to it.
        drop(c);
        let c = DiskCache::open(dir.path(), 100).unwrap();
        assert_eq!(c.len(), 0);
    }
}
