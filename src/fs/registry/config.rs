//! Client configuration ([`RegistryConfig`]) and per-host endpoint lists.
//!
//! Endpoints for a host come from containerd's
//! `<certs_d>/<host>/hosts.toml` when it exists: each `[host."<url>"]` with
//! the needed capability, in file order (mirrors), then `server`. Otherwise
//! the host itself, over plain HTTP for loopback hosts and for hosts listed in
//! `insecure_hosts`, over HTTPS otherwise. `docker.io` maps to
//! `registry-1.docker.io`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::error::RegistryError;
use super::reference::DOCKER_HUB;

/// The `[registry]` section with every key at its default, as documented.
/// A test parses it and compares it with [`RegistryConfig::default`].
pub const SAMPLE_CONFIG: &str = r#"
[registry]
certs_d = "/etc/containerd/certs.d"   # containerd's hosts.toml tree
# docker_config = "/root/.docker"     # default: $DOCKER_CONFIG, then ~/.docker
insecure_hosts = []                   # plain HTTP (loopback hosts always are)
skip_verify_hosts = []                # TLS without certificate verification
max_concurrent_requests = 8           # in-flight HTTP requests per client
max_attempts = 5                      # per request, first included
connect_timeout_ms = 10000
request_timeout_ms = 30000            # headers and body
backoff_base_ms = 30                  # alias: min_wait_msec
backoff_max_ms = 10000                # alias: max_wait_msec
retry_after_cap_ms = 60000
max_redirects = 5
multi_range = true                    # hosts that fail it are remembered
max_ranges_per_request = 32
max_whole_body_bytes = 67108864       # 200-with-whole-blob answers used up to this size
max_manifest_bytes = 4194304
platform = "linux/amd64"
"#;

/// Registry client settings (`[registry]` in the daemon config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// containerd's hosts directory (`<dir>/<host>/hosts.toml`).
    pub certs_d: Option<PathBuf>,
    /// Directory holding docker's `config.json`; `None` means
    /// `$DOCKER_CONFIG`, then `~/.docker`.
    pub docker_config: Option<PathBuf>,
    /// Hosts (`host` or `host:port`) reached over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// Hosts whose TLS certificates are not verified.
    pub skip_verify_hosts: Vec<String>,
    /// In-flight HTTP requests per client.
    pub max_concurrent_requests: usize,
    /// Attempts per request, first included.
    pub max_attempts: u32,
    /// TCP+TLS connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout (headers and body), milliseconds.
    pub request_timeout_ms: u64,
    /// First backoff delay, milliseconds (doubles per attempt, jittered).
    /// Also accepted as upstream's `min_wait_msec`.
    #[serde(alias = "min_wait_msec")]
    pub backoff_base_ms: u64,
    /// Largest backoff delay, milliseconds. Also accepted as upstream's
    /// `max_wait_msec`.
    #[serde(alias = "max_wait_msec")]
    pub backoff_max_ms: u64,
    /// Largest `Retry-After` honoured, milliseconds.
    pub retry_after_cap_ms: u64,
    /// Redirect hops followed per request.
    pub max_redirects: u32,
    /// Try multi-range requests at all (a host that fails them is
    /// remembered and gets single ranges from then on).
    pub multi_range: bool,
    /// Ranges per multi-range request (keeps the `Range` header short).
    pub max_ranges_per_request: usize,
    /// Largest blob served from a 200 answer that ignored `Range` (the
    /// whole body is read only when its length equals the blob size).
    pub max_whole_body_bytes: u64,
    /// Largest manifest or index accepted, bytes.
    pub max_manifest_bytes: u64,
    /// Platform picked from manifest indexes, `os/arch[/variant]`.
    pub platform: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            certs_d: Some(PathBuf::from("/etc/containerd/certs.d")),
            docker_config: None,
            insecure_hosts: Vec::new(),
            skip_verify_hosts: Vec::new(),
            max_concurrent_requests: 8,
            max_attempts: 5,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            backoff_base_ms: 30,
            backoff_max_ms: 10_000,
            retry_after_cap_ms: 60_000,
            max_redirects: 5,
            multi_range: true,
            max_ranges_per_request: 32,
            max_whole_body_bytes: 64 << 20,
            max_manifest_bytes: 4 << 20,
            platform: "linux/amd64".to_owned(),
        }
    }
}

