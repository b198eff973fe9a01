//! A full disk under the chunk cache: a 3 MiB tmpfs as the cache directory
//! with a budget far above it. Reads of 16 MiB of files keep working,
//! served uncached once the disk is full; the failed writes are counted;
//! nothing half-written ever sits in the cache under a digest's name; and
//! after a daemon restart on the same cache the files read right again.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image;
use support::registry::Registry;

const FILES: usize = 32;
const FILE_SIZE: usize = 512 * 1024;

/// A tmpfs of `size` mounted on `dir`, lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        support::run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("rstargz-test-cache")
                .arg(dir),
            std::time::Duration::from_secs(30),
        )
        .expect("mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn file(i: usize) -> String {
    image::noise_file("big", i)
}

fn read_all(daemon: &Daemon) {
    let mount = daemon
        .mounts()
        .into_iter()
        .find(|m| m.join("big/f00").exists())
        .unwrap_or_else(|| panic!("no mount holds /big: {:?}", daemon.mounts()));
    for i in 0..FILES {
        let p = mount.join(file(i).trim_start_matches('/'));
        // The FUSE connection survives daemon restarts (hand-over), and with
        // it the kernel's page cache: drop the file's pages so that the read
        // reaches the daemon.
        if let Ok(f) = std::fs::File::open(&p) {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on an fd we own.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let got = std::fs::read(&p)
            .unwrap_or_else(|e| panic!("read {}: {e}; log:\n{}", p.display(), daemon.log_tail()));
        assert!(
            got == image::noise(i as u64, FILE_SIZE),
            "{} has the wrong content",
            p.display()
        );
    }
}

/// Every entry under `<cache>/chunks` holds the bytes its name is the
/// digest of; returns how many there are.
fn check_cache_entries(cache: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![cache.join("chunks")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = support::sha256_digest(&std::fs::read(&p).expect("read entry"));
            let hex = digest.trim_start_matches("sha256:");
            assert!(
                name.ends_with(hex),
                "cache entry {} does not hold what its name says",
                p.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn full_disk_under_the_cache_serves_reads_uncached_and_corrupts_nothing() {
    support::require_prerequisites();
    let cache_dir = support::temp_dir("cache");
    let _tmpfs = Tmpfs::mount(cache_dir.path(), "3m");

    let mut registry = Registry::start();
    let dst = image::push_estargz(
        &mut registry,
        "diskfull",
        image::noise_files_layer("big", FILES, FILE_SIZE),
        &[],
    );

    // The budget (1 GiB) is far above the disk (3 MiB); the memory cache
    // (2 MiB) holds only a few of the files.
    let config = format!(
        "[layer]\n\
         disk_cache_dir = \"{}\"\n\
         disk_cache_bytes = 1073741824\n\
         memory_cache_bytes = 2097152\n\
         background_fetch = false\n\
         prefetch = false\n\
         read_ahead_bytes = 0\n",
        cache_dir.path().display()
    );
    let mut daemon = Daemon::start_with_config(Some(&config));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    ctrd.rpull_stargz(&dst);

    read_all(&daemon);
    let cache = &daemon.status_json()["cache"];
    eprintln!("cache after the first pass: {cache:#}");
    let failed = cache["disk_write_errors"].as_u64().unwrap()
        + cache["disk_writes_skipped"].as_u64().unwrap();
    assert!(failed > 0, "the disk never filled up: {cache:#}");
    assert!(
        cache["disk_writes"].as_u64().unwrap() > 0,
        "nothing was cached before the disk filled up: {cache:#}"
    );
    let entries = check_cache_entries(cache_dir.path());
    eprintln!("{entries} whole, verified entries on the full disk");
    assert!(entries > 0);
    daemon.assert_alive();

    // Same cache after a restart: what is there is reused, the rest fetched.
    daemon.restart(false);
    read_all(&daemon);
    let cache = &daemon.status_json()["cache"];
    eprintln!("cache after the restart: {cache:#}");
    assert!(
        cache["disk_hits"].as_u64().unwrap() > 0,
        "the cache on the full disk was not reused: {cache:#}"
    );
    assert_eq!(cache["disk_corrupt"].as_u64(), Some(0), "{cache:#}");
    check_cache_entries(cache_dir.path());

    // A container reads the files as well (once containerd has reconnected
    // to the restarted daemon).
    ctrd.wait_snapshotter("stargz", std::time::Duration::from_secs(60));
    let out = ctrd.run(
        &["--rm"],
        "stargz",
        &dst,
        "diskfull-cat",
        &["cat", &file(FILES - 1)],
    );
    assert!(out.stdout_bytes == image::noise((FILES - 1) as u64, FILE_SIZE));
    drop(ctrd);
    drop(daemon);
}
