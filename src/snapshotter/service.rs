//! The `containerd.services.snapshots.v1.Snapshots` gRPC service over a
//! [`Snapshotter`]. Translation only: request fields in, [`Error`]s out
//! through the one `From<Error> for tonic::Status`.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as PbInfo, Kind as PbKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};

use super::core::{Info, Snapshotter, blocking};
use super::error::Error;
use super::metadata::Kind;

/// How many snapshots one `List` response message carries.
const LIST_BATCH: usize = 100;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
}

impl Service {
    pub fn new(sn: Arc<Snapshotter>) -> Service {
        Service { sn }
    }
}

fn btree(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn to_pb(i: Info) -> PbInfo {
    PbInfo {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::View => PbKind::View,
            Kind::Active => PbKind::Active,
            Kind::Committed => PbKind::Committed,
        } as i32,
        created_at: Some(i.created.into()),
        updated_at: Some(i.updated.into()),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "prepare");
        let mounts = self.sn.prepare(r.key, r.parent, btree(r.labels)).await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let sn = self.sn.clone();
        let (_, mounts) =
            blocking(move || sn.create(Kind::View, &r.key, &r.parent, btree(r.labels))).await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        // A point read in redb (MVCC, never waits for the writer): cheaper
        // inline than a hop to the blocking pool. Remote lower layers, if
        // any, are checked first.
        let mounts = self.sn.checked_mounts(&request.into_inner().key).await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        let sn = self.sn.clone();
        blocking(move || sn.commit(&r.name, &r.key, btree(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        tracing::debug!(key = %key, "remove");
        self.sn.remove(key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        // A point read, like Mounts.
        let info = self.sn.stat(&request.into_inner().key)?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Error::InvalidArgument("update without snapshot info".into()))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let sn = self.sn.clone();
        let labels = btree(info.labels);
        let updated = blocking(move || sn.update(&info.name, &labels, &paths)).await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(to_pb(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let sn = self.sn.clone();
        let infos = blocking(move || sn.list(&filters)).await?;
        let mut batches = Vec::with_capacity(infos.len() / LIST_BATCH + 1);
        let mut it = infos.into_iter().map(to_pb).peekable();
        while it.peek().is_some() {
            let info: Vec<PbInfo> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let key = request.into_inner().key;
        let sn = self.sn.clone();
        let (size, inodes) = blocking(move || sn.usage(&key)).await?;
        Ok(Response::new(UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let sn = self.sn.clone();
        let removed = blocking(move || sn.cleanup()).await?;
        tracing::info!(removed, "cleanup");
        Ok(Response::new(()))
    }
}
