//! A snapshots gRPC client over a unix socket, for tests, benchmarks and
//! tools.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::snapshots::snapshots_client::SnapshotsClient;

/// Connects to the service listening on the unix socket `path`.
pub async fn connect(
    path: impl Into<PathBuf>,
) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = path.into();
    // The URI is required by the API but unused: the connector decides.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(SnapshotsClient::new(channel))
}
