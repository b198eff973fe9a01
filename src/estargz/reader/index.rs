//! The typed, checked index of a blob, built from the TOC JSON.
//!
//! Every value from the JSON is validated here, once, so later code (chunk
//! lookup, FUSE) can trust the [`Index`]: names are normalised and safe,
//! numbers are non-negative and consistent, chunks tile their file exactly,
//! compressed offsets lie before the TOC and increase in TOC order, and
//! hardlinks resolve to a non-directory node.
//!
//! Nodes get dense ids (root = 0) so FUSE can derive inode numbers; a
//! directory's children are sorted by name so listings are deterministic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{DigestPolicy, ReaderOptions};
use crate::estargz::digest::Digest;
use crate::estargz::error::{Error, Result};
use crate::estargz::rfc3339;
use crate::estargz::toc::{EntryType, JsonEntry, JsonToc};

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
    pub user_name: Box<str>,
    pub group_name: Box<str>,
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
            .map(|(i, n)| (NodeId(i as u32), n))
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

/// One non-chunk entry after normalisation, with the chunk entries after it.
struct Record<'a> {
    path: String,
    e: &'a JsonEntry,
    chunks: Vec<ChunkInfo>,
    user_name: &'a str,
    group_name: &'a str,
}

struct Builder<'o> {
    toc_offset: u64,
    opts: &'o ReaderOptions,
    nodes: Vec<Node>,
    chunks: Vec<ChunkInfo>,
    /// Path → node, for directories being filled and for hardlink targets.
    by_path: HashMap<String, NodeId>,
    dir_children: HashMap<NodeId, BTreeMap<Box<str>, NodeId>>,
}

impl<'o> Builder<'o> {
    fn new(toc_offset: u64, opts: &'o ReaderOptions) -> Self {
        Builder {
            toc_offset,
            opts,
            nodes: Vec::new(),
            chunks: Vec::new(),
            by_path: HashMap::new(),
            dir_children: HashMap::new(),
        }
    }

    fn build(mut self, toc: &JsonToc) -> Result<Index> {
        let count = toc.entries.len() as u64;
        if count > self.opts.max_entries {
            return Err(Error::TooManyEntries {
                limit: self.opts.max_entries,
            });
        }
        let mut records = self.records(toc)?;
        set_next_offsets(&mut records, self.toc_offset)?;

        // Duplicate names: the last one wins.
        let mut winner: HashMap<&str, usize> = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            winner.insert(r.path.as_str(), i);
        }
        let is_winner = |i: usize, r: &Record| winner.get(r.path.as_str()) == Some(&i);

