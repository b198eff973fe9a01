//! [`RegistryError`]: every way a registry request can fail, typed so that the
//! FUSE layer can pick an errno ([`RegistryError::errno`]), the retry loop can
//! decide whether to try again ([`RegistryError::is_retryable`]) and the
//! snapshotter can log a stable fallback reason ([`RegistryError::reason`]).

use thiserror::Error;

/// An error from the registry client.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The image reference could not be parsed.
    #[error("invalid image reference {0:?}: {1}")]
    InvalidReference(String, &'static str),
    /// Configuration (ours, `hosts.toml`, docker `config.json`) is unusable.
    #[error("registry configuration: {0}")]
    Config(String),
    /// 404, or a manifest index without a matching platform.
    #[error("not found: {0}")]
    NotFound(String),
    /// 401 that authentication could not fix.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403 from the registry itself (not from a redirect target).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Connect, request or body timeout.
    #[error("timeout: {0}")]
    Timeout(String),
    /// Connection refused, DNS failure, TLS failure, reset.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// The caller asked for a range outside the blob, or the server answered
    /// 416 to a single range that should be satisfiable.
    #[error("bad range: {0}")]
    BadRange(String),
    /// The server's answer does not match the request: wrong
    /// `Content-Range`, wrong length, malformed multipart, truncated body,
    /// digest mismatch. Retryable: the next answer may be right.
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// 429 Too Many Requests.
    #[error("rate limited (429)")]
    RateLimited,
    /// A 5xx (or 408) status.
    #[error("server error: HTTP {0}")]
    ServerError(u16),
    /// Any other unexpected status.
    #[error("unexpected HTTP status {0}: {1}")]
    UnexpectedStatus(u16, String),
    /// A manifest or index that cannot be parsed or used.
    #[error("bad manifest: {0}")]
    Manifest(String),
    /// A whole blob arrived complete but with another digest: the stored
    /// content is corrupt. Not retried (the next answer is the same bytes).
    #[error("blob digest mismatch: expected {expected}, got {got}")]
    DigestMismatch { expected: String, got: String },
}

impl RegistryError {
    /// Whether another attempt may succeed (5xx, 408, 429, timeouts,
    /// connection errors, truncated or mismatching bodies).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_)
                | Self::Unreachable(_)
                | Self::ProtocolViolation(_)
                | Self::RateLimited
                | Self::ServerError(_)
        )
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound(_) => libc::ENOENT,
            Self::Unauthorized(_) | Self::Forbidden(_) => libc::EACCES,
            Self::Timeout(_) => libc::ETIMEDOUT,
            Self::Unreachable(_) => libc::EHOSTUNREACH,
            Self::BadRange(_) => libc::EINVAL,
            Self::RateLimited => libc::EAGAIN,
            Self::InvalidReference(..)
            | Self::Config(_)
            | Self::ProtocolViolation(_)
            | Self::ServerError(_)
            | Self::UnexpectedStatus(..)
            | Self::Manifest(_)
            | Self::DigestMismatch { .. } => libc::EIO,
        }
    }

    /// A stable, machine-readable reason for logs and metrics (e.g. the
    /// snapshotter's "fell back to a normal pull because ...").
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidReference(..) => "invalid_reference",
            Self::Config(_) => "config",
            Self::NotFound(_) => "not_found",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Timeout(_) => "timeout",
            Self::Unreachable(_) => "unreachable",
            Self::BadRange(_) => "bad_range",
            Self::ProtocolViolation(_) => "protocol_violation",
            Self::RateLimited => "rate_limited",
            Self::ServerError(_) => "server_error",
            Self::UnexpectedStatus(..) => "unexpected_status",
            Self::Manifest(_) => "bad_manifest",
            Self::DigestMismatch { .. } => "digest_mismatch",
        }
    }

    /// Maps a non-success status to an error (`what` names the resource).
    pub(crate) fn from_status(status: u16, what: &str) -> Self {
        match status {
            401 => Self::Unauthorized(what.to_owned()),
            403 => Self::Forbidden(what.to_owned()),
            404 => Self::NotFound(what.to_owned()),
            408 => Self::ServerError(408),
            416 => Self::BadRange(what.to_owned()),
            429 => Self::RateLimited,
            500..=599 => Self::ServerError(status),
            _ => Self::UnexpectedStatus(status, what.to_owned()),
        }
    }

    /// Classifies a transport error from reqwest.
    pub(crate) fn from_reqwest(e: &reqwest::Error) -> Self {
        let msg = error_chain(e);
        if e.is_timeout() {
            Self::Timeout(msg)
        } else if e.is_connect() {
            Self::Unreachable(msg)
        } else if e.is_body() || e.is_decode() {
            Self::ProtocolViolation(format!("body: {msg}"))
        } else if e.is_builder() {
            Self::Config(msg)
        } else {
            // Resets, early EOF before headers, TLS errors after connect.
            Self::Unreachable(msg)
        }
    }
}

/// `e: source: source...` so that hyper's "connection refused" is visible.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_and_retryability() {
        assert_eq!(RegistryError::from_status(404, "x").errno(), libc::ENOENT);
        assert!(RegistryError::from_status(503, "x").is_retryable());
        assert!(RegistryError::from_status(429, "x").is_retryable());
        assert!(RegistryError::from_status(408, "x").is_retryable());
        assert!(!RegistryError::from_status(400, "x").is_retryable());
        assert!(!RegistryError::from_status(403, "x").is_retryable());
        assert_eq!(
            RegistryError::from_status(401, "x").reason(),
            "unauthorized"
        );
    }
}
