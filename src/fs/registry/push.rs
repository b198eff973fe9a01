//! Whole blobs, for the converter: a streaming `GET` into a file with the
//! digest checked as the bytes arrive, and the registry push API.
//!
//! Push (distribution spec "push"): `HEAD /v2/<name>/blobs/<digest>` skips a
//! blob the registry has; otherwise `POST /v2/<name>/blobs/uploads/` opens a
//! session, and the blob goes up either in one `PUT <location>?digest=`
//! (small blobs) or as `PATCH` chunks of [`UPLOAD_CHUNK`] bytes closed by an
//! empty `PUT ?digest=`. Only one chunk is in memory at a time. Manifests
//! go last with `PUT /v2/<name>/manifests/<tag>`; ordering is the caller's
//! job (see `crate::convert`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use url::Url;

use super::client::{Failure, RegistryClient, Target, status_failure};
use super::config::{Capability, Endpoint};
use super::error::RegistryError;
use super::reference::{Reference, validate_digest};

/// Blobs up to this size go up in one `PUT`; larger ones in `PATCH`
/// chunks of this size.
pub const UPLOAD_CHUNK: u64 = 16 << 20;

fn push_scope(r: &Reference) -> String {
    format!("repository:{}:pull,push", r.repository)
}

fn sha256_hex(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

impl RegistryClient {
    /// The endpoint pushes for `r` go to: the server, over plain HTTP for
    /// loopback and `insecure_hosts`.
    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint, RegistryError> {
        let eps = self.config().endpoints(&r.host, Capability::Pull)?;
        // hosts.toml mirrors are read-only: pushes go to the server.
        eps.into_iter()
            .find(|e| !e.is_mirror)
            .ok_or_else(|| RegistryError::Config(format!("no push endpoint for {}", r.host)))
    }

    /// Streams blob `digest` (`size` bytes, from a verified descriptor)
    /// into `out`, hashing as it goes. A body of the wrong length or digest
    /// is an error naming both digests; `out` is rewound and truncated
    /// before every attempt. Returns the number of bytes written.
    pub async fn blob_to_file(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        out: &mut std::fs::File,
    ) -> Result<u64, RegistryError> {
        self.blob_to_file_progress(r, digest, size, out, &|_| {})
            .await
    }

    /// [`Self::blob_to_file`], calling `on_bytes(n)` for every `n` bytes
    /// written (restarting from 0 on a retry is not signalled; the caller
    /// only draws progress with it). A complete body with the wrong digest
    /// is [`RegistryError::DigestMismatch`] and is not retried.
    pub async fn blob_to_file_progress(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        out: &mut std::fs::File,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, RegistryError> {
        validate_digest(digest)
            .map_err(|m| RegistryError::InvalidReference(digest.to_owned(), m))?;
        let endpoints = self.config().endpoints(&r.host, Capability::Pull)?;
        let scope = r.pull_scope();
        let mut last = None;
        for ep in &endpoints {
            let t = Target {
                endpoint: ep,
                ref_host: &r.host,
                scope: &scope,
            };
            let url = ep.url(&r.repository, "blobs", digest)?;
            let res = self
                .retry("blob GET", || {
                    let (t, url) = (&t, &url);
                    let out = out.try_clone();
                    async move {
                        let mut out = out.map_err(io_err)?;
                        out.set_len(0).map_err(io_err)?;
                        out.seek(SeekFrom::Start(0)).map_err(io_err)?;
                        let (sent, _) = self
                            .send_following(t, Method::GET, url.clone(), &HeaderMap::new())
                            .await?;
                        if !sent.resp.status().is_success() {
                            return Err(status_failure(&sent.resp, &format!("blob {digest}")));
                        }
                        let client = sent.client.clone();
                        let mut resp = sent.resp;
                        let mut hash = Sha256::new();
                        let mut n = 0u64;
                        while let Some(chunk) = resp
                            .chunk()
                            .await
                            .map_err(|e| Failure::from(RegistryError::from_reqwest(&e)))?
                        {
                            n += chunk.len() as u64;
                            if n > size {
                                return Err(RegistryError::ProtocolViolation(format!(
                                    "blob {digest}: body longer than its {size} bytes"
                                ))
                                .into());
                            }
                            client.count_bytes(chunk.len());
                            on_bytes(chunk.len() as u64);
                            hash.update(&chunk);
                            out.write_all(&chunk).map_err(io_err)?;
                        }
                        if n != size {
                            return Err(RegistryError::ProtocolViolation(format!(
                                "blob {digest}: truncated body, {n} of {size} bytes"
                            ))
                            .into());
                        }
                        let got = sha256_hex(hash);
                        if got != digest {
                            return Err(RegistryError::DigestMismatch {
                                expected: digest.to_owned(),
                                got,
                            }
                            .into());
                        }
                        Ok(n)
                    }
                })
                .await;
            match res {
                Ok(n) => {
                    out.flush()
                        .map_err(|e| RegistryError::Config(e.to_string()))?;
                    return Ok(n);
                }
                // Corrupt content: another mirror may be right, but the
                // error must stay the digest mismatch.
                Err(e @ RegistryError::DigestMismatch { .. }) if endpoints.len() == 1 => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.base, %digest, error = %e, "blob download failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    /// Whether the registry already has blob `digest` in `r`'s repository.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let ep = self.push_endpoint(r)?;
        let scope = push_scope(r);
        let t = Target {
            endpoint: &ep,
            ref_host: &r.host,
            scope: &scope,
        };
        let url = ep.url(&r.repository, "blobs", digest)?;
        let (t, url) = (&t, &url);
        self.retry("blob HEAD", || async move {
            let (sent, _) = self
                .send_following(t, Method::HEAD, url.clone(), &HeaderMap::new())
                .await?;
            match sent.resp.status().as_u16() {
                200..=299 => Ok(true),
                404 => Ok(false),
                _ => Err(status_failure(&sent.resp, &format!("HEAD blob {digest}"))),
            }
        })
        .await
    }

    /// Cross-repository mount: `POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>`
    /// asks the registry to link blob `digest` from `from`'s repository
    /// (same host) into `r`'s. Returns whether it did (201); a registry
    /// that answers 202 opened an upload instead, which is left to expire.
    pub async fn mount_blob(
        &self,
        r: &Reference,
        digest: &str,
        from: &Reference,
    ) -> Result<bool, RegistryError> {
        validate_digest(digest)
            .map_err(|m| RegistryError::InvalidReference(digest.to_owned(), m))?;
        if from.host != r.host {
            return Ok(false);
        }
        let ep = self.push_endpoint(r)?;
        let scope = push_scope(r);
        let t = Target {
            endpoint: &ep,
            ref_host: &r.host,
            scope: &scope,
        };
        let mut url = ep
            .base
            .join(&format!("{}/blobs/uploads/", r.repository))
            .map_err(|e| RegistryError::Config(format!("bad upload URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", &from.repository);
        let (t, url) = (&t, &url);
        self.retry("blob mount", || async move {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_LENGTH, hv("0"));
            let sent = self
                .send_registry_body(t, Method::POST, url.clone(), &h, Some(Bytes::new()))
                .await?;
            match sent.resp.status().as_u16() {
                201 => Ok(true),
                202 => Ok(false),
                _ => Err(status_failure(
                    &sent.resp,
                    &format!("mounting blob {digest}"),
                )),
            }
        })
        .await
    }

    /// Uploads the file at `path` as blob `digest` (`size` bytes) unless
    /// the registry has it. Returns whether bytes were uploaded.
    pub async fn push_blob_file(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<bool, RegistryError> {
        validate_digest(digest)
            .map_err(|m| RegistryError::InvalidReference(digest.to_owned(), m))?;
        if self.blob_exists(r, digest).await? {
            return Ok(false);
        }
        let ep = self.push_endpoint(r)?;
        let scope = push_scope(r);
        let t = Target {
            endpoint: &ep,
            ref_host: &r.host,
            scope: &scope,
        };
        let (t, ep) = (&t, &ep);
        self.retry("blob upload", || async move {
            let mut f = std::fs::File::open(path).map_err(io_err)?;
            let mut location = self.start_upload(t, ep, r).await?;
            if size > UPLOAD_CHUNK {
                let mut sent_bytes = 0u64;
                while sent_bytes < size {
                    let n = (size - sent_bytes).min(UPLOAD_CHUNK);
                    let chunk = read_chunk(&mut f, n)?;
                    let mut h = HeaderMap::new();
                    h.insert(CONTENT_TYPE, hv("application/octet-stream"));
                    h.insert(CONTENT_LENGTH, hv(&n.to_string()));
                    h.insert(
                        CONTENT_RANGE,
                        hv(&format!("{}-{}", sent_bytes, sent_bytes + n - 1)),
                    );
                    let sent = self
                        .send_registry_body(t, Method::PATCH, location.clone(), &h, Some(chunk))
                        .await?;
                    if sent.resp.status().as_u16() != 202 {
                        return Err(status_failure(&sent.resp, &format!("PATCH blob {digest}")));
                    }
                    location = upload_location(&sent.resp, &location)?;
                    sent_bytes += n;
                }
                let url = with_digest(location, digest);
                let sent = self
                    .send_registry_body(t, Method::PUT, url, &HeaderMap::new(), Some(Bytes::new()))
                    .await?;
                check_created(&sent.resp, digest)
            } else {
                let body = read_chunk(&mut f, size)?;
                let mut h = HeaderMap::new();
                h.insert(CONTENT_TYPE, hv("application/octet-stream"));
                let url = with_digest(location, digest);
                let sent = self
                    .send_registry_body(t, Method::PUT, url, &h, Some(body))
                    .await?;
                check_created(&sent.resp, digest)
            }
        })
        .await?;
        Ok(true)
    }

    /// `POST /v2/<name>/blobs/uploads/`: the upload session's URL.
    async fn start_upload(
        &self,
        t: &Target<'_>,
        ep: &Endpoint,
        r: &Reference,
    ) -> Result<Url, Failure> {
        let url = ep
            .base
            .join(&format!("{}/blobs/uploads/", r.repository))
            .map_err(|e| RegistryError::Config(format!("bad upload URL: {e}")))?;
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, hv("0"));
        let sent = self
            .send_registry_body(t, Method::POST, url.clone(), &h, Some(Bytes::new()))
            .await?;
        match sent.resp.status().as_u16() {
            202 => upload_location(&sent.resp, &url),
            // distribution answers 405 UNSUPPORTED in read-only mode.
            405 => Err(status_failure(
                &sent.resp,
                &format!(
                    "starting a blob upload: the registry does not accept pushes to {} (read-only?)",
                    r.repository
                ),
            )),
            _ => Err(status_failure(&sent.resp, "starting a blob upload")),
        }
    }

    /// `PUT /v2/<name>/manifests/<tag>`. Returns the manifest digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        tag: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<String, RegistryError> {
        let ep = self.push_endpoint(r)?;
        let scope = push_scope(r);
        let t = Target {
            endpoint: &ep,
            ref_host: &r.host,
            scope: &scope,
        };
        let url = ep.url(&r.repository, "manifests", tag)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, hv(media_type));
        let (t, url, h, body) = (&t, &url, &h, &body);
        self.retry("manifest PUT", || async move {
            let sent = self
                .send_registry_body(t, Method::PUT, url.clone(), h, Some(body.clone()))
                .await?;
            if !sent.resp.status().is_success() {
                return Err(status_failure(&sent.resp, &format!("PUT manifest {tag}")));
            }
            Ok(())
        })
        .await?;
        Ok(digest)
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn io_err(e: std::io::Error) -> Failure {
    RegistryError::Config(format!("local file: {e}")).into()
}

fn read_chunk(f: &mut std::fs::File, n: u64) -> Result<Bytes, Failure> {
    let len = usize::try_from(n).map_err(|_| RegistryError::Config("chunk too large".into()))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).map_err(io_err)?;
    Ok(Bytes::from(buf))
}

fn upload_location(resp: &reqwest::Response, base: &Url) -> Result<Url, Failure> {
    let loc = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| RegistryError::ProtocolViolation("upload answer without Location".into()))?;
    Ok(base
        .join(loc)
        .map_err(|e| RegistryError::ProtocolViolation(format!("bad Location {loc:?}: {e}")))?)
}

fn with_digest(mut url: Url, digest: &str) -> Url {
    url.query_pairs_mut().append_pair("digest", digest);
    url
}

fn check_created(resp: &reqwest::Response, digest: &str) -> Result<(), Failure> {
    if resp.status().as_u16() == 201 || resp.status().is_success() {
        Ok(())
    } else {
        Err(status_failure(
            resp,
            &format!("completing upload of {digest}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_appended_to_upload_url() {
        let u = Url::parse("http://h/v2/r/blobs/uploads/x?_state=abc").unwrap();
        let u = with_digest(u, "sha256:00");
        assert_eq!(
            u.as_str(),
            "http://h/v2/r/blobs/uploads/x?_state=abc&digest=sha256%3A00"
        );
    }
}
