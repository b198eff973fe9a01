//! Conformance suites, written once and run against every implementation.
//!
//! - [`snapshotter`]: containerd's snapshots gRPC API, against containerd's
//!   own overlayfs snapshotter (the reference) and against `rstargz-grpc`.
//! - [`backends`]: starting and stopping those daemons.
//!
//! Every case becomes one test per backend, named
//! `<backend>::<case>`, e.g. `rstargz_grpc::remove_parent_with_children_fails`.
//! The suites mount filesystems and start daemons, so they need root.

mod backends;
mod snapshotter;

use std::time::Duration;

/// How long a backend may take to start, and then one case to run.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a backend with `start`, runs `case` against it, stops it.
///
/// The runtime goes before the backend: that closes the client's
/// connection, so the daemon is not stopped with a client still attached.
fn run<B, C>(start: B, case: C)
where
    B: AsyncFnOnce() -> anyhow::Result<snapshotter::Backend>,
    C: AsyncFnOnce(&snapshotter::Backend) -> anyhow::Result<()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let backend = runtime
        .block_on(async { tokio::time::timeout(CASE_TIMEOUT, start()).await })
        .unwrap_or_else(|_| panic!("backend did not start within {CASE_TIMEOUT:?}"))
        .unwrap_or_else(|err| panic!("backend failed to start: {err:#}"));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async { tokio::time::timeout(CASE_TIMEOUT, case(&backend)).await })
    }));
    drop(runtime);
    drop(backend);
    match outcome {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => panic!("{err:#}"),
        Ok(Err(_)) => panic!("case timed out after {CASE_TIMEOUT:?}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Defines one `#[test]` per case, each against a fresh backend from
/// `$start`.
macro_rules! instantiate {
    ($start:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                crate::run($start, crate::snapshotter::cases::$case);
            }
        )*
    };
}

mod containerd_overlayfs {
    crate::for_each_case!(instantiate, crate::backends::containerd::start);
}

mod rstargz_grpc {
    crate::for_each_case!(instantiate, crate::backends::rstargz::start);
}
