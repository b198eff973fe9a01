//! Whole files written out from verified chunks, for FUSE passthrough.
//!
//! Warm reads through FUSE cost a round trip to the daemon per request.
//! Once a layer is fully fetched, each regular file that gets opened is
//! written here whole (read through the layer, so from verified chunks),
//! its bytes checked against the TOC's whole-file digest, and later opens
//! hand the kernel this file as the backing file: reads then go straight
//! to it (`FOPEN_PASSTHROUGH`), as fast as a local file.
//!
//! Keyed by whole-file digest, so identical files of different layers are
//! stored once. Bounded in bytes; the least recently opened files go first
//! (a file still open keeps its data until closed). The directory is
//! emptied at start: only files written and checked by this process are
//! served, so passthrough never returns a byte that was not verified.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::estargz::digest::{Digest, Hasher};
use crate::estargz::reader::NodeId;
use crate::fs::content::ContentSource;

/// Bytes asked of the layer per read while writing a file out.
const PIECE: u32 = 1 << 20;

/// Counters, for status and benchmarks.
#[derive(Debug, Default)]
pub struct CompleteStats {
    pub written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub failed: AtomicU64,
    pub evicted: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Ready files: size and last-use tick.
    ready: HashMap<Digest, (u64, u64)>,
    pending: HashSet<Digest>,
    total: u64,
    tick: u64,
}

/// The bounded store of complete files. Cheap to share (`Arc`).
pub struct CompleteFiles {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// One file written at a time: this is background work.
    writers: Semaphore,
    pub stats: CompleteStats,
}

