//! Multi-layer images from rootfs tarballs: what a rootfs adds over the one
//! below it, written as layer tars, optionally split by path so that one
//! package set spans several layers (as images built in steps do).
//!
//! A path goes into the diff when it is new or differs in type, mode,
//! owner, link target or content (mtimes are ignored: two debootstraps of
//! the same packages differ only there). A path of the lower rootfs that
//! the upper one lacks becomes a whiteout in the last layer. Each layer
//! carries the new directories above its entries itself, so the layers
//! apply in any order; a hard link whose target is not in the same layer
//! is written as a copy of the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::rootfs::normalize;

/// What decides whether an entry changed.
#[derive(PartialEq, Eq, Clone, Debug)]
struct Sig {
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    content: Option<[u8; 32]>,
}

fn sig_of(h: &tar::Header, data: &[u8]) -> Sig {
    use sha2::Digest;
    let kind = h.entry_type().as_byte();
    Sig {
        kind,
        mode: h.mode().unwrap_or(0),
        uid: h.uid().unwrap_or(0),
        gid: h.gid().unwrap_or(0),
        link: h
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned()),
        content: h
            .entry_type()
            .is_file()
            .then(|| sha2::Sha256::digest(data).into()),
    }
}

/// Every entry of a tar: normalized path -> (header, data). Regular-file
/// data only; the rest has none. Paths `skip` accepts are left out.
fn read_all(tar_path: &Path, skip: &dyn Fn(&str) -> bool) -> Vec<(String, tar::Header, Vec<u8>)> {
    let f = std::fs::File::open(tar_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", tar_path.display()));
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut out = Vec::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let path = normalize(&e.path().expect("entry path").to_string_lossy());
        if skip(&path) {
            continue;
        }
        let mut data = Vec::new();
        if e.header().entry_type().is_file() {
            e.read_to_end(&mut data).expect("read tar entry");
        }
        let mut h = e.header().clone();
        // The link name may be in a GNU long-link entry, not the header.
        if let Ok(Some(l)) = e.link_name() {
            let _ = h.set_link_name(&l);
        }
        out.push((path, h, data));
    }
    out
}

fn parents(path: &str) -> Vec<&str> {
    let mut v: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
    v.retain(|p| !p.is_empty());
    v
}

/// One layer tar being written.
struct Out {
    builder: tar::Builder<std::io::BufWriter<std::fs::File>>,
    written: HashSet<String>,
    path: PathBuf,
}

