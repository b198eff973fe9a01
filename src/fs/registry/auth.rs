//! Registry authentication: `WWW-Authenticate` challenges, the Bearer token
//! flow (anonymous, Basic credentials, or an OAuth2 refresh token from
//! `identitytoken`), Basic auth, and a token cache per (host, scope) that
//! holds each token until shortly before it expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use url::Url;

use super::credentials::Credential;
use super::error::RegistryError;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=..,service=..,scope=..`
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// `Basic realm=..`
    Basic,
}

/// Parses the first Bearer or Basic challenge in a header value.
pub fn parse_challenge(v: &str) -> Option<Challenge> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `k=v, k="v,with,commas"` pairs (quoted-string with `\` escapes).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                val.push(c);
            }
            val = val.trim().to_owned();
        }
        out.push((key.trim().to_owned(), val));
    }
}

/// `Basic base64(user:pass)`.
pub fn basic_header(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Tokens last 60 s when the server does not say (distribution's spec).
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens are dropped this fraction of their lifetime early.
const TTL_NUMERATOR: u32 = 9;
const TTL_DENOMINATOR: u32 = 10;

/// Asks the realm for a token. `scope` is the challenge's scope or ours.
pub async fn fetch_token(
    http: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    cred: Option<&Credential>,
) -> Result<(String, Duration), RegistryError> {
    let mut url = Url::parse(realm)
        .map_err(|e| RegistryError::Unauthorized(format!("bad token realm {realm:?}: {e}")))?;
    let req = match cred {
        Some(Credential::IdentityToken(refresh)) => {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", refresh);
            form.append_pair("client_id", "rstargz");
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            if !scope.is_empty() {
                form.append_pair("scope", scope);
            }
            http.post(url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form.finish())
        }
        other => {
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                if !scope.is_empty() {
                    q.append_pair("scope", scope);
                }
            }
            let req = http.get(url);
            match other {
                Some(Credential::UserPass { username, password }) => {
                    req.header("Authorization", basic_header(username, password))
                }
                _ => req,
            }
        }
    };
    let resp = req
        .send()
        .await
        .map_err(|e| RegistryError::from_reqwest(&e))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(match status {
            401 | 403 => RegistryError::Unauthorized(format!("token realm answered {status}")),
            s => RegistryError::from_status(s, "token realm"),
        });
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| RegistryError::from_reqwest(&e))?;
    let t: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| RegistryError::Unauthorized(format!("bad token response: {e}")))?;
    let token = t
        .token
        .filter(|s| !s.is_empty())
        .or(t.access_token)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RegistryError::Unauthorized("token response without a token".into()))?;
    let ttl = t
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_TTL);
    Ok((token, ttl * TTL_NUMERATOR / TTL_DENOMINATOR))
}

/// (host, scope) → (`Authorization` value, expiry; `None` = until invalidated).
type AuthEntries = HashMap<(String, String), (String, Option<Instant>)>;

/// `Authorization` values per (host, scope), with expiry.
#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<AuthEntries>,
}

impl AuthCache {
    /// A live header for (host, scope), if any.
    pub fn get(&self, host: &str, scope: &str) -> Option<String> {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = (host.to_owned(), scope.to_owned());
        match m.get(&key) {
            Some((h, exp)) if exp.is_none_or(|e| Instant::now() < e) => Some(h.clone()),
            Some(_) => {
                m.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Stores a header; `ttl` `None` means until invalidated (Basic).
    pub fn put(&self, host: &str, scope: &str, header: String, ttl: Option<Duration>) {
        let exp = ttl.map(|t| Instant::now() + t);
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the map: drop expired entries when it grows, and everything if
        // that is not enough (tokens without expiry); a dropped token costs
        // one more token request.
        if m.len() >= 1024 {
            let now = Instant::now();
            m.retain(|_, (_, e)| e.is_none_or(|e| now < e));
            if m.len() >= 1024 {
                m.clear();
            }
        }
        m.insert((host.to_owned(), scope.to_owned()), (header, exp));
    }

    /// Forgets (host, scope), after the server rejected it.
    pub fn invalidate(&self, host: &str, scope: &str) {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(host.to_owned(), scope.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "realm is required"
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn cache_expires() {
        let c = AuthCache::default();
        c.put("h", "s", "Bearer t".into(), Some(Duration::from_millis(0)));
        assert_eq!(c.get("h", "s"), None);
        c.put("h", "s", "Bearer t".into(), Some(Duration::from_secs(60)));
        assert_eq!(c.get("h", "s").as_deref(), Some("Bearer t"));
        assert_eq!(c.get("h", "other"), None);
        c.invalidate("h", "s");
        assert_eq!(c.get("h", "s"), None);
    }
}
