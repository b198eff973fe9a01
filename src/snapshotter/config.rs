//! `rstargz-grpc` configuration: one typed tree read from TOML
//! (`/etc/rstargz/config.toml` by default; see `docs/config.toml`).
//! Command-line flags override it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default config file; a missing default file is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rstargz/config.toml";
/// Default socket, the same path stargz-snapshotter uses so containerd's
/// `proxy_plugins` entry need not change.
pub const DEFAULT_ADDRESS: &str = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";
/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/rstargz";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket the gRPC service listens on.
    pub address: PathBuf,
    /// State directory: `metadata.redb` and `snapshots/`.
    pub root: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing
    /// `EnvFilter` directive such as `rstargz=debug`).
    pub log_level: String,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM
    /// before the daemon exits anyway (clients may keep connections open).
    pub shutdown_timeout_secs: u64,
    /// Runtime sizing.
    pub runtime: RuntimeConfig,
    /// Lazy pulling (`[fs]`); the snapshotter itself only sees `RemoteFs`.
    pub fs: crate::fs::lazy::FsConfig,
    /// Registry access for lazy pulling (`[registry]`).
    pub registry: crate::fs::registry::RegistryConfig,
    /// Layer reads and caches (`[layer]`). An unset `disk_cache_dir` means
    /// `<root>/cache`.
    pub layer: crate::fs::layer::LayerConfig,
    /// The `/status` and `/metrics` endpoint (`[metrics]`).
    pub metrics: crate::fs::status::MetricsConfig,
}

/// Thread budget of the daemon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// tokio worker threads.
    pub worker_threads: usize,
    /// Upper bound of tokio's blocking pool (metadata I/O, directory work).
    pub max_blocking_threads: usize,
    /// Seconds an idle blocking thread lingers before it exits.
    pub blocking_keep_alive_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: PathBuf::from(DEFAULT_ADDRESS),
            root: PathBuf::from(DEFAULT_ROOT),
            log_level: "info".to_string(),
            shutdown_timeout_secs: 10,
            runtime: RuntimeConfig::default(),
            fs: Default::default(),
            registry: Default::default(),
            layer: Default::default(),
            metrics: Default::default(),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 2,
            max_blocking_threads: 4,
            blocking_keep_alive_secs: 10,
        }
    }
}

/// A configuration problem, with the file it came from when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses TOML text; unknown keys are rejected, naming the key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Loads `path`. When `explicit` is false (the default path) a missing
    /// file yields the defaults; an explicitly given file must exist.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml(&text, path),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.address.is_absolute() {
            return bad(format!(
                "address must be an absolute socket path, got {:?}",
                self.address
            ));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.address.as_os_str().len() > 107 {
            return bad(format!(
                "address {:?} is longer than the 107 bytes a unix socket path may have",
                self.address
            ));
        }
        if !self.root.is_absolute() {
            return bad(format!(
                "root must be an absolute directory path, got {:?}",
                self.root
            ));
        }
        if !valid_log_level(&self.log_level) {
            return bad(format!(
                "log_level {:?} is not one of error, warn, info, debug, trace (or a tracing directive)",
                self.log_level
            ));
        }
        if let Some(a) = &self.metrics.address
            && (!a.is_absolute() || a.as_os_str().len() > 107)
        {
            return bad(format!(
                "metrics.address must be an absolute socket path of at most 107 bytes, got {a:?}"
            ));
        }
        if let Err(e) = self.layer.validate() {
            return bad(e);
        }
        let rt = &self.runtime;
        if !(1..=64).contains(&rt.worker_threads) {
            return bad(format!(
                "runtime.worker_threads must be 1..=64, got {}",
                rt.worker_threads
            ));
        }
        if !(1..=512).contains(&rt.max_blocking_threads) {
            return bad(format!(
                "runtime.max_blocking_threads must be 1..=512, got {}",
                rt.max_blocking_threads
            ));
        }
        if rt.blocking_keep_alive_secs == 0 {
            return bad("runtime.blocking_keep_alive_secs must be at least 1".to_string());
        }
        Ok(())
    }
}

/// A plain level, or tracing directives with at least one `target=level`.
fn valid_log_level(s: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    LEVELS.contains(&s.to_ascii_lowercase().as_str())
        || (s.contains('=') && tracing_subscriber::EnvFilter::try_new(s).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_sample_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::from_toml(&text, &path).unwrap();
        c.validate().unwrap();
        assert_eq!(c, Config::default(), "the sample documents the defaults");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("adress = \"/x\"\n", Path::new("c.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("adress") && msg.contains("c.toml"), "{msg}");
        let e = Config::from_toml("[runtime]\nworkers = 3\n", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("workers"), "{e}");
    }

    #[test]
    fn partial_files_keep_defaults() {
        let c = Config::from_toml("[runtime]\nworker_threads = 1\n", Path::new("c")).unwrap();
        assert_eq!(c.runtime.worker_threads, 1);
        assert_eq!(c.runtime.max_blocking_threads, 4);
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
    }

    #[test]
    fn validate_explains() {
        let c = Config {
            root: "relative".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("root"));
        let mut c = Config::default();
        c.runtime.worker_threads = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("worker_threads")
        );
        let c = Config {
            log_level: "verbose".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            address: PathBuf::from(format!("/{}", "a".repeat(120))),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("107"));
        let mut c = Config::default();
        c.metrics.address = Some("rel.sock".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("metrics.address")
        );
    }

    #[test]
    fn metrics_section() {
        let c = Config::from_toml(
            "[metrics]\naddress = \"/run/m.sock\"\ntcp_address = \"127.0.0.1:9101\"\n",
            Path::new("c"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics.address, Some(PathBuf::from("/run/m.sock")));
        assert_eq!(
            c.metrics.tcp_address,
            Some("127.0.0.1:9101".parse().unwrap())
        );
        assert!(Config::default().metrics.tcp_address.is_none());
    }

    #[test]
    fn missing_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(&p, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
