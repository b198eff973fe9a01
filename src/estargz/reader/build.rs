//! Building an [`Index`] from TOC JSON: every check the index promises.
//!
//! Two passes: first each entry is normalised and its numbers checked, with
//! `chunk` entries attached to their file ([`Record`]); then the winners of
//! duplicate names become nodes, implicit parent directories are created,
//! and hardlinks are resolved last (their target may come later in the TOC).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::index::{ChunkInfo, Index, Node, NodeId, NodeKind};
use super::name::{MAX_NAME_LEN, normalize, split};
use super::{DigestPolicy, ReaderOptions};
use crate::estargz::digest::Digest;
use crate::estargz::error::{Error, Result};
use crate::estargz::rfc3339;
use crate::estargz::toc::{EntryType, JsonEntry, JsonToc};

/// Hops followed through hardlinks whose target is itself a hardlink.
const MAX_LINK_HOPS: usize = 64;

/// One non-chunk entry after normalisation, with the chunk entries after it.
struct Record<'a> {
    path: String,
    e: &'a JsonEntry,
    chunks: Vec<ChunkInfo>,
    user_name: &'a str,
    group_name: &'a str,
}

pub(crate) struct Builder<'o> {
    toc_offset: u64,
    opts: &'o ReaderOptions,
    nodes: Vec<Node>,
    chunks: Vec<ChunkInfo>,
    /// Path → node, for directories being filled and for hardlink targets.
    by_path: HashMap<String, NodeId>,
    dir_children: HashMap<NodeId, BTreeMap<Box<str>, NodeId>>,
    /// Owner names, one allocation per distinct name: a layer has a handful
    /// of owners and thousands of nodes.
    owner_names: HashMap<String, Arc<str>>,
}

impl<'o> Builder<'o> {
    pub(crate) fn new(toc_offset: u64, opts: &'o ReaderOptions) -> Self {
        Builder {
            toc_offset,
            opts,
            nodes: Vec::new(),
            chunks: Vec::new(),
            by_path: HashMap::new(),
            dir_children: HashMap::new(),
            owner_names: HashMap::new(),
        }
    }

    pub(crate) fn build(mut self, toc: &JsonToc) -> Result<Index> {
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
        // The index lives as long as the mount: give back the growth slack.
        self.nodes.shrink_to_fit();
        self.chunks.shrink_to_fit();
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
            user_name: Arc::from(""),
            group_name: Arc::from(""),
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
        let id = match u32::try_from(self.nodes.len()) {
            Ok(n) if u64::from(n) < limit => NodeId(n),
            _ => return Err(Error::TooManyEntries { limit }),
        };
        self.nodes.push(Node {
            path: Arc::from(path),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            user_name: Arc::from(""),
            group_name: Arc::from(""),
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
                    size: u64::try_from(e.size).map_err(|_| invalid(&r.path, "negative size"))?,
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
        check_xattrs(&r.path, e)?;
        let user_name = self.owner_name(r.user_name);
        let group_name = self.owner_name(r.group_name);
        let n = &mut self.nodes[id.0 as usize];
        n.mode = small(&r.path, e.mode)? & 0o7777;
        n.uid = small(&r.path, e.uid)?;
        n.gid = small(&r.path, e.gid)?;
        n.user_name = user_name;
        n.group_name = group_name;
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

    fn owner_name(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.owner_names.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        // Hostile TOCs could name a new owner per entry; stop sharing then.
        if self.owner_names.len() < MAX_SHARED_OWNER_NAMES {
            self.owner_names.insert(name.to_string(), a.clone());
        }
        a
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

/// Distinct owner names kept for sharing.
const MAX_SHARED_OWNER_NAMES: usize = 1024;

/// Linux's limits (`XATTR_NAME_MAX`, `XATTR_SIZE_MAX`, `XATTR_LIST_MAX`): an
/// xattr the kernel could never have stored is not in a real layer, and
/// FUSE could not hand it out anyway.
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
const XATTR_LIST_MAX: usize = 64 * 1024;

fn check_xattrs(path: &str, e: &JsonEntry) -> Result<()> {
    let mut list = 0usize;
    for (k, v) in &e.xattrs {
        if k.len() > XATTR_NAME_MAX {
            return Err(invalid(path, "xattr name longer than 255 bytes"));
        }
        if v.0.len() > XATTR_SIZE_MAX {
            return Err(invalid(path, "xattr value larger than 64 KiB"));
        }
        list = list.saturating_add(k.len() + 1);
    }
    if list > XATTR_LIST_MAX {
        return Err(invalid(path, "xattr names longer than 64 KiB in all"));
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
    if r.e.kind == EntryType::Reg && u64::try_from(r.e.size) != Ok(pos) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::reader::Prefetch;

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
    fn landmarks() {
        let mut lm = reg(crate::estargz::PREFETCH_LANDMARK, 1, 400, 0);
        lm.chunk_digest = Digest::of(&[0x0f]).to_string();
        let ix = build(vec![reg("a", 3, 100, 0), lm.clone()]).unwrap();
        assert_eq!(ix.prefetch(), Prefetch::UpTo(400));
        let no = reg(crate::estargz::NO_PREFETCH_LANDMARK, 1, 50, 0);
        let ix = build(vec![no, reg("a", 3, 100, 0)]).unwrap();
        assert_eq!(ix.prefetch(), Prefetch::Disabled);
    }
}
