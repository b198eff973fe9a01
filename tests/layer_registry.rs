//! The layer reader over the real registry client against a real
//! `docker-registry` (Debian's distribution 2.8) on 127.0.0.1: push an
//! eStargz blob, open it as a layer with the TOC digest, read every file.
//! Fails when `docker-registry` or `curl` is not installed (`scripts/deps.sh`).

mod fixture;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fixture::*;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::reader::{Prefetch, ReaderOptions, TailOutcome, index_from_tail};
use rstargz::fs::cache::{Caches, DiskCache, MemoryCache};
use rstargz::fs::layer::{LayerConfig, LayerContext, PrefetchState, TocCheck, open_layer};
use rstargz::fs::registry::{Reference, RegistryClient, RegistryConfig};

struct Registry {
    child: Child,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_registry(dir: &Path) -> Registry {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_ne!(port, 5000);
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reg = Registry { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return reg;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not start on port {port}");
}

/// Monolithic blob upload: POST an upload session, PUT the bytes.
fn push_blob(port: u16, repo: &str, blob: &[u8], dir: &Path) -> String {
    let digest = Digest::of(blob).to_string();
    let file = dir.join("blob.bin");
    std::fs::write(&file, blob).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{port}/v2/{repo}/blobs/uploads/"))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout);
    let location = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Location in {headers}"));
    let url = if location.starts_with('/') {
        format!("http://127.0.0.1:{port}{location}")
    } else {
        location
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", "Content-Type: application/octet-stream"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{url}{sep}digest={digest}"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "201", "blob upload");
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_over_a_real_registry() {
    assert!(
        have("docker-registry") && have("curl"),
        "docker-registry and curl are required (scripts/deps.sh installs them)"
    );
    let dir = tempfile::tempdir().unwrap();
    let reg = start_registry(dir.path());

    let hot = pattern(30_000, 3);
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("dir/f{i:02}"), pattern(5_000 + i * 777, i as u8)))
        .collect();
    let mut specs = vec![
        Spec::Dir("dir/"),
        Spec::File("hot", &hot, 8 << 10, false),
        Spec::File(".prefetch.landmark", &[0x0f], 0, false),
    ];
    for (name, data) in &files {
        specs.push(Spec::File(name, data, 4 << 10, false));
    }
    let blob = build(&specs);
    let toc =
        match index_from_tail(&blob, blob.len() as u64, &ReaderOptions::default(), None).unwrap() {
            TailOutcome::Ready(i) => {
                assert!(matches!(i.prefetch(), Prefetch::UpTo(_)));
                i.toc_digest.unwrap()
            }
            TailOutcome::NeedMember(_) => unreachable!(),
        };
    let digest = push_blob(reg.port, "test/layer", &blob, dir.path());

    let client = RegistryClient::new(RegistryConfig::default()).unwrap();
    let reference = Reference::parse(&format!("127.0.0.1:{}/test/layer:latest", reg.port)).unwrap();
    let fetcher = client.blob(&reference, &digest).unwrap();
    let caches = Caches {
        memory: Arc::new(MemoryCache::new(16 << 20)),
        disk: Some(Arc::new(
            DiskCache::open(&dir.path().join("cache"), 64 << 20).unwrap(),
        )),
    };
    let cfg = LayerConfig {
        background_pause_ms: 0,
        ..LayerConfig::default()
    };
    // A footer-only tail read, so that chunks come through range requests.
    let mut ctx = LayerContext::new(cfg, caches);
    ctx.reader.tail_size = 0;
    let layer = Arc::new(
        open_layer(fetcher, TocCheck::Digest(toc), ctx)
            .await
            .unwrap(),
    );
    assert!(layer.is_verified());
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(10)).await,
        PrefetchState::Done
    );
    let id = layer.index().lookup("hot").unwrap();
    assert_eq!(&layer.read_at(id, 0, 1 << 20).await.unwrap()[..], &hot[..]);
    for (name, data) in &files {
        let id = layer.index().lookup(name).unwrap();
        let got = layer.read_at(id, 100, 1 << 20).await.unwrap();
        assert_eq!(&got[..], &data[100..], "{name}");
    }
    for _ in 0..500 {
        if layer.background_done() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = layer.stats();
    eprintln!("real registry: {s:?}");
    assert!(layer.background_done());
    assert_eq!(s.verification_failures, 0);
    assert_eq!(s.blob_size, blob.len() as u64);
    assert!(s.bytes_fetched <= blob.len() as u64 * 2);
    assert!(s.chunks_prefetched > 0);
    assert!(s.chunks_background + s.chunks_from_network + s.chunks_read_ahead > 0);
    assert_eq!(s.fetch_errors, 0);

    // Default tail: this small blob arrives whole with the footer read.
    let fetcher = client.blob(&reference, &digest).unwrap();
    let small = open_layer(
        fetcher,
        TocCheck::Digest(toc),
        LayerContext::new(LayerConfig::default(), Caches::memory_only(16 << 20)),
    )
    .await
    .unwrap();
    let (name, data) = &files[7];
    let id = small.index().lookup(name).unwrap();
    assert_eq!(&small.read_at(id, 0, 1 << 20).await.unwrap()[..], &data[..]);
    assert_eq!(small.stats().fetches, 1);

    // A wrong TOC digest is refused by the same path.
    let fetcher = client.blob(&reference, &digest).unwrap();
    let bad = open_layer(
        fetcher,
        TocCheck::Digest(Digest::of(b"x")),
        LayerContext::new(LayerConfig::default(), Caches::memory_only(1 << 20)),
    )
    .await;
    assert!(bad.is_err());
}
