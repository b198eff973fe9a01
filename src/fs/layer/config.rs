//! [`LayerConfig`]: caches, fetching, prefetch, background fetch and
//! read-ahead. Every default is in one `impl Default`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How layers read their blobs. Parsed from the daemon's config file
/// (`[layer]` table); unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerConfig {
    /// Memory chunk cache size in bytes, shared by all layers. 0 disables.
    pub memory_cache_bytes: u64,
    /// Disk chunk cache size in bytes. 0 disables.
    pub disk_cache_bytes: u64,
    /// Disk cache directory; `None` disables the disk cache (the daemon
    /// sets `<root>/cache`).
    pub disk_cache_dir: Option<PathBuf>,
    /// Range requests in flight per layer for on-demand reads.
    pub fetch_concurrency: usize,
    /// A read waiting longer than this for its chunks fails with
    /// `ReadError::Timeout` (EIO); the fetch itself goes on and still fills
    /// the caches. 0 = wait as long as the registry client retries.
    pub read_timeout_ms: u64,
    /// Fetch the prioritized files (`[0, landmark)`) when a layer opens.
    pub prefetch: bool,
    /// Prefetch size for blobs without landmarks. 0 = none.
    pub prefetch_unspecified_bytes: u64,
    /// A prefetch larger than this is split into ranges of about this size,
    /// fetched concurrently. Each range is streamed (its chunks decoded as
    /// their bytes arrive), so one range keeps the blob order of the
    /// prioritized files.
    pub prefetch_range_bytes: u64,
    /// How long the snapshotter's check of a layer (`Mounts`, e.g. when a
    /// container is created) waits for its prefetch. 0 (default): not at
    /// all; the container starts while prefetch streams in, and its reads
    /// of prioritized files wait for those chunks' flights.
    pub prefetch_timeout_ms: u64,
    /// Fetch the rest of the layer in the background after prefetch.
    pub background_fetch: bool,
    /// Range requests in flight per layer for background fetch.
    pub background_concurrency: usize,
    /// Compressed bytes per background range request.
    pub background_range_bytes: u64,
    /// Background fetch pauses this long after an on-demand fetch.
    pub background_pause_ms: u64,
    /// Compressed bytes of following chunks (blob order) fetched along with
    /// an on-demand chunk. 0 disables read-ahead.
    pub read_ahead_bytes: u64,
    /// While misses keep landing just past the previous read-ahead (a walk
    /// through the layer in blob order), the window doubles up to this;
    /// any other miss resets it to `read_ahead_bytes`.
    pub read_ahead_max_bytes: u64,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            memory_cache_bytes: 256 << 20,
            disk_cache_bytes: 10 << 30,
            disk_cache_dir: None,
            fetch_concurrency: 8,
            read_timeout_ms: 60_000,
            prefetch: true,
            prefetch_unspecified_bytes: 0,
            prefetch_range_bytes: 64 << 20,
            prefetch_timeout_ms: 0,
            background_fetch: true,
            background_concurrency: 2,
            background_range_bytes: 4 << 20,
            background_pause_ms: 1000,
            read_ahead_bytes: 512 << 10,
            read_ahead_max_bytes: 4 << 20,
        }
    }
}

impl LayerConfig {
    /// Says what is wrong, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if self.fetch_concurrency == 0 {
            return Err("layer.fetch_concurrency must be at least 1".into());
        }
        if self.background_fetch && self.background_concurrency == 0 {
            return Err("layer.background_concurrency must be at least 1".into());
        }
        if self.prefetch_range_bytes < 64 << 10 {
            return Err("layer.prefetch_range_bytes must be at least 64 KiB".into());
        }
        if self.background_range_bytes < 64 << 10 {
            return Err("layer.background_range_bytes must be at least 64 KiB".into());
        }
        if self.read_ahead_bytes > 64 << 20 {
            return Err("layer.read_ahead_bytes must be at most 64 MiB".into());
        }
        if self.read_ahead_max_bytes > 64 << 20 {
            return Err("layer.read_ahead_max_bytes must be at most 64 MiB".into());
        }
        Ok(())
    }

    pub fn prefetch_timeout(&self) -> Duration {
        Duration::from_millis(self.prefetch_timeout_ms)
    }

    pub fn background_pause(&self) -> Duration {
        Duration::from_millis(self.background_pause_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_defaults_and_unknown_keys() {
        let c: LayerConfig = toml::from_str("").unwrap();
        assert_eq!(c, LayerConfig::default());
        c.validate().unwrap();
        let c: LayerConfig = toml::from_str(
            "memory_cache_bytes = 1048576\ndisk_cache_dir = \"/var/lib/x/cache\"\nread_ahead_bytes = 0\n",
        )
        .unwrap();
        assert_eq!(c.memory_cache_bytes, 1 << 20);
        assert_eq!(c.read_ahead_bytes, 0);
        assert!(toml::from_str::<LayerConfig>("memory_cache = 1").is_err());
        let bad = LayerConfig {
            fetch_concurrency: 0,
            ..LayerConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    /// The sample in docs/layer.md holds exactly the defaults.
    #[test]
    fn documented_sample_is_the_defaults() {
        let doc = include_str!("../../../docs/layer.md");
        let start = doc.find("# [layer]").expect("sample in docs/layer.md");
        let end = start + doc[start..].find("```").expect("end of sample");
        let c: LayerConfig = toml::from_str(&doc[start..end]).unwrap();
        assert_eq!(c, LayerConfig::default());
    }
}
