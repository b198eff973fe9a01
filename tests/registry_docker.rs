//! The registry client against the real `docker-registry` (Debian's
//! packaging of distribution 2.8) on 127.0.0.1: push a blob and an OCI
//! manifest through the registry's own push API, then `resolve` and `fetch`
//! ranges (multi and single) and compare bytes.
//!
//! How this registry answers multi-range requests: with filesystem storage it
//! serves blobs through Go's `http.ServeContent`, which answers
//! `Range: bytes=a-b,c-d` with `206 multipart/byteranges` (random boundary,
//! each part with `Content-Type` and `Content-Range`). If the requested
//! ranges add up to more than the blob, Go ignores them and answers 200 with
//! the whole blob; the client never sends such requests because it merges
//! overlapping ranges first. A range past the end answers 416. Both behaviours
//! are asserted below.
//!
//! Fails when `docker-registry` is not installed;
//! `scripts/deps.sh` installs it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rstargz::fs::registry::{
    RangeFetcher, Reference, RegistryClient, RegistryConfig, RegistryError, ensure_crypto_provider,
};
use sha2::{Digest, Sha256};

const BIN: &str = "/usr/bin/docker-registry";
const REPO: &str = "test/estargz";

struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p != 5000 {
            return p;
        }
    }
}

async fn start_registry() -> Option<Registry> {
    assert!(
        Path::new(BIN).exists(),
        "{BIN} is not installed (scripts/deps.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yml");
    let storage = dir.path().join("storage");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: {addr}\n  secret: rstargz-test\n",
            storage.display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .arg(&config)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start docker-registry");
    let reg = Registry {
        child,
        addr: addr.clone(),
        _dir: dir,
    };
    ensure_crypto_provider();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/v2/")).send().await
            && r.status().is_success()
        {
            return Some(reg);
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not come up on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Monolithic upload: POST an upload session, then PUT ?digest= with the body.
async fn push_blob(http: &reqwest::Client, addr: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = http
        .post(format!("http://{addr}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "upload start");
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let mut url = reqwest::Url::parse(&format!("http://{addr}/"))
        .unwrap()
        .join(&loc)
        .unwrap();
    url.query_pairs_mut().append_pair("digest", &d);
    let r = http
        .put(url)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "upload finish");
    d
}

#[tokio::test]
async fn real_registry_resolve_and_ranges() {
    let Some(reg) = start_registry().await else {
        return;
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let layer: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let layer_digest = push_blob(&http, &reg.addr, &layer).await;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(&http, &reg.addr, config).await;
    let toc = "sha256:5555555555555555555555555555555555555555555555555555555555555555";
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{},"annotations":{{"containerd.io/snapshot/stargz/toc.digest":"{toc}"}}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = http
        .put(format!("http://{}/v2/{REPO}/manifests/v1", reg.addr))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        201,
        "manifest put: {:?}",
        r.text().await
    );

    // Observe the registry's raw multi-range behaviour (documented above).
    let url = format!("http://{}/v2/{REPO}/blobs/{layer_digest}", reg.addr);
    let r = http
        .get(&url)
        .header("Range", "bytes=0-9,100-109")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let r = http
        .get(&url)
        .header("Range", "bytes=0-299999,0-10")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "ranges adding up past the size: whole body"
    );
    let r = http
        .get(&url)
        .header("Range", "bytes=300000-300001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 416);

    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        certs_d: None,
        docker_config: Some(dir.path().to_owned()),
        ..RegistryConfig::default()
    };
    let client = RegistryClient::new(cfg.clone()).unwrap();
    let reference = Reference::parse(&format!("{}/{REPO}:v1", reg.addr)).unwrap();
    let resolved = client.resolve(&reference).await.unwrap();
    assert_eq!(resolved.digest, digest(manifest.as_bytes()));
    assert_eq!(resolved.layers()[0].digest, layer_digest);
    assert_eq!(resolved.layers()[0].toc_digest(), Some(toc));
    let by_digest = Reference::parse(&format!("{}/{REPO}@{}", reg.addr, resolved.digest)).unwrap();
    assert_eq!(
        client.resolve(&by_digest).await.unwrap().manifest,
        resolved.manifest
    );

    let ranges = [
        0..10u64,
        1000..5000,
        4000..6000,
        299_990..300_000,
        150_000..150_001,
    ];
    let check = |got: Vec<bytes::Bytes>| {
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &layer[r.start as usize..r.end as usize], "{r:?}");
        }
    };
    let before = client.stats().requests;
    let blob = client.blob(&reference, &layer_digest).unwrap();
    assert_eq!(blob.size().await.unwrap(), layer.len() as u64);
    check(blob.fetch(&ranges).await.unwrap());
    assert_eq!(
        client.stats().requests - before,
        3,
        "HEAD, location probe, then all four spans in one multi-range GET"
    );
    assert!(
        client.multi_range_supported(&reg.addr),
        "distribution with filesystem storage answers multipart/byteranges"
    );

    // Single ranges only.
    let single = RegistryClient::new(RegistryConfig {
        multi_range: false,
        ..cfg
    })
    .unwrap();
    let blob = single.blob(&reference, &layer_digest).unwrap();
    check(blob.fetch(&ranges).await.unwrap());
    let past_end = std::slice::from_ref(&(299_999..300_001));
    let err = blob.fetch(past_end).await.unwrap_err();
    assert!(matches!(err, RegistryError::BadRange(_)), "{err:?}");

    let missing = single
        .blob(&reference, &digest(b"not pushed"))
        .unwrap()
        .size()
        .await
        .unwrap_err();
    assert!(matches!(missing, RegistryError::NotFound(_)), "{missing:?}");
}
