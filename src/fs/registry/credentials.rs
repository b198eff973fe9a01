//! Credentials from docker's `config.json` (`auths.<host>`).
//!
//! Our own parser rather than the `docker_credential` crate: it is ~50 lines
//! over `serde_json` and `base64` (already dependencies), the directory is
//! passed in explicitly (so tests never set process-wide environment
//! variables, which edition 2024 rightly makes `unsafe`), and errors come back
//! typed. Credential helpers (`credsStore`, `credHelpers`) are not run: a
//! snapshotter daemon executing helper binaries is a choice to make
//! deliberately, later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::error::RegistryError;

/// What the config file holds for a host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Basic credentials (also sent to a token realm).
    UserPass { username: String, password: String },
    /// An OAuth2 refresh token, exchanged at the token realm.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPass { username, .. } => write!(f, "UserPass({username}, ***)"),
            Self::IdentityToken(_) => f.write_str("IdentityToken(***)"),
        }
    }
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The directory docker reads: `explicit`, else `$DOCKER_CONFIG`, else
/// `~/.docker`.
pub fn docker_config_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(p) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker"))
}

/// Loaded credentials, keyed by registry host.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_host: HashMap<String, Credential>,
}

impl CredentialStore {
    /// Reads `<dir>/config.json`; a missing file is an empty store.
    pub fn load(dir: Option<&Path>) -> Result<Self, RegistryError> {
        let Some(dir) = dir else {
            return Ok(Self::default());
        };
        let path = dir.join("config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(RegistryError::Config(format!("{}: {e}", path.display()))),
        };
        Self::parse(&text).map_err(|m| RegistryError::Config(format!("{}: {m}", path.display())))
    }

    /// Parses the JSON text of a `config.json`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ConfigFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut by_host = HashMap::new();
        for (key, e) in file.auths {
            let cred = if let Some(t) = e.identitytoken.filter(|t| !t.is_empty()) {
                Credential::IdentityToken(t)
            } else if let (Some(u), Some(p)) = (&e.username, &e.password) {
                Credential::UserPass {
                    username: u.clone(),
                    password: p.clone(),
                }
            } else if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|e| format!("auths.{key}.auth: {e}"))?;
                let s =
                    String::from_utf8(raw).map_err(|_| format!("auths.{key}.auth: not UTF-8"))?;
                let (u, p) = s
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key}.auth: no ':'"))?;
                Credential::UserPass {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }
            } else {
                continue;
            };
            by_host.insert(normalize_key(&key), cred);
        }
        Ok(Self { by_host })
    }

    /// Credentials for `host` (`docker.io` also matches docker's legacy
    /// `https://index.docker.io/v1/` key).
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(host)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `https://h:1/x` → `h:1`.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        h => h.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auth_userpass_and_identitytoken() {
        let s = CredentialStore::parse(
            r#"{"auths":{
              "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
              "reg.example:5000":{"username":"u2","password":"p2"},
              "ghcr.io":{"auth":"eDp5","identitytoken":"refresh-me"},
              "empty.io":{}
            },"credsStore":"desktop"}"#,
        )
        .unwrap();
        assert_eq!(
            s.get("docker.io"),
            Some(&Credential::UserPass {
                username: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert!(
            matches!(s.get("reg.example:5000"), Some(Credential::UserPass { username, .. }) if username == "u2")
        );
        assert_eq!(
            s.get("ghcr.io"),
            Some(&Credential::IdentityToken("refresh-me".into()))
        );
        assert_eq!(s.get("empty.io"), None);
        assert!(!format!("{:?}", s.get("docker.io")).contains("pa:ss"));
    }

    #[test]
    fn missing_file_is_empty_and_bad_base64_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            CredentialStore::load(Some(d.path()))
                .unwrap()
                .get("x")
                .is_none()
        );
        assert!(CredentialStore::parse(r#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
    }
}
