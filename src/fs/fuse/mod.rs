//! A read-only FUSE filesystem for one eStargz layer, shaped to be an
//! overlayfs lower directory.
//!
//! - [`LayerFs`]: the `fuser::Filesystem`; metadata from the [`Index`],
//!   content from a [`ContentSource`] (ops in `ops.rs`, reads in `read.rs`).
//! - `whiteout`: OCI whiteouts as overlayfs whiteouts and opaque dirs.
//! - `attr`: TOC metadata to `stat` attributes.
//! - [`mount`](mount()): mounting, [`MountHandle`], stale-mount cleanup.
//! - [`mux`]: [`MuxMount`], the daemon's single FUSE mount serving every
//!   layer in its own slot directory.
//! - `adopt`: serving a connection a previous daemon set up (hand-over).
//!
//! Inode numbers are `NodeId + 1` (FUSE's root is 1); whiteouts, which have
//! no node of their own, are numbered after the last node. In the
//! multiplexed mount a layer's numbers are offset by its slot in the high
//! 32 bits ([`slot_base`]). See ARCHITECTURE.md for the thread model.

mod adopt;
mod attr;
mod error;
mod mount;
mod mux;
mod ops;
mod passthrough;
mod read;
mod whiteout;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fuser::{FileAttr, INodeNo};
use tokio::sync::Semaphore;

pub use mount::{MountHandle, MountOptions, Unmounted, mount, unmount};
pub use mux::{INODE_LAYOUT, MuxMount, SLOT_BITS, is_mounted_here, slot_base};
pub use read::ReadStats;

use crate::estargz::reader::{Index, Node, NodeId, NodeKind};
use crate::fs::content::ContentSource;
use error::FsError;
use whiteout::{Target, Whiteouts};

/// Which xattr names mark an opaque directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpaqueXattr {
    /// `trusted.overlay.opaque`, read by overlayfs mounted as root (the
    /// snapshotter's case).
    #[default]
    Trusted,
    /// `user.overlay.opaque`, read by overlayfs mounted with `userxattr`.
    User,
    Both,
}

impl OpaqueXattr {
    fn names(self) -> &'static [&'static str] {
        match self {
            OpaqueXattr::Trusted => &["trusted.overlay.opaque"],
            OpaqueXattr::User => &["user.overlay.opaque"],
            OpaqueXattr::Both => &["trusted.overlay.opaque", "user.overlay.opaque"],
        }
    }
}

/// Tuning of one layer's filesystem.
#[derive(Debug, Clone)]
pub struct LayerFsOptions {
    /// How long the kernel may cache entries and attributes. The layer
    /// never changes, so this can be long.
    pub ttl: Duration,
    /// Reads waiting on the content source at once; further reads wait in
    /// their task, never on a FUSE thread.
    pub max_inflight_reads: usize,
    /// Keep file pages and directory listings cached across opens
    /// (`FOPEN_KEEP_CACHE`, `FOPEN_CACHE_DIR`): content is immutable.
    pub keep_cache: bool,
    pub opaque_xattr: OpaqueXattr,
}

impl Default for LayerFsOptions {
    fn default() -> Self {
        LayerFsOptions {
            ttl: Duration::from_secs(24 * 3600),
            max_inflight_reads: 64,
            keep_cache: true,
            opaque_xattr: OpaqueXattr::Trusted,
        }
    }
}

/// The filesystem of one mounted layer.
pub struct LayerFs {
    index: Arc<Index>,
    content: Arc<dyn ContentSource>,
    rt: tokio::runtime::Handle,
    whiteouts: Whiteouts,
    reads: Arc<Semaphore>,
    stats: Arc<ReadStats>,
    opts: LayerFsOptions,
    /// Sum of regular file sizes, for `statfs`.
    total_bytes: u64,
    /// Added to every inode number: 0 when mounted alone, the slot's base
    /// in the multiplexed mount.
    ino_base: u64,
    /// Entries handed to the kernel (lookup, readdirplus) minus those it
    /// forgot: while non-zero the kernel may still ask about our inodes.
    lookups: AtomicU64,
    /// Passthrough of complete files, when enabled.
    passthrough: Option<passthrough::Passthrough>,
}

