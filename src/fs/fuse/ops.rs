//! `fuser::Filesystem` for [`LayerFs`]: metadata answered inline from the
//! index (no I/O, no locks), reads handed to the runtime (`read.rs`), and
//! every modification refused with `EROFS`.

use std::ffi::OsStr;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::error::FsError;
use super::whiteout::Target;
use super::{Inode, LayerFs, attr};
use crate::estargz::reader::{Node, NodeId, NodeKind};

pub(super) const GEN: Generation = Generation(0);
/// `statfs` block size.
const BSIZE: u32 = 4096;
const NAME_MAX: u32 = 255;

/// Kernel features asked for when available; none is required.
const WANTED: [InitFlags; 4] = [
    InitFlags::FUSE_DO_READDIRPLUS,
    InitFlags::FUSE_READDIRPLUS_AUTO,
    InitFlags::FUSE_CACHE_SYMLINKS,
    InitFlags::FUSE_PARALLEL_DIROPS,
];

/// Kernel settings shared by the single-layer and the multiplexed mount.
pub(super) fn negotiate(config: &mut KernelConfig, max_inflight_reads: usize) {
    // Stacking depth: overlayfs on top adds one, and the kernel allows 2
    // in all, so ours must stay <= 1 (2 fails "maximum fs stacking depth
    // exceeded"). 1 rather than 0 so that passthrough reads from
    // cache files on a plain fs stay possible. The kernel reads the depth
    // only when passthrough is negotiated.
    match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
        Ok(()) => {
            if let Err(max) = config.set_max_stack_depth(1) {
                tracing::warn!(max, "kernel refused FUSE stacking depth 1");
            }
        }
        Err(_) => tracing::warn!(
            "kernel lacks FUSE passthrough: overlayfs may refuse to stack on this mount"
        ),
    }
    // Let as many readahead requests reach us as reads may be in flight.
    let background = u16::try_from(max_inflight_reads.clamp(16, 1024)).unwrap_or(16);
    if let Err(v) = config.set_max_background(background) {
        tracing::debug!(v, "kernel refused max_background");
    }
    for flag in WANTED {
        if config.add_capabilities(flag).is_err() {
            tracing::debug!(?flag, "FUSE capability not offered by the kernel");
        }
    }
}

