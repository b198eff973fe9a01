//! Behaviour tests of the registry client against the scripted fake server
//! (`fake.rs`), all on 127.0.0.1.

// A one-range request list is what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use super::fake::{Body, FakeServer, Multi, Req, Resp, range_response};
use super::*;

const BLOB_LEN: usize = 10_000;

fn blob_data() -> Arc<Vec<u8>> {
    Arc::new((0..BLOB_LEN).map(|i| (i * 31 % 251) as u8).collect())
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A config that never reads /etc or ~/.docker, with fast backoff.
fn test_config(docker_dir: &tempfile::TempDir) -> RegistryConfig {
    RegistryConfig {
        certs_d: None,
        docker_config: Some(docker_dir.path().to_owned()),
        backoff_base_ms: 1,
        backoff_max_ms: 20,
        request_timeout_ms: 5_000,
        connect_timeout_ms: 2_000,
        ..RegistryConfig::default()
    }
}

fn reference(s: &FakeServer) -> Reference {
    Reference::parse(&format!("{}/test/repo:latest", s.host())).unwrap()
}

fn is_data_get(r: &Req) -> bool {
    r.method == "GET"
        && r.path.contains("/blobs/")
        && r.header("range").is_some_and(|v| v != "bytes=0-0")
        || r.method == "GET"
            && r.path.starts_with("/storage")
            && r.header("range").is_some_and(|v| v != "bytes=0-0")
}

fn is_multi(r: &Req) -> bool {
    r.header("range").is_some_and(|v| v.contains(','))
}

fn is_single_data(r: &Req) -> bool {
    is_data_get(r) && !is_multi(r)
}

async fn fetch_and_check(blob: &Blob, data: &[u8], ranges: &[Range<u64>]) {
    let got = RangeFetcher::fetch(blob, ranges).await.unwrap();
    assert_eq!(got.len(), ranges.len());
    for (r, b) in ranges.iter().zip(&got) {
        assert_eq!(
            &b[..],
            &data[r.start as usize..r.end as usize],
            "range {r:?}"
        );
    }
}

async fn registry_with(multi: Multi) -> (FakeServer, Arc<Vec<u8>>) {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| move |r: &Req| range_response(&d, r, multi)).await;
    (s, data)
}

const RANGES: [Range<u64>; 5] = [10..20, 100..150, 20..30, 5000..5001, 7..7];

#[tokio::test]
async fn multi_range_supported_uses_one_request() {
    let (s, data) = registry_with(Multi::Multipart).await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    assert_eq!(RangeFetcher::size(&b).await.unwrap(), BLOB_LEN as u64);
    fetch_and_check(&b, &data, &RANGES).await;
    assert_eq!(
        s.count(is_multi),
        1,
        "10..30 merged, three spans in one request"
    );
    assert_eq!(s.count(is_single_data), 0);
    let multi = s.requests().into_iter().find(is_multi).unwrap();
    assert_eq!(multi.header("range"), Some("bytes=10-29,100-149,5000-5000"));
}

/// The first range read of a blob is its own location probe: on a
/// registry that serves blobs directly, one request, no `bytes=0-0` first.
#[tokio::test]
async fn first_range_read_needs_no_separate_location_probe() {
    let (s, data) = registry_with(Multi::Multipart).await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c
        .blob_with_size(&reference(&s), &digest_of(&data), BLOB_LEN as u64)
        .unwrap();
    fetch_and_check(&b, &data, &[100..200]).await;
    let gets: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(gets.len(), 1, "{gets:#?}");
    assert_eq!(gets[0].header("range"), Some("bytes=100-199"));
    // The location is now known: the next read is one request too.
    fetch_and_check(&b, &data, &[300..400]).await;
    assert_eq!(s.count(|r| r.method == "GET"), 2);
}

#[tokio::test]
async fn multi_range_rejections_fall_back_and_are_remembered() {
    for mode in [Multi::Reject400, Multi::Reject416, Multi::Whole] {
        let (s, data) = registry_with(mode).await;
        let dir = tempfile::tempdir().unwrap();
        let c = RegistryClient::new(test_config(&dir)).unwrap();
        let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
        fetch_and_check(&b, &data, &RANGES).await;
        let singles_first = s.count(is_single_data);
        if mode == Multi::Whole {
            assert_eq!(singles_first, 0, "whole body of the right length is used");
        } else {
            assert_eq!(singles_first, 3, "{mode:?}: three spans fetched singly");
        }
        assert!(!c.multi_range_supported(&s.host()), "{mode:?} remembered");
        fetch_and_check(&b, &data, &[1..2, 300..400]).await;
        assert_eq!(
            s.count(is_multi),
            1,
            "{mode:?}: no second multi-range attempt"
        );
        assert_eq!(s.count(is_single_data), singles_first + 2);
    }
}

