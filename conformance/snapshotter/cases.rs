//! The cases. Each is independent: it uses key names of its own, so it may
//! share a backend with the others. Expected status codes are containerd
//! 1.6's (metadata layer over overlayfs), established by running this suite
//! against it; where a bare snapshotter would differ, the case says so.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use rstargz::proto::snapshots::{Info, Kind};
use rstargz::proto::types::Mount;
use tonic::Code;

use super::mounts::{has_flag, mount_all, option};
use super::{Backend, Labels, Signal, expect_code, expect_code_in, labels};

/// What containerd answers for an empty key or name (an unmapped internal
/// error), and the code that would mean it.
const EMPTY_NAME_CODES: &[Code] = &[Code::Unknown, Code::InvalidArgument];

/// Calls `$callback!($args; case, ...)` with the name of every case, so that each runner
/// can turn each case into a test of its own.
#[macro_export]
macro_rules! for_each_case {
    ($callback:ident, $($args:tt)*) => {
        $callback!(
            $($args)*;
            mounts_active_without_parent_is_rw_bind,
            mounts_active_with_parents_is_overlay_nearest_first,
            mounts_view_of_one_layer_is_ro_bind,
            mounts_view_of_several_layers_is_lowerdir_only_overlay,
            mounts_rpc_repeats_prepare_and_view,
            mount_parent_files_visible_and_writes_committed,
            mount_upper_layer_shadows_lower,
            mount_whiteout_hides_parent_file,
            mount_opaque_dir_hides_parent_contents,
            mount_view_is_read_only,
            mount_root_of_new_active_is_0755,
            mount_ownership_and_modes_preserved,
            mount_rename_from_lower_layer,
            mount_deep_chain,
            mount_commit_while_mounted,
            mount_xattrs_preserved,
            mounts_of_committed,
            stat_info_fields,
            stat_commit_labels_replace_active_labels,
            stat_missing_is_not_found,
            labels_with_empty_value_are_dropped,
            mounts_missing_is_not_found,
            update_changes_updated_at_only,
            update_label_by_field_path,
            update_labels_whole_map,
            update_empty_mask_replaces_labels,
            update_label_removed_by_empty_value,
            update_invalid_field_path,
            update_missing_is_not_found,
            update_labels_too_large,
            remove_parent_with_children_fails,
            remove_active,
            remove_view,
            remove_committed_leaf_then_parent,
            remove_missing_is_not_found,
            key_reusable_after_commit_and_remove,
            usage_grows_with_writes,
            usage_of_committed_matches_active,
            usage_missing_is_not_found,
            usage_of_view,
            usage_excludes_parents,
            list_all_and_kinds,
            list_filter_name_and_parent,
            list_filter_labels,
            list_filters_or_and_comma_and,
            list_streams_large_results,
            prepare_empty_key,
            keys_with_odd_characters,
            prepare_with_remote_ref_label,
            prepare_duplicate_key,
            prepare_missing_parent,
            prepare_on_active_parent,
            view_on_active_parent,
            prepare_on_view_parent,
            view_duplicate_key,
            commit_of_view,
            commit_missing_key,
            commit_to_existing_name,
            commit_name_equal_to_active_key,
            commit_empty_name,
            prepare_labels_too_large,
            commit_labels_too_large,
            cleanup_removes_dirs_of_removed_snapshots,
            concurrent_prepares_of_one_key_one_wins,
            concurrent_chains,
            restart_stops_promptly_with_client_connected,
            restart_keeps_snapshots_and_data,
            sigkill_keeps_acknowledged_changes,
        );
    };
}

// ---------------------------------------------------------------- helpers

fn no_labels() -> Labels {
    Labels::new()
}

/// Prepares `key` on `parent`, writes `files` and removes `deletes`
/// through a real mount, then commits it as `name`.
async fn layer(
    b: &Backend,
    name: &str,
    parent: &str,
    files: &[(&str, &str)],
    deletes: &[&str],
) -> Result<()> {
    let key = format!("{name}-active");
    let mounts = b.prepare(&key, parent, no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir(&key)?)?;
        write_files(mounted.path(), files)?;
        for path in deletes {
            let path = mounted.path().join(path);
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path).with_context(|| format!("rm {}", path.display()))?;
            }
        }
    }
    b.commit(name, &key, no_labels()).await?;
    Ok(())
}

fn write_files(root: &Path, files: &[(&str, &str)]) -> Result<()> {
    for (path, content) in files {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Commits a chain `<p>-1 <- <p>-2 <- ... <- <p>-n`, each layer writing
/// `layer` with its number and a file of its own.
async fn chain(b: &Backend, prefix: &str, n: usize) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for i in 1..=n {
        let name = format!("{prefix}-{i}");
        let parent: String = names.last().cloned().unwrap_or_default();
        let own = format!("file{i}");
        let content = format!("layer {i}");
        layer(
            b,
            &name,
            &parent,
            &[("layer", &content), (&own, &content)],
            &[],
        )
        .await?;
        names.push(name);
    }
    Ok(names)
}

/// The one mount of a snapshot, asserting there is exactly one.
fn single(mounts: &[Mount], what: &str) -> Mount {
    assert_eq!(
        mounts.len(),
        1,
        "{what}: expected one mount, got {mounts:?}"
    );
    mounts[0].clone()
}

/// The directories a read-only view of `name` stacks, nearest first: the
/// source of a bind mount, or an overlay's lowerdirs.
async fn layer_dirs(b: &Backend, name: &str) -> Result<Vec<PathBuf>> {
    let key = format!("{name}-dirprobe");
    let mounts = b.view(&key, name, no_labels()).await?;
    let m = single(&mounts, "view");
    b.remove(&key).await?;
    Ok(match option(&m, "lowerdir") {
        Some(lower) => lower.split(':').map(PathBuf::from).collect(),
        None => vec![PathBuf::from(&m.source)],
    })
}

/// Which layer of a [`chain`] a directory holds, by its `layer` file.
fn layer_number(dir: impl AsRef<Path>) -> Result<String> {
    read(&dir.as_ref().join("layer"))
}

/// The snapshot directory a mount list writes into or reads from.
fn snapshot_dir_of(mounts: &[Mount]) -> Result<PathBuf> {
    let m = mounts.first().context("no mounts")?;
    let fs = match option(m, "upperdir") {
        Some(upper) => PathBuf::from(upper),
        None if m.r#type == "bind" || has_flag(m, "bind") || has_flag(m, "rbind") => {
            PathBuf::from(&m.source)
        }
        None => bail!("cannot tell the snapshot dir of {m:?}"),
    };
    Ok(fs.parent().context("fs dir has no parent")?.to_path_buf())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn names<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.into_iter().map(String::from).collect()
}

fn to_system_time(ts: &Option<prost_types::Timestamp>, what: &str) -> SystemTime {
    let ts = ts.as_ref().unwrap_or_else(|| panic!("{what} is missing"));
    assert!(ts.seconds > 0, "{what} is not set: {ts:?}");
    SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32)
}

fn assert_recent(ts: &Option<prost_types::Timestamp>, what: &str) {
    let t = to_system_time(ts, what);
    let now = SystemTime::now();
    let skew = Duration::from_secs(60);
    assert!(
        t <= now + skew && t + skew >= now,
        "{what} = {t:?} is not close to now ({now:?})"
    );
}

fn kind(info: &Info) -> Kind {
    Kind::try_from(info.kind).unwrap_or(Kind::Unknown)
}

// ----------------------------------------------------------- mount shapes