impl RegistryConfig {
    /// Says what is wrong, if anything.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let bad = |m: &str| Err(RegistryError::Config(m.to_owned()));
        if self.max_concurrent_requests == 0 {
            return bad("max_concurrent_requests must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return bad("timeouts must be positive");
        }
        if self.max_ranges_per_request == 0 {
            return bad("max_ranges_per_request must be at least 1");
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return bad("backoff_base_ms exceeds backoff_max_ms");
        }
        if self.platform.split('/').count() < 2 {
            return bad("platform must be os/arch[/variant]");
        }
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The endpoints to try for `host`, in order.
    pub fn endpoints(&self, host: &str, cap: Capability) -> Result<Vec<Endpoint>, RegistryError> {
        if let Some(dir) = &self.certs_d
            && let Some(eps) = hosts_toml_endpoints(dir, host, cap)?
        {
            return Ok(eps);
        }
        let plain = is_loopback(host) || self.insecure_hosts.iter().any(|h| h == host);
        let scheme = if plain { "http" } else { "https" };
        let target = if host == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            host
        };
        let base = parse_url(&format!("{scheme}://{target}/v2/"))?;
        Ok(vec![Endpoint {
            base,
            skip_verify: self.skip_verify_hosts.iter().any(|h| h == host),
            is_mirror: false,
        }])
    }
}

/// What an endpoint is used for (hosts.toml `capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Blob and manifest-by-digest fetches.
    Pull,
    /// Tag to digest resolution.
    Resolve,
}

/// One place to send requests for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// URL that `<repo>/blobs/<digest>` is appended to; ends with `/`.
    pub base: Url,
    /// Do not verify the TLS certificate.
    pub skip_verify: bool,
    /// A mirror from hosts.toml rather than the server.
    pub is_mirror: bool,
}

impl Endpoint {
    /// `<base><repo>/<kind>/<reference>`.
    pub fn url(&self, repo: &str, kind: &str, reference: &str) -> Result<Url, RegistryError> {
        self.base
            .join(&format!("{repo}/{kind}/{reference}"))
            .map_err(|e| RegistryError::Config(format!("bad URL for {repo}: {e}")))
    }
}

/// `localhost`, `127.0.0.1`, `[::1]`, each with or without a port.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

fn parse_url(s: &str) -> Result<Url, RegistryError> {
    Url::parse(s).map_err(|e| RegistryError::Config(format!("bad URL {s:?}: {e}")))
}

/// containerd's `hosts.toml`. Unknown keys (`ca`, `client`, `header`, ...)
/// are ignored: the file is containerd's, not ours.
#[derive(Debug, Default, Deserialize)]
struct HostsToml {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    plain_http: Option<bool>,
    #[serde(default, deserialize_with = "ordered_hosts")]
    host: Vec<(String, HostEntry)>,
}

#[derive(Debug, Default, Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    plain_http: Option<bool>,
    override_path: Option<bool>,
}

/// Keeps `[host."..."]` tables in file order (mirror priority).
fn ordered_hosts<'de, D>(d: D) -> Result<Vec<(String, HostEntry)>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<(String, HostEntry)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table of host tables")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some((k, e)) = m.next_entry::<String, HostEntry>()? {
                v.push((k, e));
            }
            Ok(v)
        }
    }
    d.deserialize_map(V)
}

fn has_cap(caps: &Option<Vec<String>>, cap: Capability) -> bool {
    let want = match cap {
        Capability::Pull => "pull",
        Capability::Resolve => "resolve",
    };
    caps.as_ref().is_none_or(|c| c.iter().any(|x| x == want))
}

/// Endpoint URL for a hosts.toml entry: adds a scheme when missing
/// (`plain_http` decides) and `/v2/` unless `override_path`.
fn entry_base(raw: &str, plain_http: bool, override_path: bool) -> Result<Url, RegistryError> {
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else if plain_http {
        format!("http://{raw}")
    } else {
        format!("https://{raw}")
    };
    let mut url = parse_url(&with_scheme)?;
    if plain_http && url.scheme() == "https" {
        url.set_scheme("http")
            .map_err(|()| RegistryError::Config(format!("cannot use http for {raw}")))?;
    }
    let mut path = url.path().trim_end_matches('/').to_owned();
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    path.push('/');
    url.set_path(&path);
    Ok(url)
}

