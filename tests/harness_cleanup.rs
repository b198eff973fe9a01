//! The real-stack harness cleans up after a failing test: a test that
//! panics while a container is running must leave no containerd, shim,
//! container process, daemon, registry, mount or temp dir behind.
//!
//! Needs root, containerd, runc and the tools from `scripts/deps.sh`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image;
use support::proc;
use support::registry::Registry;

/// What the doomed test started, recorded before it panicked.
#[derive(Default, Debug)]
struct Started {
    dirs: Vec<PathBuf>,
    containerd_sock: String,
    container_pid: Option<u32>,
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    support::require_prerequisites();
    let started = std::sync::Mutex::new(Started::default());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let layout = support::temp_dir("layout");
        image::debian_image(layout.path(), "1");
        let mut registry = Registry::start();
        let reference = registry.push_oci_layout(layout.path(), "1", "e2e/debian");
        let daemon = Daemon::start();
        let ctrd = Containerd::start(ContainerdOptions {
            stargz_proxy: Some(daemon.address.clone()),
        });
        {
            let mut s = started.lock().unwrap();
            s.dirs = vec![
                layout.path().into(),
                registry.dir().into(),
                daemon.dir().into(),
                ctrd.dir().into(),
            ];
            s.containerd_sock = ctrd.address.display().to_string();
        }
        ctrd.ctr_timeout(
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                "stargz",
                &reference,
            ],
            Duration::from_secs(300),
        );
        let id = support::unique_name("doomed");
        ctrd.run(&["--detach"], "stargz", &reference, &id, &["sleep", "600"]);
        let tasks = ctrd.ctr(&["tasks", "ls"]).stdout;
        let pid = tasks
            .lines()
            .find(|l| l.starts_with(&id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        started.lock().unwrap().container_pid = pid;
        assert!(
            !proc::mounts_under(ctrd.dir()).is_empty()
                || !proc::mounts_under(daemon.dir()).is_empty(),
            "a running container should have mounts"
        );
        panic!("deliberate failure with a container running");
    }));
    assert!(r.is_err(), "the doomed closure should have panicked");
    let s = started.into_inner().unwrap();
    assert_eq!(s.dirs.len(), 4, "setup did not get far enough: {s:?}");
    let pid = s.container_pid.expect("container pid from `ctr tasks ls`");

    // Processes: the container, its shim, containerd, daemon, registry.
    let gone = support::wait_for(Duration::from_secs(10), || {
        let t = proc::process_table();
        let left: Vec<_> = t
            .iter()
            .filter(|(p, (_, argv))| {
                **p == pid
                    || argv.iter().any(|a| {
                        a == &s.containerd_sock
                            || s.dirs.iter().any(|d| a.contains(&*d.to_string_lossy()))
                    })
            })
            .map(|(p, (_, argv))| (*p, argv.join(" ")))
            .collect();
        left.is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "processes left behind after the guards dropped"
    );
    for d in &s.dirs {
        assert!(
            proc::mounts_under(d).is_empty(),
            "mounts left under {}",
            d.display()
        );
        assert!(!d.exists(), "{} not removed", d.display());
    }
}
