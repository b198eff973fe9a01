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

/// How long one case may take, daemon start and stop included.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a backend with `start`, runs `case` against it, stops it.
fn run<B, C>(start: B, case: C)
where
    B: AsyncFnOnce() -> anyhow::Result<snapshotter::Backend>,
    C: AsyncFnOnce(&snapshotter::Backend) -> anyhow::Result<()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let backend = start().await.expect("backend failed to start");
        let outcome = tokio::time::timeout(CASE_TIMEOUT, case(&backend)).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("{err:#}"),
            Err(_) => panic!("case timed out after {CASE_TIMEOUT:?}"),
        }
    });
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