/// Writes the difference of rootfs tar `upper` over `lower` (`None`: an
/// empty rootfs, so all of `upper`) as layer tars in `dir`, both read
/// without the paths `skip` accepts: `groups` are lists of path prefixes (normalized, e.g.
/// `usr/lib/python3/dist-packages/numpy`, matching every path that starts
/// with it), each a layer of its own on top
/// of a first layer holding everything else. Returns the layer tars,
/// bottom first (`1 + groups.len()` of them).
pub fn diff_layers(
    lower: Option<&Path>,
    upper: &Path,
    dir: &Path,
    name: &str,
    groups: &[&[&str]],
    skip: &dyn Fn(&str) -> bool,
) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let low: HashMap<String, Sig> = lower
        .map(|l| read_all(l, skip))
        .unwrap_or_default()
        .into_iter()
        .map(|(p, h, d)| {
            let s = sig_of(&h, &d);
            (p, s)
        })
        .collect();
    let up = read_all(upper, skip);
    let up_index: HashMap<&str, usize> = up
        .iter()
        .enumerate()
        .map(|(i, (p, _, _))| (p.as_str(), i))
        .collect();
    let mut outs: Vec<Out> = (0..=groups.len())
        .map(|i| {
            let path = dir.join(format!("{name}-{i}.tar"));
            let f = std::fs::File::create(&path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            Out {
                builder: tar::Builder::new(std::io::BufWriter::new(f)),
                written: HashSet::new(),
                path,
            }
        })
        .collect();
    let layer_of = |p: &str| {
        groups
            .iter()
            .position(|g| g.iter().any(|pre| p.starts_with(pre)))
            .map_or(0, |i| i + 1)
    };
    let changed = |p: &str, h: &tar::Header, d: &[u8]| low.get(p) != Some(&sig_of(h, d));
    // New or changed directories above `path`, written into `o` first.
    let ensure_parents = |o: &mut Out, path: &str| {
        for a in parents(path) {
            if o.written.contains(a) {
                continue;
            }
            let Some(&i) = up_index.get(a) else { continue };
            let (_, h, d) = &up[i];
            if !changed(a, h, d) {
                continue;
            }
            let mut h = h.clone();
            o.builder
                .append_data(&mut h, format!("{a}/"), &[][..])
                .expect("append dir");
            o.written.insert(a.to_string());
        }
    };
    for (path, h, data) in &up {
        if path.is_empty() || !changed(path, h, data) {
            continue;
        }
        let o = &mut outs[layer_of(path)];
        ensure_parents(o, path);
        if o.written.contains(path.as_str()) {
            continue;
        }
        let mut h = h.clone();
        let t = h.entry_type();
        if t.is_dir() {
            o.builder
                .append_data(&mut h, format!("{path}/"), &[][..])
                .expect("append dir");
        } else if t.is_symlink() {
            let target = h
                .link_name()
                .ok()
                .flatten()
                .expect("symlink target")
                .into_owned();
            o.builder
                .append_link(&mut h, path, target)
                .expect("append symlink");
        } else if t.is_hard_link() {
            let target = normalize(
                &h.link_name()
                    .ok()
                    .flatten()
                    .expect("hard link target")
                    .to_string_lossy(),
            );
            if o.written.contains(&target) {
                o.builder
                    .append_link(&mut h, path, &target)
                    .expect("append hard link");
            } else {
                // The target lives in another layer: a copy instead.
                let (_, th, td) = &up[up_index[target.as_str()]];
                let mut th = th.clone();
                o.builder
                    .append_data(&mut th, path, &td[..])
                    .expect("append copy");
            }
        } else {
            o.builder
                .append_data(&mut h, path, &data[..])
                .expect("append entry");
        }
        o.written.insert(path.clone());
    }
    // Deletions: whiteouts in the first layer, only at the top of a
    // deleted tree.
    let up_paths: HashSet<&str> = up.iter().map(|(p, _, _)| p.as_str()).collect();
    let gone: BTreeMap<&String, ()> = low
        .keys()
        .filter(|p| !p.is_empty() && !up_paths.contains(p.as_str()))
        .map(|p| (p, ()))
        .collect();
    for p in gone.keys() {
        if parents(p).iter().any(|a| !up_paths.contains(a)) {
            continue;
        }
        let o = &mut outs[0];
        ensure_parents(o, p);
        let (parent, base) = match p.rsplit_once('/') {
            Some((d, b)) => (format!("{d}/"), b),
            None => (String::new(), p.as_str()),
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        o.builder
            .append_data(&mut h, format!("{parent}.wh.{base}"), &[][..])
            .expect("append whiteout");
    }
    outs.into_iter()
        .map(|o| {
            o.builder
                .into_inner()
                .expect("finish layer tar")
                .into_inner()
                .expect("flush layer tar");
            o.path
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, &[u8])], dirs: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for d in dirs {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, format!("{d}/"), &[][..]).unwrap();
        }
        for (p, d) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(d.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, p, *d).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn names(p: &Path) -> Vec<String> {
        let mut ar = tar::Archive::new(std::fs::File::open(p).unwrap());
        ar.entries()
            .unwrap()
            .map(|e| normalize(&e.unwrap().path().unwrap().to_string_lossy()))
            .collect()
    }

    #[test]
    fn diff_splits_by_prefix_and_whiteouts_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let low = dir.path().join("low.tar");
        let up = dir.path().join("up.tar");
        std::fs::write(
            &low,
            tar_with(
                &[("a/same", b"1"), ("a/changed", b"1"), ("a/gone", b"1")],
                &["a"],
            ),
        )
        .unwrap();
        std::fs::write(
            &up,
            tar_with(
                &[
                    ("a/same", b"1"),
                    ("a/changed", b"2"),
                    ("b/new/x", b"x"),
                    ("c/y", b"y"),
                ],
                &["a", "b", "b/new", "c"],
            ),
        )
        .unwrap();
        let out = diff_layers(
            Some(&low),
            &up,
            &dir.path().join("out"),
            "t",
            &[&["b/new"]],
            &|p| p == "c/y",
        );
        assert_eq!(out.len(), 2);
        assert_eq!(names(&out[0]), vec!["b", "c", "a/changed", "a/.wh.gone"]);
        assert_eq!(names(&out[1]), vec!["b", "b/new", "b/new/x"]);
        // No lower rootfs: everything, as one layer.
        let all = diff_layers(None, &low, &dir.path().join("all"), "a", &[], &|_| false);
        assert_eq!(names(&all[0]), vec!["a", "a/same", "a/changed", "a/gone"]);
    }
}
