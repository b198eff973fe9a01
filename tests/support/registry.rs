//! A private `docker-registry` (distribution 2.x) on 127.0.0.1, storing into
//! its own temp dir, plus plain-HTTP reads through `curl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::Server;
use super::{free_port, run, run_ok, temp_dir, wait_for};

/// Accept header covering OCI and Docker manifests and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

pub struct Registry {
    /// `127.0.0.1:<port>`
    pub host: String,
    pub port: u16,
    server: Server,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits until `/v2/` answers.
    pub fn start() -> Registry {
        Self::start_at(None, "127.0.0.1", false)
    }

    /// A registry in read-only maintenance mode: every push is refused.
    pub fn start_readonly() -> Registry {
        Self::start_at(None, "127.0.0.1", true)
    }

    /// Starts a registry inside network namespace `netns`, listening on
    /// `ip` (an address of that namespace reachable from the host, e.g. the
    /// namespace end of a veth pair). The port is picked on the host; the
    /// namespace has no listeners of its own.
    pub fn start_in_netns(netns: &str, ip: &str) -> Registry {
        Self::start_at(Some(netns), ip, false)
    }

    fn start_at(netns: Option<&str>, ip: &str, readonly: bool) -> Registry {
        let mut last = String::new();
        // The free port may be taken between probe and bind: retry a few times.
        for _ in 0..3 {
            match Self::try_start(netns, ip, readonly) {
                Ok(r) => return r,
                Err(e) => last = e,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    fn try_start(netns: Option<&str>, ip: &str, readonly: bool) -> Result<Registry, String> {
        let dir = temp_dir("registry");
        let port = free_port();
        let host = format!("{ip}:{port}");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).map_err(|e| e.to_string())?;
        let config = dir.path().join("config.yml");
        // Everything a default would pick (port 5000, /var/lib, debug port)
        // is set explicitly.
        let yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: {readonly}\n\
             http:\n  addr: {host}\n  secret: rstargz-test-{port}\n\
             health:\n  storagedriver:\n    enabled: false\n",
            storage.display()
        );
        std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let mut server = Server::spawn(
            "docker-registry",
            cmd.arg("serve").arg(&config),
            &dir.path().join("registry.log"),
        );
        let url = format!("http://{host}/v2/");
        let ready = wait_for(Duration::from_secs(20), || {
            if server.exited().is_some() {
                return Some(false);
            }
            http_status(&url).filter(|s| *s == 200).map(|_| true)
        });
        if ready != Some(true) {
            let tail = server.log_tail(4000);
            server.stop(Duration::from_secs(1));
            return Err(format!("registry on {host} not ready; log:\n{tail}"));
        }
        Ok(Registry {
            host,
            port,
            server,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry stores blob `digest` (to corrupt it in tests).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Requests served so far, from the access log (combined log format,
    /// written to the registry's log file).
    pub fn access_log(&self) -> Vec<AccessEntry> {
        std::fs::read_to_string(&self.server.log)
            .unwrap_or_default()
            .lines()
            .filter_map(AccessEntry::parse)
            .collect()
    }

    /// Bytes of blob bodies (`GET /v2/.../blobs/...`) served so far.
    pub fn blob_bytes_served(&self) -> u64 {
        self.access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
            .map(|e| e.bytes)
            .sum()
    }

    /// `127.0.0.1:<port>/<name>:<tag>`
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host)
    }

    /// Pushes tag `tag` of the OCI layout at `layout` as `<name>:<tag>` with
    /// skopeo, keeping the blobs' digests. Returns the reference.
    pub fn push_oci_layout(&mut self, layout: &Path, tag: &str, name: &str) -> String {
        self.server.assert_alive();
        let policy = self.dir.path().join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write skopeo policy");
        let reference = self.reference(name, tag);
        run_ok(
            Command::new("skopeo")
                .arg("--policy")
                .arg(&policy)
                .args([
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("docker://{reference}")),
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("skopeo push failed: {e}"));
        reference
    }

    /// Pushes one blob to repository `name` (monolithic upload: POST a
    /// session, PUT the bytes); returns its `sha256:` digest.
    pub fn push_blob(&self, name: &str, blob: &[u8]) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(blob)));
        let tmp = temp_dir("push-blob");
        let file = tmp.path().join("blob");
        std::fs::write(&file, blob).expect("write blob");
        let headers = run_ok(
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-D", "-", "-X", "POST"])
                .arg(format!("http://{}/v2/{name}/blobs/uploads/", self.host)),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("blob upload session: {e}"))
        .stdout;
        let location = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no Location in {headers}"));
        let url = if location.starts_with('/') {
            format!("http://{}{location}", self.host)
        } else {
            location
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let code = run_ok(
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
                .args(["-H", "Content-Type: application/octet-stream"])
                .arg("--data-binary")
                .arg(format!("@{}", file.display()))
                .arg(format!("{url}{sep}digest={digest}")),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("blob upload: {e}"))
        .stdout;
        assert_eq!(code.trim(), "201", "blob upload of {digest}");
        digest
    }

    /// GET `/v2/<name>/manifests/<reference>` with OCI and Docker accept
    /// headers; returns the body and the `Docker-Content-Digest`.
    pub fn manifest(&self, name: &str, reference: &str) -> (Vec<u8>, String) {
        let url = format!("http://{}/v2/{name}/manifests/{reference}", self.host);
        let tmp = temp_dir("manifest");
        let headers = tmp.path().join("headers");
        let body = tmp.path().join("body");
        curl_to_file(
            &url,
            &body,
            &["-H", &format!("Accept: {MANIFEST_ACCEPT}")],
            Some(&headers),
        );
        let digest = std::fs::read_to_string(&headers)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        (std::fs::read(&body).expect("read manifest body"), digest)
    }

    /// GET `/v2/<name>/blobs/<digest>` into `dest`, checking the digest.
    pub fn blob_to_file(&self, name: &str, digest: &str, dest: &Path) {
        let url = format!("http://{}/v2/{name}/blobs/{digest}", self.host);
        curl_to_file(&url, dest, &[], None);
        let got = file_digest(dest);
        assert_eq!(got, digest, "blob {url} has the wrong digest");
    }

    /// GET a (small) blob into memory.
    pub fn blob(&self, name: &str, digest: &str) -> Vec<u8> {
        let tmp = temp_dir("blob");
        let p = tmp.path().join("blob");
        self.blob_to_file(name, digest, &p);
        std::fs::read(p).expect("read blob")
    }
}

/// One access-log line: `host - - [time] "GET /path HTTP/1.1" 200 123 ...`.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

impl AccessEntry {
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let method = req.next()?.to_string();
        let path = req.next()?.to_string();
        let mut f = rest.split_whitespace();
        let status = f.next()?.parse().ok()?;
        // "-" when no body was sent.
        let bytes = f.next().map_or(0, |b| b.parse().unwrap_or(0));
        Some(AccessEntry {
            method,
            path,
            status,
            bytes,
        })
    }
}

/// `sha256:<hex>` of a file, streamed.
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut HashSink(&mut h)).expect("hash file");
    format!("sha256:{}", hex::encode(h.finalize()))
}

