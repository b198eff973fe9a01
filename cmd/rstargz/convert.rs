//! `rstargz convert SRC DST`: reads an image (registry or `oci:DIR[:TAG]`),
//! rebuilds its layers as eStargz and writes the result (see
//! `rstargz::convert`). SIGINT/SIGTERM stop it cleanly: the conversion is
//! dropped (work files removed, nothing more pushed, no manifest) and the
//! exit code is 130/143.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rstargz::convert::{ConvertOptions, ImageLocation, convert_image};
use rstargz::estargz::writer::BuildOptions;
use rstargz::fs::registry::{RegistryClient, RegistryConfig};

/// Arguments of `rstargz convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source image, e.g. `127.0.0.1:5001/app:1` or `oci:DIR[:TAG]`.
    pub src: String,
    /// Destination image (a tag), e.g. `127.0.0.1:5001/app:1-esgz` or
    /// `oci:DIR[:TAG]` (an OCI image layout, created if missing).
    pub dst: String,
    /// Use plain HTTP for the source and destination hosts (loopback hosts
    /// always are).
    #[arg(long)]
    pub plain_http: bool,
    #[command(flatten)]
    pub build: LayerBuildArgs,
    /// Platform picked from a manifest index, `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Convert every platform of an index and write an index.
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How layers are rebuilt: the flags `convert` and `optimize` share.
#[derive(Debug, clap::Args)]
pub struct LayerBuildArgs {
    /// Uncompressed chunk size in bytes.
    #[arg(long, default_value_t = rstargz::estargz::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Let small pieces share a gzip member while it holds fewer than this
    /// many uncompressed bytes (0 = one member per payload).
    #[arg(long, default_value_t = 0)]
    pub min_chunk_size: u64,
    /// Compression level, 0-12 (libdeflate).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(0..=12))]
    pub level: u32,
    /// Layers downloaded and converted at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// Directory for temporary layer files (default: the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl LayerBuildArgs {
    /// Conversion options with these flags, progress bars on a terminal.
    pub fn convert_options(&self) -> ConvertOptions {
        ConvertOptions {
            build: BuildOptions {
                chunk_size: self.chunk_size,
                min_chunk_size: self.min_chunk_size,
                level: self.level,
                ..BuildOptions::default()
            },
            layer_jobs: self.jobs as usize,
            work_dir: self.work_dir.clone(),
            progress: std::io::stderr().is_terminal(),
            ..ConvertOptions::default()
        }
    }
}

/// Runs the conversion.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let src = ImageLocation::parse(&args.src).context("source")?;
    let dst = ImageLocation::parse(&args.dst).context("destination")?;
    let mut cfg = RegistryConfig {
        platform: args.platform.clone(),
        // Whole layers stream through one request.
        request_timeout_ms: 3_600_000,
        ..RegistryConfig::default()
    };
    if args.plain_http {
        cfg.insecure_hosts = [&src, &dst]
            .into_iter()
            .filter_map(|l| match l {
                ImageLocation::Registry(r) => Some(r.host.clone()),
                ImageLocation::Layout(_) => None,
            })
            .collect();
    }
    let client = RegistryClient::new(cfg)?;
    let opts = ConvertOptions {
        all_platforms: args.all_platforms,
        ..args.build.convert_options()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // Dropping the conversion future aborts its tasks and removes its
        // work directory; the manifest is only ever pushed at its end.
        tokio::select! {
            r = convert_image(&client, &src, &dst, &opts) => r.map(Ok),
            _ = int.recv() => anyhow::Ok(Err(("SIGINT", 130u8))),
            _ = term.recv() => anyhow::Ok(Err(("SIGTERM", 143u8))),
        }
    });
    // Layer builds on blocking threads cannot be cancelled; their files
    // are gone with the work directory, so do not wait long for them.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    let report = match outcome? {
        Ok(r) => r,
        Err((sig, code)) => {
            eprintln!("rstargz: convert interrupted by {sig}; nothing was tagged");
            return Ok(ExitCode::from(code));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} -> {}", report.source, report.destination);
        println!(
            "manifest: {} ({})",
            report.manifest_digest, report.media_type
        );
        for img in &report.images {
            if let Some(p) = &img.platform {
                println!(" {p}: {}", img.manifest_digest);
            }
            for l in &report.layers[img.first_layer..img.first_layer + img.layer_count] {
                println!(
                    "  {} ({} B) -> {} ({} B) toc {}{}",
                    l.digest_in,
                    l.size_in,
                    l.digest_out,
                    l.size_out,
                    l.toc_digest,
                    if l.mounted {
                        " [kept, mounted]"
                    } else if l.kept {
                        " [kept]"
                    } else {
                        ""
                    }
                );
            }
        }
        println!(
            "{} -> {} bytes in {:.1}s",
            report.size_in, report.size_out, report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