fn hosts_toml_endpoints(
    dir: &Path,
    host: &str,
    cap: Capability,
) -> Result<Option<Vec<Endpoint>>, RegistryError> {
    // containerd names directories `host` or `host:port`; also `_default`.
    let mut path = dir.join(host).join("hosts.toml");
    if !path.exists() {
        path = dir.join("_default").join("hosts.toml");
        if !path.exists() {
            return Ok(None);
        }
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))?;
    let parsed: HostsToml = toml::from_str(&text)
        .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))?;
    let mut eps = Vec::new();
    for (url, e) in &parsed.host {
        if !has_cap(&e.capabilities, cap) {
            continue;
        }
        eps.push(Endpoint {
            base: entry_base(
                url,
                e.plain_http.unwrap_or(false),
                e.override_path.unwrap_or(false),
            )?,
            skip_verify: e.skip_verify.unwrap_or(false),
            is_mirror: true,
        });
    }
    let server = match parsed.server.as_deref() {
        Some(s) => Some(s.to_owned()),
        None if host == DOCKER_HUB => Some("https://registry-1.docker.io".to_owned()),
        None => Some(host.to_owned()),
    };
    if let Some(s) = server
        && has_cap(&parsed.capabilities, cap)
    {
        let plain = parsed.plain_http.unwrap_or(false) || (!s.contains("://") && is_loopback(&s));
        eps.push(Endpoint {
            base: entry_base(&s, plain, false)?,
            skip_verify: parsed.skip_verify.unwrap_or(false),
            is_mirror: false,
        });
    }
    if eps.is_empty() {
        return Err(RegistryError::Config(format!(
            "{}: no endpoint with the needed capability",
            path.display()
        )));
    }
    Ok(Some(eps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> RegistryConfig {
        RegistryConfig {
            certs_d: Some(dir.to_owned()),
            ..RegistryConfig::default()
        }
    }

    #[test]
    fn defaults_validate_and_loopback_is_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        c.validate().unwrap();
        for h in ["localhost:5001", "127.0.0.1:9", "[::1]:80", "localhost"] {
            let e = c.endpoints(h, Capability::Pull).unwrap();
            assert_eq!(e[0].base.scheme(), "http", "{h}");
        }
        let e = c.endpoints("ghcr.io", Capability::Pull).unwrap();
        assert_eq!(e[0].base.as_str(), "https://ghcr.io/v2/");
        let e = c.endpoints("docker.io", Capability::Pull).unwrap();
        assert_eq!(e[0].base.as_str(), "https://registry-1.docker.io/v2/");
        let c = RegistryConfig {
            insecure_hosts: vec!["reg.lan:8080".into()],
            ..cfg(dir.path())
        };
        let e = c.endpoints("reg.lan:8080", Capability::Pull).unwrap();
        assert_eq!(e[0].base.as_str(), "http://reg.lan:8080/v2/");
    }

    #[test]
    fn config_denies_unknown_fields() {
        let c: RegistryConfig = toml::from_str("max_attempts = 3\nmulti_range = false").unwrap();
        assert_eq!(c.max_attempts, 3);
        assert!(!c.multi_range);
        assert_eq!(c.request_timeout_ms, 30_000);
        assert!(toml::from_str::<RegistryConfig>("max_attempt = 3").is_err());
        let zero = RegistryConfig {
            max_attempts: 0,
            ..RegistryConfig::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn sample_config_is_the_default() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Root {
            registry: RegistryConfig,
        }
        let root: Root = toml::from_str(SAMPLE_CONFIG).unwrap();
        assert_eq!(root.registry, RegistryConfig::default());
        root.registry.validate().unwrap();
        let c: RegistryConfig = toml::from_str("min_wait_msec = 7\nmax_wait_msec = 70").unwrap();
        assert_eq!((c.backoff_base_ms, c.backoff_max_ms), (7, 70));
    }

    #[test]
    fn hosts_toml_mirrors_in_file_order_then_server() {
        let dir = tempfile::tempdir().unwrap();
        let hd = dir.path().join("reg.example:5000");
        std::fs::create_dir_all(&hd).unwrap();
        std::fs::write(
            hd.join("hosts.toml"),
            r#"
server = "https://reg.example:5000"
[host."http://zzz-mirror.local:1"]
  capabilities = ["pull", "resolve"]
  plain_http = true
[host."https://aaa-mirror.local"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "/some/ca.pem"
[host."https://pull-path.local/custom/v2"]
  capabilities = ["pull"]
  override_path = true
"#,
        )
        .unwrap();
        let c = cfg(dir.path());
        let e = c.endpoints("reg.example:5000", Capability::Pull).unwrap();
        let urls: Vec<_> = e.iter().map(|e| e.base.as_str().to_owned()).collect();
        assert_eq!(
            urls,
            [
                "http://zzz-mirror.local:1/v2/",
                "https://aaa-mirror.local/v2/",
                "https://pull-path.local/custom/v2/",
                "https://reg.example:5000/v2/",
            ]
        );
        assert!(e[1].skip_verify && e[1].is_mirror && !e[3].is_mirror);
        let e = c
            .endpoints("reg.example:5000", Capability::Resolve)
            .unwrap();
        assert_eq!(e.len(), 2, "pull-only mirrors are not used to resolve");
    }
}
