//! [`LazyFs`]: the snapshotter's [`RemoteFs`], mounting eStargz layers
//! straight from their registry.
//!
//! `mount` reads the labels containerd passes on `Prepare` (image reference,
//! layer digest, TOC digest), opens the layer (blob size plus one tail read
//! for footer and TOC, TOC digest checked), and serves it read-only in a
//! slot of the daemon's single FUSE mount ([`MuxMount`], at `<root>/fuse`),
//! bind-mounted on the snapshot's directory. Any failure is returned as a reason, and the snapshotter falls back
//! to an ordinary pull of that layer. `check` waits for the layer's prefetch
//! only if `prefetch_timeout_ms` asks (default: no; reads of prioritized
//! files wait for the streaming prefetch's chunks instead).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::fs::cache::{Caches, CompleteFiles};
use crate::fs::content::ContentSource;
use crate::fs::fuse::{self, LayerFs, LayerFsOptions, MountOptions, MuxMount};
use crate::fs::handover::{Handover, HolderCommand};
use crate::fs::layer::{
    DynFetcher, Layer, LayerConfig, LayerContext, PrefetchState, StatsSnapshot, TocCheck, Trust,
    open_layer,
};
use crate::fs::prewarm::{self, Prewarm, WarmFetcher};
use crate::fs::registry::{Reference, RegistryClient, RegistryConfig};
use crate::fs::slots::SlotTable;
use crate::fs::tail_cache::{self, TailCache};
use crate::snapshotter::{RemoteError, RemoteFs};

/// Image reference: CRI's label first, then stargz-snapshotter's.
const IMAGE_REF_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/remote/stargz.reference",
];
/// This layer's compressed digest, in the same order.
const LAYER_DIGEST_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
];

/// `[fs]` in the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsConfig {
    /// Mount eStargz layers lazily. Off: every layer is pulled normally.
    pub enabled: bool,
    /// Mount legacy stargz layers that carry the `stargz.skipverify` label
    /// without a TOC digest.
    pub allow_no_verification: bool,
    /// FUSE worker threads of the daemon's single mount, shared by every
    /// layer. Reads are answered from the runtime; workers only answer
    /// metadata from memory and start reads.
    pub fuse_threads: usize,
    /// Largest number of reads in flight per layer.
    pub max_inflight_reads: usize,
    /// Bytes of whole files written out (`<root>/complete-files`) once a
    /// layer is fully fetched, served by FUSE passthrough at local-file
    /// speed. 0 turns passthrough off.
    pub passthrough_bytes: u64,
    /// Park the FUSE connection with a holder process, so that running
    /// containers keep reading across a restart, crash or upgrade of the
    /// daemon (docs/restart.md). Off: a stop unmounts every layer.
    pub handover: bool,
    /// How long the holder keeps a connection no daemon took over; then it
    /// closes it, and reads waiting for a daemon fail with `ENOTCONN`.
    pub handover_grace_secs: u64,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            enabled: true,
            allow_no_verification: false,
            fuse_threads: 4,
            max_inflight_reads: 64,
            passthrough_bytes: 2 << 30,
            handover: true,
            handover_grace_secs: 60,
        }
    }
}

/// What one mounted layer reports (`rstargz status`).
#[derive(Debug, Clone, Serialize)]
pub struct LayerStatus {
    pub mountpoint: PathBuf,
    /// The layer's directory in the daemon's FUSE mount (`<root>/fuse/<slot>`).
    pub slot: u32,
    /// Where footer and TOC came from at open: `registry`, `prewarm`, or
    /// `disk` (stored by an earlier open, e.g. before a restart).
    pub tail_source: &'static str,
    pub reference: String,
    pub digest: String,
    pub verified: bool,
    pub prefetch: String,
    pub stats: StatsSnapshot,
}

/// How many recent fallbacks [`LazyFs::fallbacks`] keeps.
pub const FALLBACK_HISTORY: usize = 64;