pub async fn mounts_active_without_parent_is_rw_bind(b: &Backend) -> Result<()> {
    let mounts = b.prepare("mnt-bind-rw", "", no_labels()).await?;
    let m = single(&mounts, "active without parent");
    assert_eq!(m.r#type, "bind", "{m:?}");
    assert!(has_flag(&m, "rbind") || has_flag(&m, "bind"), "{m:?}");
    assert!(has_flag(&m, "rw"), "active must be rw: {m:?}");
    assert!(!has_flag(&m, "ro"), "active must not be ro: {m:?}");
    ensure!(
        Path::new(&m.source).is_dir(),
        "source {} is not a dir",
        m.source
    );
    if let Some(dir) = b.snapshots_dir() {
        assert!(
            Path::new(&m.source).starts_with(dir),
            "{m:?} not under {dir:?}"
        );
    }
    Ok(())
}

pub async fn mounts_active_with_parents_is_overlay_nearest_first(b: &Backend) -> Result<()> {
    let layers = chain(b, "mnt-ovl", 3).await?;
    for (parent, want) in [
        (&layers[0], &["layer 1"][..]),
        (&layers[2], &["layer 3", "layer 2", "layer 1"][..]),
    ] {
        let key = format!("{parent}-child");
        let mounts = b.prepare(&key, parent, no_labels()).await?;
        let m = single(&mounts, "active with parent");
        assert_eq!(m.r#type, "overlay", "{m:?}");
        assert!(!has_flag(&m, "ro"), "active must be writable: {m:?}");
        let upper = option(&m, "upperdir").unwrap_or_else(|| panic!("no upperdir: {m:?}"));
        let work = option(&m, "workdir").unwrap_or_else(|| panic!("no workdir: {m:?}"));
        assert_ne!(upper, work);
        if let Some(root) = b.snapshots_dir() {
            let lowers = option(&m, "lowerdir").unwrap_or_default().split(':');
            for dir in lowers.chain([upper, work]) {
                assert!(Path::new(dir).starts_with(root), "{dir} not under {root:?}");
            }
        }
        ensure!(
            std::fs::read_dir(upper)?.next().is_none(),
            "upperdir of a new active is empty"
        );
        let lowerdir = option(&m, "lowerdir").unwrap_or_else(|| panic!("no lowerdir: {m:?}"));
        let got = lowerdir
            .split(':')
            .map(layer_number)
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(got, want, "lowerdir must list parents nearest first: {m:?}");
    }
    Ok(())
}

pub async fn mounts_view_of_one_layer_is_ro_bind(b: &Backend) -> Result<()> {
    let layers = chain(b, "mnt-view1", 1).await?;
    let mounts = b.view("mnt-view1-v", &layers[0], no_labels()).await?;
    let m = single(&mounts, "view of one layer");
    assert_eq!(m.r#type, "bind", "{m:?}");
    assert!(has_flag(&m, "ro"), "view must be ro: {m:?}");
    assert!(!has_flag(&m, "rw"), "view must not be rw: {m:?}");
    assert_eq!(read(&Path::new(&m.source).join("file1"))?, "layer 1");
    Ok(())
}

pub async fn mounts_view_of_several_layers_is_lowerdir_only_overlay(b: &Backend) -> Result<()> {
    let layers = chain(b, "mnt-viewn", 3).await?;
    let mounts = b.view("mnt-viewn-v", &layers[2], no_labels()).await?;
    let m = single(&mounts, "view of several layers");
    assert_eq!(m.r#type, "overlay", "{m:?}");
    assert_eq!(
        option(&m, "upperdir"),
        None,
        "a view has no upperdir: {m:?}"
    );
    assert_eq!(option(&m, "workdir"), None, "a view has no workdir: {m:?}");
    let lowerdir = option(&m, "lowerdir").unwrap_or_else(|| panic!("no lowerdir: {m:?}"));
    let got = lowerdir
        .split(':')
        .map(layer_number)
        .collect::<Result<Vec<_>>>()?;
    assert_eq!(
        got,
        ["layer 3", "layer 2", "layer 1"],
        "nearest first: {m:?}"
    );
    Ok(())
}

pub async fn mounts_rpc_repeats_prepare_and_view(b: &Backend) -> Result<()> {
    let layers = chain(b, "mnt-rpc", 2).await?;
    for (key, parent) in [("mnt-rpc-a0", ""), ("mnt-rpc-a2", layers[1].as_str())] {
        let prepared = b.prepare(key, parent, no_labels()).await?;
        assert_eq!(b.mounts(key).await?, prepared, "Mounts({key})");
    }
    for (key, parent) in [("mnt-rpc-v1", &layers[0]), ("mnt-rpc-v2", &layers[1])] {
        let viewed = b.view(key, parent, no_labels()).await?;
        assert_eq!(b.mounts(key).await?, viewed, "Mounts({key})");
    }
    Ok(())
}

// --------------------------------------------------------- mount semantics

pub async fn mount_parent_files_visible_and_writes_committed(b: &Backend) -> Result<()> {
    let layers = chain(b, "sem-vis", 3).await?;
    let mounts = b.prepare("sem-vis-top", &layers[2], no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("sem-vis-top")?)?;
        for i in 1..=3 {
            assert_eq!(
                read(&mounted.path().join(format!("file{i}")))?,
                format!("layer {i}")
            );
        }
        write_files(mounted.path(), &[("new/file", "written in active")])?;
    }
    b.commit("sem-vis-4", "sem-vis-top", no_labels()).await?;
    let mounts = b.view("sem-vis-view", "sem-vis-4", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-vis-view")?)?;
    assert_eq!(read(&mounted.path().join("new/file"))?, "written in active");
    assert_eq!(read(&mounted.path().join("file1"))?, "layer 1");
    Ok(())
}

pub async fn mount_upper_layer_shadows_lower(b: &Backend) -> Result<()> {
    let layers = chain(b, "sem-shadow", 3).await?;
    for (i, name) in layers.iter().enumerate() {
        let key = format!("{name}-view");
        let mounts = b.view(&key, name, no_labels()).await?;
        let mounted = mount_all(&mounts, &b.scratch_dir(&key)?)?;
        assert_eq!(
            read(&mounted.path().join("layer"))?,
            format!("layer {}", i + 1)
        );
        let visible = std::fs::read_dir(mounted.path())?.count();
        assert_eq!(visible, i + 2, "layer + file1..file{}", i + 1);
    }
    Ok(())
}

pub async fn mount_whiteout_hides_parent_file(b: &Backend) -> Result<()> {
    layer(
        b,
        "sem-wh-1",
        "",
        &[("keep", "k"), ("gone", "g"), ("d/x", "x")],
        &[],
    )
    .await?;
    layer(b, "sem-wh-2", "sem-wh-1", &[], &["gone", "d/x"]).await?;
    layer(b, "sem-wh-3", "sem-wh-2", &[("added", "a")], &[]).await?;
    // The deletion is recorded in the child layer as an overlay whiteout.
    let dirs = layer_dirs(b, "sem-wh-3").await?;
    ensure!(dirs.len() == 3, "three layers: {dirs:?}");
    let whiteout = dirs[1].join("gone");
    let meta = std::fs::symlink_metadata(&whiteout)
        .with_context(|| format!("whiteout {}", whiteout.display()))?;
    assert!(
        meta.file_type().is_char_device(),
        "whiteout is a char device"
    );
    let mounts = b.view("sem-wh-view", "sem-wh-3", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-wh-view")?)?;
    let root = mounted.path();
    assert!(!root.join("gone").exists(), "deleted file still visible");
    assert!(
        !root.join("d/x").exists(),
        "deleted file in dir still visible"
    );
    assert!(root.join("d").is_dir());
    assert_eq!(read(&root.join("keep"))?, "k");
    assert_eq!(read(&root.join("added"))?, "a");
    Ok(())
}

pub async fn mount_opaque_dir_hides_parent_contents(b: &Backend) -> Result<()> {
    layer(b, "sem-opq-1", "", &[("d/old", "o")], &[]).await?;
    layer(b, "sem-opq-2", "sem-opq-1", &[], &["d"]).await?;
    layer(b, "sem-opq-3", "sem-opq-2", &[("d/new", "n")], &[]).await?;
    let mounts = b.view("sem-opq-view", "sem-opq-3", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-opq-view")?)?;
    let entries: BTreeSet<String> = std::fs::read_dir(mounted.path().join("d"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert_eq!(entries, names(["new"]));
    Ok(())
}

pub async fn mount_view_is_read_only(b: &Backend) -> Result<()> {
    let layers = chain(b, "sem-ro", 2).await?;
    for (key, parent) in [("sem-ro-v1", &layers[0]), ("sem-ro-v2", &layers[1])] {
        let mounts = b.view(key, parent, no_labels()).await?;
        let mounted = mount_all(&mounts, &b.scratch_dir(key)?)?;
        let err = std::fs::write(mounted.path().join("file1"), "overwrite")
            .expect_err("writing into a view must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}: {err}");
        assert_eq!(read(&mounted.path().join("file1"))?, "layer 1");
    }
    Ok(())
}

pub async fn mount_root_of_new_active_is_0755(b: &Backend) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mounts = b.prepare("sem-root", "", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-root")?)?;
    let meta = std::fs::metadata(mounted.path())?;
    assert_eq!(meta.mode() & 0o7777, 0o755, "mode {:o}", meta.mode());
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    ensure!(
        std::fs::read_dir(mounted.path())?.next().is_none(),
        "a new active is empty"
    );
    Ok(())
}

pub async fn mount_ownership_and_modes_preserved(b: &Backend) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mounts = b.prepare("sem-own-a", "", no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("sem-own-a")?)?;
        let root = mounted.path();
        write_files(root, &[("priv/file", "p"), ("suid", "s")])?;
        std::fs::set_permissions(root.join("priv"), std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(
            root.join("priv/file"),
            std::fs::Permissions::from_mode(0o640),
        )?;
        std::fs::set_permissions(root.join("suid"), std::fs::Permissions::from_mode(0o4755))?;
        std::os::unix::fs::chown(root.join("priv/file"), Some(1234), Some(5678))?;
        std::os::unix::fs::symlink("priv/file", root.join("link"))?;
    }
    b.commit("sem-own-1", "sem-own-a", no_labels()).await?;
    // Seen through a bind view and through an overlay above a new layer.
    layer(b, "sem-own-2", "sem-own-1", &[("other", "o")], &[]).await?;
    for parent in ["sem-own-1", "sem-own-2"] {
        let key = format!("{parent}-view");
        let mounts = b.view(&key, parent, no_labels()).await?;
        let mounted = mount_all(&mounts, &b.scratch_dir(&key)?)?;
        let root = mounted.path();
        let mode = |p: &str| -> Result<u32> { Ok(std::fs::symlink_metadata(root.join(p))?.mode()) };
        assert_eq!(mode("priv")? & 0o7777, 0o700, "{parent}: priv");
        assert_eq!(mode("priv/file")? & 0o7777, 0o640, "{parent}: priv/file");
        assert_eq!(mode("suid")? & 0o7777, 0o4755, "{parent}: suid");
        let meta = std::fs::metadata(root.join("priv/file"))?;
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{parent}: owner");
        assert_eq!(
            std::fs::read_link(root.join("link"))?,
            Path::new("priv/file")
        );
    }
    Ok(())
}

pub async fn mount_rename_from_lower_layer(b: &Backend) -> Result<()> {
    layer(
        b,
        "sem-mv-1",
        "",
        &[("from", "moved"), ("d/inner", "i")],
        &[],
    )
    .await?;
    let mounts = b.prepare("sem-mv-a", "sem-mv-1", no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("sem-mv-a")?)?;
        std::fs::rename(mounted.path().join("from"), mounted.path().join("to"))?;
        std::fs::rename(mounted.path().join("d/inner"), mounted.path().join("inner"))?;
    }
    b.commit("sem-mv-2", "sem-mv-a", no_labels()).await?;
    layer(b, "sem-mv-3", "sem-mv-2", &[], &[]).await?;
    let mounts = b.view("sem-mv-view", "sem-mv-3", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-mv-view")?)?;
    let root = mounted.path();
    assert!(!root.join("from").exists() && !root.join("d/inner").exists());
    assert_eq!(read(&root.join("to"))?, "moved");
    assert_eq!(read(&root.join("inner"))?, "i");
    Ok(())
}

/// Committing does not need the active to be unmounted first.
pub async fn mount_commit_while_mounted(b: &Backend) -> Result<()> {
    let mounts = b.prepare("sem-cwm-a", "", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-cwm-a")?)?;
    write_files(mounted.path(), &[("f", "before commit")])?;
    b.commit("sem-cwm-1", "sem-cwm-a", no_labels()).await?;
    drop(mounted);
    let mounts = b.view("sem-cwm-v", "sem-cwm-1", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-cwm-v")?)?;
    assert_eq!(read(&mounted.path().join("f"))?, "before commit");
    Ok(())
}

/// Sixteen layers: every one visible, the top one winning.
pub async fn mount_deep_chain(b: &Backend) -> Result<()> {
    let layers = chain(b, "deep", 16).await?;
    let mounts = b.prepare("deep-top", &layers[15], no_labels()).await?;
    let m = single(&mounts, "active on 16 layers");
    let lowerdir = option(&m, "lowerdir").unwrap_or_default();
    assert_eq!(lowerdir.split(':').count(), 16, "{m:?}");
    let mounted = mount_all(&mounts, &b.scratch_dir("deep-top")?)?;
    for i in 1..=16 {
        assert_eq!(
            read(&mounted.path().join(format!("file{i}")))?,
            format!("layer {i}")
        );
    }
    assert_eq!(read(&mounted.path().join("layer"))?, "layer 16");
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value pointer and length describe one live slice.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    ensure!(rc == 0, "lsetxattr: {}", std::io::Error::last_os_error());
    Ok(())
}

fn get_xattr(path: &Path, name: &str) -> Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    let mut buf = vec![0u8; 256];
    // SAFETY: as in `set_xattr`; the buffer is writable for its length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    ensure!(n >= 0, "lgetxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    Ok(buf)
}

/// Extended attributes set in a layer survive commit, and a copy-up in a
/// child layer keeps them.
pub async fn mount_xattrs_preserved(b: &Backend) -> Result<()> {
    let mounts = b.prepare("sem-xa-a", "", no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("sem-xa-a")?)?;
        write_files(mounted.path(), &[("f", "x")])?;
        set_xattr(&mounted.path().join("f"), "user.conformance", b"v1")?;
    }
    b.commit("sem-xa-1", "sem-xa-a", no_labels()).await?;
    let mounts = b.prepare("sem-xa-b", "sem-xa-1", no_labels()).await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("sem-xa-b")?)?;
        // Writing copies the file up into this layer.
        std::fs::write(mounted.path().join("f"), "xy")?;
    }
    b.commit("sem-xa-2", "sem-xa-b", no_labels()).await?;
    let mounts = b.view("sem-xa-v", "sem-xa-2", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("sem-xa-v")?)?;
    let f = mounted.path().join("f");
    assert_eq!(read(&f)?, "xy");
    assert_eq!(get_xattr(&f, "user.conformance")?, b"v1");
    Ok(())
}

/// A committed snapshot has no mounts of its own: containerd's overlayfs
/// answers that it is not active.
pub async fn mounts_of_committed(b: &Backend) -> Result<()> {
    layer(b, "mc-c", "", &[], &[]).await?;
    expect_code(
        b.mounts("mc-c").await,
        Code::FailedPrecondition,
        "Mounts(committed)",
    );
    Ok(())
}

// ------------------------------------------------------------------- stat

pub async fn stat_info_fields(b: &Backend) -> Result<()> {
    let l = labels([("conformance/a", "1")]);
    b.prepare("stat-a", "", l.clone()).await?;
    let info = b.stat("stat-a").await?;
    assert_eq!(info.name, "stat-a");
    assert_eq!(info.parent, "");
    assert_eq!(kind(&info), Kind::Active);
    assert_eq!(info.labels, l);
    assert_recent(&info.created_at, "created_at");
    assert_recent(&info.updated_at, "updated_at");
    assert_eq!(info.created_at, info.updated_at, "never updated");
    let active = info;

    b.commit("stat-c", "stat-a", no_labels()).await?;
    let info = b.stat("stat-c").await?;
    assert_eq!((info.name.as_str(), info.parent.as_str()), ("stat-c", ""));
    assert_eq!(kind(&info), Kind::Committed);
    // containerd stamps a committed snapshot with the commit's time.
    assert!(
        to_system_time(&info.created_at, "created_at")
            >= to_system_time(&active.created_at, "created_at"),
        "committed {:?} before active {:?}",
        info.created_at,
        active.created_at
    );
    assert_recent(&info.updated_at, "updated_at");
    expect_code(
        b.stat("stat-a").await,
        Code::NotFound,
        "active key after commit",
    );

    b.prepare("stat-a2", "stat-c", no_labels()).await?;
    let info = b.stat("stat-a2").await?;
    assert_eq!(
        (info.parent.as_str(), kind(&info)),
        ("stat-c", Kind::Active)
    );
    assert!(info.labels.is_empty(), "{:?}", info.labels);
    b.commit("stat-c2", "stat-a2", no_labels()).await?;
    b.view("stat-v", "stat-c2", no_labels()).await?;
    let info = b.stat("stat-v").await?;
    assert_eq!((info.parent.as_str(), kind(&info)), ("stat-c2", Kind::View));
    let committed = b.stat("stat-c2").await?;
    assert_eq!(
        (committed.parent.as_str(), kind(&committed)),
        ("stat-c", Kind::Committed)
    );
    Ok(())
}

/// Commit labels are the committed snapshot's labels; the active's are
/// not carried over.
pub async fn stat_commit_labels_replace_active_labels(b: &Backend) -> Result<()> {
    b.prepare("stat-cl-a", "", labels([("from", "prepare")]))
        .await?;
    b.commit("stat-cl-c", "stat-cl-a", labels([("at", "commit")]))
        .await?;
    let info = b.stat("stat-cl-c").await?;
    assert_eq!(info.labels, labels([("at", "commit")]));
    Ok(())
}

/// containerd does not store a label whose value is empty, whichever call
/// sets it.
pub async fn labels_with_empty_value_are_dropped(b: &Backend) -> Result<()> {
    let sent = labels([("empty", ""), ("full", "1")]);
    b.prepare("lev-a", "", sent.clone()).await?;
    let prepared = b.stat("lev-a").await?.labels;
    b.commit("lev-c", "lev-a", sent.clone()).await?;
    let committed = b.stat("lev-c").await?.labels;
    b.view("lev-v", "lev-c", sent.clone()).await?;
    let viewed = b.stat("lev-v").await?.labels;
    b.prepare("lev-u", "", no_labels()).await?;
    let updated = b
        .update(info_with("lev-u", sent), &["labels"])
        .await?
        .labels;
    let want = labels([("full", "1")]);
    let got = [
        ("Prepare", prepared),
        ("Commit", committed),
        ("View", viewed),
        ("Update", updated),
    ];
    let wrong: Vec<_> = got.iter().filter(|(_, l)| *l != want).collect();
    assert!(
        wrong.is_empty(),
        "labels stored with an empty value: {wrong:?}"
    );
    Ok(())
}

pub async fn stat_missing_is_not_found(b: &Backend) -> Result<()> {
    expect_code(
        b.stat("stat-missing").await,
        Code::NotFound,
        "Stat(missing)",
    );
    Ok(())
}

pub async fn mounts_missing_is_not_found(b: &Backend) -> Result<()> {
    expect_code(
        b.mounts("mounts-missing").await,
        Code::NotFound,
        "Mounts(missing)",
    );
    Ok(())
}

// ----------------------------------------------------------------- update

fn info_with(name: &str, l: Labels) -> Info {
    Info {
        name: name.into(),
        labels: l,
        ..Default::default()
    }
}

pub async fn update_changes_updated_at_only(b: &Backend) -> Result<()> {
    b.prepare("upd-time", "", labels([("x", "1")])).await?;
    let before = b.stat("upd-time").await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let returned = b
        .update(info_with("upd-time", labels([("x", "2")])), &["labels.x"])
        .await?;
    let after = b.stat("upd-time").await?;
    assert_eq!(returned, after, "Update returns what Stat then shows");
    assert_eq!(
        after.created_at, before.created_at,
        "created_at must not change"
    );
    assert!(
        to_system_time(&after.updated_at, "updated_at")
            > to_system_time(&before.updated_at, "updated_at"),
        "updated_at must advance: {:?} -> {:?}",
        before.updated_at,
        after.updated_at
    );
    assert_eq!(
        (after.name, after.parent, kind(&before)),
        (before.name, before.parent, Kind::Active)
    );
    Ok(())
}

pub async fn update_label_by_field_path(b: &Backend) -> Result<()> {
    b.prepare("upd-path", "", labels([("keep", "k"), ("foo", "old")]))
        .await?;
    // Fields outside the mask are ignored, the read-only ones included.
    let sent = Info {
        name: "upd-path".into(),
        parent: "not-a-parent".into(),
        kind: Kind::Committed as i32,
        labels: labels([
            ("foo", "new"),
            ("ignored", "not in mask"),
            ("example.com/a.b", "dotted"),
        ]),
        ..Default::default()
    };
    // Everything after `labels.` is the key, dots included.
    let info = b
        .update(sent, &["labels.foo", "labels.example.com/a.b"])
        .await?;
    let want = labels([("keep", "k"), ("foo", "new"), ("example.com/a.b", "dotted")]);
    assert_eq!(info.labels, want);
    assert_eq!((info.parent.as_str(), kind(&info)), ("", Kind::Active));
    assert_eq!(b.stat("upd-path").await?, info);
    Ok(())
}

pub async fn update_labels_whole_map(b: &Backend) -> Result<()> {
    layer(b, "upd-map", "", &[], &[]).await?;
    b.update(
        info_with("upd-map", labels([("a", "1"), ("b", "2")])),
        &["labels"],
    )
    .await?;
    let info = b
        .update(info_with("upd-map", labels([("c", "3")])), &["labels"])
        .await?;
    assert_eq!(info.labels, labels([("c", "3")]));
    assert_eq!(kind(&info), Kind::Committed);
    assert_eq!(b.stat("upd-map").await?.labels, labels([("c", "3")]));
    Ok(())
}

/// An empty mask updates every updatable field, i.e. replaces the labels.
pub async fn update_empty_mask_replaces_labels(b: &Backend) -> Result<()> {
    b.prepare("upd-empty", "", labels([("a", "1"), ("b", "2")]))
        .await?;
    let info = b
        .update(info_with("upd-empty", labels([("c", "3")])), &[])
        .await?;
    assert_eq!(info.labels, labels([("c", "3")]));
    assert_eq!(b.stat("upd-empty").await?.labels, labels([("c", "3")]));
    Ok(())
}

pub async fn update_label_removed_by_empty_value(b: &Backend) -> Result<()> {
    b.prepare("upd-rm", "", labels([("a", "1"), ("b", "2"), ("c", "3")]))
        .await?;
    // Sent as an empty value.
    b.update(info_with("upd-rm", labels([("a", "")])), &["labels.a"])
        .await?;
    // Absent from the sent labels altogether.
    let info = b
        .update(info_with("upd-rm", no_labels()), &["labels.b"])
        .await?;
    assert_eq!(info.labels, labels([("c", "3")]));
    assert_eq!(b.stat("upd-rm").await?.labels, labels([("c", "3")]));
    Ok(())
}

pub async fn update_invalid_field_path(b: &Backend) -> Result<()> {
    b.prepare("upd-bad", "", labels([("a", "1")])).await?;
    for path in ["bogus", "name", "parent", "kind"] {
        let info = Info {
            name: "upd-bad".into(),
            parent: "other".into(),
            kind: Kind::Committed as i32,
            ..Default::default()
        };
        expect_code(b.update(info, &[path]).await, Code::InvalidArgument, path);
    }
    let info = b.stat("upd-bad").await?;
    assert_eq!((info.parent.as_str(), kind(&info)), ("", Kind::Active));
    assert_eq!(info.labels, labels([("a", "1")]));
    Ok(())
}

pub async fn update_missing_is_not_found(b: &Backend) -> Result<()> {
    let info = info_with("upd-missing", labels([("a", "1")]));
    expect_code(
        b.update(info, &["labels.a"]).await,
        Code::NotFound,
        "Update(missing)",
    );
    let info = info_with("", labels([("a", "1")]));
    expect_code(
        b.update(info, &["labels.a"]).await,
        Code::InvalidArgument,
        "Update(\"\")",
    );
    Ok(())
}

fn huge_labels() -> Labels {
    labels([("conformance/huge", &"x".repeat(4097))])
}

pub async fn update_labels_too_large(b: &Backend) -> Result<()> {
    b.prepare("upd-huge", "", no_labels()).await?;
    let info = info_with("upd-huge", huge_labels());
    expect_code(
        b.update(info, &["labels"]).await,
        Code::InvalidArgument,
        "Update(huge)",
    );
    assert!(b.stat("upd-huge").await?.labels.is_empty());
    Ok(())
}

// ----------------------------------------------------------------- remove

pub async fn remove_parent_with_children_fails(b: &Backend) -> Result<()> {
    let layers = chain(b, "rm-parent", 2).await?;
    expect_code(
        b.remove(&layers[0]).await,
        Code::FailedPrecondition,
        "Remove(parent of committed)",
    );
    b.view("rm-parent-view", &layers[1], no_labels()).await?;
    expect_code(
        b.remove(&layers[1]).await,
        Code::FailedPrecondition,
        "Remove(parent of view)",
    );
    b.remove("rm-parent-view").await?;
    b.prepare("rm-parent-active", &layers[1], no_labels())
        .await?;
    expect_code(
        b.remove(&layers[1]).await,
        Code::FailedPrecondition,
        "Remove(parent of active)",
    );
    assert_eq!(kind(&b.stat(&layers[0]).await?), Kind::Committed);
    assert_eq!(kind(&b.stat(&layers[1]).await?), Kind::Committed);
    Ok(())
}

pub async fn remove_active(b: &Backend) -> Result<()> {
    b.prepare("rm-active", "", no_labels()).await?;
    b.remove("rm-active").await?;
    expect_code(
        b.stat("rm-active").await,
        Code::NotFound,
        "Stat after Remove",
    );
    expect_code(
        b.mounts("rm-active").await,
        Code::NotFound,
        "Mounts after Remove",
    );
    Ok(())
}

pub async fn remove_view(b: &Backend) -> Result<()> {
    let layers = chain(b, "rm-view", 1).await?;
    b.view("rm-view-v", &layers[0], no_labels()).await?;
    b.remove("rm-view-v").await?;
    expect_code(
        b.stat("rm-view-v").await,
        Code::NotFound,
        "Stat after Remove",
    );
    // The parent, now childless, can go too.
    b.remove(&layers[0]).await?;
    Ok(())
}

pub async fn remove_committed_leaf_then_parent(b: &Backend) -> Result<()> {
    let layers = chain(b, "rm-leaf", 3).await?;
    for name in layers.iter().rev() {
        b.remove(name).await?;
        expect_code(b.stat(name).await, Code::NotFound, "Stat after Remove");
    }
    assert!(b.list_names("rm-leaf", &[]).await?.is_empty());
    Ok(())
}

pub async fn remove_missing_is_not_found(b: &Backend) -> Result<()> {
    expect_code(
        b.remove("rm-missing").await,
        Code::NotFound,
        "Remove(missing)",
    );
    b.prepare("rm-twice", "", no_labels()).await?;
    b.remove("rm-twice").await?;
    expect_code(b.remove("rm-twice").await, Code::NotFound, "Remove twice");
    Ok(())
}

pub async fn key_reusable_after_commit_and_remove(b: &Backend) -> Result<()> {
    b.prepare("reuse-a", "", no_labels()).await?;
    b.commit("reuse-c", "reuse-a", no_labels()).await?;
    b.prepare("reuse-a", "reuse-c", no_labels()).await?;
    assert_eq!(b.stat("reuse-a").await?.parent, "reuse-c");
    b.remove("reuse-a").await?;
    b.prepare("reuse-a", "", no_labels()).await?;
    assert_eq!(b.stat("reuse-a").await?.parent, "");
    Ok(())
}

// ------------------------------------------------------------------ usage

const WRITTEN: usize = 1 << 20;
const FILES: i64 = 10;

/// Writes `FILES` files totalling `WRITTEN` bytes into `key`.
async fn fill(b: &Backend, key: &str, parent: &str) -> Result<()> {
    let mounts = b.prepare(key, parent, no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir(key)?)?;
    let chunk = vec![0xa5u8; WRITTEN / FILES as usize];
    for i in 0..FILES {
        std::fs::write(mounted.path().join(format!("blob{i}")), &chunk)?;
    }
    nix::unistd::sync();
    Ok(())
}

pub async fn usage_grows_with_writes(b: &Backend) -> Result<()> {
    let layers = chain(b, "usage-grow", 1).await?;
    b.prepare("usage-grow-empty", &layers[0], no_labels())
        .await?;
    let empty = b.usage("usage-grow-empty").await?;
    assert!(empty.size >= 0 && empty.inodes >= 0, "{empty:?}");
    fill(b, "usage-grow-a", &layers[0]).await?;
    let usage = b.usage("usage-grow-a").await?;
    let min = (WRITTEN as i64 / FILES) * FILES;
    assert!(
        usage.size >= empty.size + min,
        "size {} < {min} written",
        usage.size
    );
    assert!(
        usage.inodes >= empty.inodes + FILES,
        "inodes {} < {FILES} files",
        usage.inodes
    );
    Ok(())
}

pub async fn usage_of_committed_matches_active(b: &Backend) -> Result<()> {
    fill(b, "usage-c-a", "").await?;
    let active = b.usage("usage-c-a").await?;
    b.commit("usage-c", "usage-c-a", no_labels()).await?;
    let committed = b.usage("usage-c").await?;
    assert_eq!(committed, active, "a commit does not change the usage");
    assert!(
        committed.size >= WRITTEN as i64 / FILES * FILES,
        "{committed:?}"
    );
    Ok(())
}

/// A view has no writable layer: containerd's overlayfs reports nothing.
pub async fn usage_of_view(b: &Backend) -> Result<()> {
    fill(b, "usage-v-a", "").await?;
    b.commit("usage-v-c", "usage-v-a", no_labels()).await?;
    b.view("usage-v", "usage-v-c", no_labels()).await?;
    let usage = b.usage("usage-v").await?;
    assert_eq!((usage.size, usage.inodes), (0, 0), "{usage:?}");
    Ok(())
}

/// An active snapshot's usage counts its own layer, not its parents'.
pub async fn usage_excludes_parents(b: &Backend) -> Result<()> {
    fill(b, "usage-x-a", "").await?;
    b.commit("usage-x-c", "usage-x-a", no_labels()).await?;
    b.prepare("usage-x-child", "usage-x-c", no_labels()).await?;
    let usage = b.usage("usage-x-child").await?;
    assert!(
        usage.size < (WRITTEN / 4) as i64,
        "{usage:?} counts the parent"
    );
    assert!(usage.inodes < FILES, "{usage:?} counts the parent");
    Ok(())
}

pub async fn usage_missing_is_not_found(b: &Backend) -> Result<()> {
    expect_code(
        b.usage("usage-missing").await,
        Code::NotFound,
        "Usage(missing)",
    );
    Ok(())
}

// ------------------------------------------------------------- list/walk

/// `lst-1 <- lst-2 <- lst-3` committed, `lst-a` active on `lst-3`, `lst-v`
/// a view of `lst-2`, `lst-b` active without parent; labelled variously.
async fn list_fixture(b: &Backend) -> Result<()> {
    b.prepare("lst-1-a", "", labels([("a.b", "v")])).await?;
    b.commit("lst-1", "lst-1-a", labels([("a.b", "v"), ("x", "1")]))
        .await?;
    b.prepare("lst-2-a", "lst-1", no_labels()).await?;
    b.commit("lst-2", "lst-2-a", labels([("a.b", "w")])).await?;
    b.prepare("lst-3-a", "lst-2", no_labels()).await?;
    b.commit("lst-3", "lst-3-a", labels([("z", "3")])).await?;
    b.prepare("lst-a", "lst-3", labels([("x", "2"), ("a.b", "v")]))
        .await?;
    b.view("lst-v", "lst-2", labels([("y", "1")])).await?;
    b.prepare("lst-b", "", no_labels()).await?;
    Ok(())
}

pub async fn list_all_and_kinds(b: &Backend) -> Result<()> {
    list_fixture(b).await?;
    let all = names(["lst-1", "lst-2", "lst-3", "lst-a", "lst-v", "lst-b"]);
    assert_eq!(b.list_names("lst-", &[]).await?, all);
    let infos = b.list(&[]).await?;
    let ours: Vec<&Info> = infos
        .iter()
        .filter(|i| i.name.starts_with("lst-"))
        .collect();
    assert_eq!(ours.len(), all.len(), "each snapshot listed once: {ours:?}");
    for info in ours {
        assert_eq!(info, &b.stat(&info.name).await?, "List and Stat agree");
    }
    let filters = [
        ("kind==committed", names(["lst-1", "lst-2", "lst-3"])),
        ("kind==active", names(["lst-a", "lst-b"])),
        ("kind==view", names(["lst-v"])),
        ("kind!=committed", names(["lst-a", "lst-b", "lst-v"])),
    ];
    for (filter, want) in filters {
        assert_eq!(b.list_names("lst-", &[filter]).await?, want, "{filter}");
    }
    Ok(())
}

pub async fn list_filter_name_and_parent(b: &Backend) -> Result<()> {
    list_fixture(b).await?;
    let filters = [
        ("name==lst-2", names(["lst-2"])),
        ("name==lst-nothing", names([])),
        ("parent==lst-2", names(["lst-3", "lst-v"])),
        ("parent==lst-3", names(["lst-a"])),
        (r#"name~="^lst-[ab]$""#, names(["lst-a", "lst-b"])),
    ];
    for (filter, want) in filters {
        assert_eq!(b.list_names("lst-", &[filter]).await?, want, "{filter}");
    }
    Ok(())
}

pub async fn list_filter_labels(b: &Backend) -> Result<()> {
    list_fixture(b).await?;
    let filters = [
        (r#"labels."a.b"==v"#, names(["lst-1", "lst-a"])),
        (r#"labels."a.b""#, names(["lst-1", "lst-2", "lst-a"])),
        (
            r#"labels."a.b"!=v"#,
            names(["lst-2", "lst-3", "lst-b", "lst-v"]),
        ),
        ("labels.x", names(["lst-1", "lst-a"])),
        ("labels.y==1", names(["lst-v"])),
    ];
    for (filter, want) in filters {
        assert_eq!(b.list_names("lst-", &[filter]).await?, want, "{filter}");
    }
    Ok(())
}

pub async fn list_filters_or_and_comma_and(b: &Backend) -> Result<()> {
    list_fixture(b).await?;
    let cases: [(&[&str], BTreeSet<String>); 4] = [
        (&["name==lst-1", "name==lst-b"], names(["lst-1", "lst-b"])),
        (&["kind==view", "parent==lst-3"], names(["lst-a", "lst-v"])),
        (&[r#"kind==committed,labels."a.b"==v"#], names(["lst-1"])),
        (
            &["kind==active,labels.x", "kind==committed,parent==lst-1"],
            names(["lst-a", "lst-2"]),
        ),
    ];
    for (filters, want) in cases {
        assert_eq!(b.list_names("lst-", filters).await?, want, "{filters:?}");
    }
    // containerd wraps the parse error so that it reaches the wire as
    // Unknown (its message ends in "invalid argument").
    expect_code_in(
        b.list(&["kind=="]).await,
        EMPTY_NAME_CODES,
        "malformed filter",
    );
    Ok(())
}

/// 160 snapshots with 32 KB of labels each: 5 MB of answers, more than
/// one gRPC message may carry by default (4 MiB), so List must stream
/// them in several messages. containerd sends batches of 100 snapshots
/// whatever their size (so 32 snapshots of 160 KB would already fail).
pub async fn list_streams_large_results(b: &Backend) -> Result<()> {
    let big: Labels = (0..8)
        .map(|i| (format!("conformance/big{i}"), "v".repeat(4000)))
        .collect();
    for batch in 0..10 {
        let results = futures_join(16, |i| {
            let key = format!("big-list-{:03}", batch * 16 + i);
            let big = big.clone();
            async move { b.prepare(&key, "", big).await }
        })
        .await;
        for result in results {
            result?;
        }
    }
    let infos = b.list(&[]).await?;
    let ours: Vec<&Info> = infos
        .iter()
        .filter(|i| i.name.starts_with("big-list-"))
        .collect();
    assert_eq!(ours.len(), 160, "each snapshot listed once");
    let distinct: BTreeSet<&str> = ours.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(distinct.len(), 160);
    assert!(ours.iter().all(|i| i.labels == big), "labels intact");
    Ok(())
}

// ------------------------------------------------------- invalid requests

pub async fn prepare_empty_key(b: &Backend) -> Result<()> {
    expect_code_in(
        b.prepare("", "", no_labels()).await,
        EMPTY_NAME_CODES,
        "Prepare(\"\")",
    );
    expect_code_in(
        b.view("", "", no_labels()).await,
        EMPTY_NAME_CODES,
        "View(\"\")",
    );
    layer(b, "ek-c", "", &[], &[]).await?;
    expect_code_in(
        b.prepare("", "ek-c", no_labels()).await,
        EMPTY_NAME_CODES,
        "Prepare(\"\", parent)",
    );
    let listed = b.list(&[]).await?;
    assert!(
        listed.iter().all(|i| !i.name.is_empty()),
        "a snapshot without name: {listed:?}"
    );
    Ok(())
}

/// Keys are opaque strings: containerd's unpacker uses keys such as
/// `extract-<n> sha256:<chain id>`, and none of these may be taken as a
/// path.
pub async fn keys_with_odd_characters(b: &Backend) -> Result<()> {
    let long = format!("odd-long-{}", "k".repeat(2000));
    let keys = [
        "odd-extract-1 sha256:4a7f2c0e5b9d8e1f3a6c7b2d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f",
        "odd/with/slashes",
        "odd-../../../escape",
        "..",
        ".",
        "odd-ключ-键-🔑",
        "odd-tab\tand\nnewline",
        long.as_str(),
    ];
    for (i, key) in keys.iter().enumerate() {
        let name = format!("{key}-committed");
        layer(b, &name, "", &[("n", &i.to_string())], &[]).await?;
        let child = format!("{key}-child");
        b.prepare(&child, &name, no_labels()).await?;
        let info = b.stat(&child).await?;
        assert_eq!(
            (info.name.as_str(), info.parent.as_str()),
            (child.as_str(), name.as_str())
        );
        let mounted = mount_all(
            &b.mounts(&child).await?,
            &b.scratch_dir(&format!("odd-{i}"))?,
        )?;
        assert_eq!(read(&mounted.path().join("n"))?, i.to_string(), "{key:?}");
        drop(mounted);
        let listed = b.list(&[]).await?;
        assert!(listed.iter().any(|i| i.name == name), "{name:?} not listed");
        b.remove(&child).await?;
        b.remove(&name).await?;
        expect_code(b.stat(&name).await, Code::NotFound, "Stat after Remove");
    }
    if let Some(root) = b.snapshots_dir() {
        let outside = root.parent().context("snapshots dir has a parent")?;
        for entry in std::fs::read_dir(outside)? {
            let name = entry?.file_name();
            assert!(
                !name.to_string_lossy().contains("escape"),
                "a key became a path: {name:?} in {outside:?}"
            );
        }
    }
    Ok(())
}

/// `containerd.io/snapshot.ref` names the committed snapshot a Prepare is
/// meant to become (containerd's unpacker). Without a remote layer to
/// mount (overlayfs never has one) the Prepare is an ordinary one: an
/// empty active snapshot with its labels, for containerd to unpack into
/// and commit.
pub async fn prepare_with_remote_ref_label(b: &Backend) -> Result<()> {
    let chain_id = "sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b";
    let key = format!("extract-1 {chain_id}");
    let l = labels([
        ("containerd.io/snapshot.ref", chain_id),
        (
            "containerd.io/snapshot/cri.layer-digest",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ]);
    let mounts = b.prepare(&key, "", l.clone()).await?;
    let info = b.stat(&key).await?;
    assert_eq!(kind(&info), Kind::Active);
    assert_eq!(info.labels, l);
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("remote-ref")?)?;
        ensure!(
            std::fs::read_dir(mounted.path())?.next().is_none(),
            "not empty"
        );
        write_files(mounted.path(), &[("unpacked", "u")])?;
    }
    b.commit(chain_id, &key, no_labels()).await?;
    assert_eq!(kind(&b.stat(chain_id).await?), Kind::Committed);
    // Once the target exists, containerd answers a Prepare naming it with
    // AlreadyExists ("target snapshot"), the signal to skip the unpack.
    expect_code(
        b.prepare("extract-2", "", l).await,
        Code::AlreadyExists,
        "Prepare of an existing target",
    );
    expect_code(
        b.stat("extract-2").await,
        Code::NotFound,
        "nothing left behind",
    );
    // Without the label, a second unpack only fails at Commit.
    b.prepare("extract-3", "", no_labels()).await?;
    expect_code(
        b.commit(chain_id, "extract-3", no_labels()).await,
        Code::AlreadyExists,
        "second commit",
    );
    Ok(())
}

pub async fn prepare_duplicate_key(b: &Backend) -> Result<()> {
    b.prepare("dup-a", "", no_labels()).await?;
    expect_code(
        b.prepare("dup-a", "", no_labels()).await,
        Code::AlreadyExists,
        "Prepare twice",
    );
    layer(b, "dup-c", "", &[], &[]).await?;
    expect_code(
        b.prepare("dup-c", "", no_labels()).await,
        Code::AlreadyExists,
        "Prepare(committed name)",
    );
    expect_code(
        b.prepare("dup-a", "dup-c", no_labels()).await,
        Code::AlreadyExists,
        "Prepare twice with parent",
    );
    assert_eq!(b.stat("dup-a").await?.parent, "", "the first one stays");
    Ok(())
}

pub async fn prepare_missing_parent(b: &Backend) -> Result<()> {
    expect_code(
        b.prepare("np-a", "np-missing", no_labels()).await,
        Code::NotFound,
        "Prepare on missing parent",
    );
    expect_code(
        b.view("np-v", "np-missing", no_labels()).await,
        Code::NotFound,
        "View on missing parent",
    );
    expect_code(b.stat("np-a").await, Code::NotFound, "nothing left behind");
    Ok(())
}

pub async fn prepare_on_active_parent(b: &Backend) -> Result<()> {
    b.prepare("ap-parent", "", no_labels()).await?;
    expect_code(
        b.prepare("ap-child", "ap-parent", no_labels()).await,
        Code::InvalidArgument,
        "Prepare on active parent",
    );
    expect_code(
        b.stat("ap-child").await,
        Code::NotFound,
        "nothing left behind",
    );
    Ok(())
}

pub async fn view_on_active_parent(b: &Backend) -> Result<()> {
    b.prepare("avp-parent", "", no_labels()).await?;
    expect_code(
        b.view("avp-child", "avp-parent", no_labels()).await,
        Code::InvalidArgument,
        "View on active parent",
    );
    Ok(())
}

pub async fn prepare_on_view_parent(b: &Backend) -> Result<()> {
    layer(b, "vp-c", "", &[], &[]).await?;
    b.view("vp-v", "vp-c", no_labels()).await?;
    expect_code(
        b.prepare("vp-child", "vp-v", no_labels()).await,
        Code::InvalidArgument,
        "Prepare on view parent",
    );
    expect_code(
        b.view("vp-child-v", "vp-v", no_labels()).await,
        Code::InvalidArgument,
        "View on view parent",
    );
    Ok(())
}

pub async fn view_duplicate_key(b: &Backend) -> Result<()> {
    layer(b, "vdup-c", "", &[], &[]).await?;
    b.view("vdup-v", "vdup-c", no_labels()).await?;
    expect_code(
        b.view("vdup-v", "vdup-c", no_labels()).await,
        Code::AlreadyExists,
        "View twice",
    );
    expect_code(
        b.prepare("vdup-v", "", no_labels()).await,
        Code::AlreadyExists,
        "Prepare(view key)",
    );
    b.prepare("vdup-a", "vdup-c", no_labels()).await?;
    expect_code(
        b.view("vdup-a", "vdup-c", no_labels()).await,
        Code::AlreadyExists,
        "View(active key)",
    );
    assert_eq!(kind(&b.stat("vdup-a").await?), Kind::Active);
    Ok(())
}

pub async fn commit_of_view(b: &Backend) -> Result<()> {
    layer(b, "cv-c", "", &[], &[]).await?;
    b.view("cv-v", "cv-c", no_labels()).await?;
    expect_code(
        b.commit("cv-new", "cv-v", no_labels()).await,
        Code::FailedPrecondition,
        "Commit(view)",
    );
    assert_eq!(kind(&b.stat("cv-v").await?), Kind::View);
    expect_code(
        b.stat("cv-new").await,
        Code::NotFound,
        "no committed snapshot made",
    );
    Ok(())
}

pub async fn commit_missing_key(b: &Backend) -> Result<()> {
    expect_code(
        b.commit("cm-new", "cm-missing", no_labels()).await,
        Code::NotFound,
        "Commit(missing)",
    );
    layer(b, "cm-c", "", &[], &[]).await?;
    expect_code(
        b.commit("cm-new", "cm-c", no_labels()).await,
        Code::FailedPrecondition,
        "Commit(committed)",
    );
    Ok(())
}

pub async fn commit_to_existing_name(b: &Backend) -> Result<()> {
    layer(b, "ce-c", "", &[], &[]).await?;
    b.prepare("ce-a", "", no_labels()).await?;
    expect_code(
        b.commit("ce-c", "ce-a", no_labels()).await,
        Code::AlreadyExists,
        "Commit onto committed name",
    );
    assert_eq!(
        kind(&b.stat("ce-a").await?),
        Kind::Active,
        "the active survives"
    );
    Ok(())
}

pub async fn commit_name_equal_to_active_key(b: &Backend) -> Result<()> {
    b.prepare("cn-a1", "", no_labels()).await?;
    b.prepare("cn-a2", "", no_labels()).await?;
    expect_code(
        b.commit("cn-a1", "cn-a2", no_labels()).await,
        Code::AlreadyExists,
        "Commit onto active key",
    );
    b.view("cn-v", "", no_labels()).await?;
    expect_code(
        b.commit("cn-v", "cn-a2", no_labels()).await,
        Code::AlreadyExists,
        "Commit onto view key",
    );
    assert_eq!(kind(&b.stat("cn-a1").await?), Kind::Active);
    assert_eq!(kind(&b.stat("cn-a2").await?), Kind::Active);
    Ok(())
}

pub async fn commit_empty_name(b: &Backend) -> Result<()> {
    b.prepare("cen-a", "", no_labels()).await?;
    expect_code_in(
        b.commit("", "cen-a", no_labels()).await,
        EMPTY_NAME_CODES,
        "Commit(\"\")",
    );
    assert_eq!(kind(&b.stat("cen-a").await?), Kind::Active);
    Ok(())
}

pub async fn prepare_labels_too_large(b: &Backend) -> Result<()> {
    expect_code(
        b.prepare("big-a", "", huge_labels()).await,
        Code::InvalidArgument,
        "Prepare(huge labels)",
    );
    expect_code(b.stat("big-a").await, Code::NotFound, "nothing left behind");
    // Exactly at the limit is fine: key + value = 4096 bytes.
    let key = "conformance/limit";
    let at_limit = labels([(key, &"x".repeat(4096 - key.len()))]);
    b.prepare("big-ok", "", at_limit.clone()).await?;
    assert_eq!(b.stat("big-ok").await?.labels, at_limit);
    // The limit is per label, not for the whole map.
    let many: Labels = (0..8)
        .map(|i| (format!("conformance/{i}"), "v".repeat(3000)))
        .collect();
    b.prepare("big-many", "", many.clone()).await?;
    assert_eq!(b.stat("big-many").await?.labels, many);
    Ok(())
}

pub async fn commit_labels_too_large(b: &Backend) -> Result<()> {
    b.prepare("bigc-a", "", no_labels()).await?;
    expect_code(
        b.commit("bigc-c", "bigc-a", huge_labels()).await,
        Code::InvalidArgument,
        "Commit(huge labels)",
    );
    assert_eq!(kind(&b.stat("bigc-a").await?), Kind::Active);
    Ok(())
}

// ---------------------------------------------------------------- cleanup

pub async fn cleanup_removes_dirs_of_removed_snapshots(b: &Backend) -> Result<()> {
    let mounts = b.prepare("clean-1-a", "", no_labels()).await?;
    let dir1 = snapshot_dir_of(&mounts)?;
    b.commit("clean-1", "clean-1-a", no_labels()).await?;
    let dir2 = snapshot_dir_of(&b.prepare("clean-2", "clean-1", no_labels()).await?)?;
    let dir3 = snapshot_dir_of(&b.prepare("clean-3", "clean-1", no_labels()).await?)?;
    if let Some(root) = b.snapshots_dir() {
        for dir in [&dir1, &dir2, &dir3] {
            assert!(
                dir.starts_with(root),
                "{} not under {}",
                dir.display(),
                root.display()
            );
        }
    }
    for dir in [&dir1, &dir2, &dir3] {
        assert!(dir.is_dir(), "{} missing before removal", dir.display());
    }
    b.remove("clean-2").await?;
    b.remove("clean-3").await?;
    b.remove("clean-1").await?;
    b.prepare("clean-live", "", no_labels()).await?;
    let live = snapshot_dir_of(&b.mounts("clean-live").await?)?;
    let cleanup = async || {
        if b.cleanup_implemented() {
            b.cleanup().await
        } else {
            expect_code(b.cleanup().await, Code::Unimplemented, "Cleanup");
            Ok(())
        }
    };
    cleanup().await?;
    // containerd removes directories in its garbage collector, shortly
    // after the removal (later on a loaded machine: the collector backs off
    // in proportion to how long its last run took); a bare snapshotter may
    // do so in Remove or Cleanup.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while [&dir1, &dir2, &dir3].iter().any(|d| d.exists()) {
        if std::time::Instant::now() > deadline {
            panic!(
                "snapshot dirs still on disk after Remove and Cleanup: {dir1:?} {dir2:?} {dir3:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        cleanup().await?;
    }
    assert!(live.is_dir(), "Cleanup removed a live snapshot's dir");
    if let Some(root) = b.snapshots_dir() {
        let left: Vec<PathBuf> = std::fs::read_dir(root)?
            .map(|e| Ok(e?.path()))
            .collect::<Result<_>>()?;
        assert_eq!(left, [live], "only the live snapshot is left in {root:?}");
    }
    Ok(())
}

// ------------------------------------------------------------ concurrency

/// Eight Prepares of one key at once: exactly one succeeds.
pub async fn concurrent_prepares_of_one_key_one_wins(b: &Backend) -> Result<()> {
    let results = futures_join(8, |_| b.prepare("conc-one", "", no_labels())).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        expect_code(r, Code::AlreadyExists, "concurrent Prepare of one key");
    }
    Ok(())
}

/// Four chains built at once each end up whole.
pub async fn concurrent_chains(b: &Backend) -> Result<()> {
    let results = futures_join(4, |i| {
        let prefix = format!("conc-chain{i}");
        async move { chain(b, &prefix, 3).await }
    })
    .await;
    for (i, result) in results.into_iter().enumerate() {
        let layers = result?;
        let info = b.stat(&layers[2]).await?;
        assert_eq!(info.parent, format!("conc-chain{i}-2"));
        let mounts = b
            .view(&format!("conc-chain{i}-v"), &layers[2], no_labels())
            .await?;
        let mounted = mount_all(&mounts, &b.scratch_dir(&format!("conc-chain{i}-v"))?)?;
        assert_eq!(read(&mounted.path().join("layer"))?, "layer 3");
    }
    Ok(())
}

/// Runs `n` futures concurrently on the current task and collects their
/// outputs in order.
async fn futures_join<F, T>(n: usize, make: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut set: Vec<std::pin::Pin<Box<F>>> = (0..n).map(|i| Box::pin(make(i))).collect();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in out.iter_mut().zip(set.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("polled to completion"))
        .collect()
}

// ---------------------------------------------------------------- restart

/// containerd keeps its connection to a proxy snapshotter open; a SIGTERM
/// must not wait for it to go away.
pub async fn restart_stops_promptly_with_client_connected(b: &Backend) -> Result<()> {
    b.prepare("rs-prompt", "", no_labels()).await?;
    let stopped = b.restart(Signal::SIGTERM).await?;
    assert!(stopped < Duration::from_secs(3), "SIGTERM took {stopped:?}");
    assert_eq!(kind(&b.stat("rs-prompt").await?), Kind::Active);
    Ok(())
}

pub async fn restart_keeps_snapshots_and_data(b: &Backend) -> Result<()> {
    let layers = chain(b, "rs", 2).await?;
    b.update(info_with(&layers[0], labels([("l", "1")])), &["labels"])
        .await?;
    let mounts = b
        .prepare("rs-active", &layers[1], labels([("a", "b")]))
        .await?;
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("rs-active")?)?;
        write_files(mounted.path(), &[("before-restart", "kept")])?;
    }
    let view_mounts = b.view("rs-view", &layers[0], no_labels()).await?;
    let keys = ["rs-1", "rs-2", "rs-active", "rs-view"];
    let mut before = Vec::new();
    for key in keys {
        before.push(b.stat(key).await?);
    }
    let usage = b.usage("rs-1").await?;

    b.restart(Signal::SIGTERM).await?;

    for (key, info) in keys.iter().zip(&before) {
        assert_eq!(&b.stat(key).await?, info, "Stat({key}) after restart");
    }
    assert_eq!(b.list_names("rs-", &[]).await?, names(keys));
    assert_eq!(
        b.mounts("rs-active").await?,
        mounts,
        "Mounts(active) after restart"
    );
    assert_eq!(
        b.mounts("rs-view").await?,
        view_mounts,
        "Mounts(view) after restart"
    );
    assert_eq!(
        b.usage("rs-1").await?,
        usage,
        "Usage(committed) after restart"
    );
    {
        let mounted = mount_all(&mounts, &b.scratch_dir("rs-active-2")?)?;
        assert_eq!(read(&mounted.path().join("before-restart"))?, "kept");
        assert_eq!(read(&mounted.path().join("file1"))?, "layer 1");
    }
    b.commit("rs-3", "rs-active", no_labels()).await?;
    b.remove("rs-view").await?;
    expect_code(
        b.remove("rs-1").await,
        Code::FailedPrecondition,
        "parent after restart",
    );
    let mounts = b.view("rs-view-3", "rs-3", no_labels()).await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("rs-view-3")?)?;
    assert_eq!(read(&mounted.path().join("before-restart"))?, "kept");
    Ok(())
}

/// Every call answered before a SIGKILL is durable: the daemon comes back
/// with exactly the acknowledged state.
pub async fn sigkill_keeps_acknowledged_changes(b: &Backend) -> Result<()> {
    let layers = chain(b, "kill", 2).await?;
    b.prepare("kill-active", &layers[1], labels([("a", "1")]))
        .await?;
    b.view("kill-view", &layers[0], no_labels()).await?;
    b.prepare("kill-removed", "", no_labels()).await?;
    b.remove("kill-removed").await?;
    b.update(info_with(&layers[1], labels([("u", "2")])), &["labels.u"])
        .await?;
    let mut before = Vec::new();
    for key in ["kill-1", "kill-2", "kill-active", "kill-view"] {
        before.push(b.stat(key).await?);
    }

    b.restart(Signal::SIGKILL).await?;

    for info in &before {
        assert_eq!(
            &b.stat(&info.name).await?,
            info,
            "Stat({}) after SIGKILL",
            info.name
        );
    }
    expect_code(
        b.stat("kill-removed").await,
        Code::NotFound,
        "removed before SIGKILL",
    );
    let mounts = b.mounts("kill-active").await?;
    let mounted = mount_all(&mounts, &b.scratch_dir("kill-active")?)?;
    assert_eq!(read(&mounted.path().join("layer"))?, "layer 2");
    Ok(())
}
