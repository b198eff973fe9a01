//! Shared pieces of the FUSE tests: an in-memory, verifying content source
//! and guards that unmount even when a test panics.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rstargz::estargz::reader::{BlobReader, Index, NodeId, ReaderOptions, decode_chunk};
use rstargz::fs::fuse::{LayerFs, LayerFsOptions, MountHandle, MountOptions, ReadStats, mount};
use rstargz::fs::{ContentSource, ReadError, ReadFuture};

/// Serves file content by decoding (and verifying) chunks of a blob held
/// in memory, optionally after a delay; counts reads in flight.
pub struct MemSource {
    blob: Vec<u8>,
    index: Arc<Index>,
    pub delay: Duration,
    inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub reads: AtomicUsize,
}

impl MemSource {
    pub fn new(blob: Vec<u8>, index: Arc<Index>, delay: Duration) -> Arc<MemSource> {
        Arc::new(MemSource {
            blob,
            index,
            delay,
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        })
    }

    fn read_now(&self, node: NodeId, offset: u64, size: u32) -> Result<Bytes, ReadError> {
        let end = offset + u64::from(size);
        let mut out = Vec::with_capacity(size as usize);
        let mut off = offset;
        while off < end {
            let Some(c) = self.index.chunk_for(node, off) else {
                break;
            };
            let compressed = &self.blob[c.compressed_offset as usize..c.compressed_end as usize];
            let data =
                decode_chunk(compressed, &c).map_err(|e| ReadError::Verification(e.to_string()))?;
            let to = c.chunk_end().min(end);
            out.extend_from_slice(
                &data[(off - c.chunk_offset) as usize..(to - c.chunk_offset) as usize],
            );
            off = to;
        }
        Ok(Bytes::from(out))
    }
}

impl ContentSource for MemSource {
    fn read(self: Arc<Self>, node: NodeId, offset: u64, size: u32) -> ReadFuture {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_inflight.fetch_max(now, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let r = self.read_now(node, offset, size);
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }

    /// The whole blob is in memory.
    fn complete(&self) -> bool {
        true
    }
}

pub fn index_of(blob: &[u8]) -> Arc<Index> {
    let r = BlobReader::open(blob, &ReaderOptions::default(), None).expect("open blob");
    Arc::new(r.index().clone())
}

/// A mounted layer: unmounted (then its runtime stopped and its directory
/// removed) when dropped, also during a panic.
pub struct Layer {
    pub handle: Option<MountHandle>,
    pub source: Arc<MemSource>,
    pub stats: Arc<ReadStats>,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

impl Layer {
    pub fn mount(blob: Vec<u8>, delay: Duration, fs_opts: LayerFsOptions) -> Layer {
        Self::mount_with(blob, delay, fs_opts, &MountOptions::default())
    }

    pub fn mount_with(
        blob: Vec<u8>,
        delay: Duration,
        fs_opts: LayerFsOptions,
        opts: &MountOptions,
    ) -> Layer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let index = index_of(&blob);
        let source = MemSource::new(blob, index.clone(), delay);
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = LayerFs::new(index, source.clone(), rt.handle().clone(), fs_opts);
        let stats = fs.stats();
        let handle = mount(&mnt, fs, opts).expect("mount layer");
        Layer {
            handle: Some(handle),
            source,
            stats,
            rt,
            dir,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.handle.take().map(MountHandle::unmount) {
            eprintln!("unmount failed: {e}");
        }
    }
}

/// An overlayfs mount, detached when dropped.
pub struct Overlay {
    pub dir: tempfile::TempDir,
}

impl Overlay {
    /// Mounts overlayfs with `lowers` (topmost first) and a fresh upper dir.
    pub fn mount(lowers: &[PathBuf]) -> Overlay {
        let dir = tempfile::tempdir().unwrap();
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &dir.path().join("merged"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount overlay {data}: {e}"));
        Overlay { dir }
    }

    pub fn merged(&self, rel: &str) -> PathBuf {
        self.dir.path().join("merged").join(rel)
    }

    pub fn upper(&self, rel: &str) -> PathBuf {
        self.dir.path().join("upper").join(rel)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(
            &self.dir.path().join("merged"),
            nix::mount::MntFlags::MNT_DETACH,
        );
    }
}

/// The FUSE control filesystem (`fusectl`), mounted privately so a test
/// can abort a connection; detached when dropped.
pub struct FuseCtl {
    pub dir: tempfile::TempDir,
}

impl FuseCtl {
    pub fn mount() -> FuseCtl {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("fusectl"),
            dir.path(),
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount fusectl");
        FuseCtl { dir }
    }
}

impl Drop for FuseCtl {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `getxattr(2)`: the value, or the errno.
pub fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `listxattr(2)`: the names.
pub fn listxattr(p: &Path) -> Vec<String> {
    let cp = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and a buffer of the given length.
    let n = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect()
}

/// Every name `readdir(3)` returns, `.` and `..` included, in order.
pub fn readdir_all(p: &Path) -> Vec<String> {
    let cp = cpath(p);
    let mut out = Vec::new();
    // SAFETY: opendir/readdir/closedir on a valid path; entries are read
    // before the next readdir call.
    unsafe {
        let d = libc::opendir(cp.as_ptr());
        assert!(!d.is_null(), "opendir: {}", std::io::Error::last_os_error());
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            out.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(d);
    }
    out
}

/// `statvfs(3)`.
pub fn statvfs(p: &Path) -> libc::statvfs {
    let cp = cpath(p);
    // SAFETY: statvfs writes the struct it is given.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(cp.as_ptr(), &mut s), 0);
        s
    }
}
