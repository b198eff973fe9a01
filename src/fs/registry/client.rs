//! [`RegistryClient`]: the shared HTTP machinery: two reqwest clients
//! (verifying, and one for `skip_verify` hosts) with redirects disabled, the
//! in-flight request semaphore, authentication on 401, manual redirects that
//! drop `Authorization` when leaving the registry's origin, bounded body
//! reads, and the retry loop.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    AUTHORIZATION, HeaderMap, HeaderValue, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use super::auth::{AuthCache, Challenge, basic_header, fetch_token, parse_challenge};
use super::config::{Endpoint, RegistryConfig};
use super::credentials::{Credential, CredentialStore, docker_config_dir};
use super::error::RegistryError;
use super::range::{ContentRange, parse_content_range};
use super::retry::{RetryPolicy, parse_retry_after};

/// A failed attempt, with the server's `Retry-After` if it sent one.
#[derive(Debug)]
pub(crate) struct Failure {
    pub err: RegistryError,
    pub retry_after: Option<Duration>,
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Self {
        Self {
            err,
            retry_after: None,
        }
    }
}

/// A response and the concurrency permit held until its body is read.
pub(crate) struct Sent {
    pub resp: Response,
    pub _permit: OwnedSemaphorePermit,
    /// For counting body bytes.
    pub client: RegistryClient,
}

/// Where a request is sent and how it authenticates.
#[derive(Debug, Clone)]
pub(crate) struct Target<'a> {
    pub endpoint: &'a Endpoint,
    /// The reference's host (credentials fallback, e.g. `docker.io`).
    pub ref_host: &'a str,
    /// Token scope, e.g. `repository:a/b:pull`.
    pub scope: &'a str,
}

/// The registry client. Cheap to clone; clones share caches, the semaphore
/// and connection pools.
#[derive(Clone)]
pub struct RegistryClient {
    pub(crate) inner: Arc<Inner>,
}

/// Counters since the client was built (for metrics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP requests sent (every hop, token requests excluded).
    pub requests: u64,
    /// Attempts repeated after a retryable failure.
    pub retries: u64,
    /// Body bytes read (verified or not).
    pub bytes_received: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    bytes_received: AtomicU64,
}

pub(crate) struct Inner {
    counters: Counters,
    pub cfg: RegistryConfig,
    http: reqwest::Client,
    http_insecure: reqwest::Client,
    creds: CredentialStore,
    auth: AuthCache,
    sem: Arc<Semaphore>,
    pub policy: RetryPolicy,
    no_multi_range: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn build_http(cfg: &RegistryConfig, insecure: bool) -> Result<reqwest::Client, RegistryError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cfg.connect_timeout())
        .timeout(cfg.request_timeout())
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("rstargz/", env!("CARGO_PKG_VERSION")))
        .tls_danger_accept_invalid_certs(insecure)
        .build()
        .map_err(|e| RegistryError::Config(format!("HTTP client: {e}")))
}

