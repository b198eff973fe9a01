//! Image references: `[host[:port]/]repo[:tag][@digest]` with Docker's
//! defaults (`docker.io`, `library/`, `latest`).

use std::fmt;

use super::error::RegistryError;

/// The registry host Docker Hub references name.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host` or `host:port` as written (`docker.io` when omitted).
    pub host: String,
    /// Repository path, e.g. `library/alpine`.
    pub repository: String,
    /// Tag, if any (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `algorithm:hex` digest, if any.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference. A first path component is a host when it contains
    /// `.` or `:`, or is `localhost`; otherwise the host is `docker.io`, and a
    /// single-component repository gets the `library/` prefix.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |why| RegistryError::InvalidReference(s.to_owned(), why);
        if s.is_empty() || s.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(bad)?;
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(i) if last_slash.is_none_or(|j| i > j) => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(bad("invalid tag"));
        }
        let (host, repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        if repo.is_empty()
            || repo.len() > MAX_REPOSITORY_LEN
            || !repo.split('/').all(valid_path_component)
        {
            return Err(bad("invalid repository name"));
        }
        if !valid_host(&host) {
            return Err(bad("invalid registry host"));
        }
        let host = if host == "index.docker.io" || host == "registry-1.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            host
        };
        let repository = if host == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Self {
            host,
            repository,
            tag,
            digest,
        })
    }

    /// What to put after `/manifests/`: the digest if any, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The token scope for pulling from this repository.
    pub fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Longest repository name the distribution spec allows.
const MAX_REPOSITORY_LEN: usize = 255;

/// A repository path component as the distribution spec defines it:
/// lowercase alphanumerics joined by one `.`, one or two `_`, or any number
/// of `-`. Rejects `..`, leading or trailing separators, and everything
/// else a URL would reinterpret.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let ok = match &b[start..i] {
            b"." | b"_" | b"__" => true,
            sep => sep.iter().all(|&x| x == b'-'),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `name[:port]` or `[ipv6][:port]`, in the characters host names use.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// Checks `algorithm:hex` (sha256 / sha512 with the right hex length).
pub fn validate_digest(d: &str) -> Result<(), &'static str> {
    let (alg, hex) = d.split_once(':').ok_or("digest without algorithm")?;
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("malformed digest hex");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_defaults() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(r.host, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = Reference::parse("user/app:1.2").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("docker.io", "user/app")
        );
        assert_eq!(r.tag.as_deref(), Some("1.2"));
    }

    #[test]
    fn host_port_tag_digest() {
        let r = Reference::parse(&format!("127.0.0.1:5001/a/b:v1@{D}")).unwrap();
        assert_eq!(r.host, "127.0.0.1:5001");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.manifest_reference(), D);
        let r = Reference::parse(&format!("localhost/x@{D}")).unwrap();
        assert_eq!(r.host, "localhost");
        assert_eq!(r.tag, None);
        let r = Reference::parse("[::1]:5001/x:t").unwrap();
        assert_eq!(r.host, "[::1]:5001");
        assert_eq!(r.pull_scope(), "repository:x:pull");
    }

    #[test]
    fn accepts_the_spec_separators() {
        for s in ["host.io/a.b_c__d---e/f-g", "host.io/0/x9", "library/ubuntu"] {
            assert!(Reference::parse(s).is_ok(), "{s}");
        }
        let long = format!("host.io/{}", "a".repeat(256));
        assert!(Reference::parse(&long).is_err());
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "UPPER/case",
            "a//b",
            "x:",
            "x@sha256:12",
            "x@md5:00",
            "host.io/",
            "127.0.0.1:5001/../../etc/passwd:x",
            "host.io/a/./b",
            "host.io/.hidden",
            "host.io/a..b",
            "host.io/a._b",
            "host.io/a___b",
            "host.io/trailing-",
            "host.io/a%2fb",
            "ho st.io/a",
            "host.io/a?x=1",
        ] {
            assert!(Reference::parse(s).is_err(), "{s}");
        }
    }
}
