//! `rstargz optimize`: run an image's workload, record the files it opens
//! in order of first access, and convert the image to eStargz with those
//! files prioritized in the layers that provide them.
//!
//! Recording (see `docs/optimize.md` for why fanotify and not our FUSE
//! mounts):
//! - [`unpack`]: each source layer into its own directory, whiteouts and
//!   opaque dirs in overlayfs's format;
//! - [`mount`]: overlayfs over them with a private upper dir;
//! - [`record`]: a fanotify `FAN_MARK_FILESYSTEM` mark on that overlay,
//!   seeing every open by every process of the workload;
//! - [`runc`]: the workload ([`workload`]) in a runc container on the
//!   overlay, killed after the period;
//! - [`layers`]: each opened path to the topmost layer that provides it.
//!
//! The result is a [`recording::Recording`] (JSON with `--record-out`,
//! read back with `--record-in`), turned into per-layer prioritized files
//! for [`crate::convert::convert`]. Mounts, the container and temp dirs
//! are removed on every exit path, interrupts included.

pub mod error;
pub mod layers;
pub mod mount;
pub mod netns;
pub mod record;
pub mod recording;
pub mod runc;
pub mod unpack;
pub mod workload;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::convert::{ConvertOptions, ConvertReport, convert};
use crate::fs::registry::{Reference, RegistryClient};
pub use error::OptimizeError;
use recording::{LayerFiles, RECORDING_VERSION, Recording};
use workload::{Overrides, Workload};

/// Largest image config accepted, bytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// How to optimize.
#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    /// How to convert (chunk sizes, level, jobs, work dir).
    pub convert: ConvertOptions,
    /// The workload is killed after this long.
    pub period: Duration,
    pub overrides: Overrides,
    /// Convert from this recording instead of running anything.
    pub record_in: Option<PathBuf>,
    /// Write the recording here.
    pub record_out: Option<PathBuf>,
    /// The runc binary.
    pub runc: PathBuf,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        Self {
            convert: ConvertOptions::default(),
            period: Duration::from_secs(10),
            overrides: Overrides::default(),
            record_in: None,
            record_out: None,
            runc: PathBuf::from("runc"),
        }
    }
}

/// What the recording step saw.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSummary {
    /// `None` with `--record-in`.
    pub workload: Option<Workload>,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Paths opened (distinct), including ones no layer provides.
    pub opened: usize,
    /// Prioritized files, all layers.
    pub prioritized: usize,
    /// Prioritized files per layer, base first.
    pub per_layer: Vec<usize>,
    pub events_lost: bool,
    pub seconds: f64,
}

/// What an optimization did.
#[derive(Debug, Clone, Serialize)]
pub struct OptimizeReport {
    pub record: RecordSummary,
    pub convert: ConvertReport,
    pub seconds: f64,
}

