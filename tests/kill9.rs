//! Crash consistency for real: concurrent Prepare/Commit/Remove against the
//! daemon binary, `kill -9` at random moments, restart, and check that every
//! record has its directories and that startup left no orphans.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rstargz::proto::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use rstargz::snapshotter::metadata::{Kind, Store};
use rstargz::snapshotter::overlay::Layout;

/// xorshift64*, seeded per run and printed so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Opens the store of a stopped daemon and checks the invariant both ways.
fn check_root(root: &Path) -> usize {
    let store = Store::open(&root.join("metadata.redb")).unwrap();
    let layout = Layout::new(root).unwrap();
    let mut ids = HashSet::new();
    let mut names = HashMap::new();
    store
        .for_each(|name, r| {
            names.insert(name.to_string(), r.clone());
            ids.insert(r.id);
        })
        .unwrap();
    for (name, r) in &names {
        assert!(layout.fs(r.id).is_dir(), "{name} (id {}): fs missing", r.id);
        assert!(
            layout.work(r.id).is_dir(),
            "{name} (id {}): work missing",
            r.id
        );
        if !r.parent.is_empty() {
            let p = names
                .get(&r.parent)
                .unwrap_or_else(|| panic!("{name}: parent {} missing", r.parent));
            assert_eq!(p.kind, Kind::Committed);
            assert_eq!(r.parent_ids.first(), Some(&p.id));
        }
    }
    let debris = layout.debris(&ids).unwrap();
    assert!(debris.is_empty(), "orphans after startup: {debris:?}");
    names.len()
}

async fn worker(socket: std::path::PathBuf, t: u64, seed: u64, ops: Arc<AtomicU64>) {
    let Ok(mut c) = rstargz::snapshotter::client::connect(&socket).await else {
        return;
    };
    let mut rng = Rng(seed | 1);
    let mut committed: Vec<String> = Vec::new();
    for n in 0.. {
        let key = format!("w{t}-{seed}-{n}");
        let parent = if committed.is_empty() || rng.below(3) == 0 {
            String::new()
        } else {
            committed[rng.below(committed.len() as u64) as usize].clone()
        };
        let r = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: String::new(),
                key: key.clone(),
                parent,
                labels: HashMap::new(),
            })
            .await;
        let mounts = match r {
            Ok(m) => m.into_inner().mounts,
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(_) => return,
        };
        // Put some data in the snapshot, as an unpack would.
        let m = &mounts[0];
        let dir = if m.r#type == "bind" {
            m.source.clone()
        } else {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap()
                .to_string()
        };
        let _ = std::fs::write(Path::new(&dir).join(format!("f{n}")), vec![0u8; 4096]);
        ops.fetch_add(1, Ordering::Relaxed);
        if rng.below(4) != 0 {
            let name = format!("c-{key}");
            let r = c
                .commit(CommitSnapshotRequest {
                    snapshotter: String::new(),
                    name: name.clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                })
                .await;
            match r {
                Ok(_) => committed.push(name),
                Err(s)
                    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown =>
                {
                    return;
                }
                Err(_) => {}
            }
        }
        if !committed.is_empty() && rng.below(3) == 0 {
            let i = rng.below(committed.len() as u64) as usize;
            let r = c
                .remove(RemoveSnapshotRequest {
                    snapshotter: String::new(),
                    key: committed[i].clone(),
                })
                .await;
            match r {
                Ok(_) => {
                    committed.swap_remove(i);
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(_) => return,
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every listed snapshot answers Stat, and every active one Mounts.
async fn check_live(d: &common::Daemon) {
    let mut c = d.client().await;
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: String::new(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut infos = Vec::new();
    while let Some(b) = stream.message().await.unwrap() {
        infos.extend(b.info);
    }
    for i in infos {
        c.stat(StatSnapshotRequest {
            snapshotter: String::new(),
            key: i.name.clone(),
        })
        .await
        .unwrap();
        if i.kind != rstargz::proto::snapshots::Kind::Committed as i32 {
            let m = c
                .mounts(MountsRequest {
                    snapshotter: String::new(),
                    key: i.name.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .mounts;
            assert_eq!(m.len(), 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_keeps_records_and_dirs_consistent() {
    let dir = common::workdir();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed | 1);
    let ops = Arc::new(AtomicU64::new(0));
    let mut total_records = 0;
    for round in 0..5 {
        let mut d = common::Daemon::start(dir.path());
        let mut tasks = Vec::new();
        for t in 0..6 {
            tasks.push(tokio::spawn(worker(
                d.socket.clone(),
                t,
                rng.next() ^ round,
                ops.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(500))).await;
        d.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        // Restart: startup cleans debris. Check through the API, then stop
        // it cleanly and check the files and the store directly.
        let mut d = common::Daemon::start(dir.path());
        check_live(&d).await;
        assert!(d.terminate());
        total_records = check_root(&d.root);
    }
    eprintln!(
        "{} operations, {total_records} records at the end",
        ops.load(Ordering::Relaxed)
    );
    assert!(ops.load(Ordering::Relaxed) > 50, "the workload did run");
}