        self.add_root();
        for (i, r) in records.iter().enumerate() {
            if is_winner(i, r) && r.e.kind != EntryType::Hardlink {
                self.add_node(r)?;
            }
        }
        for (i, r) in records.iter().enumerate() {
            if is_winner(i, r) && r.e.kind == EntryType::Hardlink {
                self.add_hardlink(r, &records, &winner)?;
            }
        }
        self.finish_dirs();
        Ok(Index {
            nodes: self.nodes,
            chunks: self.chunks,
            toc_offset: self.toc_offset,
            toc_entries: count,
            toc_digest: None,
            toc_verified: false,
        })
    }

    /// Normalises names, checks numbers and attaches chunks to their file.
    fn records<'t>(&self, toc: &'t JsonToc) -> Result<Vec<Record<'t>>> {
        let mut out: Vec<Record<'t>> = Vec::new();
        let mut unames: HashMap<i64, &'t str> = HashMap::new();
        let mut gnames: HashMap<i64, &'t str> = HashMap::new();
        // (offset, inner end) of the last payload, to keep payloads ordered.
        let mut last_payload: Option<(u64, u64)> = None;
        for e in &toc.entries {
            if let Some(what) = negative_field(e) {
                let name = if e.name.is_empty() {
                    "<chunk>"
                } else {
                    &e.name
                };
                return Err(invalid(name, &format!("negative {what}")));
            }
            if e.kind == EntryType::Chunk {
                let Some(rec) = out.last_mut() else {
                    return Err(invalid("", "chunk entry before any file"));
                };
                if rec.e.kind != EntryType::Reg {
                    return Err(invalid(&rec.path, "chunk entry after a non-regular file"));
                }
                let c = self.chunk(&rec.path, e, rec.e.size, &mut last_payload)?;
                rec.chunks.push(c);
                continue;
            }
            let path = normalize(&e.name)?;
            let user_name = carry(&mut unames, e.uid, &e.user_name);
            let group_name = carry(&mut gnames, e.gid, &e.group_name);
            let mut chunks = Vec::new();
            if e.kind == EntryType::Reg && e.size > 0 {
                chunks.push(self.chunk(&path, e, e.size, &mut last_payload)?);
            }
            out.push(Record {
                path,
                e,
                chunks,
                user_name,
                group_name,
            });
        }
        for r in &out {
            check_tiling(r)?;
        }
        Ok(out)
    }

    /// Checks one payload-carrying entry (a non-empty `reg` or a `chunk`).
    fn chunk(
        &self,
        path: &str,
        e: &JsonEntry,
        file_size: i64,
        last: &mut Option<(u64, u64)>,
    ) -> Result<ChunkInfo> {
        let num = |what: &str, v: i64| -> Result<u64> {
            u64::try_from(v).map_err(|_| invalid(path, &format!("negative {what}")))
        };
        let size = num("size", file_size)?;
        let offset = num("offset", e.offset)?;
        let inner_offset = num("innerOffset", e.inner_offset)?;
        let chunk_offset = num("chunkOffset", e.chunk_offset)?;
        let mut chunk_size = num("chunkSize", e.chunk_size)?;
        if chunk_size == 0 {
            chunk_size = size
                .checked_sub(chunk_offset)
                .ok_or_else(|| invalid(path, "chunkOffset past the file size"))?;
        }
        let end = chunk_offset
            .checked_add(chunk_size)
            .ok_or_else(|| invalid(path, "chunk end overflows"))?;
        if chunk_size == 0 || end > size {
            return Err(invalid(
                path,
                "chunk is empty or extends past the file size",
            ));
        }
        if offset == 0 || offset >= self.toc_offset {
            return Err(invalid(
                path,
                "payload offset is missing or not before the TOC",
            ));
        }
        let inner_end = inner_offset
            .checked_add(chunk_size)
            .ok_or_else(|| invalid(path, "innerOffset overflows"))?;
        if let Some((prev_off, prev_inner_end)) = *last {
            let ordered =
                offset > prev_off || (offset == prev_off && inner_offset >= prev_inner_end);
            if !ordered {
                return Err(invalid(
                    path,
                    "payload overlaps or precedes the previous one",
                ));
            }
        }
        *last = Some((offset, inner_end));
        let digest = match e.chunk_digest.as_str() {
            "" if self.opts.digest_policy == DigestPolicy::RequireChunkDigests => {
                return Err(Error::Unverifiable {
                    name: path.to_string(),
                });
            }
            "" => None,
            s => Some(Digest::parse(s)?),
        };
        Ok(ChunkInfo {
            offset,
            next_offset: 0,
            inner_offset,
            chunk_offset,
            chunk_size,
            digest,
        })
    }

    fn add_root(&mut self) {
        self.nodes.push(Node {
            path: Arc::from(""),
            kind: NodeKind::Dir { children: vec![] },
            mode: 0o755,
            uid: 0,
            gid: 0,
            user_name: "".into(),
            group_name: "".into(),
            mtime: 0,
            xattrs: BTreeMap::new(),
            nlink: 2,
            parent: Index::ROOT,
        });
        self.by_path.insert(String::new(), Index::ROOT);
        self.dir_children.insert(Index::ROOT, BTreeMap::new());
    }

    /// The directory at `path`, created (mode 0755) with its parents if
    /// missing. Fails if something that is not a directory is in the way.
    /// Iterative: a hostile name may have thousands of components.
    fn dir(&mut self, path: &str) -> Result<NodeId> {
        let mut missing = Vec::new();
        let mut end = path.len();
        let mut cur = loop {
            let p = &path[..end];
            if let Some(&id) = self.by_path.get(p) {
                if !matches!(self.nodes[id.0 as usize].kind, NodeKind::Dir { .. }) {
                    return Err(invalid(p, "used as a directory but is not one"));
                }
                break id;
            }
            missing.push(end);
            // The root ("") is always present, so this terminates.
            end = p.rfind('/').unwrap_or(0);
        };
        for &e in missing.iter().rev() {
            let p = &path[..e];
            let id = self.push(cur, split(p).1, p, NodeKind::Dir { children: vec![] })?;
            self.dir_children.insert(id, BTreeMap::new());
            cur = id;
        }
        Ok(cur)
    }

    fn push(&mut self, parent: NodeId, base: &str, path: &str, kind: NodeKind) -> Result<NodeId> {
        // Implicit directories add nodes beyond the entry count; bound them.
        let limit = self.opts.max_entries.saturating_mul(2).min(u32::MAX.into());
        if self.nodes.len() as u64 >= limit {
            return Err(Error::TooManyEntries { limit });
        }
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node {
            path: Arc::from(path),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            user_name: "".into(),
            group_name: "".into(),
            mtime: 0,
            xattrs: BTreeMap::new(),
            nlink: 1,
            parent,
        });
        self.by_path.insert(path.to_string(), id);
        self.link(parent, base, id);
        Ok(id)
    }

    fn link(&mut self, parent: NodeId, base: &str, id: NodeId) {
        self.dir_children
            .get_mut(&parent)
            .expect("parent is a directory")
            .insert(base.into(), id);
    }

    fn add_node(&mut self, r: &Record) -> Result<()> {
        let e = r.e;
        let kind = match e.kind {
            EntryType::Dir => None,
            EntryType::Reg => {
                let digest = match e.digest.as_str() {
                    "" => None,
                    s => Some(Digest::parse(s)?),
                };
                let start = self.chunks.len();
                self.chunks.extend_from_slice(&r.chunks);
                let range = u32::try_from(start)
                    .and_then(|s| Ok(s..u32::try_from(self.chunks.len())?))
                    .map_err(|_| Error::TooManyEntries {
                        limit: u32::MAX.into(),
                    })?;
                Some(NodeKind::Reg {
                    size: e.size as u64,
                    digest,
                    chunks: range,
                })
            }
            EntryType::Symlink => {
                if e.link_name.is_empty()
                    || e.link_name.contains('\0')
                    || e.link_name.len() > MAX_NAME_LEN
                {
                    return Err(invalid(
                        &r.path,
                        "symlink target is empty, too long or has a NUL",
                    ));
                }
                Some(NodeKind::Symlink {
                    target: e.link_name.as_str().into(),
                })
            }
            EntryType::Char => Some(NodeKind::Char {
                major: small(&r.path, e.dev_major)?,
                minor: small(&r.path, e.dev_minor)?,
            }),
            EntryType::Block => Some(NodeKind::Block {
                major: small(&r.path, e.dev_major)?,
                minor: small(&r.path, e.dev_minor)?,
            }),
            EntryType::Fifo => Some(NodeKind::Fifo),
            EntryType::Hardlink | EntryType::Chunk => unreachable!("filtered by the caller"),
        };
        let id = match kind {
            None => self.dir(&r.path)?,
            Some(kind) => {
                if self.by_path.contains_key(&r.path) {
                    return Err(invalid(
                        &r.path,
                        "a directory and a non-directory share this name",
                    ));
                }
                let (parent, base) = split(&r.path);
                let parent = self.dir(parent)?;
                self.push(parent, base, &r.path, kind)?
            }
        };
        let mtime = match e.modtime.as_str() {
            "" => 0,
            s => rfc3339::parse_unix_seconds(s)
                .ok_or_else(|| invalid(&r.path, "modtime is not RFC 3339"))?,
        };
        if e.xattrs.keys().any(|k| k.is_empty() || k.contains('\0')) {
            return Err(invalid(&r.path, "xattr name is empty or has a NUL"));
        }
        let n = &mut self.nodes[id.0 as usize];
        n.mode = small(&r.path, e.mode)? & 0o7777;
        n.uid = small(&r.path, e.uid)?;
        n.gid = small(&r.path, e.gid)?;
        n.user_name = r.user_name.into();
        n.group_name = r.group_name.into();
        n.mtime = mtime;
        n.xattrs = e
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        Ok(())
    }

    fn add_hardlink(
        &mut self,
        r: &Record,
        records: &[Record],
        winner: &HashMap<&str, usize>,
    ) -> Result<()> {
        let broken = |reason| Error::BrokenHardlink {
            name: r.path.clone(),
            target: r.e.link_name.clone(),
            reason,
        };
        // Follow (rare) hardlink-to-hardlink chains a bounded number of hops.
        let mut target = normalize(&r.e.link_name).map_err(|_| broken("invalid target name"))?;
        for _ in 0..MAX_LINK_HOPS {
            let Some(&i) = winner.get(target.as_str()) else {
                return Err(broken("target not found"));
            };
            let t = &records[i];
            if t.e.kind != EntryType::Hardlink {
                break;
            }
            target = normalize(&t.e.link_name).map_err(|_| broken("invalid target name"))?;
        }
        let Some(&id) = self.by_path.get(&target) else {
            return Err(broken("target not found, or a hardlink chain too long"));
        };
        if matches!(self.nodes[id.0 as usize].kind, NodeKind::Dir { .. }) || target.is_empty() {
            return Err(broken("target is a directory"));
        }
        if self.by_path.contains_key(&r.path) {
            return Err(invalid(
                &r.path,
                "a directory and a hardlink share this name",
            ));
        }
        let (parent, base) = split(&r.path);
        let parent = self.dir(parent)?;
        self.link(parent, base, id);
        self.by_path.insert(r.path.clone(), id);
        let n = &mut self.nodes[id.0 as usize];
        n.nlink = n.nlink.saturating_add(1);
        Ok(())
    }

    /// Moves the children maps into the nodes and counts directory links.
    fn finish_dirs(&mut self) {
        for (id, map) in std::mem::take(&mut self.dir_children) {
            let subdirs = map
                .values()
                .filter(|c| matches!(self.nodes[c.0 as usize].kind, NodeKind::Dir { .. }))
                .count();
            let n = &mut self.nodes[id.0 as usize];
            n.nlink = 2u32.saturating_add(u32::try_from(subdirs).unwrap_or(u32::MAX));
            n.kind = NodeKind::Dir {
                children: map.into_iter().collect(),
            };
        }
    }
}

