//! `rstargz-grpc`: the snapshotter daemon. Parses flags and the config
//! file, sets up logging and a small tokio runtime, and hands over to
//! [`rstargz::snapshotter::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rstargz::fs::lazy::LazyFs;
use rstargz::fs::status;
use rstargz::snapshotter::config::{Config, DEFAULT_CONFIG_PATH};
use rstargz::snapshotter::{NoRemote, RemoteFs, run};

/// containerd snapshotter with lazy pulling of eStargz layers.
#[derive(Debug, Parser)]
#[command(name = "rstargz-grpc", version)]
struct Flags {
    /// Unix socket to listen on [config: address].
    #[arg(long)]
    address: Option<PathBuf>,
    /// State directory [config: root].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Config file; a missing default file is fine, a missing explicit one
    /// is an error [default: /etc/rstargz/config.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// error, warn, info, debug or trace [config: log_level].
    #[arg(long)]
    log_level: Option<String>,
    /// Internal: run as the FUSE holder listening on this socket (started
    /// by the daemon itself; see docs/restart.md).
    #[arg(long, hide = true, value_name = "SOCKET")]
    fuse_holder: Option<PathBuf>,
    /// Internal: the holder's grace period.
    #[arg(long, hide = true, default_value_t = 60)]
    fuse_holder_grace_secs: u64,
}

/// The holder process: keeps the parked `/dev/fuse` fd until a daemon takes
/// it or the grace period ends.
fn run_holder(socket: &std::path::Path, grace_secs: u64) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    // Signals meant for the daemon's terminal or service must not end the
    // connection: only the protocol, the grace period or the kernel do.
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let grace = Duration::from_secs(grace_secs);
    match rstargz::fs::handover::holder::run(socket, grace) {
        Ok(why) => {
            tracing::info!(?why, "FUSE holder exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "FUSE holder failed");
            ExitCode::FAILURE
        }
    }
}

fn load(flags: Flags) -> Result<Config, String> {
    let explicit = flags.config.is_some();
    let path = flags
        .config
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let mut config = Config::load(&path, explicit).map_err(|e| e.to_string())?;
    if let Some(a) = flags.address {
        config.address = a;
    }
    if let Some(r) = flags.root {
        config.root = r;
    }
    if let Some(l) = flags.log_level {
        config.log_level = l;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// A plain level applies to rstargz; libraries (h2, hyper, tonic) stay at
/// `warn` unless the level is quieter. Directives pass through unchanged.
fn filter_directives(level: &str) -> String {
    if level.contains('=') {
        return level.to_string();
    }
    let deps = match level.to_ascii_lowercase().as_str() {
        "off" | "error" => level.to_string(),
        _ => "warn".to_string(),
    };
    format!("{deps},rstargz={level},rstargz_grpc={level}")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The running status endpoint; [`StatusServer::stop`] ends it and
/// removes its socket.
struct StatusServer {
    socket: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
}

impl StatusServer {
    fn stop(self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Binds the status socket (and the TCP address when configured) and
/// serves `/status` and `/metrics` from `fs` in the background.
async fn start_status(config: &Config, fs: Arc<LazyFs>) -> anyhow::Result<StatusServer> {
    use anyhow::Context;
    let socket = config.metrics.socket_path(&config.address);
    let unix = rstargz::snapshotter::bind_socket(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(addr) = config.metrics.tcp_address {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(address = %addr, "status endpoint on TCP");
        tokio::spawn(status::serve(fs.clone(), tcp, stopped(rx.clone())));
    }
    tracing::info!(address = %socket.display(), "status endpoint");
    tokio::spawn(status::serve(fs, unix, stopped(rx)));
    Ok(StatusServer { socket, stop: tx })
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if let Some(socket) = &flags.fuse_holder {
        return run_holder(socket, flags.fuse_holder_grace_secs);
    }
    let config = match load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rstargz-grpc: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter_directives(
            &config.log_level,
        )))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads)
        .max_blocking_threads(config.runtime.max_blocking_threads)
        .thread_keep_alive(Duration::from_secs(config.runtime.blocking_keep_alive_secs))
        .thread_name("rstargz-grpc")
        .enable_all()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rstargz-grpc: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ready = || {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "systemd readiness notification failed");
        }
    };
    let mut lazy: Option<Arc<LazyFs>> = None;
    let remote: Arc<dyn RemoteFs> = if config.fs.enabled {
        let fs = LazyFs::new(
            config.fs.clone(),
            config.registry.clone(),
            config.layer.clone(),
            &config.root,
            rt.handle().clone(),
        );
        let holder = std::env::current_exe().map(|exe| (exe, vec!["--fuse-holder".to_string()]));
        let fs = match (fs, holder) {
            (Ok(fs), Ok((exe, args))) => Ok(fs.with_holder(&config.root, exe, args)),
            (Ok(fs), Err(e)) => {
                tracing::warn!(error = %e, "cannot find my own executable: FUSE hand-over off");
                Ok(fs)
            }
            (Err(e), _) => Err(e),
        };
        match fs {
            Ok(fs) => {
                let fs = Arc::new(fs);
                lazy = Some(fs.clone());
                fs
            }
            Err(e) => {
                eprintln!("rstargz-grpc: cannot set up lazy pulling: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Arc::new(NoRemote)
    };
    let status = match lazy.clone().filter(|_| config.metrics.enabled) {
        Some(fs) => match rt.block_on(start_status(&config, fs)) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("rstargz-grpc: status endpoint: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let result = rt.block_on(run(&config, remote, shutdown_signal(), ready));
    if let Some(s) = status {
        s.stop();
    }
    if let Some(fs) = &lazy {
        fs.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "rstargz-grpc failed");
            eprintln!("rstargz-grpc: {e:#}");
            ExitCode::FAILURE
        }
    }
}
