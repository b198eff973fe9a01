//! Snapshotter-level tests: simulated crashes at every step, and the remote
//! path with fake [`RemoteFs`] implementations. Mounting needs root.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::core::{CrashPoint, RESTORE_CONCURRENCY, Snapshotter};
use super::error::Error;
use super::metadata::Kind;
use super::remote::{NoRemote, REMOTE_LABEL, RemoteError, RemoteFs, TARGET_REF_LABEL};

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Checks the invariant both ways: every record has a complete directory,
/// and `snapshots/` holds nothing else.
fn assert_consistent(sn: &Snapshotter) {
    let records = sn.records().unwrap();
    let mut ids = HashSet::new();
    for (name, r) in &records {
        assert!(sn.layout().fs(r.id).is_dir(), "{name}: fs dir missing");
        assert!(sn.layout().work(r.id).is_dir(), "{name}: work dir missing");
        ids.insert(r.id);
    }
    let debris = sn.layout().debris(&ids).unwrap();
    assert!(debris.is_empty(), "orphans: {debris:?}");
}

fn reopen(root: &Path, sn: Snapshotter) -> Snapshotter {
    drop(sn);
    Snapshotter::open_blocking(root, Arc::new(NoRemote)).unwrap()
}

#[test]
fn crash_at_every_step_leaves_a_consistent_store() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let mut sn = Snapshotter::open_blocking(root, Arc::new(NoRemote)).unwrap();
    sn.create(Kind::Active, "base-key", "", BTreeMap::new())
        .unwrap();
    std::fs::write(sn.layout().fs(1).join("f"), b"x").unwrap();
    sn.commit("base", "base-key", BTreeMap::new()).unwrap();

    for point in [
        CrashPoint::CreateAfterTempDir,
        CrashPoint::CreateBeforeCommit,
    ] {
        sn.set_crash_point(Some(point));
        let e = sn
            .create(Kind::Active, "lost", "base", BTreeMap::new())
            .unwrap_err();
        assert!(matches!(e, Error::SimulatedCrash(_)), "{e}");
        // The crash left debris but never a record without its directory.
        assert!(sn.stat("lost").is_err());
        sn = reopen(root, sn);
        assert_consistent(&sn);
        assert!(matches!(sn.stat("lost"), Err(Error::NotFound(_))));
        // The key is free again and the directory id collides with nothing.
        sn.create(Kind::Active, "lost", "base", BTreeMap::new())
            .unwrap();
        sn.remove_blocking("lost").unwrap();
        assert_consistent(&sn);
    }

    for point in [CrashPoint::RemoveAfterCommit, CrashPoint::RemoveAfterRetire] {
        sn.create(Kind::View, "gone", "base", BTreeMap::new())
            .unwrap();
        sn.set_crash_point(Some(point));
        assert!(sn.remove_blocking("gone").is_err());
        assert!(matches!(sn.stat("gone"), Err(Error::NotFound(_))));
        sn = reopen(root, sn);
        assert_consistent(&sn);
    }

    // A crash-like leftover made by hand: a directory whose record never
    // committed, plus a half-deleted removal directory.
    std::fs::create_dir_all(root.join("snapshots/999/fs/deep")).unwrap();
    std::fs::create_dir_all(root.join("snapshots/rm-42/fs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots/new-1-1/work")).unwrap();
    assert_eq!(sn.cleanup().unwrap(), 3);
    assert_consistent(&sn);
    let base = sn.stat("base").unwrap();
    assert_eq!(base.kind, Kind::Committed);
    assert!(
        sn.layout().fs(1).join("f").exists(),
        "committed data survived"
    );
}

/// What the fake remotes' `check` answers: mounted by this instance or not.
fn is_mounted(mounted: &Mutex<HashSet<PathBuf>>, mp: &Path) -> Result<(), RemoteError> {
    if mounted.lock().unwrap().contains(mp) {
        Ok(())
    } else {
        Err(RemoteError::new("not mounted"))
    }
}

