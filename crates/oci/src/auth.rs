//! Credentials as people already have them (`~/.docker/config.json`, `DOCKER_CONFIG`,
//! `credHelpers`/`credsStore` helpers) and the `WWW-Authenticate` challenge grammar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::reference::DOCKER_HUB;
use crate::{Error, Result};

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (or personal access token).
    Basic {
        /// User name.
        username: String,
        /// Password or token.
        password: String,
    },
    /// An OAuth2 refresh token from `docker login` against an identity provider.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::IdentityToken(_) => write!(f, "IdentityToken(***)"),
        }
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` value.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credentials::IdentityToken(_) => None,
        }
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`, lowercased.
    pub scheme: String,
    /// Its parameters (`realm`, `service`, `scope`, ...), names lowercased.
    pub params: BTreeMap<String, String>,
}

/// Parses one challenge: `Bearer realm="https://auth/token",service="registry",scope="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = BTreeMap::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = rest[start..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut value = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch = rest[i..].chars().next()?;
                value.push(ch);
                i += ch.len_utf8();
            }
            i += 1;
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            value = rest[start..i].trim().to_owned();
        }
        if !key.is_empty() {
            params.insert(key, value);
        }
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Where credentials come from: a docker `config.json`, plus explicit ones.
#[derive(Debug, Default, Clone)]
pub struct CredentialStore {
    path: Option<PathBuf>,
    auths: BTreeMap<String, Credentials>,
    cred_helpers: BTreeMap<String, String>,
    creds_store: Option<String>,
    explicit: BTreeMap<String, Credentials>,
}

/// The key docker uses for a registry in `auths`: Docker Hub is `https://index.docker.io/v1/`;
/// any key is compared by host, without scheme and path.
fn host_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_owned(),
        h => h.to_owned(),
    }
}

impl CredentialStore {
    /// No credentials at all (anonymous).
    pub fn empty() -> CredentialStore {
        CredentialStore::default()
    }

    /// Loads `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; a missing file means
    /// anonymous access, a broken one is an error naming it.
    pub fn from_environment() -> Result<CredentialStore> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
        match dir {
            Some(d) => CredentialStore::from_file(&d.join("config.json")),
            None => Ok(CredentialStore::default()),
        }
    }

    /// Loads a docker `config.json`; a missing file gives an empty store.
    pub fn from_file(path: &Path) -> Result<CredentialStore> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CredentialStore::default());
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let file: ConfigFile = serde_json::from_slice(&text).map_err(|e| Error::Credentials {
            registry: "*".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        let mut auths = BTreeMap::new();
        for (key, entry) in file.auths {
            let host = host_key(&key);
            let creds = if let Some(tok) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Some(Credentials::IdentityToken(tok))
            } else if let Some(a) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| Error::Credentials {
                        registry: host.clone(),
                        reason: format!(
                            "{}: auths[{key:?}].auth is not base64 of user:password",
                            path.display()
                        ),
                    })?;
                let (u, p) = decoded.split_once(':').ok_or_else(|| Error::Credentials {
                    registry: host.clone(),
                    reason: format!("{}: auths[{key:?}].auth has no ':'", path.display()),
                })?;
                Some(Credentials::Basic {
                    username: u.to_owned(),
                    password: p.to_owned(),
                })
            } else {
                match (entry.username, entry.password) {
                    (Some(u), Some(p)) => Some(Credentials::Basic {
                        username: u,
                        password: p,
                    }),
                    _ => None,
                }
            };
            if let Some(c) = creds {
                auths.insert(host, c);
            }
        }
        Ok(CredentialStore {
            path: Some(path.to_owned()),
            auths,
            cred_helpers: file
                .cred_helpers
                .into_iter()
                .map(|(k, v)| (host_key(&k), v))
                .collect(),
            creds_store: file.creds_store.filter(|s| !s.is_empty()),
            explicit: BTreeMap::new(),
        })
    }

    /// Adds credentials for a registry host, taking precedence over the config file.
    pub fn insert(&mut self, registry: &str, creds: Credentials) {
        self.explicit.insert(host_key(registry), creds);
    }

    /// Credentials for `registry` (e.g. `docker.io`, `127.0.0.1:5000`), if any. A helper that
    /// is named but fails is an error; a helper that has nothing for this host is not.
    pub fn get(&self, registry: &str) -> Result<Option<Credentials>> {
        let host = host_key(registry);
        if let Some(c) = self.explicit.get(&host) {
            return Ok(Some(c.clone()));
        }
        if let Some(helper) = self.cred_helpers.get(&host) {
            return run_helper(helper, &host);
        }
        if let Some(c) = self.auths.get(&host) {
            return Ok(Some(c.clone()));
        }
        if let Some(helper) = &self.creds_store {
            return run_helper(helper, &host);
        }
        Ok(None)
    }

    /// The config file this store was read from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// Runs `docker-credential-<helper> get` with the server URL on stdin.