impl LayerFs {
    /// Answers a lookup of this layer's root (the multiplexed mount's slot
    /// directory), counting the reference handed out.
    pub(super) fn reply_root_entry(&self, reply: ReplyEntry) {
        match self.attr_of(Target::Node(crate::estargz::reader::Index::ROOT)) {
            Ok(attr) => {
                self.looked_up();
                reply.entry(&self.opts.ttl, &attr, GEN)
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    /// The root directory's attributes (for `readdirplus` of the slots).
    pub(super) fn root_attr(&self) -> Option<fuser::FileAttr> {
        self.attr_of(Target::Node(crate::estargz::reader::Index::ROOT))
            .ok()
    }

    pub(super) fn ttl(&self) -> std::time::Duration {
        self.opts.ttl
    }

    /// Counts a reference handed out by the multiplexed root's listing.
    pub(super) fn count_lookup(&self) {
        self.looked_up();
    }

    pub(super) fn statfs_values(&self) -> (u64, u64) {
        let blocks = self.total_bytes.div_ceil(u64::from(BSIZE));
        let files = (self.index.len() + self.whiteouts.count()) as u64;
        (blocks, files)
    }

    fn open_flags(&self, dir: bool) -> FopenFlags {
        // Nothing to flush on close of a read-only file: skip the round trip.
        let base = if dir {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_NOFLUSH
        };
        match (self.opts.keep_cache, dir) {
            (false, _) => base,
            (true, false) => base | FopenFlags::FOPEN_KEEP_CACHE,
            (true, true) => base | FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        }
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<fuser::FileAttr, FsError> {
        let (dir, _) = self.dir(parent)?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let t = self
            .whiteouts
            .listing(&self.index, dir)
            .find(name)
            .ok_or(FsError::NotFound)?;
        self.attr_of(t)
    }

    /// Entry `i` of a listing that starts with `.` and `..`.
    fn dir_entry(&self, dir: NodeId, parent: NodeId, i: usize) -> Option<(&str, Target)> {
        match i {
            0 => Some((".", Target::Node(dir))),
            1 => Some(("..", Target::Node(parent))),
            _ => self.whiteouts.listing(&self.index, dir).get(i - 2),
        }
    }

    fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        if size == 0 {
            reply.size(len);
        } else if len > size {
            reply.error(FsError::Range.errno());
        } else {
            reply.data(value);
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        negotiate(config, self.opts.max_inflight_reads);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(attr) => {
                self.looked_up();
                reply.entry(&self.opts.ttl, &attr, GEN)
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, nlookup: u64) {
        self.forgot(nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.resolve(ino) {
            Ok(inode) => reply.attr(&self.opts.ttl, &self.attr(ino, inode)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.resolve(ino) {
            Ok(Inode::Node(_, n)) => match &n.kind {
                NodeKind::Symlink { target } => reply.data(target.as_bytes()),
                _ => reply.error(FsError::Invalid.errno()),
            },
            Ok(Inode::Whiteout(_)) => reply.error(FsError::Invalid.errno()),
            Err(e) => reply.error(e.errno()),
        }
    }

    /// Write opens get `EROFS`, as the read-only mount flag already gives
    /// them in the VFS; overlayfs never opens a lower file for writing (it
    /// copies up into the upper dir first).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.resolve(ino) {
            Err(e) => reply.error(e.errno()),
            Ok(Inode::Node(_, n)) if matches!(n.kind, NodeKind::Dir { .. }) => {
                reply.error(FsError::IsDir.errno())
            }
            Ok(_) if writes => reply.error(FsError::ReadOnly.errno()),
            Ok(Inode::Node(
                id,
                Node {
                    kind:
                        NodeKind::Reg {
                            size,
                            digest: Some(d),
                            ..
                        },
                    ..
                },
            )) if *size >= super::passthrough::MIN_SIZE && self.passthrough.is_some() => {
                if let Some(pt) = &self.passthrough {
                    pt.open(
                        id,
                        *d,
                        *size,
                        self.open_flags(false),
                        &self.content,
                        &self.rt,
                        reply,
                    );
                }
            }
            Ok(_) => reply.opened(FileHandle(0), self.open_flags(false)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh == super::passthrough::FH_CACHED
            && let (Some(pt), Ok(Inode::Node(id, _))) = (&self.passthrough, self.resolve(ino))
        {
            pt.released(id);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.resolve(ino) {
            Ok(Inode::Node(id, n)) => match n.kind {
                NodeKind::Reg { size: len, .. } => self.spawn_read(id, len, offset, size, reply),
                NodeKind::Dir { .. } => reply.error(FsError::IsDir.errno()),
                _ => reply.error(FsError::Invalid.errno()),
            },
            Ok(Inode::Whiteout(_)) => reply.error(FsError::Invalid.errno()),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir(ino) {
            Ok(_) => reply.opened(FileHandle(0), self.open_flags(true)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (dir, node) = match self.dir(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e.errno()),
        };
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((name, t)) = self.dir_entry(dir, node.parent, i) {
            let kind = match self.resolve(self.ino_of(t)) {
                Ok(Inode::Node(_, n)) => attr::file_type(&n.kind),
                Ok(Inode::Whiteout(_)) => fuser::FileType::CharDevice,
                Err(_) => break,
            };
            i += 1;
            if reply.add(self.ino_of(t), i as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (dir, node) = match self.dir(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e.errno()),
        };
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((name, t)) = self.dir_entry(dir, node.parent, i) {
            let Ok(attr) = self.attr_of(t) else { break };
            i += 1;
            // The kernel takes a reference on every entry but `.` and `..`.
            let counted = i > 2;
            if counted {
                self.looked_up();
            }
            if reply.add(attr.ino, i as u64, name, &self.opts.ttl, &attr, GEN) {
                if counted {
                    self.forgot(1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.statfs_values();
        reply.statfs(blocks, 0, 0, files, 0, BSIZE, NAME_MAX, BSIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let inode = match self.resolve(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e.errno()),
        };
        match name.to_str().and_then(|n| self.xattr(inode, n)) {
            Some(v) => Self::reply_xattr(v, size, reply),
            None => reply.error(FsError::NoAttr.errno()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.resolve(ino) {
            Ok(inode) => Self::reply_xattr(&self.xattr_names(inode), size, reply),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.resolve(ino) {
            Err(e) => reply.error(e.errno()),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(FsError::ReadOnly.errno()),
            // Permission bits are checked by the kernel (`default_permissions`).
            Ok(_) => reply.ok(),
        }
    }

    // ---- everything below modifies the layer: EROFS ----

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(FsError::ReadOnly.errno());
    }
}