struct HashSink<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The HTTP status of a GET, or `None` if nothing answered.
pub fn http_status(url: &str) -> Option<u16> {
    let o = run(
        Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            url,
        ]),
        Duration::from_secs(5),
    )
    .ok()?;
    o.stdout.trim().parse().ok().filter(|s| *s != 0)
}

fn curl_to_file(url: &str, dest: &Path, extra: &[&str], headers: Option<&PathBuf>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "-L", "--max-time", "300", "-o"])
        .arg(dest)
        .args(extra);
    if let Some(h) = headers {
        cmd.arg("-D").arg(h);
    }
    cmd.arg(url);
    if let Err(e) = run_ok(&mut cmd, Duration::from_secs(310)) {
        let body = std::fs::read_to_string(dest).unwrap_or_default();
        panic!("GET {url} failed: {e}\nbody: {body}");
    }
}

#[cfg(test)]
mod tests {
    use super::AccessEntry;

    #[test]
    fn parses_access_log_lines() {
        let l = r#"127.0.0.1 - - [24/Nov/2026:05:04:16 +0000] "GET /v2/e2e/debian/blobs/sha256:ab HTTP/1.1" 206 4096 "" "containerd/1.6""#;
        assert_eq!(
            AccessEntry::parse(l),
            Some(AccessEntry {
                method: "GET".into(),
                path: "/v2/e2e/debian/blobs/sha256:ab".into(),
                status: 206,
                bytes: 4096,
            })
        );
        assert_eq!(AccessEntry::parse("time=\"x\" level=info msg=hi"), None);
    }
}