/// Installs rustls' ring provider as the process default unless one is
/// installed already. reqwest (built with `rustls-no-provider`) panics when
/// a client is built without one, so any code building its own
/// `reqwest::Client` calls this first; [`RegistryClient::new`] does.
pub fn ensure_crypto_provider() {
    // Process-wide by rustls' design; an already installed provider wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    /// Builds a client: validates `cfg`, loads docker credentials, and
    /// installs rustls' ring provider as the process default if none is.
    pub fn new(cfg: RegistryConfig) -> Result<Self, RegistryError> {
        cfg.validate()?;
        ensure_crypto_provider();
        let creds =
            CredentialStore::load(docker_config_dir(cfg.docker_config.as_deref()).as_deref())?;
        Ok(Self {
            inner: Arc::new(Inner {
                counters: Counters::default(),
                http: build_http(&cfg, false)?,
                http_insecure: build_http(&cfg, true)?,
                creds,
                auth: AuthCache::default(),
                sem: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
                policy: RetryPolicy::from_config(&cfg),
                no_multi_range: Mutex::new(HashSet::new()),
                cfg,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    /// Counters since the client was built.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_bytes(&self, n: usize) {
        self.inner
            .counters
            .bytes_received
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether multi-range requests may be sent to `host` (`host:port`).
    pub fn multi_range_supported(&self, host: &str) -> bool {
        self.inner.cfg.multi_range
            && !self
                .inner
                .no_multi_range
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(host)
    }

    /// Remembers that `host` mishandles multi-range requests.
    pub(crate) fn mark_no_multi_range(&self, host: &str) {
        let newly = self
            .inner
            .no_multi_range
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_owned());
        if newly {
            tracing::info!(
                host,
                "registry does not support multi-range requests; using single ranges"
            );
        }
    }

    /// Runs `attempt` up to `max_attempts` times, sleeping (async) between
    /// retryable failures.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let policy = self.inner.policy;
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(f) if f.err.is_retryable() && n < policy.max_attempts => {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let delay = policy.delay(n, f.retry_after);
                    tracing::debug!(what, attempt = n, error = %f.err, ?delay, "retrying registry request");
                    tokio::time::sleep(delay).await;
                }
                Err(f) => {
                    tracing::debug!(what, attempts = n, error = %f.err, "registry request failed");
                    return Err(f.err);
                }
            }
        }
    }

    /// A concurrency permit for one HTTP request (counted).
    async fn permit(&self) -> Result<OwnedSemaphorePermit, Failure> {
        self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        Arc::clone(&self.inner.sem)
            .acquire_owned()
            .await
            .map_err(|_| RegistryError::Config("client shut down".into()).into())
    }

    fn http(&self, skip_verify: bool) -> &reqwest::Client {
        if skip_verify {
            &self.inner.http_insecure
        } else {
            &self.inner.http
        }
    }

    /// One unauthenticated request (redirect targets, object storage).
    pub(crate) async fn send_plain(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
    ) -> Result<Sent, Failure> {
        let permit = self.permit().await?;
        let resp = self
            .http(false)
            .request(method, url)
            .headers(headers.clone())
            .send()
            .await
            .map_err(|e| Failure::from(RegistryError::from_reqwest(&e)))?;
        Ok(Sent {
            resp,
            _permit: permit,
            client: self.clone(),
        })
    }

    fn credential(&self, t: &Target<'_>) -> Option<&Credential> {
        let host = host_port(&t.endpoint.base);
        self.inner.creds.get(&host).or_else(|| {
            if t.endpoint.is_mirror {
                None
            } else {
                self.inner.creds.get(t.ref_host)
            }
        })
    }

    /// One request to a registry endpoint with authentication: sends the
    /// cached `Authorization` for (host, scope), and on 401 answers the
    /// challenge (token or Basic) and sends once more. Redirects are
    /// returned, not followed.
    pub(crate) async fn send_registry(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        headers: &HeaderMap,
    ) -> Result<Sent, Failure> {
        self.send_registry_body(t, method, url, headers, None).await
    }

    /// [`RegistryClient::send_registry`] with a request body (pushes). The
    /// body is cheap to clone, so the request after a 401 resends it.
    pub(crate) async fn send_registry_body(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        headers: &HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Sent, Failure> {
        let host = host_port(&t.endpoint.base);
        let mut cached = self.inner.auth.get(&host, t.scope);
        for round in 0..2 {
            let permit = self.permit().await?;
            let mut req = self
                .http(t.endpoint.skip_verify)
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if let Some(h) = &cached {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Failure::from(RegistryError::from_reqwest(&e)))?;
            if resp.status().as_u16() != 401 || round == 1 {
                return Ok(Sent {
                    resp,
                    _permit: permit,
                    client: self.clone(),
                });
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            drop(resp);
            drop(permit);
            if cached.is_some() {
                self.inner.auth.invalidate(&host, t.scope);
            }
            let cred = self.credential(t);
            let header = match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => {
                    // Ask for our scope; the challenge's when we have none.
                    let scope_to_ask = if t.scope.is_empty() {
                        scope.unwrap_or_default()
                    } else {
                        t.scope.to_owned()
                    };
                    // Credentials never go to a plain-HTTP realm of an
                    // HTTPS registry (a downgrade that would leak them).
                    let cred = if realm.starts_with("http://")
                        && t.endpoint.base.scheme() == "https"
                    {
                        tracing::warn!(%host, %realm, "plain-HTTP token realm: asking anonymously");
                        None
                    } else {
                        cred
                    };
                    let (token, ttl) = fetch_token(
                        self.http(t.endpoint.skip_verify),
                        &realm,
                        service.as_deref(),
                        &scope_to_ask,
                        cred,
                    )
                    .await?;
                    let h = format!("Bearer {token}");
                    self.inner.auth.put(&host, t.scope, h.clone(), Some(ttl));
                    h
                }
                Some(Challenge::Basic) => match cred {
                    Some(Credential::UserPass { username, password }) => {
                        let h = basic_header(username, password);
                        self.inner.auth.put(&host, t.scope, h.clone(), None);
                        h
                    }
                    _ => {
                        return Err(RegistryError::Unauthorized(format!(
                            "{host} wants Basic auth and no credentials are configured"
                        ))
                        .into());
                    }
                },
                None => {
                    return Err(RegistryError::Unauthorized(format!(
                        "{host} answered 401 without a usable challenge"
                    ))
                    .into());
                }
            };
            cached = Some(header);
        }
        unreachable!("the second round always returns")
    }

    /// Sends to the registry and follows redirects by hand. `Authorization`
    /// is sent only while the URL stays on the registry's origin. Returns
    /// the final response and, if the registry redirected, the first
    /// off-registry URL (what a blob reader caches).
    pub(crate) async fn send_following(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        headers: &HeaderMap,
    ) -> Result<(Sent, Option<Url>), Failure> {
        let mut sent = self
            .send_registry(t, method.clone(), url.clone(), headers)
            .await?;
        let mut current = url;
        let mut redirected = None;
        for _ in 0..self.inner.cfg.max_redirects {
            let Some(next) = redirect_location(&sent.resp, &current)? else {
                return Ok((sent, redirected));
            };
            drop(sent);
            sent = if same_origin(&next, &t.endpoint.base) {
                self.send_registry(t, method.clone(), next.clone(), headers)
                    .await?
            } else {
                redirected.get_or_insert_with(|| next.clone());
                self.send_plain(method.clone(), next.clone(), headers)
                    .await?
            };
            current = next;
        }
        match redirect_location(&sent.resp, &current)? {
            None => Ok((sent, redirected)),
            Some(_) => Err(RegistryError::ProtocolViolation("too many redirects".into()).into()),
        }
    }

    /// Sends to a cached redirect target, following further hops (never
    /// with `Authorization`).
    pub(crate) async fn send_plain_following(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
    ) -> Result<Sent, Failure> {
        let mut sent = self
            .send_plain(method.clone(), url.clone(), headers)
            .await?;
        let mut current = url;
        for _ in 0..self.inner.cfg.max_redirects {
            let Some(next) = redirect_location(&sent.resp, &current)? else {
                return Ok(sent);
            };
            drop(sent);
            sent = self
                .send_plain(method.clone(), next.clone(), headers)
                .await?;
            current = next;
        }
        match redirect_location(&sent.resp, &current)? {
            None => Ok(sent),
            Some(_) => Err(RegistryError::ProtocolViolation("too many redirects".into()).into()),
        }
    }
}

/// The absolute `Location` of a 301/302/303/307/308, if this is one.
pub(crate) fn redirect_location(resp: &Response, base: &Url) -> Result<Option<Url>, Failure> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return Ok(None);
    }
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| RegistryError::ProtocolViolation("redirect without Location".into()))?;
    let url = base
        .join(loc)
        .map_err(|e| RegistryError::ProtocolViolation(format!("bad Location {loc:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(
            RegistryError::ProtocolViolation(format!("redirect to {}", url.scheme())).into(),
        );
    }
    Ok(Some(url))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `host[:port]` of a URL, as hosts are keyed everywhere.
pub(crate) fn host_port(u: &Url) -> String {
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

/// The failure a non-success response stands for, with its `Retry-After`.
pub(crate) fn status_failure(resp: &Response, what: &str) -> Failure {
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    Failure {
        err: RegistryError::from_status(resp.status().as_u16(), what),
        retry_after,
    }
}

/// A header value as text.
pub(crate) fn header_str<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The `Content-Range` a 206 must carry, parsed.
pub(crate) fn content_range(resp: &Response) -> Result<ContentRange, RegistryError> {
    header_str(resp, "content-range")
        .ok_or_else(|| RegistryError::ProtocolViolation("206 without Content-Range".into()))
        .and_then(parse_content_range)
}

/// `Content-Length`, parsed strictly.
pub(crate) fn content_length(resp: &Response) -> Option<u64> {
    header_str(resp, "content-length").and_then(|v| v.trim().parse().ok())
}

/// Reads a body of exactly `expected` bytes (when given) and at most
/// `limit`. Short or long bodies are protocol violations (retryable).
pub(crate) async fn read_body(
    sent: Sent,
    expected: Option<u64>,
    limit: u64,
) -> Result<Bytes, RegistryError> {
    let client = sent.client.clone();
    let mut resp = sent.resp;
    let cap = expected.unwrap_or(limit).min(limit);
    if let Some(cl) = content_length(&resp)
        && (cl > cap || expected.is_some_and(|e| e != cl))
    {
        return Err(RegistryError::ProtocolViolation(format!(
            "Content-Length {cl}, expected {}",
            expected.map_or_else(|| format!("at most {cap}"), |e| e.to_string())
        )));
    }
    let mut buf = BytesMut::with_capacity(usize::try_from(cap.min(1 << 20)).unwrap_or(0));
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| RegistryError::from_reqwest(&e))?
    {
        if (buf.len() + chunk.len()) as u64 > cap {
            return Err(RegistryError::ProtocolViolation(format!(
                "body longer than {cap} bytes"
            )));
        }
        client.count_bytes(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    if let Some(e) = expected
        && buf.len() as u64 != e
    {
        return Err(RegistryError::ProtocolViolation(format!(
            "truncated body: {} of {e} bytes",
            buf.len()
        )));
    }
    Ok(buf.freeze())
}

/// A `HeaderMap` with one header.
pub(crate) fn one_header(name: reqwest::header::HeaderName, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
    h
}
