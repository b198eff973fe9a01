//! Mounting what a snapshotter returns, the way containerd does: each
//! `Mount` in turn onto the same target, mount(8)-style options split into
//! flags and filesystem data.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use rstargz::proto::types::Mount;

/// A target with mounts stacked on it; dropping it detaches them all.
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
    layers: usize,
}

impl Mounted {
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..self.layers {
            if let Err(err) = umount2(&self.target, MntFlags::MNT_DETACH) {
                eprintln!("umount {}: {err}", self.target.display());
                break;
            }
        }
    }
}

/// Splits mount(8) options into mount(2) flags and the data string.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "defaults" | "suid" | "dev" | "exec" | "async" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts every entry of `mounts` onto `target` in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted> {
    if mounts.is_empty() {
        bail!("no mounts to mount on {}", target.display());
    }
    std::fs::create_dir_all(target)?;
    let mut mounted = Mounted {
        target: target.to_path_buf(),
        layers: 0,
    };
    for m in mounts {
        let (flags, data) = parse_options(&m.options);
        let data = (!data.is_empty()).then_some(data.as_str());
        let context = || format!("mount {m:?} on {}", target.display());
        if flags.contains(MsFlags::MS_BIND) || m.r#type == "bind" {
            let bind = flags & (MsFlags::MS_BIND | MsFlags::MS_REC) | MsFlags::MS_BIND;
            mount(Some(m.source.as_str()), target, None::<&str>, bind, data)
                .with_context(context)?;
            mounted.layers += 1;
            // A bind mount ignores every other flag until it is remounted.
            let rest = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
            if !rest.is_empty() {
                mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    rest | MsFlags::MS_REMOUNT | MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(context)?;
            }
        } else {
            mount(
                Some(m.source.as_str()),
                target,
                Some(m.r#type.as_str()),
                flags,
                data,
            )
            .with_context(context)?;
            mounted.layers += 1;
        }
    }
    Ok(mounted)
}

/// The value of `key=` in a mount's options, if present.
pub fn option<'a>(m: &'a Mount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

/// Whether a mount's options contain exactly `flag`.
pub fn has_flag(m: &Mount, flag: &str) -> bool {
    m.options.iter().any(|o| o == flag)
}
