//! File attributes from TOC metadata. The layer is immutable, so every
//! attribute is derived from the [`Node`] alone and can be cached for long.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::estargz::reader::{Node, NodeKind};

/// `st_blksize`: the page size, so `cp` and friends read in page units.
const BLKSIZE: u32 = 4096;

pub(crate) fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Dir { .. } => FileType::Directory,
        NodeKind::Reg { .. } => FileType::RegularFile,
        NodeKind::Symlink { .. } => FileType::Symlink,
        NodeKind::Char { .. } => FileType::CharDevice,
        NodeKind::Block { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

/// Unix seconds to `SystemTime`; TOC times may predate 1970.
pub(crate) fn system_time(secs: i64) -> SystemTime {
    let d = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// The kernel's 32-bit `new_encode_dev`, the form FUSE carries `rdev` in.
pub(crate) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Attributes of a TOC node under inode number `ino`.
pub(crate) fn node_attr(ino: INodeNo, node: &Node) -> FileAttr {
    let size = node.size();
    let rdev = match node.kind {
        NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
            encode_dev(major, minor)
        }
        _ => 0,
    };
    let t = system_time(node.mtime);
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(&node.kind),
        // `mode` is already masked to 0o7777 by the index.
        perm: (node.mode & 0o7777) as u16,
        nlink: node.nlink.max(1),
        uid: node.uid,
        gid: node.gid,
        rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Attributes of an overlayfs whiteout (char device 0/0) made from the
/// `.wh.` entry `src`: its owner and time, no permission bits.
pub(crate) fn whiteout_attr(ino: INodeNo, src: &Node) -> FileAttr {
    let t = system_time(src.mtime);
    FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: FileType::CharDevice,
        perm: 0,
        nlink: 1,
        uid: src.uid,
        gid: src.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_matches_libc() {
        for (ma, mi) in [(1, 3), (8, 0), (259, 65_537), (4095, 0xfffff)] {
            let d = libc::makedev(ma, mi);
            assert_eq!(u64::from(encode_dev(ma, mi)), d, "{ma}:{mi}");
        }
    }

    #[test]
    fn times_before_epoch() {
        assert_eq!(system_time(-10), UNIX_EPOCH - Duration::from_secs(10));
        assert_eq!(system_time(5), UNIX_EPOCH + Duration::from_secs(5));
    }
}
