//! Which layer provides a path of the merged root, by overlayfs rules over
//! the unpacked layer directories (base first): the topmost layer holding
//! the path wins; a whiteout, a non-directory ancestor or an opaque
//! ancestor directory hides every layer below it.
//!
//! Recorded paths come from the kernel (the opened file's path), so every
//! directory in them is real in the merged view: symlinks were resolved.

use std::collections::HashSet;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::{OptimizeError, Result};
use super::unpack::is_opaque;
use crate::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};

/// Index of the layer (base first) whose entry is `rel` in the merged root,
/// or `None` when no layer provides it (the workload created it, or it is
/// deleted).
pub fn provider(layers: &[PathBuf], rel: &str) -> Result<Option<usize>> {
    let comps: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps.is_empty() || comps.contains(&"..") {
        return Ok(None);
    }
    'layers: for i in (0..layers.len()).rev() {
        let mut p = layers[i].clone();
        let mut opaque = false;
        for (k, c) in comps.iter().enumerate() {
            p.push(c);
            let md = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    if opaque {
                        return Ok(None);
                    }
                    continue 'layers;
                }
                Err(e) => return Err(OptimizeError::io(&p, e)),
            };
            if is_whiteout(&md) {
                return Ok(None);
            }
            if k + 1 == comps.len() {
                return Ok(Some(i));
            }
            if !md.is_dir() {
                // A file or symlink under a directory of a higher layer:
                // that directory hides it and everything below.
                return Ok(None);
            }
            if is_opaque(&p) {
                opaque = true;
            }
        }
    }
    Ok(None)
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Splits recorded paths (first access order, may repeat) into per-layer
/// lists, deduplicated, keeping the order. Paths no layer provides are
/// dropped, and so are the eStargz TOC and landmark files an eStargz
/// source layer unpacks (the writer regenerates them). Returns (per
/// layer, every kept path in order).
pub fn assign(layers: &[PathBuf], recorded: &[String]) -> Result<(Vec<Vec<String>>, Vec<String>)> {
    let mut per = vec![Vec::new(); layers.len()];
    let mut all = Vec::new();
    let mut seen = HashSet::new();
    for r in recorded {
        let rel = normalize(r);
        if rel.is_empty() || RESERVED.contains(&rel.as_str()) || !seen.insert(rel.clone()) {
            continue;
        }
        if let Some(i) = provider(layers, &rel)? {
            per[i].push(rel.clone());
            all.push(rel);
        }
    }
    Ok((per, all))
}

/// Root-level names the eStargz writer owns.
const RESERVED: &[&str] = &[TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK];

/// `/a//b/` -> `a/b`.
pub fn normalize(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// `layers[i]` for the unpacked layer directories under `root`.
pub fn layer_dir(root: &Path, i: usize) -> PathBuf {
    root.join(i.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimize::unpack::set_opaque;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};

    struct Fixture {
        _d: tempfile::TempDir,
        layers: Vec<PathBuf>,
    }

    impl Fixture {
        fn new(n: usize) -> Fixture {
            let d = tempfile::tempdir().unwrap();
            let layers = (0..n).map(|i| layer_dir(d.path(), i)).collect::<Vec<_>>();
            for l in &layers {
                std::fs::create_dir(l).unwrap();
            }
            Fixture { _d: d, layers }
        }
        fn file(&self, l: usize, p: &str) {
            let p = self.layers[l].join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        fn dir(&self, l: usize, p: &str) {
            std::fs::create_dir_all(self.layers[l].join(p)).unwrap();
        }
        fn whiteout(&self, l: usize, p: &str) {
            let p = self.layers[l].join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            mknod(&p, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
        }
        fn symlink(&self, l: usize, p: &str, target: &str) {
            let p = self.layers[l].join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, p).unwrap();
        }
        fn at(&self, p: &str) -> Option<usize> {
            provider(&self.layers, p).unwrap()
        }
    }

    #[test]
    fn upper_layers_override_lower_ones() {
        let f = Fixture::new(3);
        f.file(0, "etc/a");
        f.file(0, "etc/b");
        f.file(2, "etc/b");
        f.file(1, "usr/bin/x");
        assert_eq!(f.at("etc/a"), Some(0));
        assert_eq!(f.at("/etc/b"), Some(2));
        assert_eq!(f.at("usr/bin/x"), Some(1));
        assert_eq!(f.at("usr/bin/created-by-workload"), None);
        assert_eq!(f.at(""), None);
        assert_eq!(f.at("../etc/a"), None);
    }

    #[test]
    fn whiteouts_hide_lower_files_and_dirs() {
        let f = Fixture::new(3);
        f.file(0, "etc/gone");
        f.file(0, "var/old/f");
        f.whiteout(1, "etc/gone");
        f.whiteout(1, "var/old");
        // Recreated above the whiteout: the new one is what the path is.
        f.file(2, "var/old/f");
        assert_eq!(f.at("etc/gone"), None);
        assert_eq!(f.at("var/old/f"), Some(2));
        f.file(0, "var/old/only-below");
        assert_eq!(f.at("var/old/only-below"), None);
    }

    #[test]
    fn opaque_dirs_hide_lower_content() {
        let f = Fixture::new(2);
        f.file(0, "app/old.py");
        f.file(0, "app/lib/deep.py");
        f.file(0, "app/both");
        f.dir(1, "app");
        set_opaque(&f.layers[1].join("app")).unwrap();
        f.file(1, "app/new.py");
        f.file(1, "app/both");
        assert_eq!(f.at("app/new.py"), Some(1));
        assert_eq!(f.at("app/both"), Some(1));
        assert_eq!(f.at("app/old.py"), None);
        assert_eq!(f.at("app/lib/deep.py"), None);
        // Not opaque: lower content shows through.
        f.file(0, "srv/low");
        f.file(1, "srv/high");
        assert_eq!(f.at("srv/low"), Some(0));
    }

    #[test]
    fn a_directory_over_a_lower_symlink_or_file_hides_it() {
        let f = Fixture::new(2);
        // usrmerge in the base: /lib -> usr/lib. The kernel reports the
        // resolved path, so the file is found under usr/lib.
        f.symlink(0, "lib", "usr/lib");
        f.file(0, "usr/lib/libc.so.6");
        assert_eq!(f.at("usr/lib/libc.so.6"), Some(0));
        // A real directory in the upper layer at a path the base had as a
        // symlink: nothing below shows through it.
        f.dir(1, "lib");
        f.file(1, "lib/only-upper.so");
        assert_eq!(f.at("lib/only-upper.so"), Some(1));
        assert_eq!(f.at("lib/libc.so.6"), None);
        f.file(0, "data");
        f.file(1, "data/inner");
        assert_eq!(f.at("data/inner"), Some(1));
        // A symlink as the last component is an entry of its own.
        f.symlink(1, "usr/bin/python3", "python3.11");
        assert_eq!(f.at("usr/bin/python3"), Some(1));
    }

    #[test]
    fn assign_dedups_in_first_access_order() {
        let f = Fixture::new(2);
        f.file(0, "a");
        f.file(1, "b");
        f.file(0, "c");
        f.file(0, "stargz.index.json");
        let rec: Vec<String> = [
            "/c",
            "/stargz.index.json",
            "/b",
            "/tmp/new",
            "/c",
            "/a",
            "//b",
        ]
        .map(String::from)
        .to_vec();
        let (per, all) = assign(&f.layers, &rec).unwrap();
        assert_eq!(per[0], ["c", "a"]);
        assert_eq!(per[1], ["b"]);
        assert_eq!(all, ["c", "b", "a"]);
    }
}
