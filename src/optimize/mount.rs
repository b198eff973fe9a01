//! The overlayfs mount of the unpacked layers: the rootfs the workload
//! runs on. Unmounted (lazily, so a stuck user never blocks cleanup) when
//! the guard drops, on every exit path.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::{OptimizeError, Result};

/// Longest overlay option string the kernel takes (one page).
const MAX_OPTIONS: usize = 4000;

pub struct Overlay {
    merged: PathBuf,
    mounted: bool,
}

impl Overlay {
    /// Mounts `layers` (base first) with a writable `upper`/`work` pair on
    /// `merged`. All directories must exist; upper and work on the same
    /// filesystem.
    pub fn mount(layers: &[PathBuf], upper: &Path, work: &Path, merged: &Path) -> Result<Overlay> {
        let err = |reason: String| OptimizeError::Mount {
            path: merged.to_owned(),
            reason,
        };
        if layers.is_empty() {
            return Err(err("the image has no layers".into()));
        }
        let mut lower = String::new();
        // overlayfs lists the topmost lower layer first.
        for l in layers.iter().rev() {
            let s = l
                .to_str()
                .filter(|s| !s.contains([',', ':']))
                .ok_or_else(|| err(format!("unusable layer path {}", l.display())))?;
            if !lower.is_empty() {
                lower.push(':');
            }
            lower.push_str(s);
        }
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        if opts.len() > MAX_OPTIONS {
            return Err(err(format!(
                "{} layers make overlay options of {} bytes (limit {MAX_OPTIONS})",
                layers.len(),
                opts.len()
            )));
        }
        mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| err(format!("mount: {e}")))?;
        Ok(Overlay {
            merged: merged.to_owned(),
            mounted: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.merged
    }

    /// Unmounts now, reporting failure.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        umount2(&self.merged, MntFlags::MNT_DETACH).map_err(|e| OptimizeError::Mount {
            path: self.merged.clone(),
            reason: format!("umount: {e}"),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.merged, MntFlags::MNT_DETACH);
        }
    }
}