/// What an inode number refers to.
#[derive(Clone, Copy)]
enum Inode<'a> {
    Node(NodeId, &'a Node),
    /// A whiteout, with the `.wh.` node it was made from.
    Whiteout(&'a Node),
}

impl LayerFs {
    /// Builds the overlayfs view of `index` (O(entries)). `rt` runs reads.
    pub fn new(
        index: Arc<Index>,
        content: Arc<dyn ContentSource>,
        rt: tokio::runtime::Handle,
        opts: LayerFsOptions,
    ) -> LayerFs {
        let whiteouts = Whiteouts::build(&index);
        let total_bytes = index
            .nodes()
            .filter(|(_, n)| matches!(n.kind, NodeKind::Reg { .. }))
            .map(|(_, n)| n.size())
            .fold(0u64, u64::saturating_add);
        LayerFs {
            reads: Arc::new(Semaphore::new(opts.max_inflight_reads.max(1))),
            stats: Arc::default(),
            index,
            content,
            rt,
            whiteouts,
            opts,
            total_bytes,
            ino_base: 0,
            lookups: AtomicU64::new(0),
            passthrough: None,
        }
    }

    /// Serves files from `files` by FUSE passthrough once written out there.
    pub fn with_passthrough(mut self, files: Arc<crate::fs::cache::CompleteFiles>) -> LayerFs {
        self.passthrough = Some(passthrough::Passthrough::new(files));
        self
    }

    /// Numbers this layer's inodes from `base` (see [`slot_base`]).
    pub fn with_ino_base(mut self, base: u64) -> LayerFs {
        self.ino_base = base;
        self
    }

    /// The root directory's inode number.
    pub fn root_ino(&self) -> INodeNo {
        INodeNo(self.ino_base + 1)
    }

    /// Kernel references to our inodes not yet forgotten.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Acquire)
    }

    /// Counts one kernel reference; called before the reply is sent so a
    /// `FORGET` can never be seen first.
    fn looked_up(&self) {
        self.lookups.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops `n` kernel references; returns how many remain.
    pub(crate) fn forgot(&self, n: u64) -> u64 {
        let mut cur = self.lookups.load(Ordering::Acquire);
        loop {
            let next = cur.saturating_sub(n);
            match self
                .lookups
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next,
                Err(c) => cur = c,
            }
        }
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// The layer's read counters; they stay readable after mounting.
    pub fn stats(&self) -> Arc<ReadStats> {
        self.stats.clone()
    }

    /// Number of whiteouts presented as character devices.
    pub fn whiteout_count(&self) -> usize {
        self.whiteouts.count()
    }

    fn ino_of(&self, t: Target) -> INodeNo {
        let local = match t {
            Target::Node(id) => u64::from(id.0) + 1,
            Target::Whiteout(k) => self.index.len() as u64 + 1 + u64::from(k),
        };
        INodeNo(self.ino_base + local)
    }

    fn resolve(&self, ino: INodeNo) -> Result<Inode<'_>, FsError> {
        let local = ino.0.checked_sub(self.ino_base).ok_or(FsError::NotFound)?;
        if self.ino_base != 0 && local >> SLOT_BITS != 0 {
            return Err(FsError::NotFound);
        }
        let n = local.checked_sub(1).ok_or(FsError::NotFound)?;
        let nodes = self.index.len() as u64;
        if n < nodes {
            let id = NodeId(n as u32);
            let node = self.index.node(id).ok_or(FsError::NotFound)?;
            return Ok(Inode::Node(id, node));
        }
        let k = u32::try_from(n - nodes).map_err(|_| FsError::NotFound)?;
        let src = self.whiteouts.source(k).ok_or(FsError::NotFound)?;
        let node = self.index.node(src).ok_or(FsError::NotFound)?;
        Ok(Inode::Whiteout(node))
    }

    fn attr(&self, ino: INodeNo, inode: Inode<'_>) -> FileAttr {
        match inode {
            Inode::Node(_, node) => attr::node_attr(ino, node),
            Inode::Whiteout(src) => attr::whiteout_attr(ino, src),
        }
    }

    fn attr_of(&self, t: Target) -> Result<FileAttr, FsError> {
        let ino = self.ino_of(t);
        Ok(self.attr(ino, self.resolve(ino)?))
    }

    fn dir(&self, ino: INodeNo) -> Result<(NodeId, &Node), FsError> {
        match self.resolve(ino)? {
            Inode::Node(id, node) if matches!(node.kind, NodeKind::Dir { .. }) => Ok((id, node)),
            _ => Err(FsError::NotDir),
        }
    }

    /// The value of xattr `name`, the opaque marker included.
    fn xattr<'a>(&'a self, inode: Inode<'a>, name: &str) -> Option<&'a [u8]> {
        let Inode::Node(id, node) = inode else {
            return None;
        };
        if self.whiteouts.is_opaque(id) && self.opts.opaque_xattr.names().contains(&name) {
            return Some(b"y");
        }
        node.xattrs.get(name).map(Vec::as_slice)
    }

    /// All xattr names, NUL-terminated, as `listxattr` returns them.
    fn xattr_names(&self, inode: Inode<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let Inode::Node(id, node) = inode else {
            return out;
        };
        let mut names: Vec<&str> = node.xattrs.keys().map(String::as_str).collect();
        if self.whiteouts.is_opaque(id) {
            names.extend(self.opts.opaque_xattr.names());
            names.sort_unstable();
            names.dedup();
        }
        for n in names {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
        }
        out
    }
}
