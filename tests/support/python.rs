//! A three-layer Debian Python image for `rstargz optimize` tests, built
//! from real packages without a container build:
//! - layer 1: the debootstrap minbase rootfs ([`super::rootfs`]);
//! - layer 2: `python3-minimal`, `python3.11-minimal`,
//!   `libpython3.11-minimal`, `libexpat1` (the interpreter, its core
//!   stdlib, e.g. `csv.py`);
//! - layer 3: `libpython3.11-stdlib` (e.g. the `json` package) plus
//!   [`OVERRIDDEN`] copied from layer 2, so that the file Python reads is
//!   layer 3's.
//!
//! The .debs come from `apt-get download` (the host's apt sources) and are
//! cached beside the rootfs; each layer is `dpkg-deb -x` of its packages,
//! with `/lib` content moved to `/usr/lib` as usrmerge's dpkg would place
//! it (a real `lib/` directory would hide the base's `lib -> usr/lib`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::image::{Layer, OciLayout, build_oci_layout};
use super::rootfs;
use super::run_ok;

pub const LAYER2_DEBS: &[&str] = &[
    "python3-minimal",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libexpat1",
];
pub const LAYER3_DEBS: &[&str] = &["libpython3.11-stdlib"];
/// Present in layer 2 and, with the same content, in layer 3.
pub const OVERRIDDEN: &str = "usr/lib/python3.11/encodings/__init__.py";

pub struct PythonImage {
    pub layout: OciLayout,
}

/// Writes the image as an OCI layout in `dir`, tagged `tag`, `Cmd`
/// `["python3"]`.
pub fn python_image(dir: &Path, tag: &str) -> PythonImage {
    let base = rootfs::debian_rootfs();
    let debs = python_debs();
    let work = super::temp_dir("pylayers");
    let l2 = work.path().join("l2");
    let l3 = work.path().join("l3");
    extract(&debs, LAYER2_DEBS, &l2);
    extract(&debs, LAYER3_DEBS, &l3);
    let over = l3.join(OVERRIDDEN);
    std::fs::create_dir_all(over.parent().unwrap()).unwrap();
    std::fs::copy(l2.join(OVERRIDDEN), &over).expect("copy the overridden file");
    let t2 = tar_dir(&l2, &work.path().join("l2.tar"));
    let t3 = tar_dir(&l3, &work.path().join("l3.tar"));
    let layout = build_oci_layout(
        dir,
        tag,
        &[
            Layer::TarFile(base.path.clone()),
            Layer::TarFile(t2),
            Layer::TarFile(t3),
        ],
        &["python3"],
    );
    PythonImage { layout }
}

/// The .deb files, downloaded once into the cache (under its lock).
fn python_debs() -> PathBuf {
    let dir = rootfs::cache_dir().join("python-debs");
    std::fs::create_dir_all(&dir).expect("create python deb cache");
    let lock = std::fs::File::create(rootfs::cache_dir().join(".lock-python")).unwrap();
    // SAFETY: flock on an fd we own; released when `lock` closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let missing: Vec<&str> = LAYER2_DEBS
        .iter()
        .chain(LAYER3_DEBS)
        .copied()
        .filter(|p| find_deb(&dir, p).is_none())
        .collect();
    if !missing.is_empty() {
        let download = || {
            run_ok(
                Command::new("apt-get")
                    .arg("download")
                    .args(&missing)
                    .current_dir(&dir),
                Duration::from_secs(600),
            )
        };
        if download().is_err() {
            // No package lists yet on a fresh machine.
            run_ok(
                Command::new("apt-get").args(["update", "-q"]),
                Duration::from_secs(600),
            )
            .unwrap_or_else(|e| panic!("apt-get update: {e}"));
            download().unwrap_or_else(|e| panic!("apt-get download {missing:?}: {e}"));
        }
    }
    drop(lock);
    dir
}

fn find_deb(dir: &Path, pkg: &str) -> Option<PathBuf> {
    let prefix = format!("{pkg}_");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    v.sort();
    v.pop()
}

fn extract(debs: &Path, pkgs: &[&str], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for p in pkgs {
        let deb = find_deb(debs, p).unwrap_or_else(|| panic!("{p}.deb missing in the cache"));
        run_ok(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("dpkg-deb -x {}: {e}", deb.display()));
    }
    for d in ["bin", "sbin", "lib", "lib64"] {
        let top = dest.join(d);
        if top.is_dir() && !top.is_symlink() {
            let usr = dest.join("usr").join(d);
            std::fs::create_dir_all(&usr).unwrap();
            run_ok(
                Command::new("cp").arg("-a").arg(top.join(".")).arg(&usr),
                Duration::from_secs(60),
            )
            .unwrap();
            std::fs::remove_dir_all(&top).unwrap();
        }
    }
}

fn tar_dir(dir: &Path, out: &Path) -> PathBuf {
    run_ok(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--sort=name",
                "--mtime=@1700000000",
                "-C",
            ])
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("tar of {}: {e}", dir.display()));
    out.to_owned()
}