#[tokio::test]
async fn whole_body_of_wrong_length_is_never_returned() {
    let data = blob_data();
    let d = data.clone();
    // HEAD tells the true size; GETs ignore Range and send a longer body.
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.method == "HEAD" {
                return Resp::new(200).body(d.to_vec());
            }
            let mut longer = d.to_vec();
            longer.extend_from_slice(b"extra");
            Resp::new(200).body(longer)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_attempts: 2,
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let err = b.fetch_ranges(&[0..10, 50..60]).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::ProtocolViolation(_)),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

/// A server answering the first `bad` single-range GETs with a Content-Range
/// shifted by one byte (and the matching shifted bytes).
async fn shifting_server(bad: usize) -> (FakeServer, Arc<Vec<u8>>) {
    let data = blob_data();
    let d = data.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            let rh = r.header("range").unwrap_or("");
            if r.method == "GET"
                && rh != "bytes=0-0"
                && !rh.is_empty()
                && n.fetch_add(1, Ordering::SeqCst) < bad
            {
                let rg = super::fake::parse_range_header(rh)[0].clone();
                let (a, z) = (rg.start + 1, rg.end + 1);
                return Resp::new(206)
                    .header(
                        "Content-Range",
                        format!("bytes {}-{}/{}", a, z - 1, d.len()),
                    )
                    .body(d[a..z].to_vec());
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    (s, data)
}

#[tokio::test]
async fn wrong_content_range_is_retried_then_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, data) = shifting_server(1).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[100..200]).await;
    assert_eq!(s.count(is_data_get), 2, "one lie, one retry");

    let (s, data) = shifting_server(usize::MAX).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let err = b.fetch_ranges(&[100..200]).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::ProtocolViolation(_)),
        "{err:?}"
    );
    assert_eq!(s.count(is_data_get), 5, "max_attempts");
}

#[tokio::test]
async fn truncated_body_is_retried() {
    let data = blob_data();
    let d = data.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            let mut resp = range_response(&d, r, Multi::Multipart);
            if is_data_get(r)
                && n.fetch_add(1, Ordering::SeqCst) == 0
                && let Body::Full(full) = &resp.body
            {
                let half = full[..full.len() / 2].to_vec();
                resp.body = Body::Truncated {
                    declared: full.len(),
                    data: half,
                };
            }
            resp
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[1000..3000]).await;
    assert_eq!(s.count(is_data_get), 2);
}

/// Answers the first `fails` data GETs with `resp`, then correctly.
async fn failing_server(fails: usize, resp: Resp) -> (FakeServer, Arc<Vec<u8>>) {
    let data = blob_data();
    let d = data.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if is_data_get(r) && n.fetch_add(1, Ordering::SeqCst) < fails {
                return resp.clone();
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    (s, data)
}

#[tokio::test]
async fn server_errors_are_retried_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let (s, data) = failing_server(3, Resp::new(503)).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..10]).await;
    assert_eq!(s.count(is_data_get), 4);
    let st = c.stats();
    assert_eq!(st.retries, 3);
    assert_eq!(st.requests, s.count(|_| true) as u64);
    assert_eq!(
        st.bytes_received, 10,
        "503 bodies are empty; one 10-byte range"
    );

    let (s, data) = failing_server(usize::MAX, Resp::new(502)).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    assert_eq!(
        b.fetch_ranges(&[0..10]).await.unwrap_err(),
        RegistryError::ServerError(502)
    );
    assert_eq!(s.count(is_data_get), 5);

    let (s, data) = failing_server(usize::MAX, Resp::new(404)).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let err = b.fetch_ranges(&[0..10]).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    assert_eq!(s.count(is_data_get), 1, "404 is not retried");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let (s, data) = failing_server(1, Resp::new(429).header("Retry-After", "1")).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    b.blob_size().await.unwrap();
    let t = Instant::now();
    fetch_and_check(&b, &data, &[0..10]).await;
    let e = t.elapsed();
    assert!(e >= Duration::from_millis(950), "waited only {e:?}");
    assert!(e < Duration::from_secs(4), "waited {e:?}");
}

