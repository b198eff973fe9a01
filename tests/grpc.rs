//! Drives the real `rstargz-grpc` binary over its unix socket with the
//! generated tonic client, and mounts what it returns (needs root).

mod common;

use std::collections::HashMap;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use rstargz::proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use rstargz::proto::types::Mount;
use tonic::Code;

fn mount_all(mounts: &[Mount], target: &Path) {
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    if m.r#type == "bind" {
        mount(
            Some(m.source.as_str()),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        if m.options.iter().any(|o| o == "ro") {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .unwrap();
        }
    } else {
        assert_eq!(m.r#type, "overlay");
        mount(
            Some(m.source.as_str()),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(m.options.join(",").as_str()),
        )
        .unwrap();
    }
}

fn unmount(target: &Path) {
    umount2(target, MntFlags::empty()).unwrap();
}

fn prep(key: &str, parent: &str, labels: &[(&str, &str)]) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn commit(name: &str, key: &str) -> CommitSnapshotRequest {
    CommitSnapshotRequest {
        snapshotter: String::new(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_contents_usage_and_status_codes() {
    let dir = common::workdir();
    let mut daemon = common::Daemon::start(dir.path());
    let mut c = daemon.client().await;
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();

    // Base layer: a rw bind of an empty directory.
    let m = c
        .prepare(prep("base-key", "", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
    mount_all(&m, &target);
    std::fs::write(target.join("from-parent"), b"parent data").unwrap();
    unmount(&target);
    c.commit(commit("base", "base-key")).await.unwrap();
    let u = c
        .usage(UsageRequest {
            snapshotter: String::new(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.size > 0 && u.inodes == 2, "{u:?}");

    // Child: overlay; the parent's file is visible, writes land upstairs.
    let m = c
        .prepare(prep("child", "base", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap()
        .to_string();
    let u0 = c
        .usage(UsageRequest {
            snapshotter: String::new(),
            key: "child".into(),
        })
        .await
        .unwrap()
        .into_inner();
    mount_all(&m, &target);
    assert_eq!(
        std::fs::read(target.join("from-parent")).unwrap(),
        b"parent data"
    );
    std::fs::write(target.join("new-file"), vec![1u8; 200_000]).unwrap();
    unmount(&target);
    assert!(
        Path::new(&upper).join("new-file").exists(),
        "write in upper dir"
    );
    let u1 = c
        .usage(UsageRequest {
            snapshotter: String::new(),
            key: "child".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u1.size >= u0.size + 200_000, "{u0:?} -> {u1:?}");
    assert_eq!(u1.inodes, u0.inodes + 1);

    // Mounts repeats Prepare's answer.
    let again = c
        .mounts(MountsRequest {
            snapshotter: String::new(),
            key: "child".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);

    // A view of one parent: a read-only bind.
    let v = c
        .view(ViewSnapshotRequest {
            snapshotter: String::new(),
            key: "view".into(),
            parent: "base".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(v[0].r#type, "bind");
    assert_eq!(v[0].options, vec!["ro", "rbind"]);
    mount_all(&v, &target);
    assert!(target.join("from-parent").exists());
    assert!(
        std::fs::write(target.join("nope"), b"x").is_err(),
        "view is read-only"
    );
    unmount(&target);

    // Status codes.
    let code = |r: Result<tonic::Response<_>, tonic::Status>| -> Code {
        let _: &Result<tonic::Response<()>, _> = &r;
        r.unwrap_err().code()
    };
    let pcode = |r: Result<tonic::Response<_>, tonic::Status>| -> Code {
        let _: &Result<tonic::Response<rstargz::proto::snapshots::PrepareSnapshotResponse>, _> = &r;
        r.unwrap_err().code()
    };
    assert_eq!(
        pcode(c.prepare(prep("child", "", &[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        pcode(c.prepare(prep("base", "", &[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        pcode(c.prepare(prep("x", "missing", &[])).await),
        Code::NotFound
    );
    assert_eq!(
        pcode(c.prepare(prep("x", "child", &[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        pcode(c.prepare(prep("", "", &[])).await),
        Code::InvalidArgument
    );
    let big = "v".repeat(5000);
    assert_eq!(
        pcode(c.prepare(prep("x", "", &[("k", &big)])).await),
        Code::InvalidArgument
    );
    let rm = |k: &str| RemoveSnapshotRequest {
        snapshotter: String::new(),
        key: k.into(),
    };
    assert_eq!(code(c.remove(rm("base")).await), Code::FailedPrecondition);
    assert_eq!(code(c.remove(rm("missing")).await), Code::NotFound);
    assert_eq!(
        code(c.commit(commit("c2", "view")).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.commit(commit("c2", "missing")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.commit(commit("view", "child")).await),
        Code::AlreadyExists
    );
    let st = |k: &str| StatSnapshotRequest {
        snapshotter: String::new(),
        key: k.into(),
    };
    assert_eq!(
        c.stat(st("missing")).await.unwrap_err().code(),
        Code::NotFound
    );
    let err = c
        .mounts(MountsRequest {
            snapshotter: String::new(),
            key: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .list(ListSnapshotsRequest {
            snapshotter: String::new(),
            filters: vec!["name=".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Update with field paths.
    let upd = |labels: &[(&str, &str)], paths: &[&str]| UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(Info {
            name: "base".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let i = c
        .update(upd(&[("a", "1"), ("b", "2")], &[]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels.len(), 2);
    let i = c
        .update(upd(&[("c", "3")], &["labels.c", "labels.a"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    let mut keys: Vec<_> = i.labels.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["b", "c"]);
    assert_eq!(
        c.update(upd(&[], &["parent"])).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let s = c.stat(st("base")).await.unwrap().into_inner().info.unwrap();
    assert_eq!(s.kind, Kind::Committed as i32);
    assert_eq!(s.labels.get("c").map(String::as_str), Some("3"));
    assert!(s.updated_at.unwrap().seconds >= s.created_at.unwrap().seconds);

    // List (streamed) with filters.
    let list = |filters: Vec<&str>| {
        let mut c = c.clone();
        let filters: Vec<String> = filters.into_iter().map(String::from).collect();
        async move {
            let mut stream = c
                .list(ListSnapshotsRequest {
                    snapshotter: String::new(),
                    filters,
                })
                .await
                .unwrap()
                .into_inner();
            let mut names = Vec::new();
            while let Some(batch) = stream.message().await.unwrap() {
                names.extend(batch.info.into_iter().map(|i| i.name));
            }
            names.sort();
            names
        }
    };
    assert_eq!(list(vec![]).await, vec!["base", "child", "view"]);
    assert_eq!(list(vec!["parent==base,kind==active"]).await, vec!["child"]);
    assert_eq!(
        list(vec!["kind==view", "labels.c==3"]).await,
        vec!["base", "view"]
    );
    assert_eq!(list(vec![r#"name~=/^ch/"#]).await, vec!["child"]);

    // Remote label with the default NoRemote: normal mounts, reason logged.
    let m = c
        .prepare(prep(
            "extract",
            "base",
            &[("containerd.io/snapshot.ref", "sha256:x")],
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");

    // Remove and Cleanup.
    for k in ["extract", "child", "view", "base"] {
        c.remove(rm(k)).await.unwrap();
    }
    std::fs::create_dir_all(daemon.root.join("snapshots/12345/fs")).unwrap();
    c.cleanup(CleanupRequest {
        snapshotter: String::new(),
    })
    .await
    .unwrap();
    let left: Vec<_> = std::fs::read_dir(daemon.root.join("snapshots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Small footprint: main + workers + a bounded blocking pool.
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let threads: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(threads <= 8, "{threads} threads");

    // Graceful shutdown removes the socket.
    drop(c);
    assert!(daemon.terminate(), "clean exit on SIGTERM");
    assert!(!daemon.socket.exists(), "socket removed");
    let log = daemon.log_text();
    assert!(log.contains("remote_snapshot_prepared=false"), "{log}");
    assert!(log.contains("reason="), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_state_and_stale_socket_is_replaced() {
    let dir = common::workdir();
    let mut d = common::Daemon::start(dir.path());
    let mut c = d.client().await;
    c.prepare(prep("a", "", &[])).await.unwrap();
    c.commit(commit("layer", "a")).await.unwrap();
    drop(c);
    d.kill9();
    assert!(d.socket.exists(), "kill -9 leaves the socket behind");
    let d = common::Daemon::start(dir.path());
    let mut c = d.client().await;
    let i = c
        .stat(StatSnapshotRequest {
            snapshotter: String::new(),
            key: "layer".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.kind, Kind::Committed as i32);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.socket.parent().unwrap())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    drop(c);
}

#[test]
fn sigterm_with_an_open_idle_connection_exits_within_grace() {
    let dir = common::workdir();
    // The file names other paths; the flags Daemon::start passes win.
    let cfg = format!(
        "shutdown_timeout_secs = 1\naddress = \"{0}/cfg.sock\"\nroot = \"{0}/cfg-root\"\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
    let mut d = common::Daemon::start(dir.path());
    assert!(
        !dir.path().join("cfg-root").exists(),
        "--root overrides root"
    );
    assert!(
        !dir.path().join("cfg.sock").exists(),
        "--address overrides address"
    );
    // A raw connection that never speaks HTTP/2 nor answers pings.
    let _idle = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let t = std::time::Instant::now();
    assert!(d.terminate());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert!(!d.socket.exists());
}

#[test]
fn bad_config_is_rejected_with_the_key() {
    let dir = common::workdir();
    std::fs::write(dir.path().join("config.toml"), "unknown_key = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"))
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_key"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn systemd_readiness_and_stopping_are_notified() {
    let dir = common::workdir();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut d = common::Daemon::start_with_env(dir.path(), &[("NOTIFY_SOCKET", &notify)]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    assert!(
        std::os::unix::net::UnixStream::connect(&d.socket).is_ok(),
        "listening when READY"
    );
    assert!(d.terminate());
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
}
