//! The workload to record: the image config's Entrypoint + Cmd, Env and
//! WorkingDir, with the command line's overrides (Docker's rules: a new
//! entrypoint drops the image's Cmd; `--args` replaces Cmd; `--env K=V`
//! replaces or adds K).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

use super::error::{OptimizeError, Result};

/// `PATH` used when the image sets none (what runtimes default to).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub entrypoint: Option<Vec<String>>,
    /// `Some` when `--args` was given (replaces the image's Cmd).
    pub args: Option<Vec<String>>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
}

/// What runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

/// `--entrypoint`: a JSON array of strings, or one string taken as is.
pub fn parse_entrypoint(s: &str) -> Result<Vec<String>> {
    if s.trim_start().starts_with('[') {
        let v: Vec<String> = serde_json::from_str(s).map_err(|e| {
            OptimizeError::NoWorkload(format!(
                "--entrypoint {s:?} is not a JSON string array: {e}"
            ))
        })?;
        return Ok(v);
    }
    Ok(vec![s.to_owned()])
}

fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the workload from the image config JSON and the overrides.
pub fn resolve(config: &serde_json::Value, o: &Overrides) -> Result<Workload> {
    let c = config.get("config");
    let entry = match &o.entrypoint {
        Some(e) => e.clone(),
        None => strings(c.and_then(|c| c.get("Entrypoint"))),
    };
    let cmd = match (&o.args, &o.entrypoint) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => strings(c.and_then(|c| c.get("Cmd"))),
    };
    let args: Vec<String> = entry.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(OptimizeError::NoWorkload(
            "the image has no Entrypoint or Cmd; give --entrypoint or --args".into(),
        ));
    }
    let mut env = strings(c.and_then(|c| c.get("Env")));
    for kv in &o.env {
        let Some((k, _)) = kv.split_once('=') else {
            return Err(OptimizeError::NoWorkload(format!(
                "--env {kv:?} is not KEY=VALUE"
            )));
        };
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k));
        env.push(kv.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let cwd = o
        .cwd
        .clone()
        .or_else(|| {
            c.and_then(|c| c.get("WorkingDir"))
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        return Err(OptimizeError::NoWorkload(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    Ok(Workload { args, env, cwd })
}

impl Workload {
    /// Checks that `args[0]` names an executable regular file inside
    /// `rootfs` (searching `PATH` when it has no `/`), resolving symlinks
    /// inside the rootfs. Opens with `O_PATH` only, so nothing is recorded.
    pub fn check_executable(&self, rootfs: &Path) -> Result<String> {
        let exe = &self.args[0];
        let path_var = self
            .env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let candidates: Vec<String> = if exe.contains('/') {
            if exe.starts_with('/') {
                vec![exe.clone()]
            } else {
                vec![format!("{}/{exe}", self.cwd.trim_end_matches('/'))]
            }
        } else {
            path_var
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| format!("{}/{exe}", d.trim_end_matches('/')))
                .collect()
        };
        let root = std::fs::File::open(rootfs).map_err(|e| OptimizeError::io(rootfs, e))?;
        for c in &candidates {
            if is_executable_in(&root, c) {
                return Ok(c.clone());
            }
        }
        let hint = if exe.contains('/') {
            String::new()
        } else {
            format!(" (searched PATH={path_var})")
        };
        Err(OptimizeError::ExecutableNotFound(exe.clone(), hint))
    }
}

/// `path` resolved with `root` as `/` (openat2 `RESOLVE_IN_ROOT`) is an
/// executable regular file.
fn is_executable_in(root: &std::fs::File, path: &str) -> bool {
    let Ok(c) = CString::new(Path::new(path).as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed open_how is valid; fields set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: valid fd, NUL-terminated path and a correctly sized struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: openat2 returned a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let Ok(st) = nix::sys::stat::fstat(&fd) else {
        return false;
    };
    st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> serde_json::Value {
        json!({"config": {
            "Entrypoint": ["/entry"],
            "Cmd": ["a", "b"],
            "Env": ["PATH=/bin", "A=1"],
            "WorkingDir": "/srv"
        }})
    }

    #[test]
    fn image_defaults_and_overrides() {
        let w = resolve(&cfg(), &Overrides::default()).unwrap();
        assert_eq!(w.args, ["/entry", "a", "b"]);
        assert_eq!(w.env, ["PATH=/bin", "A=1"]);
        assert_eq!(w.cwd, "/srv");

        let o = Overrides {
            args: Some(vec!["x".into()]),
            env: vec!["A=2".into(), "B=3".into()],
            ..Default::default()
        };
        let w = resolve(&cfg(), &o).unwrap();
        assert_eq!(w.args, ["/entry", "x"]);
        assert_eq!(w.env, ["PATH=/bin", "A=2", "B=3"]);

        // A new entrypoint drops the image's Cmd.
        let o = Overrides {
            entrypoint: Some(parse_entrypoint(r#"["python3", "-c"]"#).unwrap()),
            cwd: Some("/tmp".into()),
            ..Default::default()
        };
        let w = resolve(&cfg(), &o).unwrap();
        assert_eq!(w.args, ["python3", "-c"]);
        assert_eq!(w.cwd, "/tmp");
        assert_eq!(parse_entrypoint("/bin/sh").unwrap(), ["/bin/sh"]);
        assert!(parse_entrypoint("[1,").is_err());

        // Nothing to run, bad env, relative cwd: typed errors.
        let empty = json!({"config": {}});
        let e = resolve(&empty, &Overrides::default()).unwrap_err();
        assert!(matches!(e, OptimizeError::NoWorkload(_)));
        let w = resolve(
            &empty,
            &Overrides {
                args: Some(vec!["sh".into()]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(w.env, [format!("PATH={DEFAULT_PATH}")]);
        assert_eq!(w.cwd, "/");
        let bad = Overrides {
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(resolve(&cfg(), &bad).is_err());
        let rel = Overrides {
            cwd: Some("rel".into()),
            ..Default::default()
        };
        assert!(resolve(&cfg(), &rel).is_err());
    }

    #[test]
    fn executables_resolve_inside_the_rootfs() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            r.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(r.join("usr/bin/data"), b"").unwrap();
        // usrmerge-style absolute symlink: resolved inside the rootfs.
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap();
        let w = |a: &str| Workload {
            args: vec![a.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
        };
        assert_eq!(w("tool").check_executable(r).unwrap(), "/bin/tool");
        assert_eq!(
            w("/usr/bin/tool").check_executable(r).unwrap(),
            "/usr/bin/tool"
        );
        assert!(matches!(
            w("data").check_executable(r),
            Err(OptimizeError::ExecutableNotFound(..))
        ));
        assert!(matches!(
            w("absent").check_executable(r),
            Err(OptimizeError::ExecutableNotFound(..))
        ));
        // The host's /bin/sh is not the image's.
        assert!(w("/bin/sh").check_executable(r).is_err());
    }
}
