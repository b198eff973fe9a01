//! The typed, checked index of a blob, built from the TOC JSON.
//!
//! Every value from the JSON is validated once (by the `build` module), so later code (chunk
//! lookup, FUSE) can trust the [`Index`]: names are normalised and safe,
//! numbers are non-negative and consistent, chunks tile their file exactly,
//! compressed offsets lie before the TOC and increase in TOC order, and
//! hardlinks resolve to a non-directory node.
//!
//! Nodes get dense ids (root = 0) so FUSE can derive inode numbers; a
//! directory's children are sorted by name so listings are deterministic.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ReaderOptions;
use super::build::Builder;
use crate::estargz::digest::Digest;
use crate::estargz::error::Result;
use crate::estargz::toc::{EntryType, JsonToc};

/// Dense node number; [`Index::ROOT`] is 0. Hardlinked names share one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// What a node is, with the data only that type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Children sorted by name.
    Dir {
        children: Vec<(Box<str>, NodeId)>,
    },
    Reg {
        size: u64,
        /// Whole-file digest, when the TOC has one.
        digest: Option<Digest>,
        /// Range into the index's chunk table; empty for empty files.
        chunks: std::ops::Range<u32>,
    },
    Symlink {
        target: Box<str>,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One file system object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Normalised path of the name that created the node (`""` for root).
    pub path: Arc<str>,
    pub kind: NodeKind,
    /// Permission bits, setuid/setgid/sticky included (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Shared between the nodes that have the same owner.
    pub user_name: Arc<str>,
    pub group_name: Arc<str>,
    /// Unix seconds; 0 when the TOC has no modtime.
    pub mtime: i64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Link count: names for non-directories, 2 + subdirectories for dirs.
    pub nlink: u32,
    /// The directory holding the node's first name (root: itself), so FUSE
    /// can answer `..` without a path map.
    pub parent: NodeId,
}

impl Node {
    /// The `EntryType` of this node (never `Hardlink` or `Chunk`).
    pub fn entry_type(&self) -> EntryType {
        match self.kind {
            NodeKind::Dir { .. } => EntryType::Dir,
            NodeKind::Reg { .. } => EntryType::Reg,
            NodeKind::Symlink { .. } => EntryType::Symlink,
            NodeKind::Char { .. } => EntryType::Char,
            NodeKind::Block { .. } => EntryType::Block,
            NodeKind::Fifo => EntryType::Fifo,
        }
    }

    /// `st_mode`: the file type bits (`S_IF*`) plus [`Node::mode`].
    pub fn st_mode(&self) -> u32 {
        let kind = match self.kind {
            NodeKind::Dir { .. } => 0o040_000,
            NodeKind::Reg { .. } => 0o100_000,
            NodeKind::Symlink { .. } => 0o120_000,
            NodeKind::Char { .. } => 0o020_000,
            NodeKind::Block { .. } => 0o060_000,
            NodeKind::Fifo => 0o010_000,
        };
        kind | self.mode
    }

    /// Logical size: file length, or symlink target length.
    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::Reg { size, .. } => *size,
            NodeKind::Symlink { target } => target.len() as u64,
            _ => 0,
        }
    }
}

/// A stored chunk; [`super::ChunkRef`] is its public, self-contained view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkInfo {
    pub offset: u64,
    pub next_offset: u64,
    pub inner_offset: u64,
    pub chunk_offset: u64,
    pub chunk_size: u64,
    pub digest: Option<Digest>,
}

/// The checked tree of a blob.
#[derive(Debug, Clone)]
pub struct Index {
    pub(crate) nodes: Vec<Node>,
    pub(crate) chunks: Vec<ChunkInfo>,
    pub(crate) toc_offset: u64,
    /// Number of TOC entries, chunk entries included.
    pub toc_entries: u64,
    /// Digest of the TOC JSON when the index was built from a blob.
    pub toc_digest: Option<Digest>,
    /// Whether `toc_digest` was compared with an expected digest (the
    /// layer's `toc.digest` annotation) and matched. An unverified index
    /// must only be mounted by an explicit, logged policy decision.
    pub toc_verified: bool,
}

impl Index {
    pub const ROOT: NodeId = NodeId(0);

    /// Builds and checks the index. `toc_offset` is the compressed offset of
    /// the TOC member: every payload must lie before it.
    pub fn build(toc: &JsonToc, toc_offset: u64, opts: &ReaderOptions) -> Result<Index> {
        Builder::new(toc_offset, opts).build(toc)
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.0 as usize)
    }

    /// Number of nodes (distinct inodes), root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Compressed offset of the TOC member, the end of all payload.
    pub fn toc_offset(&self) -> u64 {
        self.toc_offset
    }

    /// Number of chunks of all files.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// All nodes with their ids, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            // Builder::push keeps the node count within u32.
            .map(|(i, n)| (NodeId(u32::try_from(i).unwrap_or(u32::MAX)), n))
    }

    /// Sorted children of a directory; empty for anything else.
    pub fn children(&self, dir: NodeId) -> &[(Box<str>, NodeId)] {
        match self.node(dir).map(|n| &n.kind) {
            Some(NodeKind::Dir { children }) => children,
            _ => &[],
        }
    }

    /// Looks up one name in a directory.
    pub fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        let c = self.children(dir);
        c.binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| c[i].1)
    }

    /// Looks up a path (`a/b`, `/a/b` and `./a/b` are the same). Symlinks
    /// are not followed.
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let mut cur = Self::ROOT;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            cur = self.child(cur, comp)?;
        }
        Some(cur)
    }

    /// Walks the tree depth-first in name order, yielding every name (so a
    /// hardlinked node appears once per name). The root comes first as `""`.
    pub fn walk(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![(String::new(), Self::ROOT)];
        while let Some((path, id)) = stack.pop() {
            for (name, child) in self.children(id).iter().rev() {
                let p = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}/{name}")
                };
                stack.push((p, *child));
            }
            out.push((path, id));
        }
        out
    }
}

/// The prefetch hint a blob carries in its landmark files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// No landmark: fall back to configured or labelled prefetch sizes.
    Unspecified,
    /// `.no.prefetch.landmark`: the writer knew of no files to prefetch.
    Disabled,
    /// `.prefetch.landmark`: the prioritized files lie in `[0, size)`.
    UpTo(u64),
}

impl Index {
    /// Reads the landmark files at the root (`.no.prefetch.landmark` wins).
    pub fn prefetch(&self) -> Prefetch {
        use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
        if self.child(Self::ROOT, NO_PREFETCH_LANDMARK).is_some() {
            return Prefetch::Disabled;
        }
        let Some(id) = self.child(Self::ROOT, PREFETCH_LANDMARK) else {
            return Prefetch::Unspecified;
        };
        match self.chunk_for(id, 0) {
            Some(c) => Prefetch::UpTo(c.compressed_offset),
            None => Prefetch::Unspecified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Index>();
        assert_send_sync::<super::super::ChunkRef>();
    }
}
