//! The footer-and-TOC tail of each mounted layer, kept on disk.
//!
//! Opening a layer costs a size request and a tail read. After a daemon
//! restart every remote snapshot is remounted before the daemon serves, so
//! those round trips would delay it by registry latency times layers. The
//! tail (and blob size) of every layer opened with a verified TOC is written
//! here, keyed by blob digest; a later open takes it from disk instead of
//! the registry. Nothing is trusted: the file names the TOC digest it was
//! verified against and is only used for that same `toc.digest` label, and
//! the tail goes through the usual TOC digest check at open. Bounded in
//! bytes: the oldest files go first.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::fs::prewarm::Warm;

const MAGIC: &[u8; 8] = b"RSTGZTL1";
/// Largest tail accepted from disk (the reader never asks for more).
const MAX_TAIL: u64 = 64 << 20;

/// Why a tail could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum TailCacheError {
    #[error("tail cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a sha256 digest: {0:?}")]
    BadDigest(String),
}

/// Tails on disk under one directory. All methods block.
#[derive(Debug, Clone)]
pub struct TailCache {
    dir: PathBuf,
    max_bytes: u64,
}

fn file_name(digest: &str) -> Result<String, TailCacheError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| TailCacheError::BadDigest(digest.to_string()))?;
    Ok(hex.to_ascii_lowercase())
}

impl TailCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> TailCache {
        TailCache { dir, max_bytes }
    }

    /// The tail of blob `digest`, if stored for TOC digest `toc`. A file
    /// that does not parse is removed.
    pub fn load(&self, digest: &str, toc: &str) -> Option<Warm> {
        let path = self.dir.join(file_name(digest).ok()?);
        let mut f = std::fs::File::open(&path).ok()?;
        let parsed = read_entry(&mut f, toc);
        if parsed.is_none() {
            tracing::debug!(path = %path.display(), "unusable cached tail");
        }
        parsed
    }

    /// Stores `warm` as the tail of `digest`, verified against `toc`
    /// (atomically), then trims the directory to its byte bound.
    pub fn store(&self, digest: &str, toc: &str, warm: &Warm) -> Result<(), TailCacheError> {
        let name = file_name(digest)?;
        let io = |source| TailCacheError::Io {
            path: self.dir.clone(),
            source,
        };
        if warm.tail.len() as u64 > self.max_bytes {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io)?;
        let toc = toc.as_bytes();
        let mut head = Vec::with_capacity(32 + toc.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(toc.len() as u32).to_le_bytes());
        head.extend_from_slice(toc);
        head.extend_from_slice(&warm.size.to_le_bytes());
        head.extend_from_slice(&warm.tail_range.start.to_le_bytes());
        tmp.write_all(&head).map_err(io)?;
        tmp.write_all(&warm.tail).map_err(io)?;
        tmp.persist(self.dir.join(name)).map_err(|e| io(e.error))?;
        self.trim();
        Ok(())
    }

    /// Removes the tail of `digest` (its layer is gone).
    pub fn remove(&self, digest: &str) {
        if let Ok(name) = file_name(digest) {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Deletes the oldest files until the directory fits its bound.
    fn trim(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.max_bytes {
            return;
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

fn read_entry(f: &mut std::fs::File, toc: &str) -> Option<Warm> {
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).ok()?;
    if &magic != MAGIC {
        return None;
    }
    let mut n = [0u8; 4];
    f.read_exact(&mut n).ok()?;
    let toc_len = u32::from_le_bytes(n) as usize;
    if toc_len > 256 {
        return None;
    }
    let mut stored = vec![0u8; toc_len];
    f.read_exact(&mut stored).ok()?;
    if stored != toc.as_bytes() {
        return None;
    }
    let mut u = [0u8; 8];
    f.read_exact(&mut u).ok()?;
    let size = u64::from_le_bytes(u);
    f.read_exact(&mut u).ok()?;
    let start = u64::from_le_bytes(u);
    let want = size.checked_sub(start).filter(|&l| l <= MAX_TAIL)?;
    let mut tail = Vec::with_capacity(want as usize);
    f.take(want + 1).read_to_end(&mut tail).ok()?;
    if tail.len() as u64 != want {
        return None;
    }
    Some(Warm {
        size,
        tail_range: start..size,
        tail: Bytes::from(tail),
    })
}

/// Where the daemon keeps tails: `<root>/toc-cache`.
pub fn default_dir(root: &Path) -> PathBuf {
    root.join("toc-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const E: &str = "sha256:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn warm(size: u64, tail: &[u8]) -> Warm {
        Warm {
            size,
            tail_range: size - tail.len() as u64..size,
            tail: Bytes::copy_from_slice(tail),
        }
    }

    #[test]
    fn round_trip_only_for_the_same_toc_digest() {
        let d = tempfile::tempdir().unwrap();
        let c = TailCache::new(d.path().join("t"), 1 << 20);
        c.store(D, "sha256:toc1", &warm(100, b"footer")).unwrap();
        let w = c.load(D, "sha256:toc1").expect("stored tail");
        assert_eq!(w.size, 100);
        assert_eq!(w.tail_range, 94..100);
        assert_eq!(&w.tail[..], b"footer");
        assert!(c.load(D, "sha256:other").is_none(), "other TOC digest");
        assert!(c.load(E, "sha256:toc1").is_none(), "other blob");
        c.remove(D);
        assert!(c.load(D, "sha256:toc1").is_none());
    }

    #[test]
    fn truncated_or_foreign_files_are_not_used() {
        let d = tempfile::tempdir().unwrap();
        let c = TailCache::new(d.path().to_path_buf(), 1 << 20);
        c.store(D, "t", &warm(100, b"0123456789")).unwrap();
        let p = d.path().join(file_name(D).unwrap());
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        assert!(c.load(D, "t").is_none(), "truncated");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(c.load(D, "t").is_none(), "foreign");
        assert!(matches!(
            c.store("sha256:../../etc", "t", &warm(1, b"x")),
            Err(TailCacheError::BadDigest(_))
        ));
    }

    #[test]
    fn oldest_tails_go_when_over_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let c = TailCache::new(d.path().to_path_buf(), 150);
        c.store(D, "t", &warm(200, &[1u8; 100])).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.store(E, "t", &warm(200, &[2u8; 100])).unwrap();
        assert!(c.load(D, "t").is_none(), "oldest evicted");
        assert!(c.load(E, "t").is_some(), "newest kept");
    }
}
