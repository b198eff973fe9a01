//! A real Debian root filesystem, made by `debootstrap` once and cached as a
//! tarball under `/var/cache/rstargz-test/` (or `$RSTARGZ_TEST_CACHE`).
//!
//! The mirror is the one apt is configured with, read at run time; no host
//! name is written in the project. The cache is built in a temp dir beside
//! it and renamed into place, under an exclusive lock, so parallel tests
//! build it once and a crash never leaves half a cache.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::run_ok;

pub const SUITE: &str = "bookworm";
pub const VARIANT: &str = "minbase";

/// The cached rootfs tarball (uncompressed tar, paths `./...`).
pub struct RootfsTar {
    pub path: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("RSTARGZ_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/rstargz-test"))
}

/// The Debian `bookworm`/`minbase` rootfs, building it on first use.
pub fn debian_rootfs() -> RootfsTar {
    cached(&format!("debian-{SUITE}-{VARIANT}-amd64.tar"), &[])
}

/// The Debian `bookworm`/`minbase` rootfs plus `include` (packages passed
/// to `debootstrap --include`), cached as
/// `debian-bookworm-minbase-<name>-amd64.tar`. Used by the start-up
/// benchmark's images; `name` must be a file-name-safe word.
pub fn debian_rootfs_with(name: &str, include: &[&str]) -> RootfsTar {
    cached(
        &format!("debian-{SUITE}-{VARIANT}-{name}-amd64.tar"),
        include,
    )
}

/// The cached tarball `file`, built with `include` under the cache lock if
/// it is missing.
fn cached(file: &str, include: &[&str]) -> RootfsTar {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(file);
    let lock = std::fs::File::create(dir.join(".lock")).expect("create cache lock");
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "flock {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    if !path.exists() {
        build_with(&dir, &path, include);
    }
    drop(lock);
    RootfsTar { path }
}

fn build_with(dir: &Path, dest: &Path, include: &[&str]) {
    let mirror = apt_mirror(SUITE).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(dir)
        .expect("temp dir in cache");
    let rootfs = tmp.path().join("rootfs");
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).expect("create deb cache");
    let start = Instant::now();
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--variant={VARIANT}"))
        .arg(format!("--cache-dir={}", debs.display()));
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    let r = run_ok(
        cmd.arg(SUITE).arg(&rootfs).arg(&mirror),
        Duration::from_secs(1800),
    );
    if let Err(e) = r {
        // debootstrap may leave /proc or /sys mounted in the target on failure.
        super::proc::unmount_all_under(&rootfs);
        panic!("debootstrap failed: {e}");
    }
    eprintln!("debootstrap {SUITE}/{VARIANT}: {:?}", start.elapsed());
    super::proc::unmount_all_under(&rootfs);
    let tar = tmp.path().join("rootfs.tar");
    // Device nodes and the apt lists are left out: images ship neither.
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "--sort=name", "-C"])
            .arg(&rootfs)
            .args([
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "--exclude=./var/lib/apt/lists/*",
                "--exclude=./var/cache/apt/archives/*.deb",
                "-cf",
            ])
            .arg(&tar)
            .arg("."),
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("tar of the rootfs failed: {e}"));
    std::fs::rename(&tar, dest).expect("rename rootfs tar into the cache");
}

/// The URI of an apt source that serves the `debian` archive for `suite`,
/// from `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*.{list,sources}`
/// (one-line and deb822 formats). `$RSTARGZ_DEBIAN_MIRROR` overrides it.
pub fn apt_mirror(suite: &str) -> Result<String, String> {
    if let Some(m) = std::env::var_os("RSTARGZ_DEBIAN_MIRROR") {
        return Ok(m.to_string_lossy().into_owned());
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        files.extend(v);
    }
    let mut candidates = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => candidates.extend(parse_deb822(&text, suite)),
            _ if f.file_name().and_then(|n| n.to_str()) == Some("sources.list")
                || f.extension().and_then(|e| e.to_str()) == Some("list") =>
            {
                candidates.extend(parse_one_line(&text, suite))
            }
            _ => {}
        }
    }
    candidates.retain(|u| u.starts_with("http://") || u.starts_with("https://"));
    // Prefer the main archive (`.../debian`) over security or ports archives.
    candidates
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .or(candidates.first())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no http(s) apt source with suite {suite} found in /etc/apt/sources.list(.d); \
                 set RSTARGZ_DEBIAN_MIRROR"
            )
        })
}

fn parse_one_line(text: &str, suite: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = match line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        {
            Some(r) => r.trim_start(),
            None => continue,
        };
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(i) => rest = rest[i + 1..].trim_start(),
                None => continue,
            }
        }
        let mut f = rest.split_whitespace();
        if let (Some(uri), Some(s)) = (f.next(), f.next())
            && s == suite
        {
            out.push(uri.to_string());
        }
    }
    out
}

fn parse_deb822(text: &str, suite: &str) -> Vec<String> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(k) = &last {
                    let v = fields.entry(k.clone()).or_default();
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_string());
                last = Some(k);
            }
        }
        let has = |k: &str, want: &str| {
            fields
                .get(k)
                .is_some_and(|v| v.split_whitespace().any(|x| x == want))
        };
        let enabled = fields.get("enabled").is_none_or(|v| v != "no");
        if enabled && has("types", "deb") && has("suites", suite) {
            out.extend(fields["uris"].split_whitespace().map(String::from));
        }
    }
    out
}

impl RootfsTar {
    /// Contents of the regular file at `path` (absolute, e.g.
    /// `/etc/debian_version`), or `None`.
    pub fn read_file(&self, path: &str) -> Option<Vec<u8>> {
        let want = normalize(path);
        let mut ar = tar::Archive::new(std::fs::File::open(&self.path).ok()?);
        for e in ar.entries().ok()? {
            let mut e = e.ok()?;
            let p = normalize(&e.path().ok()?.to_string_lossy());
            if p == want && e.header().entry_type().is_file() {
                let mut v = Vec::new();
                e.read_to_end(&mut v).ok()?;
                return Some(v);
            }
        }
        None
    }

    /// Every regular file: normalized path (no leading `./` or `/`) ->
    /// `sha256:` of its content. Hard links are not regular-file entries.
    pub fn regular_files(&self) -> BTreeMap<String, String> {
        regular_files_of(std::fs::File::open(&self.path).expect("open rootfs tar"))
    }
}

/// Regular files of a tar stream (see [`RootfsTar::regular_files`]).
pub fn regular_files_of(r: impl Read) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(r);
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        if !e.header().entry_type().is_file() {
            continue;
        }
        let p = normalize(&e.path().expect("entry path").to_string_lossy());
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = e.read(&mut buf).expect("read tar entry");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        out.insert(p, format!("sha256:{}", hex::encode(h.finalize())));
    }
    out
}

/// `./a/b`, `/a/b`, `a/b/` -> `a/b`.
pub fn normalize(p: &str) -> String {
    let p = p.trim_start_matches("./").trim_start_matches('/');
    p.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_source_formats() {
        let one = "# c\ndeb [signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n\
                   deb http://mirror.invalid/debian-security bookworm-security main\n";
        assert_eq!(
            parse_one_line(one, "bookworm"),
            ["http://mirror.invalid/debian"]
        );
        let d = "Types: deb\nURIs: http://apt.invalid/debian\nSuites: bookworm bookworm-updates\n\
                 Components: main\n\nTypes: deb\nURIs: http://apt.invalid/debian-security\n\
                 Suites: bookworm-security\n";
        assert_eq!(parse_deb822(d, "bookworm"), ["http://apt.invalid/debian"]);
    }
}