/// A layer that was not mounted lazily, and why (`rstargz status`).
#[derive(Debug, Clone, Serialize)]
pub struct Fallback {
    /// Seconds since the Unix epoch.
    pub at_unix_secs: u64,
    pub mountpoint: PathBuf,
    /// From the labels, when present.
    pub reference: Option<String>,
    pub digest: Option<String>,
    pub reason: String,
}

/// Where a layer's footer and TOC came from when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailSource {
    /// Fetched ahead while a layer below was mounted.
    Prewarm,
    /// Stored by an earlier open (`<root>/toc-cache`); no registry request.
    Disk,
    Registry,
}

impl TailSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TailSource::Prewarm => "prewarm",
            TailSource::Disk => "disk",
            TailSource::Registry => "registry",
        }
    }
}

/// Bytes of TOC tails kept on disk (`<root>/toc-cache`).
const TAIL_CACHE_BYTES: u64 = 256 << 20;

struct Mounted {
    layer: Arc<Layer<DynFetcher>>,
    slot: u32,
    tail: TailSource,
    reference: String,
    digest: String,
}

/// The lazy-pulling [`RemoteFs`].
pub struct LazyFs {
    config: FsConfig,
    client: RegistryClient,
    base: LayerContext,
    rt: tokio::runtime::Handle,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
    /// The single FUSE mount, made on first use.
    mux: Mutex<Option<Arc<MuxMount>>>,
    /// Held while the mount is made: two first mounts at once must not both
    /// mount (or both take the parked connection over).
    mux_init: tokio::sync::Mutex<()>,
    mux_dir: PathBuf,
    slots: Arc<Mutex<SlotTable>>,
    tails: TailCache,
    complete: Option<Arc<CompleteFiles>>,
    fallbacks: Mutex<VecDeque<Fallback>>,
    fallbacks_total: AtomicU64,
    prewarm: Prewarm,
    handover: Option<Arc<Handover>>,
}

/// The holder's socket in the daemon's root.
pub fn holder_socket(root: &Path) -> PathBuf {
    root.join("fuse-holder.sock")
}

impl LazyFs {
    /// Builds the registry client and the shared caches (scanning the disk
    /// cache directory; blocking). `root` is the daemon's state directory:
    /// `<root>/cache` is the disk cache when the layer config names none,
    /// `<root>/fuse` the FUSE mount, `<root>/fuse-slots.json` the slots.
    pub fn new(
        config: FsConfig,
        registry: RegistryConfig,
        mut layer: LayerConfig,
        root: &Path,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        if layer.disk_cache_dir.is_none() && layer.disk_cache_bytes > 0 {
            layer.disk_cache_dir = Some(root.join("cache"));
        }
        std::fs::create_dir_all(root)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", root.display()))?;
        let slot_file = root.join("fuse-slots.json");
        let slots = SlotTable::load(&slot_file).unwrap_or_else(|e| {
            // Slots only matter to a future FUSE hand-over; start afresh.
            tracing::warn!(error = %e, "ignoring the slot file");
            let _ = std::fs::remove_file(&slot_file);
            SlotTable::load(&slot_file).expect("missing slot file loads empty")
        });
        layer
            .validate()
            .map_err(|e| anyhow::anyhow!("[layer]: {e}"))?;
        let complete = match config.passthrough_bytes {
            0 => None,
            n => {
                let dir = root.join("complete-files");
                let f = CompleteFiles::open(&dir, n)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
                Some(Arc::new(f))
            }
        };
        let client = RegistryClient::new(registry)?;
        let caches = Caches::from_config(&layer)?;
        Ok(LazyFs {
            config,
            client,
            base: LayerContext::new(layer, caches),
            rt,
            mounts: Mutex::new(HashMap::new()),
            mux: Mutex::new(None),
            mux_init: tokio::sync::Mutex::new(()),
            mux_dir: root.join("fuse"),
            slots: Arc::new(Mutex::new(slots)),
            tails: TailCache::new(tail_cache::default_dir(root), TAIL_CACHE_BYTES),
            complete,
            fallbacks: Mutex::new(VecDeque::with_capacity(FALLBACK_HISTORY)),
            fallbacks_total: AtomicU64::new(0),
            prewarm: Prewarm::default(),
            handover: None,
        })
    }

