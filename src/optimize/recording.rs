//! The recording: which files a workload opened, in order of first access,
//! and which layer of the source image provides each. Written by
//! `--record-out`, read back by `--record-in` (JSON).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{OptimizeError, Result};

/// Format version written in every recording.
pub const RECORDING_VERSION: u32 = 1;

/// Largest recording file read back, bytes.
const MAX_RECORDING_BYTES: u64 = 64 << 20;

/// Files one layer provides, in the order the workload first opened them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerFiles {
    /// Position of the layer in the manifest, base first.
    pub index: usize,
    /// Compressed digest of the source layer.
    pub digest: String,
    /// Paths relative to the image root (no leading `/`).
    pub files: Vec<String>,
}

/// A whole recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recording {
    pub version: u32,
    /// The source reference as given.
    pub source: String,
    /// Digest of the source platform manifest.
    pub source_manifest: String,
    /// The workload that ran (argv).
    pub args: Vec<String>,
    /// Every recorded file provided by some layer, first access order.
    pub files: Vec<String>,
    /// Per layer of the source, base first (layers with no files included).
    pub layers: Vec<LayerFiles>,
}

impl Recording {
    /// Writes the recording as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut body = serde_json::to_vec_pretty(self)
            .map_err(|e| OptimizeError::Recording(format!("encoding: {e}")))?;
        body.push(b'\n');
        std::fs::write(path, body).map_err(|e| OptimizeError::io(path, e))
    }

    /// Reads and checks a recording.
    pub fn load(path: &Path) -> Result<Recording> {
        let md = std::fs::metadata(path).map_err(|e| OptimizeError::io(path, e))?;
        if md.len() > MAX_RECORDING_BYTES {
            return Err(OptimizeError::Recording(format!(
                "{} is {} bytes, more than {MAX_RECORDING_BYTES}",
                path.display(),
                md.len()
            )));
        }
        let body = std::fs::read(path).map_err(|e| OptimizeError::io(path, e))?;
        let r: Recording = serde_json::from_slice(&body)
            .map_err(|e| OptimizeError::Recording(format!("{}: {e}", path.display())))?;
        if r.version != RECORDING_VERSION {
            return Err(OptimizeError::Recording(format!(
                "{}: version {} (this rstargz reads {RECORDING_VERSION})",
                path.display(),
                r.version
            )));
        }
        Ok(r)
    }

    /// Prioritized files per layer index for the layers of `digests` (the
    /// source manifest's layers, base first). Each recorded layer must be
    /// the source's layer at the same index, so a recording never applies
    /// to another image by accident.
    pub fn prioritized_for(&self, digests: &[String]) -> Result<BTreeMap<usize, Vec<String>>> {
        let mut out = BTreeMap::new();
        for l in &self.layers {
            match digests.get(l.index) {
                Some(d) if *d == l.digest => {}
                Some(d) => {
                    return Err(OptimizeError::RecordingMismatch(format!(
                        "layer {} is {d} in the source but {} in the recording",
                        l.index, l.digest
                    )));
                }
                None => {
                    return Err(OptimizeError::RecordingMismatch(format!(
                        "the recording names layer {} ({}) but the source has {} layers",
                        l.index,
                        l.digest,
                        digests.len()
                    )));
                }
            }
            if !l.files.is_empty() {
                out.insert(l.index, l.files.clone());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Recording {
        Recording {
            version: RECORDING_VERSION,
            source: "127.0.0.1:1/a:1".into(),
            source_manifest: "sha256:aa".into(),
            args: vec!["python3".into(), "-c".into(), "pass".into()],
            files: vec!["usr/bin/python3.11".into(), "etc/ld.so.cache".into()],
            layers: vec![
                LayerFiles {
                    index: 0,
                    digest: "sha256:00".into(),
                    files: vec!["etc/ld.so.cache".into()],
                },
                LayerFiles {
                    index: 1,
                    digest: "sha256:11".into(),
                    files: vec!["usr/bin/python3.11".into()],
                },
                LayerFiles {
                    index: 2,
                    digest: "sha256:22".into(),
                    files: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_layer_matching() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        let r = sample();
        r.save(&p).unwrap();
        let back = Recording::load(&p).unwrap();
        assert_eq!(back, r);
        let digests: Vec<String> = ["sha256:00", "sha256:11", "sha256:22"]
            .map(String::from)
            .to_vec();
        let m = back.prioritized_for(&digests).unwrap();
        assert_eq!(m.len(), 2, "layer 2 has no files");
        assert_eq!(m[&1], ["usr/bin/python3.11"]);

        let other: Vec<String> = ["sha256:00", "sha256:99", "sha256:22"]
            .map(String::from)
            .to_vec();
        assert!(matches!(
            back.prioritized_for(&other),
            Err(OptimizeError::RecordingMismatch(_))
        ));
        assert!(matches!(
            back.prioritized_for(&digests[..2]),
            Err(OptimizeError::RecordingMismatch(_))
        ));
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            Recording::load(&p),
            Err(OptimizeError::Recording(_))
        ));
        let mut r = sample();
        r.version = 99;
        r.save(&p).unwrap();
        assert!(matches!(
            Recording::load(&p),
            Err(OptimizeError::Recording(_))
        ));
        assert!(matches!(
            Recording::load(&dir.path().join("absent")),
            Err(OptimizeError::Io { .. })
        ));
    }
}
