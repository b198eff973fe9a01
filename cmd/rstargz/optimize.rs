//! `rstargz optimize SRC DST`: runs the image's workload with runc,
//! records the files it opens and converts the image with them
//! prioritized (see `rstargz::optimize` and docs/optimize.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use rstargz::fs::registry::{Reference, RegistryClient, RegistryConfig};
use rstargz::optimize::workload::{Overrides, parse_entrypoint};
use rstargz::optimize::{OptimizeOptions, optimize};

/// Arguments of `rstargz optimize`.
#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {
    /// Source image, e.g. `127.0.0.1:5001/app:1`.
    pub src: String,
    /// Destination image (a tag).
    pub dst: String,
    /// Use plain HTTP for the source and destination hosts.
    #[arg(long)]
    pub plain_http: bool,
    /// Seconds the workload may run before it is killed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub period: u64,
    /// Entrypoint instead of the image's: a JSON array (`["python3","-c"]`)
    /// or a single executable. Drops the image's Cmd.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Arguments instead of the image's Cmd (repeat for each argument).
    #[arg(long = "args", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Extra or replaced environment variable, `KEY=VALUE` (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
    /// Working directory instead of the image's.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Write the recording (JSON) here.
    #[arg(long)]
    pub record_out: Option<PathBuf>,
    /// Convert from this recording instead of running the workload.
    #[arg(long, conflicts_with_all = ["entrypoint", "args", "env", "cwd", "period"])]
    pub record_in: Option<PathBuf>,
    /// Platform picked from a manifest index, `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    #[command(flatten)]
    pub build: crate::convert::LayerBuildArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: OptimizeArgs) -> anyhow::Result<ExitCode> {
    let src = Reference::parse(&a.src).context("source reference")?;
    let dst = Reference::parse(&a.dst).context("destination reference")?;
    let mut cfg = RegistryConfig {
        platform: a.platform.clone(),
        request_timeout_ms: 3_600_000,
        ..RegistryConfig::default()
    };
    if a.plain_http {
        cfg.insecure_hosts = vec![src.host.clone(), dst.host.clone()];
    }
    let client = RegistryClient::new(cfg)?;
    let overrides = Overrides {
        entrypoint: a.entrypoint.as_deref().map(parse_entrypoint).transpose()?,
        args: (!a.args.is_empty()).then(|| a.args.clone()),
        env: a.env.clone(),
        cwd: a.cwd.clone(),
    };
    let opts = OptimizeOptions {
        convert: a.build.convert_options(),
        period: Duration::from_secs(a.period),
        overrides,
        record_in: a.record_in.clone(),
        record_out: a.record_out.clone(),
        ..OptimizeOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let report = rt.block_on(async {
        let c = Arc::clone(&cancel);
        // SIGINT/SIGTERM: set the flag; the work stops at its next check
        // and unwinds through its guards (container, mount, temp dirs).
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("rstargz optimize: interrupted, cleaning up");
            c.store(true, Ordering::Relaxed);
        });
        optimize(&client, &src, &dst, &opts, Arc::clone(&cancel)).await
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report.record;
        if let Some(w) = &r.workload {
            println!(
                "workload {:?}: {} in {:.1}s",
                w.args,
                match (r.timed_out, r.exit_code) {
                    (true, _) => "stopped after the period".to_owned(),
                    (false, Some(c)) => format!("exit {c}"),
                    (false, None) => "killed".to_owned(),
                },
                r.seconds
            );
        }
        println!(
            "{} files opened, {} prioritized (per layer {:?})",
            r.opened, r.prioritized, r.per_layer
        );
        println!(
            "{} -> {}",
            report.convert.source, report.convert.destination
        );
        println!("manifest: {}", report.convert.manifest_digest);
        println!("{:.1}s", report.seconds);
    }
    Ok(ExitCode::SUCCESS)
}