    /// Enables the FUSE hand-over (when `[fs] handover` is on): `program`
    /// and `args` start a holder process (`rstargz-grpc --fuse-holder`).
    pub fn with_holder(mut self, root: &Path, program: PathBuf, args: Vec<String>) -> Self {
        if self.config.handover {
            self.handover = Some(Arc::new(Handover::new(
                holder_socket(root),
                HolderCommand {
                    program,
                    args,
                    grace: std::time::Duration::from_secs(self.config.handover_grace_secs),
                    log: root.join("fuse-holder.log"),
                },
            )));
        }
        self
    }

    /// Called once the remote snapshots are restored: an adopted FUSE
    /// connection starts answering now that every layer is back in its
    /// slot. A connection parked by a previous daemon that no restored layer
    /// needed is taken over too, so that whatever still references it gets
    /// answers instead of waiting out the holder's grace period.
    pub async fn resume_after_restore(&self) {
        let existing = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mux = match existing {
            Some(m) => Some(m),
            None if self.handover.is_some() => self.mux_inner(false).await.ok().flatten(),
            None => None,
        };
        if let Some(m) = mux {
            let r = tokio::task::spawn_blocking(move || m.resume()).await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot serve the adopted FUSE connection")
                }
                Err(e) => tracing::error!(error = %e, "resume task failed"),
            }
        }
    }

    /// Before the process exits. With the hand-over on, everything stays
    /// mounted and the holder keeps the connection for the next daemon;
    /// otherwise the holder (if any) is told to let go, and dropping the
    /// mount unmounts every layer. Blocking.
    pub fn shutdown(&self) {
        let mux = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (&self.handover, mux) {
            (Some(_), Some(m)) => {
                m.park();
                tracing::info!("FUSE connection left to the holder for the next daemon");
            }
            (Some(h), None) => {
                if let Err(e) = h.release() {
                    tracing::warn!(error = %e, "releasing the FUSE holder failed");
                }
            }
            (None, _) => {}
        }
    }

    /// Per-layer state and statistics, sorted by mountpoint.
    pub fn status(&self) -> Vec<LayerStatus> {
        let mounts = self.lock();
        let mut out: Vec<LayerStatus> = mounts
            .iter()
            .map(|(path, m)| LayerStatus {
                mountpoint: path.clone(),
                slot: m.slot,
                tail_source: m.tail.as_str(),
                reference: m.reference.clone(),
                digest: m.digest.clone(),
                verified: matches!(m.layer.trust(), Trust::Verified { .. }),
                prefetch: format!("{:?}", m.layer.prefetch_state()),
                stats: m.layer.stats(),
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// Fallbacks since start, and the most recent ones (oldest first).
    pub fn fallbacks(&self) -> (u64, Vec<Fallback>) {
        let ring = self.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        (
            self.fallbacks_total.load(Ordering::Relaxed),
            ring.iter().cloned().collect(),
        )
    }

    fn record_fallback(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        reason: &RemoteError,
    ) {
        let find = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let at_unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let f = Fallback {
            at_unix_secs,
            mountpoint: mountpoint.to_path_buf(),
            reference: find(&IMAGE_REF_LABELS),
            digest: find(&LAYER_DIGEST_LABELS),
            reason: reason.to_string(),
        };
        self.fallbacks_total.fetch_add(1, Ordering::Relaxed);
        let mut ring = self.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() >= FALLBACK_HISTORY {
            ring.pop_front();
        }
        ring.push_back(f);
    }

    /// The caches shared by every layer.
    pub fn caches(&self) -> &Caches {
        &self.base.caches
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        // A panic while holding the map cannot leave it inconsistent (every
        // update is a single insert or remove), so poisoning is ignored.
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn open(
        &self,
        labels: &HashMap<String, String>,
    ) -> Result<(Layer<DynFetcher>, String, String, TailSource), String> {
        let reference = first_label(labels, &IMAGE_REF_LABELS)
            .ok_or("no image reference label (cri.image-ref or stargz.reference)")?;
        let digest = first_label(labels, &LAYER_DIGEST_LABELS)
            .ok_or("no layer digest label (cri.layer-digest or stargz.digest)")?;
        let check = TocCheck::from_labels(labels, self.config.allow_no_verification)?;
        let parsed = Reference::parse(reference)
            .map_err(|e| format!("image reference {reference:?}: {e}"))?;
        // The layers above this one: resolve them while this one opens.
        let neighbours = prewarm::neighbours(labels, |d| {
            d == digest || self.lock().values().any(|m| m.digest == d)
        });
        self.prewarm
            .start(&self.client, &parsed, neighbours, &self.base.reader);
        let toc = match &check {
            TocCheck::Digest(d) => Some(d.to_string()),
            TocCheck::Skip { .. } => None,
        };
        let mut warm = self.prewarm.take(digest).await;
        let mut source = TailSource::Prewarm;
        if warm.is_none()
            && let Some(toc) = &toc
        {
            let (tails, d, t) = (self.tails.clone(), digest.to_string(), toc.clone());
            warm = tokio::task::spawn_blocking(move || tails.load(&d, &t))
                .await
                .ok()
                .flatten()
                .map(Arc::new);
            source = TailSource::Disk;
        }
        loop {
            let w = match warm.take() {
                Some(w) => w,
                None => {
                    source = TailSource::Registry;
                    let w = prewarm::fetch_warm(&self.client, &parsed, digest, &self.base.reader)
                        .await
                        .map_err(|e| format!("layer {digest}: {e}"))?;
                    Arc::new(w)
                }
            };
            let blob = self
                .client
                .blob_with_size(&parsed, digest, w.size)
                .map_err(|e| format!("layer {digest}: {e}"))?;
            let fetcher = DynFetcher(Arc::new(WarmFetcher::new(DynFetcher(Arc::new(blob)), &w)));
            let ctx = self.base.clone().with_labels(labels);
            let opened = open_layer(fetcher, check.clone(), ctx).await;
            let layer = match opened {
                Ok(l) => l,
                Err(e) if source == TailSource::Disk => {
                    // A stored tail that no longer checks out: drop it and
                    // read the registry's.
                    tracing::warn!(digest, error = %e, "cached TOC tail rejected; fetching it again");
                    let (tails, d) = (self.tails.clone(), digest.to_string());
                    let _ = tokio::task::spawn_blocking(move || tails.remove(&d)).await;
                    continue;
                }
                Err(e) => return Err(format!("opening layer {digest} of {reference}: {e}")),
            };
            if source != TailSource::Disk
                && let (Some(toc), Trust::Verified { .. }) = (&toc, layer.trust())
            {
                let (tails, d, t) = (self.tails.clone(), digest.to_string(), toc.clone());
                let stored = tokio::task::spawn_blocking(move || tails.store(&d, &t, &w)).await;
                if let Ok(Err(e)) = stored {
                    tracing::warn!(digest, error = %e, "storing the TOC tail failed");
                }
            }
            return Ok((layer, reference.to_string(), digest.to_string(), source));
        }
    }

    /// `RemoteFs::mount` without the fallback bookkeeping.
    async fn mount_layer(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        if !self.config.enabled {
            return Err(RemoteError::new(
                "lazy pulling is disabled ([fs] enabled = false)",
            ));
        }
        let labels: HashMap<String, String> = labels.clone().into_iter().collect();
        let (layer, reference, digest, tail) =
            self.open(&labels).await.map_err(RemoteError::new)?;
        let layer = Arc::new(layer);
        let mut fs = LayerFs::new(
            layer.index_arc(),
            layer.clone() as Arc<dyn ContentSource>,
            self.rt.clone(),
            LayerFsOptions {
                max_inflight_reads: self.config.max_inflight_reads,
                ..LayerFsOptions::default()
            },
        );
        if let Some(files) = &self.complete {
            fs = fs.with_passthrough(files.clone());
        }
        // A remount replaces the layer: its old slot is detached first.
        let old = self.lock().remove(mountpoint);
        if let Some(old) = old {
            self.release(old, mountpoint, false).await;
        }
        let mux = self.mux().await?;
        let path = mountpoint.to_path_buf();
        let slots = self.slots_handle();
        // Slot bookkeeping, mount(2) and the bind block: off the runtime.
        let slot = tokio::task::spawn_blocking(move || -> Result<u32, String> {
            let mut table = slots.lock().unwrap_or_else(|e| e.into_inner());
            let slot = table
                .assign(&path, |s| mux.is_free(s))
                .map_err(|e| e.to_string())?;
            drop(table);
            mux.attach(slot, fs, &path).map_err(|e| e.to_string())?;
            Ok(slot)
        })
        .await
        .map_err(|e| RemoteError::new(format!("mount task failed: {e}")))?
        .map_err(|e| RemoteError::new(format!("FUSE mount of {digest}: {e}")))?;
        tracing::info!(
            mountpoint = %mountpoint.display(),
            reference = %reference,
            digest = %digest,
            verified = matches!(layer.trust(), Trust::Verified { .. }),
            prewarmed = tail == TailSource::Prewarm,
            tail = tail.as_str(),
            slot,
            "layer mounted lazily"
        );
        let old = self.lock().insert(
            mountpoint.to_path_buf(),
            Mounted {
                layer,
                slot,
                tail,
                reference,
                digest,
            },
        );
        if let Some(old) = old {
            self.release(old, mountpoint, false).await;
        }
        Ok(())
    }

    fn slots_handle(&self) -> Arc<Mutex<SlotTable>> {
        self.slots.clone()
    }

    /// The daemon's FUSE mount, made on first use: taken over from the
    /// holder when a previous daemon parked one there, mounted afresh (and
    /// parked with a new holder) otherwise.
    async fn mux(&self) -> Result<Arc<MuxMount>, RemoteError> {
        self.mux_inner(true)
            .await?
            .ok_or_else(|| RemoteError::new("no FUSE mount"))
    }

    /// `fresh`: mount anew when there is nothing to take over.
    async fn mux_inner(&self, fresh: bool) -> Result<Option<Arc<MuxMount>>, RemoteError> {
        if let Some(m) = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(Some(m));
        }
        let _making = self.mux_init.lock().await;
        if let Some(m) = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(Some(m));
        }
        let dir = self.mux_dir.clone();
        let opts = MountOptions {
            fsname: "rstargz".into(),
            threads: self.config.fuse_threads,
            clone_fd: self.handover.is_none(),
            ..MountOptions::default()
        };
        let inflight = self.config.max_inflight_reads;
        let handover = self.handover.clone();
        let made = tokio::task::spawn_blocking(move || -> std::io::Result<Option<MuxMount>> {
            if let Some(h) = &handover {
                match h.take() {
                    Ok(Some((device, init))) => {
                        match MuxMount::adopt(&dir, device, &init, &opts, inflight) {
                            Ok(m) => {
                                h.watch();
                                tracing::info!(dir = %dir.display(), "took over the FUSE connection of the previous daemon");
                                return Ok(Some(m));
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot take over the parked FUSE connection; mounting afresh"),
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "FUSE holder unreachable"),
                }
            }
            if !fresh {
                return Ok(None);
            }
            let m = MuxMount::mount(&dir, &opts, inflight)?;
            if let (Some(h), Some((device, init))) = (handover, m.handover_parts()) {
                // Starting the holder takes a fork and exec: not on the
                // path of the first Prepare.
                let device = device.try_clone_to_owned()?;
                let parked = std::thread::Builder::new()
                    .name("rstargz-park".into())
                    .spawn(move || {
                        match h.park(std::os::fd::AsFd::as_fd(&device), &init) {
                            Ok(()) => h.watch(),
                            Err(e) => tracing::warn!(error = %e, "FUSE hand-over unavailable: a restart will break running containers"),
                        }
                    });
                if let Err(e) = parked {
                    tracing::warn!(error = %e, "FUSE hand-over unavailable");
                }
            }
            Ok(Some(m))
        })
        .await
        .map_err(|e| RemoteError::new(format!("mount task failed: {e}")))?
        .map_err(|e| RemoteError::new(format!("FUSE mount at {}: {e}", self.mux_dir.display())))?;
        let Some(made) = made else { return Ok(None) };
        let m = Arc::new(made);
        *self.mux.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        Ok(Some(m))
    }

    /// Layers attached and detached-but-referenced in the FUSE mount.
    pub fn fuse_slots(&self) -> (usize, usize) {
        match &*self.mux.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(m) => m.slots_in_use(),
            None => (0, 0),
        }
    }

    /// Unbinds a layer (blocking, off the runtime) and stops its background
    /// work. `forget_slot`: the snapshot is gone, so is its slot record.
    async fn release(&self, m: Mounted, mountpoint: &Path, forget_slot: bool) {
        m.layer.close();
        let mux = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let path = mountpoint.to_path_buf();
        let slots = self.slots_handle();
        let slot = m.slot;
        let r = tokio::task::spawn_blocking(move || {
            if let Some(mux) = mux {
                mux.detach(slot);
            }
            if forget_slot {
                let mut t = slots.lock().unwrap_or_else(|e| e.into_inner());
                if t.get(&path) == Some(slot) {
                    t.release(&path)?;
                }
            }
            Ok::<_, crate::fs::slots::SlotError>(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, digest = %m.digest, "slot release failed"),
            Err(e) => tracing::warn!(error = %e, digest = %m.digest, "unmount task failed"),
        }
    }
}

fn first_label<'a>(labels: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

#[async_trait]
impl RemoteFs for LazyFs {
    async fn mount(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        let r = self.mount_layer(mountpoint, labels).await;
        if let Err(e) = &r {
            self.record_fallback(mountpoint, labels, e);
        }
        r
    }

    async fn check(
        &self,
        mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteError> {
        let layer = match self.lock().get(mountpoint) {
            Some(m) => m.layer.clone(),
            None => return Err(RemoteError::new("layer is not mounted by this daemon")),
        };
        let path = mountpoint.to_path_buf();
        let alive = tokio::task::spawn_blocking(move || std::fs::metadata(&path).map(|_| ()))
            .await
            .map_err(|e| RemoteError::new(format!("check task failed: {e}")))?;
        alive.map_err(|e| RemoteError::new(format!("mount is not usable: {e}")))?;
        // Only when configured (`prefetch_timeout_ms`, bounded): a
        // container's reads wait for the prefetch's chunks anyway.
        if let PrefetchState::Failed(reason) = layer.wait_prefetch_default().await {
            tracing::warn!(mountpoint = %mountpoint.display(), reason = %reason, "prefetch failed; reads fetch on demand");
        }
        Ok(())
    }

    async fn restored(&self) {
        self.resume_after_restore().await;
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        let removed = self.lock().remove(mountpoint);
        match removed {
            Some(m) => {
                // The snapshot is gone: so is the reason to keep its tail,
                // unless another snapshot mounts the same blob.
                let shared = self.lock().values().any(|o| o.digest == m.digest);
                if !shared {
                    let (tails, d) = (self.tails.clone(), m.digest.clone());
                    let layer = m.layer.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        tails.remove(&d);
                        let dropped = layer.forget_memory();
                        tracing::debug!(digest = %d, dropped, "layer's chunks dropped from memory");
                    })
                    .await;
                }
                self.release(m, mountpoint, true).await;
                if self.lock().is_empty() {
                    // Nothing mounted: hand what the allocator keeps of the
                    // freed indexes and buffers back to the system, so an
                    // idle daemon is as small as a fresh one.
                    let _ = tokio::task::spawn_blocking(crate::fs::trim_heap).await;
                }
            }
            None => {
                let path = mountpoint.to_path_buf();
                let _ = tokio::task::spawn_blocking(move || fuse::unmount(&path)).await;
            }
        }
        Ok(())
    }
}