fn run_helper(helper: &str, host: &str) -> Result<Option<Credentials>> {
    run_helper_program(&format!("docker-credential-{helper}"), host)
}

/// The credential-helper protocol: `PROGRAM get`, server URL on stdin, JSON on stdout.
fn run_helper_program(program: &str, host: &str) -> Result<Option<Credentials>> {
    use std::io::Write as _;
    let server = if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_owned()
    } else {
        host.to_owned()
    };
    let fail = |reason: String| Error::Credentials {
        registry: host.to_owned(),
        reason,
    };
    let mut child = std::process::Command::new(program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| fail(format!("{program}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("{program}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let msg = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!(
            "{program} get: {}: {}",
            out.status,
            msg.trim()
        )));
    }
    let parsed: HelperOutput = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("{program} get printed no credentials JSON: {e}")))?;
    if parsed.username == "<token>" {
        return Ok(Some(Credentials::IdentityToken(parsed.secret)));
    }
    Ok(Some(Credentials::Basic {
        username: parsed.username,
        password: parsed.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/nginx:pull");
        let c = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        let c = parse_challenge(r#"Bearer realm="a\"b", error="insufficient_scope""#).unwrap();
        assert_eq!(c.params["realm"], "a\"b");
        assert_eq!(c.params["error"], "insufficient_scope");
        assert!(parse_challenge("").is_none());
        for junk in [
            "Bearer",
            "Bearer =",
            "Bearer realm=\"unterminated",
            "Bearer ,,,,",
            "x y=é",
        ] {
            let _ = parse_challenge(junk);
        }
    }

    #[test]
    fn credential_helper_protocol() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-test");
        // Answers for one server, says "not found" for others, fails on a third.
        std::fs::write(
            &helper,
            "#!/bin/sh\nread -r server\ncase \"$1:$server\" in\n  get:reg.example:5000) echo '{\"ServerURL\":\"reg.example:5000\",\"Username\":\"bob\",\"Secret\":\"pw\"}' ;;\n  get:https://index.docker.io/v1/) echo '{\"Username\":\"<token>\",\"Secret\":\"refresh\"}' ;;\n  get:broken.example) echo 'boom' >&2; exit 3 ;;\n  *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = helper.to_str().unwrap();
        assert_eq!(
            run_helper_program(p, "reg.example:5000").unwrap(),
            Some(Credentials::Basic {
                username: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            run_helper_program(p, DOCKER_HUB).unwrap(),
            Some(Credentials::IdentityToken("refresh".into()))
        );
        assert_eq!(run_helper_program(p, "other.example").unwrap(), None);
        let e = run_helper_program(p, "broken.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.example") && e.contains("boom"), "{e}");
    }

    #[test]
    fn docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"127.0.0.1:5000":{"username":"a","password":"b"},"ghcr.io":{"identitytoken":"tok"}},"credHelpers":{"gcr.io":"gcloud-that-does-not-exist"}}"#,
        )
        .unwrap();
        let s = CredentialStore::from_file(&path).unwrap();
        assert_eq!(
            s.get("docker.io").unwrap(),
            Some(Credentials::Basic {
                username: "user".into(),
                password: "pass".into()
            })
        );
        assert_eq!(
            s.get("127.0.0.1:5000").unwrap(),
            Some(Credentials::Basic {
                username: "a".into(),
                password: "b".into()
            })
        );
        assert_eq!(
            s.get("ghcr.io").unwrap(),
            Some(Credentials::IdentityToken("tok".into()))
        );
        assert_eq!(s.get("quay.io").unwrap(), None);
        let e = s.get("gcr.io").unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-gcloud-that-does-not-exist"),
            "{e}"
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            CredentialStore::from_file(&path)
                .unwrap_err()
                .to_string()
                .contains("config.json")
        );
        assert!(
            CredentialStore::from_file(&dir.path().join("none.json"))
                .unwrap()
                .get("x")
                .unwrap()
                .is_none()
        );
    }
}
