//! OCI whiteouts presented the way overlayfs reads a lower layer.
//!
//! In an image layer, `D/.wh.X` deletes `X` of the layers below and
//! `D/.wh..wh..opq` hides everything below in `D`. overlayfs instead expects
//! `X` to be a character device 0/0 and `D` to carry the xattr
//! `trusted.overlay.opaque=y`. The listing of every directory holding a
//! `.wh.` name is rewritten once at mount (O(entries), only for such
//! directories); the rest are served from the index as they are.
//!
//! Rules (OCI image spec, "Whiteouts"):
//! - `.wh..wh..opq` is hidden and makes its directory opaque.
//! - Other `.wh..wh.*` names are reserved (aufs metadata) and hidden.
//! - `.wh.X` becomes a whiteout named `X`, unless this layer also has `X`:
//!   a whiteout only applies to lower layers, so the real `X` wins. If that
//!   `X` is a directory it is made opaque, since the lower `X` was deleted
//!   and must not merge into it.

use std::collections::{HashMap, HashSet};

use crate::estargz::reader::{Index, NodeId, NodeKind};

const PREFIX: &str = ".wh.";
const META_PREFIX: &str = ".wh..wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What a visible name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Node(NodeId),
    /// Index into [`Whiteouts::source`].
    Whiteout(u32),
}

/// The overlayfs view of a layer's whiteouts.
#[derive(Debug, Default)]
pub(crate) struct Whiteouts {
    /// Sorted listings of directories that held `.wh.` names.
    rewritten: HashMap<NodeId, Vec<(Box<str>, Target)>>,
    opaque: HashSet<NodeId>,
    /// For each whiteout, the `.wh.X` node (owner and mtime come from it).
    sources: Vec<NodeId>,
}

/// One directory's visible names, in name order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Listing<'a> {
    Plain(&'a [(Box<str>, NodeId)]),
    Rewritten(&'a [(Box<str>, Target)]),
}

impl<'a> Listing<'a> {
    pub(crate) fn get(&self, i: usize) -> Option<(&'a str, Target)> {
        match *self {
            Listing::Plain(c) => c.get(i).map(|(n, id)| (&**n, Target::Node(*id))),
            Listing::Rewritten(c) => c.get(i).map(|(n, t)| (&**n, *t)),
        }
    }

    pub(crate) fn find(&self, name: &str) -> Option<Target> {
        match *self {
            Listing::Plain(c) => c
                .binary_search_by(|(n, _)| (**n).cmp(name))
                .ok()
                .map(|i| Target::Node(c[i].1)),
            Listing::Rewritten(c) => c
                .binary_search_by(|(n, _)| (**n).cmp(name))
                .ok()
                .map(|i| c[i].1),
        }
    }
}

impl Whiteouts {
    pub(crate) fn build(index: &Index) -> Whiteouts {
        let mut w = Whiteouts::default();
        for (dir, node) in index.nodes() {
            if !matches!(node.kind, NodeKind::Dir { .. }) {
                continue;
            }
            let children = index.children(dir);
            if !children.iter().any(|(n, _)| n.starts_with(PREFIX)) {
                continue;
            }
            let mut list = Vec::with_capacity(children.len());
            let mut deleted = Vec::new();
            for (name, child) in children {
                match name.strip_prefix(PREFIX) {
                    None => list.push((name.clone(), Target::Node(*child))),
                    Some(_) if &**name == OPAQUE => {
                        w.opaque.insert(dir);
                    }
                    Some(_) if name.starts_with(META_PREFIX) => {}
                    Some("") => {}
                    Some(rest) => deleted.push((rest, *child)),
                }
            }
            for (name, src) in deleted {
                match index.child(dir, name) {
                    Some(real) => {
                        let is_dir = index
                            .node(real)
                            .is_some_and(|n| matches!(n.kind, NodeKind::Dir { .. }));
                        if is_dir {
                            w.opaque.insert(real);
                        }
                    }
                    None => {
                        let k = u32::try_from(w.sources.len()).unwrap_or(u32::MAX);
                        w.sources.push(src);
                        list.push((name.into(), Target::Whiteout(k)));
                    }
                }
            }
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            w.rewritten.insert(dir, list);
        }
        w
    }

    pub(crate) fn listing<'a>(&'a self, index: &'a Index, dir: NodeId) -> Listing<'a> {
        match self.rewritten.get(&dir) {
            Some(list) => Listing::Rewritten(list),
            None => Listing::Plain(index.children(dir)),
        }
    }

    pub(crate) fn is_opaque(&self, dir: NodeId) -> bool {
        self.opaque.contains(&dir)
    }

    /// The `.wh.` node whiteout `k` came from.
    pub(crate) fn source(&self, k: u32) -> Option<NodeId> {
        self.sources.get(k as usize).copied()
    }

    pub(crate) fn count(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::reader::ReaderOptions;
    use crate::estargz::toc::{EntryType, JsonEntry, JsonToc};

    fn index(names: &[&str]) -> Index {
        let entries = names
            .iter()
            .map(|n| {
                let kind = if n.ends_with('/') {
                    EntryType::Dir
                } else {
                    EntryType::Reg
                };
                let mut e = JsonEntry::new(*n, kind);
                e.mode = 0o755;
                e
            })
            .collect();
        let toc = JsonToc {
            version: 1,
            entries,
        };
        Index::build(&toc, 0, &ReaderOptions::default()).unwrap()
    }

    fn names(w: &Whiteouts, idx: &Index, dir: &str) -> Vec<(String, bool)> {
        let l = w.listing(idx, idx.lookup(dir).unwrap());
        (0..)
            .map_while(|i| l.get(i))
            .map(|(n, t)| (n.to_string(), matches!(t, Target::Whiteout(_))))
            .collect()
    }

    #[test]
    fn rewrites_only_directories_with_whiteouts() {
        let idx = index(&[
            "d/",
            "d/.wh.b",
            "d/a",
            "d/.wh..wh..opq",
            "d/.wh..wh.plnk",
            "d/.wh.",
            "plain/",
            "plain/x",
        ]);
        let w = Whiteouts::build(&idx);
        assert_eq!(
            names(&w, &idx, "d"),
            [("a".to_string(), false), ("b".to_string(), true)]
        );
        assert!(w.is_opaque(idx.lookup("d").unwrap()));
        assert!(!w.is_opaque(idx.lookup("plain").unwrap()));
        assert!(!w.rewritten.contains_key(&idx.lookup("plain").unwrap()));
        assert_eq!(w.count(), 1);
        let l = w.listing(&idx, idx.lookup("d").unwrap());
        let Some(Target::Whiteout(k)) = l.find("b") else {
            panic!("b is not a whiteout");
        };
        assert_eq!(w.source(k), idx.lookup("d/.wh.b"));
        assert_eq!(l.find(".wh.b"), None);
        assert_eq!(l.find(".wh..wh..opq"), None);
    }

    #[test]
    fn real_entry_beats_its_whiteout() {
        let idx = index(&["f", ".wh.f", "d/", ".wh.d", "d/x"]);
        let w = Whiteouts::build(&idx);
        assert_eq!(
            names(&w, &idx, ""),
            [("d".to_string(), false), ("f".to_string(), false)]
        );
        assert_eq!(w.count(), 0);
        // The lower `d` was deleted: this layer's `d` must not merge with it.
        assert!(w.is_opaque(idx.lookup("d").unwrap()));
        assert!(!w.is_opaque(Index::ROOT));
    }
}
