//! Entry order of the output: duplicates resolved (last wins, at its own
//! position), TOC and landmark entries dropped, prioritized files (with their
//! parents and hardlink targets) moved to the front, then the landmark.

use std::collections::{HashMap, HashSet};

use super::input::{InputEntry, normalize_name};
use crate::estargz::error::{Error, Result};
use crate::estargz::toc::EntryType;
use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};

/// One entry of the output, in output order.
#[derive(Debug)]
pub(crate) enum Item {
    /// An entry copied from the input.
    Input(InputEntry),
    /// A parent directory the input lacks (normalised name).
    SynthDir(String),
    /// A landmark file.
    Landmark(&'static str),
}

/// Computes the output order. `prioritized` holds raw paths in access order.
pub(crate) fn order(
    entries: Vec<InputEntry>,
    prioritized: &[String],
    allow_not_found: bool,
) -> Result<Vec<Item>> {
    let mut stream: Vec<Option<InputEntry>> = Vec::with_capacity(entries.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for e in entries {
        if e.name == TOC_TAR_NAME || e.name == PREFETCH_LANDMARK || e.name == NO_PREFETCH_LANDMARK {
            continue;
        }
        if let Some(old) = index.insert(e.name.clone(), stream.len()) {
            stream[old] = None;
        }
        stream.push(Some(e));
    }

    let mut out = Vec::with_capacity(stream.len() + 2);
    if prioritized.is_empty() {
        out.push(Item::Landmark(NO_PREFETCH_LANDMARK));
    } else {
        let mut mover = Mover {
            stream: &mut stream,
            index: &index,
            moved: HashSet::new(),
            linking: HashSet::new(),
            out: &mut out,
        };
        for p in prioritized {
            let name = normalize_name(p.as_bytes())?;
            match mover.move_rec(&name, Missing::NotFound, 0) {
                Err(Error::PrioritizedNotFound(_)) if allow_not_found => {}
                r => r?,
            }
        }
        out.push(Item::Landmark(PREFETCH_LANDMARK));
    }
    out.extend(stream.into_iter().flatten().map(Item::Input));
    Ok(out)
}

/// What to do when a name is in neither the input nor the output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    NotFound,
    SynthDir,
    BadLink,
}

struct Mover<'a> {
    stream: &'a mut Vec<Option<InputEntry>>,
    index: &'a HashMap<String, usize>,
    moved: HashSet<String>,
    /// Hardlinks whose target is being moved, to detect loops.
    linking: HashSet<String>,
    out: &'a mut Vec<Item>,
}

/// Deepest recursion of parents plus hardlink targets (PATH_MAX / 2 would be
/// 2048 components; real layers are far shallower).
const MAX_DEPTH: usize = 256;

impl Mover<'_> {
    /// Moves `name` after its parents (and, for a hardlink, its target).
    fn move_rec(&mut self, name: &str, missing: Missing, depth: usize) -> Result<()> {
        // Bounds recursion (parents + hardlink chains) on hostile input.
        if depth > MAX_DEPTH {
            return Err(Error::InvalidEntry {
                name: name.to_string(),
                reason: "path or hardlink chain too deep".into(),
            });
        }
        let slot = self.index.get(name).copied();
        let present = slot.is_some_and(|i| self.stream[i].is_some());
        if name.is_empty() {
            if let (true, Some(i)) = (present, slot) {
                self.take(i);
            }
            return Ok(());
        }
        if !present && self.moved.contains(name) {
            return Ok(());
        }
        if !present {
            match missing {
                Missing::NotFound => return Err(Error::PrioritizedNotFound(name.to_string())),
                Missing::BadLink => {
                    return Err(Error::InvalidEntry {
                        name: name.to_string(),
                        reason: "hardlink target not in the layer".into(),
                    });
                }
                Missing::SynthDir => {}
            }
        }
        let parent = name.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        self.move_rec(parent, Missing::SynthDir, depth + 1)?;
        let Some(i) = slot.filter(|_| present) else {
            self.moved.insert(name.to_string());
            self.out.push(Item::SynthDir(name.to_string()));
            return Ok(());
        };
        let link = self.stream[i]
            .as_ref()
            .filter(|e| e.kind == EntryType::Hardlink)
            .map(|e| e.link_name.clone());
        if let Some(target) = link {
            if !self.linking.insert(name.to_string()) {
                return Err(Error::InvalidEntry {
                    name: name.to_string(),
                    reason: "hardlink loop".into(),
                });
            }
            self.move_rec(&target, Missing::BadLink, depth + 1)?;
            self.linking.remove(name);
        }
        if self.stream[i].is_some() {
            self.take(i);
        }
        Ok(())
    }

    fn take(&mut self, i: usize) {
        if let Some(e) = self.stream[i].take() {
            self.moved.insert(e.name.clone());
            self.out.push(Item::Input(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ent(name: &str, kind: EntryType, link: &str) -> InputEntry {
        InputEntry {
            name: name.into(),
            kind,
            header_pos: 0,
            header_len: 512,
            data_pos: 512,
            size: 0,
            extra_len: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            uname: String::new(),
            gname: String::new(),
            mtime: 0,
            link_name: link.into(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        }
    }

    fn names(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Item::Input(e) => e.name.clone(),
                Item::SynthDir(n) => format!("+{n}"),
                Item::Landmark(n) => n.to_string(),
            })
            .collect()
    }

    #[test]
    fn root_entry_moves_with_first_prioritized_file() {
        let v = vec![
            ent("", EntryType::Dir, ""),
            ent("b", EntryType::Reg, ""),
            ent("a/f", EntryType::Reg, ""),
        ];
        let out = order(v, &["a/f".into(), "a/f".into()], false).unwrap();
        assert_eq!(names(&out), ["", "+a", "a/f", PREFETCH_LANDMARK, "b"]);
    }

    #[test]
    fn hardlink_loops_are_errors_not_overflows() {
        let v = vec![
            ent("x", EntryType::Hardlink, "y"),
            ent("y", EntryType::Hardlink, "x"),
        ];
        assert!(matches!(
            order(v, &["x".into()], false),
            Err(Error::InvalidEntry { .. })
        ));
        let deep = vec!["d"; 300].join("/");
        let v = vec![ent(&deep, EntryType::Reg, "")];
        assert!(matches!(
            order(v, std::slice::from_ref(&deep), false),
            Err(Error::InvalidEntry { .. })
        ));
        let v = vec![ent("x", EntryType::Hardlink, "gone")];
        assert!(matches!(
            order(v, &["x".into()], true),
            Err(Error::InvalidEntry { .. })
        ));
    }

    #[test]
    fn no_prioritized_puts_landmark_first() {
        let v = vec![ent("a", EntryType::Reg, ""), ent("a", EntryType::Dir, "")];
        let out = order(v, &[], false).unwrap();
        assert_eq!(names(&out), [NO_PREFETCH_LANDMARK, "a"]);
        assert!(matches!(&out[1], Item::Input(e) if e.kind == EntryType::Dir));
    }
}