/// `NextOffset`: a payload's compressed data ends where the next gzip member
/// that starts a payload (`offset != 0 && innerOffset == 0`) begins, else at
/// the TOC. Computed over all records, superseded duplicates included,
/// because member boundaries are physical. Also bounds `innerOffset` by
/// what the compressed range could possibly inflate to.
fn set_next_offsets(records: &mut [Record], toc_offset: u64) -> Result<()> {
    let mut next = toc_offset;
    for r in records.iter_mut().rev() {
        for c in r.chunks.iter_mut().rev() {
            c.next_offset = next;
            // Offsets increase strictly across members (checked earlier).
            let max_inflated = next
                .saturating_sub(c.offset)
                .saturating_mul(MAX_DEFLATE_RATIO);
            if c.inner_offset >= max_inflated {
                return Err(invalid(
                    &r.path,
                    "innerOffset beyond what its member can hold",
                ));
            }
            if c.inner_offset == 0 {
                next = c.offset;
            }
        }
    }
    Ok(())
}

/// Deflate cannot expand data more than about 1032:1; round up.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// Chunks must start at 0 and be contiguous up to exactly the file size.
fn check_tiling(r: &Record) -> Result<()> {
    let mut pos = 0u64;
    for c in &r.chunks {
        if c.chunk_offset != pos {
            return Err(invalid(&r.path, "chunks are not contiguous from offset 0"));
        }
        pos = c.chunk_offset + c.chunk_size; // checked when the chunk was read
    }
    if r.e.kind == EntryType::Reg && pos != r.e.size as u64 {
        return Err(invalid(&r.path, "chunks do not cover the file size"));
    }
    Ok(())
}