impl CompleteFiles {
    /// Empties (or creates) `dir`. Blocking.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<CompleteFiles> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        Ok(CompleteFiles {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State::default()),
            writers: Semaphore::new(1),
            stats: CompleteStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(hex::encode(d.0))
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.lock().total
    }

    /// The file with content `d`, if written and checked; marks it used.
    pub fn ready(&self, d: &Digest) -> Option<PathBuf> {
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        let e = s.ready.get_mut(d)?;
        e.1 = tick;
        Some(self.path(d))
    }

    /// Claims the writing of `d` (`size` bytes): false if it is ready,
    /// being written, or too big for the store.
    fn claim(&self, d: &Digest, size: u64) -> bool {
        if size > self.max_bytes / 4 {
            return false;
        }
        let mut s = self.lock();
        !s.ready.contains_key(d) && s.pending.insert(*d)
    }

    /// Writes file `node` (content `d`, `size` bytes) out in the background,
    /// unless it is already there or on its way.
    pub fn write_out(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        d: Digest,
        size: u64,
        content: Arc<dyn ContentSource>,
        node: NodeId,
    ) {
        if !self.claim(&d, size) {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let r = me.write(&d, size, content, node).await;
            if let Err(e) = &r {
                let tmp = me.dir.join(format!(".tmp-{}", hex::encode(d.0)));
                let _ = tokio::fs::remove_file(&tmp).await;
                me.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(digest = %d, error = %e, "complete file not written");
            }
            let mut s = me.lock();
            s.pending.remove(&d);
            if r.is_ok() {
                s.tick += 1;
                let tick = s.tick;
                s.ready.insert(d, (size, tick));
                s.total += size;
                me.stats.written.fetch_add(1, Ordering::Relaxed);
                me.stats.bytes_written.fetch_add(size, Ordering::Relaxed);
                me.evict(&mut s);
                tracing::debug!(digest = %d, size, "complete file written");
            }
        });
    }

    async fn write(
        &self,
        d: &Digest,
        size: u64,
        content: Arc<dyn ContentSource>,
        node: NodeId,
    ) -> Result<(), String> {
        let _permit = self.writers.acquire().await.map_err(|e| e.to_string())?;
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(d.0)));
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| e.to_string())?;
        let mut h = Hasher::new();
        let mut off = 0u64;
        while off < size {
            let want = u32::try_from((size - off).min(u64::from(PIECE))).unwrap_or(PIECE);
            let b = content
                .clone()
                .read(node, off, want)
                .await
                .map_err(|e| e.to_string())?;
            if b.is_empty() {
                return Err(format!("short read at {off} of {size}"));
            }
            h.update(&b);
            f.write_all(&b).await.map_err(|e| e.to_string())?;
            off += b.len() as u64;
        }
        f.flush().await.map_err(|e| e.to_string())?;
        drop(f);
        let got = h.finish();
        if got != *d {
            return Err(format!("whole-file digest {got} != {d}"));
        }
        tokio::fs::rename(&tmp, self.path(d))
            .await
            .map_err(|e| e.to_string())
    }

    /// Drops least recently used files until the store fits.
    fn evict(&self, s: &mut State) {
        while s.total > self.max_bytes {
            let Some((&d, &(size, _))) = s.ready.iter().min_by_key(|(_, (_, t))| *t) else {
                break;
            };
            s.ready.remove(&d);
            s.total -= size;
            let _ = std::fs::remove_file(self.path(&d));
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::content::{ReadError, ReadFuture};
    use bytes::Bytes;

    struct Fixed(Vec<u8>);

    impl ContentSource for Fixed {
        fn read(self: Arc<Self>, _node: NodeId, offset: u64, size: u32) -> ReadFuture {
            let o = (offset as usize).min(self.0.len());
            let e = (o + size as usize).min(self.0.len());
            let b = Bytes::copy_from_slice(&self.0[o..e]);
            Box::pin(async move { Ok::<_, ReadError>(b) })
        }
    }

    async fn wait_ready(c: &CompleteFiles, d: &Digest) -> Option<PathBuf> {
        for _ in 0..200 {
            if let Some(p) = c.ready(d) {
                return Some(p);
            }
            if !c.lock().pending.contains(d) {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        None
    }

    #[tokio::test]
    async fn written_when_the_digest_matches_and_evicted_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(CompleteFiles::open(&dir.path().join("f"), 10_000_000).unwrap());
        let rt = tokio::runtime::Handle::current();
        let a: Vec<u8> = (0..2_400_000u32).map(|i| (i % 251) as u8).collect();
        let da = Digest::of(&a);
        c.write_out(
            &rt,
            da,
            a.len() as u64,
            Arc::new(Fixed(a.clone())),
            NodeId(1),
        );
        let p = wait_ready(&c, &da).await.expect("written");
        assert_eq!(std::fs::read(p).unwrap(), a);

        // Content that does not match its digest is never served.
        let bad = Digest::of(b"something else");
        c.write_out(&rt, bad, 5, Arc::new(Fixed(b"hello".to_vec())), NodeId(2));
        assert!(wait_ready(&c, &bad).await.is_none());
        assert_eq!(c.stats.failed.load(Ordering::Relaxed), 1);

        // Over the bound, the least recently used file goes.
        let mut others = Vec::new();
        for k in 0..3u8 {
            let v = vec![k; 2_400_000];
            let d = Digest::of(&v);
            c.write_out(&rt, d, v.len() as u64, Arc::new(Fixed(v)), NodeId(3));
            wait_ready(&c, &d).await.expect("written");
            others.push(d);
        }
        c.ready(&da); // `a` now used more recently than the first other
        let w = vec![42u8; 2_400_000];
        let dw = Digest::of(&w);
        c.write_out(&rt, dw, w.len() as u64, Arc::new(Fixed(w)), NodeId(4));
        wait_ready(&c, &dw).await.expect("w written");
        assert!(c.used() <= 10_000_000, "{}", c.used());
        assert!(c.ready(&others[0]).is_none(), "least recently used evicted");
        assert!(c.ready(&da).is_some());
        assert_eq!(c.stats.evicted.load(Ordering::Relaxed), 1);
        // Too big for the store (> a quarter): not written at all.
        assert!(!c.claim(&Digest::of(b"z"), 3_000_000));
    }
}