/// Bind-mounts a prepared directory as the "remote" layer.
struct BindRemote {
    source: PathBuf,
    mounted: Mutex<HashSet<PathBuf>>,
    /// When set, `mount` fails (the registry went away).
    refuse: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl RemoteFs for BindRemote {
    async fn mount(
        &self,
        mp: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        use nix::mount::{MsFlags, mount};
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RemoteError::new("registry unreachable"));
        }
        mount(
            Some(&self.source),
            mp,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| RemoteError::new(format!("bind mount: {e}")))?;
        self.mounted.lock().unwrap().insert(mp.to_path_buf());
        Ok(())
    }

    async fn check(
        &self,
        mp: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        is_mounted(&self.mounted, mp)
    }

    async fn unmount(&self, mp: &Path) -> Result<(), RemoteError> {
        nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| RemoteError::new(format!("umount: {e}")))?;
        self.mounted.lock().unwrap().remove(mp);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prepare_commits_target_and_unmounts_on_remove() {
    let d = tempfile::tempdir().unwrap();
    let layer = d.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    std::fs::write(layer.join("hello"), b"remote").unwrap();
    let remote = Arc::new(BindRemote {
        source: layer,
        mounted: Mutex::new(HashSet::new()),
        refuse: Default::default(),
    });
    let root = d.path().join("root");
    let sn = Snapshotter::open(&root, remote.clone()).await.unwrap();

    let l = labels(&[(TARGET_REF_LABEL, "sha256:chain1"), ("x", "y")]);
    let e = sn
        .prepare("extract-1".into(), String::new(), l.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)));
    assert_eq!(
        tonic::Status::from(e).message(),
        "target snapshot \"sha256:chain1\": already exists"
    );
    let info = sn.stat("sha256:chain1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(
        info.labels.get(REMOTE_LABEL).map(String::as_str),
        Some("remote snapshot")
    );
    assert_eq!(info.labels.get("x").map(String::as_str), Some("y"));
    assert!(matches!(sn.stat("extract-1"), Err(Error::NotFound(_))));
    let id = sn.records().unwrap()[0].1.id;
    let fs = sn.layout().fs(id);
    assert_eq!(std::fs::read(fs.join("hello")).unwrap(), b"remote");

    // Preparing the same target again: AlreadyExists, nothing created.
    let e = sn
        .prepare("extract-2".into(), String::new(), l)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)));
    assert!(sn.stat("extract-2").is_err());

    // A child sees the remote layer through overlay.
    let m = sn
        .prepare("ctr".into(), "sha256:chain1".into(), BTreeMap::new())
        .await
        .unwrap();
    assert!(
        m[0].options
            .iter()
            .any(|o| o.contains(&fs.to_string_lossy().to_string()))
    );
    assert_eq!(sn.checked_mounts("ctr").await.unwrap(), m);
    // The remote layer dies: Mounts notices and remounts it.
    remote.unmount(&fs).await.unwrap();
    assert_eq!(sn.checked_mounts("ctr").await.unwrap(), m);
    assert!(fs.join("hello").exists(), "remounted by Mounts");
    // If the remount fails too, Mounts reports it instead of handing out
    // a broken lower dir.
    remote
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    remote.unmount(&fs).await.unwrap();
    let e = sn.checked_mounts("ctr").await.unwrap_err();
    assert!(matches!(e, Error::Remote(_)), "{e}");
    assert!(e.to_string().contains("registry unreachable"), "{e}");
    remote
        .refuse
        .store(false, std::sync::atomic::Ordering::Relaxed);
    remote.mount(&fs, &BTreeMap::new()).await.unwrap();
    let e = sn.remove("sha256:chain1".into()).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)));
    assert!(
        remote.check(&fs, &BTreeMap::new()).await.is_ok(),
        "still mounted"
    );
    sn.remove("ctr".into()).await.unwrap();

    // Restart: the remote snapshot is mounted again via the trait.
    remote.unmount(&fs).await.unwrap();
    drop(sn);
    let sn = Snapshotter::open(&root, remote.clone()).await.unwrap();
    assert!(fs.join("hello").exists(), "restored on start");

    sn.remove("sha256:chain1".into()).await.unwrap();
    assert!(
        remote.mounted.lock().unwrap().is_empty(),
        "unmounted before removal"
    );
    assert!(sn.records().unwrap().is_empty());
    assert_consistent(&sn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_remote_falls_back_to_normal_mounts() {
    let d = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open(d.path(), Arc::new(NoRemote))
        .await
        .unwrap();
    let l = labels(&[(TARGET_REF_LABEL, "sha256:chain1")]);
    let m = sn
        .prepare("extract".into(), String::new(), l)
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
    let info = sn.stat("extract").unwrap();
    assert_eq!(info.kind, Kind::Active);
    assert!(!info.labels.contains_key(REMOTE_LABEL));
    assert!(sn.stat("sha256:chain1").is_err());
    // containerd then unpacks and commits itself.
    sn.commit("sha256:chain1", "extract", BTreeMap::new())
        .unwrap();
    sn.remove("sha256:chain1".into()).await.unwrap();
}

#[test]
fn usage_active_measured_committed_stored() {
    let d = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open_blocking(d.path(), Arc::new(NoRemote)).unwrap();
    let (r, _) = sn.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
    let (s0, i0) = sn.usage("a").unwrap();
    std::fs::write(sn.layout().fs(r.id).join("big"), vec![7u8; 100_000]).unwrap();
    let (s1, i1) = sn.usage("a").unwrap();
    assert_eq!(i1, i0 + 1);
    assert!(s1 >= s0 + 100_000);
    sn.commit("c", "a", BTreeMap::new()).unwrap();
    assert_eq!(sn.usage("c").unwrap(), (s1, i1));
    // Stored, not re-measured.
    std::fs::remove_file(sn.layout().fs(r.id).join("big")).unwrap();
    assert_eq!(sn.usage("c").unwrap(), (s1, i1));
    assert!(matches!(sn.usage("zz"), Err(Error::NotFound(_))));
    assert!(matches!(sn.mounts("c"), Err(Error::FailedPrecondition(_))));
}

#[test]
fn list_filters_through_the_snapshotter() {
    let d = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open_blocking(d.path(), Arc::new(NoRemote)).unwrap();
    sn.create(
        Kind::Active,
        "a",
        "",
        labels(&[("containerd.io/gc.root", "1")]),
    )
    .unwrap();
    sn.commit("base", "a", labels(&[("containerd.io/gc.root", "1")]))
        .unwrap();
    sn.create(Kind::Active, "work", "base", BTreeMap::new())
        .unwrap();
    sn.create(Kind::View, "ro", "base", labels(&[("t", "v")]))
        .unwrap();
    let names = |f: &[&str]| {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        let mut n: Vec<String> = sn.list(&f).unwrap().into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(&[]), vec!["base", "ro", "work"]);
    assert_eq!(names(&["parent==base"]), vec!["ro", "work"]);
    assert_eq!(
        names(&["kind==committed", "kind==view"]),
        vec!["base", "ro"]
    );
    assert_eq!(names(&[r#"labels."containerd.io/gc.root""#]), vec!["base"]);
    assert_eq!(names(&["labels.t==v,kind==view"]), vec!["ro"]);
    assert_eq!(names(&["name~=^w"]), vec!["work"]);
    assert!(matches!(
        sn.list(&["name==".to_string()]),
        Err(Error::InvalidArgument(_))
    ));
}

/// A remote that takes a while to mount and counts how many mounts run at
/// once (nothing is really mounted).
#[derive(Default)]
struct SlowRemote {
    mounted: Mutex<HashSet<PathBuf>>,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl RemoteFs for SlowRemote {
    async fn mount(
        &self,
        mp: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.now.fetch_sub(1, SeqCst);
        self.mounted.lock().unwrap().insert(mp.to_path_buf());
        Ok(())
    }

    async fn check(
        &self,
        mp: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        is_mounted(&self.mounted, mp)
    }

    async fn unmount(&self, mp: &Path) -> Result<(), RemoteError> {
        self.mounted.lock().unwrap().remove(mp);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_are_restored_a_few_at_a_time() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let first = Arc::new(SlowRemote::default());
    let sn = Snapshotter::open(&root, first.clone()).await.unwrap();
    for i in 0..10 {
        let l = labels(&[(TARGET_REF_LABEL, &format!("sha256:chain{i}"))]);
        let e = sn
            .prepare(format!("extract-{i}"), String::new(), l)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "remote: {e}");
    }
    drop(sn);
    // A new process: every layer is mounted again, several at once but
    // never more than the bound.
    let again = Arc::new(SlowRemote::default());
    let _sn = Snapshotter::open(&root, again.clone()).await.unwrap();
    assert_eq!(again.mounted.lock().unwrap().len(), 10);
    let most = again.most.load(SeqCst);
    assert!((2..=RESTORE_CONCURRENCY).contains(&most), "{most} at once");
}