/// Records (or loads the recording), then converts `src` into `dst` with
/// the recorded files prioritized. `cancel` stops it at the next check,
/// cleaning up.
pub async fn optimize(
    client: &RegistryClient,
    src: &Reference,
    dst: &Reference,
    opts: &OptimizeOptions,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<OptimizeReport> {
    let started = Instant::now();
    if dst.digest.is_some() {
        bail!("destination {dst} must be a tag, not a digest");
    }
    let resolved = cancellable(client.resolve(src), &cancel)
        .await?
        .with_context(|| format!("resolving source {src}"))?;
    let manifest = &resolved.manifest;
    let digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();

    let (recording, summary) = match &opts.record_in {
        Some(p) => {
            let r = Recording::load(p)?;
            let per: Vec<usize> = (0..digests.len())
                .map(|i| {
                    r.layers
                        .iter()
                        .find(|l| l.index == i)
                        .map_or(0, |l| l.files.len())
                })
                .collect();
            let summary = RecordSummary {
                workload: None,
                exit_code: None,
                timed_out: false,
                opened: r.files.len(),
                prioritized: per.iter().sum(),
                per_layer: per,
                events_lost: false,
                seconds: 0.0,
            };
            (r, summary)
        }
        None => {
            let tmp = work_tempdir(opts.convert.work_dir.as_deref(), "rstargz-optimize-")?;
            let res = record_image(client, src, &resolved, opts, tmp.path(), &cancel).await;
            // Unpacked layers can be large: gone before converting.
            drop(tmp);
            res?
        }
    };
    let prioritized = recording.prioritized_for(&digests)?;
    if let Some(p) = &opts.record_out {
        recording
            .save(p)
            .with_context(|| format!("writing the recording {}", p.display()))?;
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(OptimizeError::Interrupted.into());
    }
    // Every layer is rebuilt: one with recorded files gets them first and
    // the prefetch landmark, the others the no-prefetch landmark. (A blob
    // repeated in the image takes the files of its upper copy, the one
    // overlayfs serves.)
    let mut copts = opts.convert.clone();
    copts.prioritized = digests
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), prioritized.get(&i).cloned().unwrap_or_default()))
        .collect();
    let report = cancellable(convert(client, src, dst, &copts), &cancel).await??;
    Ok(OptimizeReport {
        record: summary,
        convert: report,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs `fut` unless `cancel` is set first (checked every 50 ms).
async fn cancellable<T>(
    fut: impl std::future::Future<Output = T>,
    cancel: &AtomicBool,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => Ok(r),
        _ = async {
            while !cancel.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } => Err(OptimizeError::Interrupted.into()),
    }
}

fn work_tempdir(dir: Option<&Path>, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match dir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .context("creating the work directory")
}

/// Downloads and unpacks the layers, then records the workload on them.
async fn record_image(
    client: &RegistryClient,
    src: &Reference,
    resolved: &crate::fs::registry::Resolved,
    opts: &OptimizeOptions,
    dir: &Path,
    cancel: &Arc<AtomicBool>,
) -> anyhow::Result<(Recording, RecordSummary)> {
    let manifest = &resolved.manifest;
    if manifest.config.size > MAX_CONFIG_BYTES {
        bail!(
            "image config of {} bytes is too large",
            manifest.config.size
        );
    }
    let cfg_path = dir.join("config.json");
    let mut f = File::create(&cfg_path)?;
    cancellable(
        client.blob_to_file(src, &manifest.config.digest, manifest.config.size, &mut f),
        cancel,
    )
    .await?
    .with_context(|| format!("fetching config {}", manifest.config.digest))?;
    drop(f);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path)?).context("parsing the image config")?;
    let workload = workload::resolve(&config, &opts.overrides)?;
    for l in &manifest.layers {
        if l.media_type.contains("zstd") || !l.urls.is_empty() {
            bail!(
                "layer {} ({}) is not supported: only tar and tar+gzip layers",
                l.digest,
                l.media_type
            );
        }
    }

    // Download and unpack, a few layers at a time.
    let t = Instant::now();
    let layer_root = dir.join("layers");
    let n = manifest.layers.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.convert.layer_jobs.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (i, desc) in manifest.layers.iter().cloned().enumerate() {
        let (client, src, sem, cancel) = (
            client.clone(),
            src.clone(),
            Arc::clone(&sem),
            Arc::clone(cancel),
        );
        let blob = dir.join(format!("layer-{i}.blob"));
        let dest = layers::layer_dir(&layer_root, i);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut f = File::create(&blob)?;
            cancellable(
                client.blob_to_file(&src, &desc.digest, desc.size, &mut f),
                &cancel,
            )
            .await?
            .with_context(|| format!("fetching layer {} {}", i + 1, desc.digest))?;
            drop(f);
            let c = Arc::clone(&cancel);
            let b = blob.clone();
            tokio::task::spawn_blocking(move || unpack::unpack_layer(i, &b, &dest, &c))
                .await
                .context("unpack task panicked")??;
            let _ = std::fs::remove_file(&blob);
            anyhow::Ok(())
        });
    }
    let joined = cancellable(
        async {
            while let Some(r) = set.join_next().await {
                r.context("layer task panicked")??;
            }
            anyhow::Ok(())
        },
        cancel,
    )
    .await;
    if !matches!(joined, Ok(Ok(()))) {
        cancel_and_drain(&mut set, cancel).await;
        joined??;
    }
    if opts.convert.progress {
        eprintln!("unpacked {n} layers in {:.1?}", t.elapsed());
    }

    let layer_dirs: Vec<PathBuf> = (0..n).map(|i| layers::layer_dir(&layer_root, i)).collect();
    let (dir2, runc, period, wl, c) = (
        dir.to_owned(),
        opts.runc.clone(),
        opts.period,
        workload.clone(),
        Arc::clone(cancel),
    );
    let dirs2 = layer_dirs.clone();
    let rec =
        tokio::task::spawn_blocking(move || record_blocking(&dir2, &dirs2, &runc, period, &wl, &c))
            .await
            .context("recording task panicked")??;

    let (per, all) = layers::assign(&layer_dirs, &rec.paths)?;
    let summary = RecordSummary {
        workload: Some(workload.clone()),
        exit_code: rec.outcome.exit_code,
        timed_out: rec.outcome.timed_out,
        opened: rec.paths.len(),
        prioritized: all.len(),
        per_layer: per.iter().map(Vec::len).collect(),
        events_lost: rec.overflowed,
        seconds: rec.outcome.seconds,
    };
    let recording = Recording {
        version: RECORDING_VERSION,
        source: src.to_string(),
        source_manifest: resolved.digest.clone(),
        args: workload.args,
        files: all,
        layers: per
            .into_iter()
            .enumerate()
            .map(|(i, files)| LayerFiles {
                index: i,
                digest: manifest.layers[i].digest.clone(),
                files,
            })
            .collect(),
    };
    Ok((recording, summary))
}

/// Sets `cancel` so running downloads and unpacks stop at their next
/// check, then waits for every task (aborting would leave unpack threads
/// writing into the temp dir while it is removed).
async fn cancel_and_drain(set: &mut tokio::task::JoinSet<anyhow::Result<()>>, cancel: &AtomicBool) {
    let was = cancel.swap(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    if !was {
        cancel.store(false, Ordering::Relaxed);
    }
}

struct Recorded {
    paths: Vec<String>,
    overflowed: bool,
    outcome: runc::Outcome,
}

/// Mounts the overlay, checks the executable, records while the workload
/// runs, unmounts. Blocking.
fn record_blocking(
    dir: &Path,
    layer_dirs: &[PathBuf],
    runc_bin: &Path,
    period: Duration,
    wl: &Workload,
    cancel: &AtomicBool,
) -> anyhow::Result<Recorded> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let overlay = mount::Overlay::mount(layer_dirs, &upper, &work, &merged)?;
    wl.check_executable(overlay.path())?;
    let net = netns::NetNs::create(&dir.join("netns"))?;
    let mut recorder = record::Recorder::start(overlay.path())?;
    let id = format!(
        "rstargz-optimize-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let outcome = runc::run(
        &runc::RunSpec {
            runc: runc_bin,
            dir: &dir.join("runc"),
            id: &id,
            rootfs: overlay.path(),
            workload: wl,
            period,
            netns: Some(net.path()),
        },
        &mut recorder,
        cancel,
    )?;
    let (paths, overflowed) = (std::mem::take(&mut recorder.paths), recorder.overflowed);
    drop(recorder);
    drop(net);
    overlay.unmount()?;
    Ok(Recorded {
        paths,
        overflowed,
        outcome,
    })
}
