//! Hostile remote-snapshot labels on `Prepare`, sent to the real daemon over
//! its socket, as containerd would pass them: garbage or traversing image
//! references, malformed digests, oversized layer lists. Each must fall back
//! to an ordinary snapshot quickly, with the reason listed by `rstargz
//! status`; none may crash the daemon or be mounted remotely. Labels over
//! containerd's size limit are refused outright.

mod support;

use std::time::{Duration, Instant};

use rstargz::proto::snapshots::PrepareSnapshotRequest;
use support::daemon::Daemon;

const REF: &str = "containerd.io/snapshot.ref";
const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const DIGEST: &str = "sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b";

fn labels(pairs: &[(&str, String)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_labels_fall_back_or_are_refused() {
    support::require_prerequisites();
    // Nothing listens on this port: a well-formed reference to it fails at
    // once (connection refused), on loopback.
    let dead = format!("127.0.0.1:{}", support::free_port());
    let daemon = Daemon::start_with_config(Some("[registry]\nmax_attempts = 1\n"));
    let mut client = rstargz::snapshotter::client::connect(&daemon.address)
        .await
        .expect("connect");
    let good_ref = format!("{dead}/hostile/img:1");
    let many_layers = (0..50)
        .map(|i| format!("sha256:{i:064x}"))
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "garbage image ref",
            vec![(IMAGE_REF, "not a reference!".into())],
        ),
        (
            "traversing image ref",
            vec![(IMAGE_REF, format!("{dead}/../../etc/passwd:x"))],
        ),
        (
            "image ref of 3000 bytes",
            vec![(IMAGE_REF, format!("{dead}/{}:1", "a".repeat(3000)))],
        ),
        (
            "malformed layer digest",
            vec![(LAYER_DIGEST, "sha256:../../x".into())],
        ),
        ("malformed TOC digest", vec![(TOC_DIGEST, "md5:zzz".into())]),
        ("no TOC digest", vec![(TOC_DIGEST, String::new())]),
        (
            "50 bogus neighbour layers",
            vec![(IMAGE_LAYERS, many_layers)],
        ),
        ("unreachable registry", vec![]),
    ];
    for (i, (name, overrides)) in cases.into_iter().enumerate() {
        let mut l = labels(&[
            (REF, format!("target-{i}")),
            (IMAGE_REF, good_ref.clone()),
            (LAYER_DIGEST, DIGEST.into()),
            (TOC_DIGEST, DIGEST.into()),
        ]);
        for (k, v) in overrides {
            l.insert(k.to_string(), v);
        }
        let t = Instant::now();
        let r = client
            .prepare(PrepareSnapshotRequest {
                snapshotter: String::new(),
                key: format!("key-{i}"),
                parent: String::new(),
                labels: l,
            })
            .await;
        let took = t.elapsed();
        eprintln!("{name}: {:?} in {took:?}", r.as_ref().map(|_| "mounts"));
        let mounts = r
            .unwrap_or_else(|e| panic!("{name}: Prepare failed: {e}"))
            .into_inner()
            .mounts;
        assert!(!mounts.is_empty(), "{name}: no mounts for the fallback");
        assert!(
            mounts.iter().all(|m| m.r#type != "fuse.rstargz"),
            "{name}: mounted remotely: {mounts:?}"
        );
        assert!(took < Duration::from_secs(20), "{name}: took {took:?}");
        daemon_alive(&daemon);
    }
    let status = daemon.status_json();
    for f in status["fallbacks"].as_array().into_iter().flatten() {
        eprintln!("fallback: {}", f["reason"]);
    }
    let reasons = status["fallbacks"].to_string();
    assert!(
        !reasons.contains("/etc/passwd/blobs"),
        "a traversing reference reached a URL: {reasons}"
    );
    assert!(
        reasons.contains("invalid repository name"),
        "traversing or oversized repositories not refused by name: {reasons}"
    );
    let fallbacks = status["fallbacks_total"].as_u64().unwrap_or(0);
    assert!(fallbacks >= 7, "fallbacks recorded: {status:#}");
    assert_eq!(status["layers"].as_array().map(Vec::len), Some(0));

    // Over containerd's limit (key + value > 4096 bytes): refused.
    let r = client
        .prepare(PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: "too-big".into(),
            parent: String::new(),
            labels: labels(&[
                (REF, "target-big".into()),
                (IMAGE_REF, format!("{dead}/{}:1", "a".repeat(5000))),
            ]),
        })
        .await;
    let code = r.expect_err("a label over the limit was accepted").code();
    assert_eq!(code, tonic::Code::InvalidArgument);
    daemon_alive(&daemon);
}

fn daemon_alive(d: &Daemon) {
    assert!(
        std::path::Path::new(&format!("/proc/{}", d.pid())).exists(),
        "the daemon died; log:\n{}",
        d.log_tail()
    );
}
