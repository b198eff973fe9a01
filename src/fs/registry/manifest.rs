//! Manifest resolution: `resolve(reference)` fetches an OCI or Docker
//! manifest or index, picks the configured platform from an index, checks
//! every digest it can, and returns the image manifest with its layer
//! descriptors (annotations included, e.g.
//! `containerd.io/snapshot/stargz/toc.digest`).

use std::collections::HashMap;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::ACCEPT;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::client::{RegistryClient, Target, header_str, one_header, read_body, status_failure};
use super::config::{Capability, Endpoint};
use super::error::RegistryError;
use super::reference::Reference;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Layer annotation carrying the TOC digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:...`
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations (layer descriptors carry the TOC digest here).
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Alternative URLs (foreign layers).
    #[serde(default)]
    pub urls: Vec<String>,
    /// Platform, in index entries.
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation, if any.
    pub fn toc_digest(&self) -> Option<&str> {
        self.annotations
            .get(TOC_DIGEST_ANNOTATION)
            .map(String::as_str)
    }
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// e.g. `linux`
    pub os: String,
    /// e.g. `amd64`
    pub architecture: String,
    /// e.g. `v8`
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// Media type, when the manifest states it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
}

/// A resolved image: the manifest digest (of the platform manifest, not
/// the index) and the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Digest of the platform manifest.
    pub digest: String,
    /// Digest of the index it was picked from, if any.
    pub index_digest: Option<String>,
    /// The manifest.
    pub manifest: Manifest,
}

impl Resolved {
    /// Layer descriptors with their annotations.
    pub fn layers(&self) -> &[Descriptor] {
        &self.manifest.layers
    }
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Whether index entry platform `p` is `want` (`os/arch[/variant]`).
pub fn platform_matches(p: &Option<Platform>, want: &str) -> bool {
    let mut it = want.split('/');
    let (os, arch, variant) = (it.next(), it.next(), it.next());
    p.as_ref().is_some_and(|p| {
        Some(p.os.as_str()) == os
            && Some(p.architecture.as_str()) == arch
            && variant.is_none_or(|v| p.variant.as_deref() == Some(v))
    })
}

impl RegistryClient {
    /// Resolves `reference` to its platform manifest. Tags are resolved on
    /// endpoints with the `resolve` capability; digests on `pull` ones.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, RegistryError> {
        let cap = if reference.digest.is_some() {
            Capability::Pull
        } else {
            Capability::Resolve
        };
        let endpoints = self.config().endpoints(&reference.host, cap)?;
        let mut last = None;
        for ep in &endpoints {
            match self.resolve_at(ep, reference).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(endpoint = %ep.base, %reference, error = %e, "manifest resolution failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    /// Fetches `reference`'s manifest or index as it is (no platform
    /// picked), or the manifest `digest` of its repository when given.
    /// Returns the body's digest (checked) and the body.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        digest: Option<&str>,
    ) -> Result<(String, Bytes), RegistryError> {
        let digest = digest.or(r.digest.as_deref());
        let cap = if digest.is_some() {
            Capability::Pull
        } else {
            Capability::Resolve
        };
        let endpoints = self.config().endpoints(&r.host, cap)?;
        let mut last = None;
        for ep in &endpoints {
            let reference = digest.unwrap_or(r.manifest_reference());
            match self.get_manifest(ep, r, reference, digest).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(endpoint = %ep.base, %r, error = %e, "manifest fetch failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    async fn resolve_at(&self, ep: &Endpoint, r: &Reference) -> Result<Resolved, RegistryError> {
        let (digest, body) = self
            .get_manifest(ep, r, r.manifest_reference(), r.digest.as_deref())
            .await?;
        let any: AnyManifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Manifest(e.to_string()))?;
        let is_index = any.manifests.is_some()
            && any.layers.is_none()
            && any
                .media_type
                .as_deref()
                .is_none_or(|m| m == OCI_INDEX || m == DOCKER_LIST);
        if !is_index {
            return Ok(Resolved {
                digest,
                index_digest: None,
                manifest: parse_manifest(&body)?,
            });
        }
        let want = &self.config().platform;
        let child = any
            .manifests
            .unwrap_or_default()
            .into_iter()
            .find(|d| platform_matches(&d.platform, want))
            .ok_or_else(|| {
                RegistryError::NotFound(format!("{r}: no manifest for platform {want}"))
            })?;
        let (cdigest, cbody) = self
            .get_manifest(ep, r, &child.digest, Some(&child.digest))
            .await?;
        Ok(Resolved {
            digest: cdigest,
            index_digest: Some(digest),
            manifest: parse_manifest(&cbody)?,
        })
    }

    /// GETs one manifest; verifies the body against `expect` (or the
    /// `Docker-Content-Digest` header when resolving a tag).
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        r: &Reference,
        reference: &str,
        expect: Option<&str>,
    ) -> Result<(String, Bytes), RegistryError> {
        let url = ep.url(&r.repository, "manifests", reference)?;
        let scope = r.pull_scope();
        let t = Target {
            endpoint: ep,
            ref_host: &r.host,
            scope: &scope,
        };
        let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ");
        let headers = one_header(ACCEPT, &accept);
        let limit = self.config().max_manifest_bytes;
        let (t, headers, url) = (&t, &headers, &url);
        let (body, header_digest) = self
            .retry("manifest GET", || async move {
                let (sent, _) = self
                    .send_following(t, Method::GET, url.clone(), headers)
                    .await?;
                if !sent.resp.status().is_success() {
                    return Err(status_failure(&sent.resp, &format!("manifest {r}")));
                }
                let hd = header_str(&sent.resp, "docker-content-digest").map(str::to_owned);
                Ok((read_body(sent, None, limit).await?, hd))
            })
            .await?;
        let actual = sha256_digest(&body);
        if let Some(want) = expect.or(header_digest.as_deref())
            && want.starts_with("sha256:")
            && want != actual
        {
            return Err(RegistryError::ProtocolViolation(format!(
                "manifest digest {actual}, expected {want}"
            )));
        }
        Ok((actual, body))
    }
}

/// Whether `body` is an image index (OCI index or Docker manifest list).
pub fn is_index(body: &[u8]) -> Result<bool, RegistryError> {
    let any: AnyManifest =
        serde_json::from_slice(body).map_err(|e| RegistryError::Manifest(e.to_string()))?;
    Ok(any.manifests.is_some()
        && any.layers.is_none()
        && any
            .media_type
            .as_deref()
            .is_none_or(|m| m == OCI_INDEX || m == DOCKER_LIST))
}

/// Parses an image manifest (schema 2).
pub fn parse_manifest(body: &[u8]) -> Result<Manifest, RegistryError> {
    let m: Manifest =
        serde_json::from_slice(body).map_err(|e| RegistryError::Manifest(e.to_string()))?;
    if m.schema_version != 2 {
        return Err(RegistryError::Manifest(format!(
            "schemaVersion {}",
            m.schema_version
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_matching() {
        let p = Some(Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        });
        assert!(platform_matches(&p, "linux/arm64"));
        assert!(platform_matches(&p, "linux/arm64/v8"));
        assert!(!platform_matches(&p, "linux/arm64/v7"));
        assert!(!platform_matches(&p, "linux/amd64"));
        assert!(!platform_matches(&None, "linux/amd64"));
    }

    #[test]
    fn layer_annotations() {
        let m = parse_manifest(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"c","digest":"sha256:00","size":1},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:11","size":5,
            "annotations":{"containerd.io/snapshot/stargz/toc.digest":"sha256:22"}}],"unknown":1}"#,
        )
        .unwrap();
        assert_eq!(m.layers[0].toc_digest(), Some("sha256:22"));
        assert!(
            parse_manifest(br#"{"schemaVersion":1,"config":{"digest":"x","size":1},"layers":[]}"#)
                .is_err()
        );
    }
}