/// The first integer field of `e` that is negative, if any.
fn negative_field(e: &JsonEntry) -> Option<&'static str> {
    [
        ("size", e.size),
        ("mode", e.mode),
        ("uid", e.uid),
        ("gid", e.gid),
        ("offset", e.offset),
        ("innerOffset", e.inner_offset),
        ("devMajor", e.dev_major),
        ("devMinor", e.dev_minor),
        ("chunkOffset", e.chunk_offset),
        ("chunkSize", e.chunk_size),
    ]
    .into_iter()
    .find(|&(_, v)| v < 0)
    .map(|(what, _)| what)
}

/// Carries a user/group name forward per id (the writer names each id once).
fn carry<'t>(names: &mut HashMap<i64, &'t str>, id: i64, name: &'t str) -> &'t str {
    if name.is_empty() {
        names.get(&id).copied().unwrap_or("")
    } else {
        names.insert(id, name);
        name
    }
}

fn small(path: &str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(path, &format!("value {v} out of range")))
}

fn invalid(name: &str, reason: &str) -> Error {
    Error::InvalidEntry {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

/// Splits `a/b/c` into (`a/b`, `c`); a top-level name has parent `""`.
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Longest name accepted (Linux `PATH_MAX`); longer ones are unusable.
const MAX_NAME_LEN: usize = 4096;
/// Longest path component (Linux `NAME_MAX`); FUSE cannot serve longer.
const MAX_COMPONENT_LEN: usize = 255;
/// Hops followed through hardlinks whose target is itself a hardlink.
const MAX_LINK_HOPS: usize = 64;

/// Normalises a TOC name to `a/b/c` (`""` is the root). Accepts a leading
/// `./`, `.` components and one trailing `/`; rejects `..`, absolute names,
/// empty components, NUL bytes and empty names.
pub fn normalize(name: &str) -> Result<String> {
    let bad = |reason| Error::InvalidName {
        name: name.chars().take(200).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("name longer than 4096 bytes"));
    }
    if name.contains('\0') {
        return Err(bad("NUL byte"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute name"));
    }
    let body = name.strip_suffix('/').unwrap_or(name);
    let mut out = String::with_capacity(body.len());
    for comp in body.split('/') {
        match comp {
            "." => {}
            ".." => return Err(bad("`..` component")),
            "" => return Err(bad("empty component")),
            c if c.len() > MAX_COMPONENT_LEN => return Err(bad("component longer than 255 bytes")),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, size: i64, offset: i64, inner: i64) -> JsonEntry {
        let mut e = JsonEntry::new(name, EntryType::Reg);
        e.size = size;
        e.offset = offset;
        e.inner_offset = inner;
        e.chunk_digest = Digest::of(name.as_bytes()).to_string();
        e
    }

    fn build(entries: Vec<JsonEntry>) -> Result<Index> {
        let toc = JsonToc {
            version: 1,
            entries,
        };
        Index::build(&toc, 1000, &ReaderOptions::default())
    }

    #[test]
    fn next_offsets_skip_shared_members() {
        let mut chunk = JsonEntry::new("", EntryType::Chunk);
        chunk.offset = 300;
        chunk.chunk_offset = 10;
        chunk.chunk_digest = Digest::of(b"c").to_string();
        let mut a = reg("a", 20, 100, 0);
        a.chunk_size = 10;
        let ix = build(vec![
            a,
            chunk,
            reg("b", 5, 300, 600),
            reg("c", 5, 500, 0),
            JsonEntry::new("d/", EntryType::Dir),
        ])
        .unwrap();
        let ends = |p: &str| -> Vec<(u64, u64)> {
            ix.chunks_of(ix.lookup(p).unwrap())
                .map(|c| (c.compressed_offset, c.compressed_end))
                .collect()
        };
        assert_eq!(ends("a"), [(100, 300), (300, 500)]);
        assert_eq!(ends("b"), [(300, 500)]);
        assert_eq!(ends("c"), [(500, 1000)]);
        assert_eq!(ix.prefetch(), Prefetch::Unspecified);
    }

    #[test]
    fn names_carried_per_id_and_dir_over_file_rejected() {
        let mut a = JsonEntry::new("a", EntryType::Fifo);
        a.uid = 7;
        a.gid = 8;
        a.user_name = "seven".into();
        a.group_name = "eight".into();
        let mut b = JsonEntry::new("b", EntryType::Fifo);
        b.uid = 8;
        b.gid = 7;
        let mut c = JsonEntry::new("c", EntryType::Fifo);
        c.uid = 7;
        c.gid = 8;
        let ix = build(vec![a, b, c]).unwrap();
        let n = |p| ix.node(ix.lookup(p).unwrap()).unwrap();
        assert_eq!((&*n("b").user_name, &*n("b").group_name), ("", ""));
        assert_eq!(
            (&*n("c").user_name, &*n("c").group_name),
            ("seven", "eight")
        );

        let err = build(vec![
            JsonEntry::new("x/y", EntryType::Fifo),
            JsonEntry::new("x", EntryType::Fifo),
        ]);
        assert!(matches!(err, Err(Error::InvalidEntry { .. })));
        // Last wins even when the kind changes.
        let ix = build(vec![
            JsonEntry::new("x", EntryType::Fifo),
            JsonEntry::new("x/", EntryType::Dir),
            JsonEntry::new("x/y", EntryType::Fifo),
        ])
        .unwrap();
        assert_eq!(ix.node(ix.lookup("x").unwrap()).unwrap().nlink, 2);
        assert_eq!(ix.node(Index::ROOT).unwrap().nlink, 3);
    }

    #[test]
    fn index_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Index>();
        assert_send_sync::<super::super::ChunkRef>();
    }

    #[test]
    fn landmarks() {
        let mut lm = reg(crate::estargz::PREFETCH_LANDMARK, 1, 400, 0);
        lm.chunk_digest = Digest::of(&[0x0f]).to_string();
        let ix = build(vec![reg("a", 3, 100, 0), lm.clone()]).unwrap();
        assert_eq!(ix.prefetch(), Prefetch::UpTo(400));
        let no = reg(crate::estargz::NO_PREFETCH_LANDMARK, 1, 50, 0);
        let ix = build(vec![no, reg("a", 3, 100, 0)]).unwrap();
        assert_eq!(ix.prefetch(), Prefetch::Disabled);
    }

    #[test]
    fn normalize_names() {
        assert_eq!(normalize("./a/b/").unwrap(), "a/b");
        assert_eq!(normalize("a/./b").unwrap(), "a/b");
        assert_eq!(normalize("./").unwrap(), "");
        assert_eq!(normalize(".").unwrap(), "");
        for bad in ["", "/a", "a/../b", "..", "a//b", "a\0b", "a/b//"] {
            assert!(
                matches!(normalize(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