#[tokio::test]
async fn stalled_body_times_out_in_configured_time() {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            let resp = range_response(&d, r, Multi::Multipart);
            if !is_data_get(r) {
                return resp;
            }
            let Body::Full(full) = resp.body.clone() else {
                unreachable!()
            };
            resp.with_body(Body::Trickle {
                data: full,
                chunk: 1,
                delay: Duration::from_millis(200),
            })
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        request_timeout_ms: 500,
        max_attempts: 1,
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    b.blob_size().await.unwrap();
    let t = Instant::now();
    let err = b.fetch_ranges(&[0..100]).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout(_)), "{err:?}");
    assert_eq!(err.errno(), libc::ETIMEDOUT);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn concurrency_is_bounded_by_the_semaphore() {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            let resp = range_response(&d, r, Multi::Multipart);
            if is_data_get(r) {
                resp.delay(Duration::from_millis(150))
            } else {
                resp
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_concurrent_requests: 2,
        multi_range: false,
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let ranges: Vec<Range<u64>> = (0..6).map(|i| i * 1000..i * 1000 + 10).collect();
    fetch_and_check(&b, &data, &ranges).await;
    assert_eq!(s.count(is_single_data), 6);
    assert_eq!(s.max_inflight(), 2, "six ranges, two at a time");
}

#[tokio::test]
async fn size_falls_back_to_get_when_head_fails() {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.method == "HEAD" {
                Resp::new(405)
            } else {
                range_response(&d, r, Multi::Multipart)
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    assert_eq!(b.blob_size().await.unwrap(), BLOB_LEN as u64);
    assert_eq!(s.count(|r| r.method == "HEAD"), 1, "405 is not retried");
    let err = b.fetch_ranges(&[9_990..10_001]).await.unwrap_err();
    assert!(matches!(err, RegistryError::BadRange(_)), "{err:?}");
}

/// A registry that wants a Bearer token from its own `/token` realm.
/// `check_token` validates the token request and returns the JSON answer.
async fn token_registry(
    check_token: impl Fn(&Req) -> Option<String> + Send + Sync + 'static,
) -> (FakeServer, Arc<Vec<u8>>) {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |addr| {
        move |r: &Req| {
            if r.path.starts_with("/token") {
                return match check_token(r) {
                    Some(json) => Resp::new(200).header("Content-Type", "application/json").body(json),
                    None => Resp::new(401),
                };
            }
            if r.header("authorization") != Some("Bearer tok-1") {
                return Resp::new(401).header(
                    "WWW-Authenticate",
                    format!(r#"Bearer realm="http://{addr}/token",service="fake",scope="repository:test/repo:pull""#),
                );
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    (s, data)
}

fn write_docker_config(dir: &tempfile::TempDir, host: &str, entry: &str) {
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{host}":{entry}}}}}"#),
    )
    .unwrap();
}

#[tokio::test]
async fn bearer_token_flow_with_basic_credentials_and_cache() {
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let (s, data) = token_registry(move |r| {
        (r.header("authorization") == Some(want.as_str()))
            .then(|| r#"{"token":"tok-1","expires_in":300}"#.to_owned())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    write_docker_config(&dir, &s.host(), &format!(r#"{{"auth":"{auth}"}}"#));
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &RANGES).await;
    fetch_and_check(&b, &data, &[0..1]).await;
    let tokens: Vec<Req> = s
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 1, "token cached per (host, scope)");
    assert!(
        tokens[0].path.contains("service=fake"),
        "{}",
        tokens[0].path
    );
    assert!(
        tokens[0]
            .path
            .contains("scope=repository%3Atest%2Frepo%3Apull"),
        "{}",
        tokens[0].path
    );
    let data_gets =
        s.count(|r| is_data_get(r) && r.header("authorization") == Some("Bearer tok-1"));
    assert_eq!(data_gets, s.count(is_data_get));
}

#[tokio::test]
async fn identitytoken_uses_refresh_token_grant() {
    let (s, data) = token_registry(|r| {
        let body = String::from_utf8_lossy(&r.body);
        (r.method == "POST"
            && body.contains("grant_type=refresh_token")
            && body.contains("refresh_token=rt-xyz")
            && body.contains("service=fake"))
        .then(|| r#"{"access_token":"tok-1"}"#.to_owned())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_docker_config(&dir, &s.host(), r#"{"identitytoken":"rt-xyz"}"#);
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[5..50]).await;
    assert_eq!(
        s.count(|r| r.method == "POST" && r.path.starts_with("/token")),
        1
    );
}

#[tokio::test]
async fn anonymous_token_and_failed_auth_is_unauthorized() {
    let (s, data) = token_registry(|r| {
        r.header("authorization")
            .is_none()
            .then(|| r#"{"token":"tok-1"}"#.to_owned())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[5..50]).await;

    let (s, data) = token_registry(|_| None).await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let err = b.blob_size().await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized(_)), "{err:?}");
    assert_eq!(err.errno(), libc::EACCES);
}

#[tokio::test]
async fn redirect_drops_authorization_and_expiry_reresolves_once() {
    let data = blob_data();
    // Object storage: accepts only the current signature; 403 otherwise.
    let valid = Arc::new(AtomicU64::new(1));
    let (d, v) = (data.clone(), valid.clone());
    let storage = FakeServer::start(move |_| {
        move |r: &Req| {
            let sig = format!("sig={}", v.load(Ordering::SeqCst));
            if !r.path.ends_with(&sig) {
                return Resp::new(403).body("Request has expired");
            }
            range_response(&d, r, Multi::Reject400)
        }
    })
    .await;
    // Registry: Bearer-protected; redirects blob GETs to the current URL.
    let storage_base = storage.base();
    let v = valid.clone();
    let registry = FakeServer::start(move |addr| {
        move |r: &Req| {
            if r.path.starts_with("/token") {
                return Resp::new(200).body(r#"{"token":"tok-1"}"#);
            }
            if r.header("authorization") != Some("Bearer tok-1") {
                return Resp::new(401).header(
                    "WWW-Authenticate",
                    format!(r#"Bearer realm="http://{addr}/token""#),
                );
            }
            // HEAD and GET are both redirected (HEAD goes through the
            // follow-redirects path, GET through the cached location).
            let loc = format!(
                "{storage_base}/storage/blob?sig={}",
                v.load(Ordering::SeqCst)
            );
            Resp::new(307).header("Location", loc)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&registry), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..100]).await;
    let resolves = |s: &FakeServer| {
        s.count(|r| {
            r.method == "GET" && r.path.contains("/blobs/") && r.header("authorization").is_some()
        })
    };
    assert_eq!(resolves(&registry), 1);
    assert_eq!(b.re_resolutions(), 0);

    // The presigned URL expires; eight readers hit it at once.
    valid.store(2, Ordering::SeqCst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (b, d) = (b.clone(), data.clone());
        tasks.spawn(async move { fetch_and_check(&b, &d, &[i * 500..i * 500 + 100]).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(b.re_resolutions(), 1, "one shared re-resolution");
    assert_eq!(resolves(&registry), 2);
    assert!(storage.count(|r| r.path.ends_with("sig=2")) >= 8);
    assert_eq!(
        storage.count(|r| r.header("authorization").is_some()),
        0,
        "Authorization must not reach object storage"
    );
    // Storage answered 400 to multi-range: remembered for its host only.
    fetch_and_check(&b, &data, &[0..10, 20..30]).await;
    assert!(!c.multi_range_supported(&storage.host()));
    assert!(c.multi_range_supported(&registry.host()));
}

#[tokio::test]
async fn redirect_that_stays_expired_is_an_error_not_a_loop() {
    let data = blob_data();
    let storage = FakeServer::start(|_| |_: &Req| Resp::new(403)).await;
    let sb = storage.base();
    let d = data.clone();
    let registry = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.method == "HEAD" {
                return Resp::new(200).body(d.to_vec());
            }
            Resp::new(307).header("Location", format!("{sb}/storage/x"))
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&registry), &digest_of(&data)).unwrap();
    let err = b.fetch_ranges(&[0..10]).await.unwrap_err();
    assert!(matches!(err, RegistryError::Forbidden(_)), "{err:?}");
    assert_eq!(b.re_resolutions(), 1);
    assert_eq!(
        storage.count(|_| true),
        2,
        "first try and one after re-resolving"
    );
}

#[tokio::test]
async fn hosts_toml_mirror_is_tried_first_then_server() {
    let (upstream, data) = registry_with(Multi::Multipart).await;
    let mirror = FakeServer::start(|_| |_: &Req| Resp::new(404)).await;
    let certs = tempfile::tempdir().unwrap();
    let hd = certs.path().join(upstream.host());
    std::fs::create_dir_all(&hd).unwrap();
    std::fs::write(
        hd.join("hosts.toml"),
        format!(
            "server = \"{}\"\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.base(),
            mirror.base()
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        certs_d: Some(certs.path().to_owned()),
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let b = c.blob(&reference(&upstream), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[3..4]).await;
    assert_eq!(
        mirror.count(|r| r.method == "HEAD"),
        1,
        "mirror asked first"
    );
    assert_eq!(
        mirror.count(is_data_get),
        0,
        "mirror lacks the blob: not used"
    );
    assert_eq!(upstream.count(is_data_get), 1);
}

#[tokio::test]
async fn resolve_picks_platform_and_verifies_digests() {
    let layer = br#"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":5,"annotations":{"containerd.io/snapshot/stargz/toc.digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222"}}"#;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":2}},"layers":[{}]}}"#,
        manifest::OCI_MANIFEST,
        String::from_utf8_lossy(layer)
    );
    let mdigest = digest_of(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
          {{"mediaType":"{m}","digest":"sha256:4444444444444444444444444444444444444444444444444444444444444444","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
          {{"mediaType":"{m}","digest":"{mdigest}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        manifest::OCI_INDEX,
        manifest.len(),
        m = manifest::OCI_MANIFEST,
    );
    let idigest = digest_of(index.as_bytes());
    let tamper = Arc::new(AtomicUsize::new(0));
    let (m2, i2, md2, t2) = (
        manifest.clone(),
        index.clone(),
        mdigest.clone(),
        tamper.clone(),
    );
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.path.ends_with("/manifests/latest") {
                return Resp::new(200)
                    .header("Content-Type", manifest::OCI_INDEX)
                    .body(i2.clone());
            }
            if r.path.ends_with(&format!("/manifests/{md2}")) {
                let mut body = m2.clone().into_bytes();
                if t2.load(Ordering::SeqCst) == 1 {
                    body.push(b' ');
                }
                return Resp::new(200)
                    .header("Content-Type", manifest::OCI_MANIFEST)
                    .body(body);
            }
            Resp::new(404)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let r = c.resolve(&reference(&s)).await.unwrap();
    assert_eq!(r.digest, mdigest);
    assert_eq!(r.index_digest.as_deref(), Some(idigest.as_str()));
    assert_eq!(
        r.layers()[0].toc_digest(),
        Some("sha256:2222222222222222222222222222222222222222222222222222222222222222")
    );
    let accept = s.requests()[0].header("accept").unwrap_or("").to_owned();
    assert!(accept.contains(manifest::OCI_INDEX) && accept.contains(manifest::DOCKER_MANIFEST));

    tamper.store(1, Ordering::SeqCst);
    let err = c.resolve(&reference(&s)).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::ProtocolViolation(_)),
        "{err:?}"
    );

    let arm = RegistryClient::new(RegistryConfig {
        platform: "linux/s390x".into(),
        ..test_config(&dir)
    })
    .unwrap();
    let err = arm.resolve(&reference(&s)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn coalesced_answer_is_used_and_garbage_multipart_falls_back() {
    // A server that coalesces every multi-range request into one 206 part.
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if let Some(rh) = r.header("range").filter(|v| v.contains(',')) {
                let rs = super::fake::parse_range_header(rh);
                let (a, z) = (rs[0].start, rs[rs.len() - 1].end);
                return Resp::new(206)
                    .header("Content-Range", format!("bytes {a}-{}/{}", z - 1, d.len()))
                    .body(d[a..z].to_vec());
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..10, 40..50]).await;
    assert_eq!(
        s.count(is_single_data),
        0,
        "coalesced part covers both spans"
    );
    assert!(c.multi_range_supported(&s.host()));

    // A server whose multipart bodies are malformed (part shorter than its
    // Content-Range says).
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.header("range").is_some_and(|v| v.contains(',')) {
                return Resp::new(206)
                    .header("Content-Type", "multipart/byteranges; boundary=B")
                    .body("--B\r\nContent-Range: bytes 0-9/10000\r\n\r\nshort\r\n--B--\r\n");
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..10, 40..50]).await;
    assert_eq!(s.count(is_multi), 5, "retried, then given up");
    assert_eq!(s.count(is_single_data), 2);
    assert!(!c.multi_range_supported(&s.host()));
}

#[tokio::test]
async fn refused_connection_is_unreachable_after_bounded_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_attempts: 3,
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let r = Reference::parse(&format!("127.0.0.1:{port}/test/repo:latest")).unwrap();
    let b = c.blob(&r, &digest_of(b"x")).unwrap();
    let t = Instant::now();
    let err = b.blob_size().await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)), "{err:?}");
    assert_eq!(err.reason(), "unreachable");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn known_size_skips_the_size_request_and_is_checked_against_mirrors() {
    let (s, data) = registry_with(Multi::Multipart).await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c
        .blob_with_size(&reference(&s), &digest_of(&data), BLOB_LEN as u64)
        .unwrap();
    fetch_and_check(&b, &data, &[0..10, 20..30]).await;
    assert_eq!(s.count(|r| r.method == "HEAD"), 0);

    // With a mirror that has a different blob size, the server is used.
    let (upstream, data) = registry_with(Multi::Multipart).await;
    let short = Arc::new(data[..100].to_vec());
    let mirror =
        FakeServer::start(move |_| move |r: &Req| range_response(&short, r, Multi::Multipart))
            .await;
    let certs = tempfile::tempdir().unwrap();
    let hd = certs.path().join(upstream.host());
    std::fs::create_dir_all(&hd).unwrap();
    std::fs::write(
        hd.join("hosts.toml"),
        format!(
            "server = \"{}\"\n[host.\"{}\"]\n",
            upstream.base(),
            mirror.base()
        ),
    )
    .unwrap();
    let c = RegistryClient::new(RegistryConfig {
        certs_d: Some(certs.path().to_owned()),
        ..test_config(&dir)
    })
    .unwrap();
    let b = c
        .blob_with_size(&reference(&upstream), &digest_of(&data), BLOB_LEN as u64)
        .unwrap();
    fetch_and_check(&b, &data, &[50..60]).await;
    assert_eq!(mirror.count(is_data_get), 0, "mirror's size disagrees");
    assert_eq!(upstream.count(is_data_get), 1);
}

#[tokio::test]
async fn fetchers_are_usable_as_trait_objects() {
    let (s, data) = registry_with(Multi::Multipart).await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let real: Arc<dyn DynRangeFetcher> =
        Arc::new(c.blob(&reference(&s), &digest_of(&data)).unwrap());
    let fake: Arc<dyn DynRangeFetcher> = Arc::new(MemoryBlob::new(data.to_vec()));
    let ranges = [0..5, 9_000..9_010, 3..3];
    for f in [real, fake] {
        assert_eq!(f.size_dyn().await.unwrap(), BLOB_LEN as u64);
        let got = f.fetch_dyn(&ranges).await.unwrap();
        assert_eq!(&got[1][..], &data[9_000..9_010]);
        assert!(got[2].is_empty());
        let err = f.fetch_dyn(&[9_999..10_001]).await.unwrap_err();
        assert!(matches!(err, RegistryError::BadRange(_)), "{err:?}");
    }
}

#[tokio::test]
async fn rejected_cached_token_is_replaced_and_basic_challenge_uses_credentials() {
    // Tokens are numbered; the registry accepts only the newest one.
    let data = blob_data();
    let d = data.clone();
    let issued = Arc::new(AtomicUsize::new(0));
    let i2 = issued.clone();
    let s = FakeServer::start(move |addr| {
        move |r: &Req| {
            if r.path.starts_with("/token") {
                let n = i2.fetch_add(1, Ordering::SeqCst) + 1;
                return Resp::new(200).body(format!(r#"{{"token":"tok-{n}","expires_in":600}}"#));
            }
            let want = format!("Bearer tok-{}", i2.load(Ordering::SeqCst));
            if r.header("authorization") != Some(want.as_str()) {
                return Resp::new(401).header(
                    "WWW-Authenticate",
                    format!(r#"Bearer realm="http://{addr}/token""#),
                );
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..10]).await;
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    // Revoke: the next token is the only valid one.
    issued.fetch_add(1, Ordering::SeqCst);
    fetch_and_check(&b, &data, &[10..20]).await;
    assert_eq!(
        issued.load(Ordering::SeqCst),
        3,
        "cached token rejected, a new one fetched"
    );

    // Basic challenge.
    let d = data.clone();
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:pw")
    );
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.header("authorization") != Some(want.as_str()) {
                return Resp::new(401).header("WWW-Authenticate", r#"Basic realm="reg""#);
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_docker_config(&dir, &s.host(), r#"{"username":"bob","password":"pw"}"#);
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    fetch_and_check(&b, &data, &[0..10, 30..40]).await;
    let unauth = s.count(|r| r.header("authorization").is_none());
    assert_eq!(unauth, 1, "Basic header cached after the first challenge");
}

/// Size and tail in one suffix-range GET: no `HEAD`, and the answer
/// settles the location and the size for later reads.
#[tokio::test]
async fn tail_and_size_come_from_one_suffix_request() {
    let (s, data) = registry_with(Multi::Multipart).await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let (size, range, tail) = b.fetch_tail(3000).await.unwrap();
    assert_eq!(size, BLOB_LEN as u64);
    assert_eq!(range, BLOB_LEN as u64 - 3000..BLOB_LEN as u64);
    assert_eq!(&tail[..], &data[BLOB_LEN - 3000..]);
    let reqs = s.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].header("range"), Some("bytes=-3000"));
    assert_eq!(b.blob_size().await.unwrap(), BLOB_LEN as u64);
    fetch_and_check(&b, &data, &[10..20]).await;
    assert_eq!(s.count(|r| r.method == "HEAD"), 0);
    assert_eq!(s.requests().len(), 2);
    // A tail longer than the blob is the whole blob.
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let (size, range, tail) = b.fetch_tail(1 << 20).await.unwrap();
    assert_eq!((size, range), (BLOB_LEN as u64, 0..BLOB_LEN as u64));
    assert_eq!(&tail[..], &data[..]);
}

/// A registry that does not understand suffix ranges (here: 416) still
/// gives the tail, through `HEAD` and a plain range read.
#[tokio::test]
async fn tail_falls_back_when_suffix_ranges_are_refused() {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            if r.header("range").is_some_and(|v| v.starts_with("bytes=-")) {
                return Resp::new(416);
            }
            range_response(&d, r, Multi::Multipart)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let c = RegistryClient::new(test_config(&dir)).unwrap();
    let b = c.blob(&reference(&s), &digest_of(&data)).unwrap();
    let (size, range, tail) = b.fetch_tail(3000).await.unwrap();
    assert_eq!((size, range), (BLOB_LEN as u64, 7000..BLOB_LEN as u64));
    assert_eq!(&tail[..], &data[7000..]);
    assert_eq!(s.count(|r| r.method == "HEAD"), 1);
    assert_eq!(s.count(|r| r.header("range") == Some("bytes=7000-9999")), 1);
}

/// A streamed range arrives in several pieces, in order, that add up to
/// the range; a body shorter than the range is an error.
#[tokio::test]
async fn streamed_range_arrives_in_pieces_and_is_length_checked() {
    let data = blob_data();
    let d = data.clone();
    let s = FakeServer::start(move |_| {
        move |r: &Req| {
            let resp = range_response(&d, r, Multi::Multipart);
            if r.header("range") == Some("bytes=1000-8999") {
                let body = d[1000..9000].to_vec();
                return resp.with_body(Body::Trickle {
                    data: body,
                    chunk: 1000,
                    delay: Duration::from_millis(5),
                });
            }
            if r.header("range") == Some("bytes=0-99") {
                return resp.with_body(Body::Truncated {
                    declared: 100,
                    data: d[..50].to_vec(),
                });
            }
            resp
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        max_attempts: 1,
        ..test_config(&dir)
    };
    let c = RegistryClient::new(cfg).unwrap();
    let b = c
        .blob_with_size(&reference(&s), &digest_of(&data), BLOB_LEN as u64)
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let fetch = RangeFetcher::fetch_stream(&b, 1000..9000, tx);
    let collect = async {
        let mut pieces = Vec::new();
        while let Some(p) = rx.recv().await {
            pieces.push(p);
        }
        pieces
    };
    let (r, pieces) = tokio::join!(fetch, collect);
    r.unwrap();
    assert!(pieces.len() > 1, "one piece: not streamed");
    assert_eq!(pieces.concat(), data[1000..9000].to_vec());
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let fetch = RangeFetcher::fetch_stream(&b, 0..100, tx);
    let drain = async { while rx.recv().await.is_some() {} };
    let (r, ()) = tokio::join!(fetch, drain);
    assert!(r.is_err(), "truncated body accepted");
}
