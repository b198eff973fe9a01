//! `rstargz convert SRC DST`: pulls a registry image, rebuilds its layers
//! as eStargz and pushes the result (see `rstargz::convert`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rstargz::convert::{ConvertOptions, convert};
use rstargz::estargz::writer::BuildOptions;
use rstargz::fs::registry::{Reference, RegistryClient, RegistryConfig};

/// Arguments of `rstargz convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source image, e.g. `127.0.0.1:5001/app:1`.
    pub src: String,
    /// Destination image (a tag), e.g. `127.0.0.1:5001/app:1-esgz`.
    pub dst: String,
    /// Use plain HTTP for the source and destination hosts (loopback hosts
    /// always are).
    #[arg(long)]
    pub plain_http: bool,
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
    /// Platform picked from a manifest index, `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Layers converted at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// Directory for temporary layer files (default: the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the conversion.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let src = Reference::parse(&args.src).context("source reference")?;
    let dst = Reference::parse(&args.dst).context("destination reference")?;
    let mut cfg = RegistryConfig {
        platform: args.platform.clone(),
        // Whole layers stream through one request.
        request_timeout_ms: 3_600_000,
        ..RegistryConfig::default()
    };
    if args.plain_http {
        cfg.insecure_hosts = vec![src.host.clone(), dst.host.clone()];
    }
    let client = RegistryClient::new(cfg)?;
    let opts = ConvertOptions {
        build: BuildOptions {
            chunk_size: args.chunk_size,
            min_chunk_size: args.min_chunk_size,
            level: args.level,
            ..BuildOptions::default()
        },
        layer_jobs: args.jobs as usize,
        work_dir: args.work_dir.clone(),
        progress: std::io::stderr().is_terminal(),
        ..ConvertOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(convert(&client, &src, &dst, &opts))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} -> {}", report.source, report.destination);
        println!("manifest: {}", report.manifest_digest);
        for l in &report.layers {
            println!(
                "  {} ({} B) -> {} ({} B) toc {}{}",
                l.digest_in,
                l.size_in,
                l.digest_out,
                l.size_out,
                l.toc_digest,
                if l.kept { " [kept]" } else { "" }
            );
        }
        println!("{:.1}s", report.seconds);
    }
    Ok(ExitCode::SUCCESS)
}
