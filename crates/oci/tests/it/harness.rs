//! Real peers for the integration tests: a CNCF distribution registry (`docker-registry`, 2.8) in
//! four auth modes, a bearer-token server it trusts, skopeo helpers to seed and inspect it, and
//! a deterministic fault-injecting TCP proxy.
//!
//! Everything listens on 127.0.0.1 only and is torn down on drop. A missing `docker-registry` or
//! `skopeo` fails the test with a message naming the fix; nothing is skipped silently.

#![allow(
    dead_code,
    reason = "the harness serves every test module; each uses only part of it"
)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;

/// The user that [`Mode::TlsBasicAuth`] and [`Mode::Token`] accept.
pub const USER: &str = "tester";
/// [`USER`]'s password.
pub const PASSWORD: &str = "s3cret-pass";
/// The `service` of [`Mode::Token`]: the registry accepts tokens whose `aud` is this.
pub const TOKEN_SERVICE: &str = "bundle-test";
/// The `iss` of the tokens [`TokenServer`] signs and the registry trusts.
pub const TOKEN_ISSUER: &str = "bundle-test-issuer";
/// How long a token lives (`expires_in` and `exp - iat`).
pub const TOKEN_LIFETIME_SECS: u64 = 300;

/// How long a peer may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bounds every socket read and write of the harness's own servers, so no thread outlives a test
/// by much.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The most request-head bytes the harness's servers read before giving up on a request.
const MAX_HEAD: usize = 64 * 1024;
/// How much of the registry log a failing test prints.
const LOG_TAIL: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// The path of `tool` on `PATH` (or in `/usr/bin`, where Debian puts it), or a panic that says
/// how to install it: these tests need the real peer and must not pass without it.
pub fn require_tool(tool: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| {
        panic!("{tool} is not installed; run `cargo xtask ci`, which installs it")
    })
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// A port on 127.0.0.1 that was free a moment ago. Callers that hand it to another process
/// retry when that process finds it taken.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// How a [`Registry`] is reached and who it lets in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP, no auth.
    Plain,
    /// HTTPS with a server certificate (IP 127.0.0.1, DNS localhost) from a fresh CA; no auth.
    Tls,
    /// [`Mode::Tls`] plus HTTP Basic auth: [`USER`] / [`PASSWORD`] from a bcrypt htpasswd file.
    TlsBasicAuth,
    /// [`Mode::Tls`] plus bearer tokens from a [`TokenServer`] (HTTPS, same CA) that wants
    /// [`USER`] / [`PASSWORD`] and grants whatever scope is asked.
    Token,
    /// Plain HTTP (no TLS on the registry) plus the bearer tokens of [`Mode::Token`] (the token
    /// server still speaks HTTPS): registries on a cluster's inside often look like this.
    PlainToken,
}

/// A `docker-registry` (CNCF distribution 2.8) process on 127.0.0.1 with its own storage in a
/// temp dir. Dropping it kills the process and deletes everything; when a test panics, the
/// registry's log is printed first.
pub struct Registry {
    mode: Mode,
    dir: TempDir,
    port: u16,
    child: Option<RegistryProcess>,
    token_server: Option<TokenServer>,
}

/// The shell that runs the registry. It kills the registry with SIGKILL as soon as its stdin
/// closes, whether the harness closed it on purpose or the test binary died, so no registry
/// outlives the test process. The watcher is killed once the registry has exited so that it never
/// signals a reused pid.
const SUPERVISOR: &str = r#"exec 3<&0
"$1" serve "$2" </dev/null &
pid=$!
(read -r _ <&3; kill -9 "$pid" 2>/dev/null) &
watcher=$!
wait "$pid"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

struct RegistryProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

enum StartError {
    /// The port was taken between [`free_port`] and the registry's bind.
    AddrInUse,
    Failed(String),
}

impl Registry {
    /// Starts a registry in `mode` and waits until it listens.
    pub fn start(mode: Mode) -> Registry {
        let bin = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("bundle-registry-")
            .tempdir()
            .expect("create the registry's temp dir");
        fs::create_dir(dir.path().join("storage")).expect("create the storage dir");

        let pki = (mode != Mode::Plain).then(|| Pki::generate(dir.path()));
        if mode == Mode::TlsBasicAuth {
            write_htpasswd(&dir.path().join("htpasswd"));
        }
        let token_server = matches!(mode, Mode::Token | Mode::PlainToken)
            .then(|| TokenServer::start(pki.as_ref().expect("token mode has a PKI")));

        let mut registry = Registry {
            mode,
            dir,
            port: 0,
            child: None,
            token_server,
        };
        // Another process may take the port between our probe and the registry's bind: pick a
        // new one and go again.
        for _ in 0..5 {
            registry.port = free_port();
            registry.write_config();
            match registry.spawn(&bin) {
                Ok(()) => return registry,
                Err(StartError::AddrInUse) => continue,
                Err(StartError::Failed(why)) => {
                    panic!("docker-registry did not start ({mode:?}): {why}")
                }
            }
        }
        panic!("docker-registry did not start ({mode:?}): no free port after 5 tries");
    }

    /// The mode it was started in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `127.0.0.1:PORT`, as it goes into an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the registry itself speaks plain HTTP.
    pub fn is_plain(&self) -> bool {
        matches!(self.mode, Mode::Plain | Mode::PlainToken)
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        let scheme = if self.is_plain() { "http" } else { "https" };
        format!("{scheme}://{}", self.host())
    }

    /// The registry's filesystem storage (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The CA certificate (PEM) that signed the registry's and the token server's certificates;
    /// `None` in [`Mode::Plain`] (in [`Mode::PlainToken`], the token server's only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.cert_dir().map(|d| d.join("ca.crt"))
    }

    /// A directory holding only `ca.crt`: what skopeo's `--cert-dir` and containers' `certs.d`
    /// expect. `None` in [`Mode::Plain`].
    pub fn cert_dir(&self) -> Option<PathBuf> {
        (self.mode != Mode::Plain).then(|| self.dir.path().join("certs"))
    }

    /// The user and password the registry (or its token server) accepts; `None` when it asks for
    /// none.
    pub fn credentials(&self) -> Option<(&'static str, &'static str)> {
        matches!(
            self.mode,
            Mode::TlsBasicAuth | Mode::Token | Mode::PlainToken
        )
        .then_some((USER, PASSWORD))
    }

    /// The token server of [`Mode::Token`].
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// The registry's log so far (stdout and stderr, access log included, all runs).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is up (it may still be starting).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the registry (SIGKILL, as a crash would) and waits for it; the storage stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.child.take() {
            // Closing stdin makes the supervisor SIGKILL the registry.
            drop(process.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match process.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    _ => {
                        let _ = process.child.kill();
                        let _ = process.child.wait();
                        break;
                    }
                }
            }
        }
    }

    /// Stops the registry if it runs and starts it again on the same port with the same storage
    /// and config.
    pub fn restart(&mut self) {
        self.stop();
        let bin = require_tool("docker-registry");
        // The old socket is gone once the process is, but another process may have grabbed the
        // port in between; it is ephemeral-range and usually freed again soon.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(&bin) {
                Ok(()) => return,
                Err(StartError::AddrInUse) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::AddrInUse) => {
                    panic!("docker-registry could not get port {} back", self.port)
                }
                Err(StartError::Failed(why)) => {
                    panic!("docker-registry did not restart: {why}")
                }
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: \"{storage}\"\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: \"127.0.0.1:{port}\"\n  secret: bundle-test-secret\n",
            storage = self.storage_dir().display(),
            port = self.port,
        );
        if !self.is_plain() {
            let _ = write!(
                yaml,
                "  tls:\n    certificate: \"{}\"\n    key: \"{}\"\n",
                d.join("tls/server.crt").display(),
                d.join("tls/server.key").display(),
            );
        }
        match self.mode {
            Mode::Plain | Mode::Tls => {}
            Mode::TlsBasicAuth => {
                let _ = write!(
                    yaml,
                    "auth:\n  htpasswd:\n    realm: bundle-test\n    path: \"{}\"\n",
                    d.join("htpasswd").display(),
                );
            }
            Mode::Token | Mode::PlainToken => {
                let token = self.token_server.as_ref().expect("token mode has a server");
                let _ = write!(
                    yaml,
                    "auth:\n  token:\n    realm: \"{realm}\"\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: \"{roots}\"\n",
                    realm = token.realm(),
                    roots = d.join("certs/ca.crt").display(),
                );
            }
        }
        fs::write(self.config_path(), yaml).expect("write the registry config");
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), StartError> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the registry log");
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(bin)
            .arg(self.config_path())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        // distribution reads REGISTRY_* variables as config overrides; the caller's must not leak
        // in (containers' REGISTRY_AUTH_FILE would become `auth.file`).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().expect("run sh to start docker-registry");
        let stdin = child.stdin.take();
        self.child = Some(RegistryProcess { child, stdin });

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let new_log = read_from(&log_path, offset);
            let process = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = process.child.try_wait() {
                self.child = None;
                if new_log.contains("address already in use") {
                    return Err(StartError::AddrInUse);
                }
                return Err(StartError::Failed(format!(
                    "it exited ({status}); its log:\n{new_log}"
                )));
            }
            if new_log.contains("listening on")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(StartError::Failed(format!(
                    "not listening after {START_TIMEOUT:?}; its log:\n{new_log}"
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    // -- skopeo -----------------------------------------------------------------------------

    /// skopeo flags for this registry as a copy destination: TLS (`--dest-tls-verify=false` for
    /// plain HTTP, `--dest-cert-dir` otherwise) and `--dest-creds` when it wants credentials.
    pub fn skopeo_dest_args(&self) -> Vec<String> {
        self.skopeo_args("dest-", self.credentials())
    }

    /// As [`Registry::skopeo_dest_args`], for this registry as a copy source.
    pub fn skopeo_src_args(&self) -> Vec<String> {
        self.skopeo_args("src-", self.credentials())
    }

    /// skopeo flags for this registry with a flag prefix (`"dest-"`, `"src-"`, or `""` for
    /// `inspect`) and explicit credentials (`None`: send none).
    pub fn skopeo_args(&self, prefix: &str, creds: Option<(&str, &str)>) -> Vec<String> {
        let mut args = Vec::new();
        // (Over plain HTTP skopeo skips verification for the token server too.)
        match self.cert_dir().filter(|_| !self.is_plain()) {
            None => args.push(format!("--{prefix}tls-verify=false")),
            Some(dir) => args.push(format!("--{prefix}cert-dir={}", dir.display())),
        }
        if let Some((user, pass)) = creds {
            args.push(format!("--{prefix}creds={user}:{pass}"));
        }
        args
    }

    /// `docker://127.0.0.1:PORT/REPO_REF`.
    pub fn docker_ref(&self, repo_ref: &str) -> String {
        format!("docker://{}/{repo_ref}", self.host())
    }

    /// `skopeo copy SRC docker://HOST/REPO_REF` with this registry's flags.
    pub fn push(&self, src: &str, repo_ref: &str) -> Result<(), String> {
        let args = self.skopeo_dest_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        skopeo_copy(src, &self.docker_ref(repo_ref), &args)
    }

    /// `skopeo inspect --raw docker://HOST/REPO_REF`: the manifest bytes the registry serves.
    pub fn inspect_raw(&self, repo_ref: &str) -> Result<Vec<u8>, String> {
        let flags = self.skopeo_args("", self.credentials());
        let target = self.docker_ref(repo_ref);
        let mut args = vec!["inspect", "--raw"];
        args.extend(flags.iter().map(String::as_str));
        args.push(&target);
        skopeo(&args)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.logs();
            let tail = &log[floor_char_boundary(&log, log.len().saturating_sub(LOG_TAIL))..];
            eprintln!(
                "---- docker-registry ({:?}, {}) log tail ----\n{tail}\n---- end of log ----",
                self.mode,
                self.host()
            );
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn write_htpasswd(path: &Path) {
    // Cost 4, the minimum: distribution checks the hash on every request.
    let hash = bcrypt::hash_with_result(PASSWORD, 4)
        .expect("bcrypt hash")
        .format_for_version(bcrypt::Version::TwoY);
    fs::write(path, format!("{USER}:{hash}\n")).expect("write htpasswd");
}

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

/// A fresh CA, a server certificate for 127.0.0.1/localhost, and a token-signing certificate,
/// all ECDSA P-256. Written below the registry's dir as `certs/ca.crt` (the only file there, so
/// the dir works as a skopeo `--cert-dir`) and `tls/server.{crt,key}`.
struct Pki {
    server_cert: CertificateDer<'static>,
    server_key_pkcs8: Vec<u8>,
    signer_cert: CertificateDer<'static>,
    signer_key_pkcs8: Vec<u8>,
}

impl Pki {
    fn generate(dir: &Path) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "bundle-test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("self-sign the CA");

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("sign the server certificate");

        // distribution verifies the token's x5c leaf against rootcertbundle with
        // ExtKeyUsageAny, so a plain digital-signature certificate under the CA will do.
        let signer_key = KeyPair::generate().expect("token signer key");
        let mut signer_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        signer_params
            .distinguished_name
            .push(DnType::CommonName, "bundle-test token signer");
        signer_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let signer_cert = signer_params
            .signed_by(&signer_key, &ca)
            .expect("sign the token signer certificate");

        fs::create_dir_all(dir.join("certs")).expect("create certs/");
        fs::create_dir_all(dir.join("tls")).expect("create tls/");
        fs::write(dir.join("certs/ca.crt"), ca.pem()).expect("write ca.crt");
        fs::write(dir.join("tls/server.crt"), server_cert.pem()).expect("write server.crt");
        fs::write(dir.join("tls/server.key"), server_key.serialize_pem()).expect("write key");

        Pki {
            server_cert: server_cert.der().clone(),
            server_key_pkcs8: server_key.serialize_der(),
            signer_cert: signer_cert.der().clone(),
            signer_key_pkcs8: signer_key.serialize_der(),
        }
    }

    fn tls_server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_pkcs8.clone())),
            )
            .expect("rustls server config");
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------------

/// The bearer-token server of [`Mode::Token`]: `GET /token?service=S&scope=X&scope=Y` over
/// HTTPS, Basic auth [`USER`]/[`PASSWORD`] (401 otherwise). It answers
/// `{"token", "access_token", "expires_in"}` with an ES256 JWT that grants every requested action
/// (cut down by [`TokenServer::restrict_actions`]) and carries its signing certificate in `x5c`.
pub struct TokenServer {
    state: Arc<TokenState>,
    acceptor: Acceptor,
}

struct TokenState {
    tls: Arc<rustls::ServerConfig>,
    signer: EcdsaKeyPair,
    signer_cert_b64: String,
    rng: SystemRandom,
    requests: AtomicU64,
    issued: AtomicU64,
    scopes: Mutex<Vec<String>>,
    allowed_actions: Mutex<Option<Vec<String>>>,
}

impl TokenServer {
    fn start(pki: &Pki) -> TokenServer {
        let rng = SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pki.signer_key_pkcs8,
            &rng,
        )
        .expect("load the token signing key");
        let state = Arc::new(TokenState {
            tls: pki.tls_server_config(),
            signer,
            signer_cert_b64: STANDARD.encode(pki.signer_cert.as_ref()),
            rng,
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            scopes: Mutex::new(Vec::new()),
            allowed_actions: Mutex::new(None),
        });
        let handler_state = Arc::clone(&state);
        let acceptor = Acceptor::spawn(
            "token-server",
            Arc::new(move |stream| handler_state.serve(stream)),
        );
        TokenServer { state, acceptor }
    }

    /// `https://127.0.0.1:PORT/token`: the realm the registry's challenge names.
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.acceptor.addr)
    }

    /// Requests seen, refused ones included.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Tokens handed out.
    pub fn tokens_issued(&self) -> u64 {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// The `scope` values of every token handed out, in order (one string per request, scopes
    /// joined by a space; empty when none was asked).
    pub fn scopes(&self) -> Vec<String> {
        lock(&self.state.scopes).clone()
    }

    /// From now on, grant at most `actions` (for example `["pull"]`) whatever is asked.
    pub fn restrict_actions(&self, actions: &[&str]) {
        *lock(&self.state.allowed_actions) =
            Some(actions.iter().map(|a| (*a).to_owned()).collect());
    }
}

impl TokenState {
    fn serve(&self, stream: &TcpStream) {
        let conn = match rustls::ServerConnection::new(Arc::clone(&self.tls)) {
            Ok(conn) => conn,
            Err(_) => return,
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let Ok(Some((head, _))) = read_head(&mut tls) else {
            return;
        };
        self.requests.fetch_add(1, Ordering::SeqCst);
        let response = self.respond(&String::from_utf8_lossy(&head));
        let _ = tls.write_all(&response);
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }

    fn respond(&self, head: &str) -> Vec<u8> {
        let request = parse_head(head);
        if request.method != "GET" {
            // Clients that try the OAuth2 POST flow first fall back to GET on 404.
            return http_response(404, &[], b"only GET /token is served here\n");
        }
        let Some(query) = request.target.strip_prefix("/token") else {
            return http_response(404, &[], b"not found\n");
        };
        let query = query.strip_prefix('?').unwrap_or("");
        let authorized = request
            .header("authorization")
            .and_then(|v| {
                v.strip_prefix("Basic ")
                    .or_else(|| v.strip_prefix("basic "))
            })
            .and_then(|b64| STANDARD.decode(b64.trim()).ok())
            .is_some_and(|creds| creds == format!("{USER}:{PASSWORD}").as_bytes());
        if !authorized {
            return http_response(
                401,
                &[("WWW-Authenticate", "Basic realm=\"bundle-test-token\"")],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"bad credentials\"}]}",
            );
        }

        let mut service = TOKEN_SERVICE.to_owned();
        let mut scopes = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "service" => service = value,
                // One scope per parameter as the spec says; some clients join them with spaces.
                "scope" => {
                    scopes.extend(value.split(' ').filter(|s| !s.is_empty()).map(String::from))
                }
                _ => {}
            }
        }
        let allowed = lock(&self.allowed_actions).clone();
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|scope| parse_scope(scope))
            .map(|(kind, name, actions)| {
                let actions: Vec<&str> = actions
                    .split(',')
                    .filter(|a| allowed.as_ref().is_none_or(|ok| ok.iter().any(|x| x == a)))
                    .collect();
                serde_json::json!({ "type": kind, "name": name, "actions": actions })
            })
            .collect();

        let serial = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.scopes).push(scopes.join(" "));
        let token = self.sign(&service, access, serial);
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME_SECS,
        });
        http_response(
            200,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// A JWS in distribution 2.8's shape: `aud` is one string (2.8 does not take a list),
    /// `x5c` holds the signing certificate, and the ES256 signature is raw `r || s`.
    fn sign(&self, service: &str, access: Vec<serde_json::Value>, serial: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [self.signer_cert_b64],
        });
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": USER,
            "aud": service,
            "exp": now + TOKEN_LIFETIME_SECS,
            "nbf": now,
            "iat": now,
            "jti": format!("bundle-test-{serial}"),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .signer
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ES256 signing");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

/// `repository:team/app:pull,push` -> (`repository`, `team/app`, `pull,push`). The name sits
/// between the first and the last colon (a type may carry a class: `repository(plugin)`).
fn parse_scope(scope: &str) -> Option<(&str, &str, &str)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((kind, name, actions))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// Runs `skopeo --insecure-policy --command-timeout=60s ARGS`: `Ok(stdout)` or `Err` with the
/// exit status and stderr. Panics when skopeo is not installed.
pub fn skopeo(args: &[&str]) -> Result<Vec<u8>, String> {
    let bin = require_tool("skopeo");
    let out = Command::new(bin)
        .args(["--insecure-policy", "--command-timeout=60s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "skopeo {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `skopeo copy --quiet EXTRA SRC DST`, e.g.
/// `skopeo_copy("oci:/tmp/layout:app-1.0", &reg.docker_ref("app:1.0"), &reg_flags)`.
pub fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) -> Result<(), String> {
    let mut args = vec!["copy", "--quiet"];
    args.extend_from_slice(extra);
    args.extend([src, dst]);
    skopeo(&args).map(drop)
}

/// The small test image set (`bundle_testimages::small_set`) in a fresh temp dir; keep the
/// `TempDir` alive while the layout is in use.
pub fn small_images() -> (TempDir, bundle_testimages::SmallSet) {
    let tmp = tempfile::Builder::new()
        .prefix("bundle-images-")
        .tempdir()
        .expect("create a temp dir for the test images");
    let set = bundle_testimages::small_set(tmp.path()).expect("write the small image set");
    (tmp, set)
}

/// `oci:LAYOUT:TAG`, the skopeo name of a tag in the set's layout (`app-1.0`, `multi-1.0`,
/// `plain-1.0`).
pub fn oci_ref(set: &bundle_testimages::SmallSet, tag: &str) -> String {
    format!("oci:{}:{tag}", set.layout.display())
}

// ---------------------------------------------------------------------------------------------
// Fault proxy
// ---------------------------------------------------------------------------------------------

/// What a [`FaultProxy`] does to a request a [`Rule`] picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (503, 429, ...) with `Retry-After: 1` instead of forwarding.
    Status(u16),
    /// Forward the request, pass on this many bytes of the raw response (status line and
    /// headers count), then reset the connection (RST, not FIN).
    ResetAfter(usize),
    /// Answer `307 Temporary Redirect` to the blob the request names, at the host
    /// [`FaultProxy::set_redirect`] gave (a [`BlobCdn`]), as registries send downloads to a
    /// CDN or an object store.
    Redirect,
    /// Hold the request this many milliseconds, then forward it. The proxy counts the
    /// requests it holds at once ([`FaultProxy::take_max_held`]): a client's requests that
    /// overlap.
    Hold(u64),
}

/// When a [`FaultProxy`] injects a [`Fault`]: on every `every`-th request whose request line
/// (`"PUT /v2/app/blobs/uploads/... HTTP/1.1"`) contains `needle`, at most `limit` times.
#[derive(Clone, Debug)]
pub struct Rule {
    fault: Fault,
    every: u64,
    needle: Option<String>,
    limit: Option<u64>,
}

impl Rule {
    /// `fault` on every request.
    pub fn new(fault: Fault) -> Rule {
        Rule {
            fault,
            every: 1,
            needle: None,
            limit: None,
        }
    }

    /// Only on requests `k`, `2k`, `3k`, ... of those it matches (1-based).
    pub fn every(mut self, k: u64) -> Rule {
        self.every = k.max(1);
        self
    }

    /// Only on requests whose request line contains `needle` (`"GET "`, `"/blobs/"`, ...).
    pub fn when(mut self, needle: &str) -> Rule {
        self.needle = Some(needle.to_owned());
        self
    }

    /// At most `n` times in all.
    pub fn limit(mut self, n: u64) -> Rule {
        self.limit = Some(n);
        self
    }
}

/// A TCP proxy on 127.0.0.1 in front of a plain-HTTP registry that injects faults by a fixed
/// schedule (no randomness). It forces `Connection: close` on each request, so every connection
/// carries exactly one request and needs no body parsing; the `Host` header is left alone, so the
/// registry's upload `Location`s point back at the proxy.
///
/// Every rule counts the requests it matches while faults are on; on each request the first rule
/// that is due fires. Stops (and joins its threads) when dropped.
pub struct FaultProxy {
    state: Arc<ProxyState>,
    acceptor: Acceptor,
}

struct ProxyState {
    upstream: String,
    inner: Mutex<ProxyInner>,
    redirect_to: Mutex<Option<String>>,
}

struct ProxyInner {
    rules: Vec<(Rule, u64, u64)>,
    enabled: bool,
    requests: u64,
    faults: u64,
    log: Vec<String>,
    /// Requests held now ([`Fault::Hold`]), and the most held at once.
    held: u64,
    max_held: u64,
}

impl FaultProxy {
    /// A proxy to `upstream` (`127.0.0.1:PORT`, e.g. [`Registry::host`]) with `rules`, faults
    /// on.
    pub fn start(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            inner: Mutex::new(ProxyInner {
                rules: rules.into_iter().map(|r| (r, 0, 0)).collect(),
                enabled: true,
                requests: 0,
                faults: 0,
                log: Vec::new(),
                held: 0,
                max_held: 0,
            }),
            redirect_to: Mutex::new(None),
        });
        let handler_state = Arc::clone(&state);
        let acceptor = Acceptor::spawn(
            "fault-proxy",
            Arc::new(move |stream| {
                // A failed copy is what a fault looks like; there is no one to tell.
                let _ = handler_state.serve(stream);
            }),
        );
        FaultProxy { state, acceptor }
    }

    /// `127.0.0.1:PORT`: use it in place of the registry's host.
    pub fn host(&self) -> String {
        self.acceptor.addr.to_string()
    }

    /// Turns fault injection on or off; off forwards everything and stops the rules' counters.
    pub fn set_enabled(&self, enabled: bool) {
        lock(&self.state.inner).enabled = enabled;
    }

    /// Replaces the rules (and resets their counters).
    pub fn set_rules(&self, rules: Vec<Rule>) {
        lock(&self.state.inner).rules = rules.into_iter().map(|r| (r, 0, 0)).collect();
    }

    /// Where [`Fault::Redirect`] sends blob requests: a [`BlobCdn::host`].
    pub fn set_redirect(&self, host: &str) {
        *lock(&self.state.redirect_to) = Some(host.to_owned());
    }

    /// Requests seen (faulted ones included).
    pub fn requests(&self) -> u64 {
        lock(&self.state.inner).requests
    }

    /// Faults injected.
    pub fn faults(&self) -> u64 {
        lock(&self.state.inner).faults
    }

    /// The most requests [`Fault::Hold`] held at once since the last call, and resets it.
    /// Exact for a client that starts a connection's next request only after the answer to
    /// its last: a request is let go before any byte of its answer is forwarded.
    pub fn take_max_held(&self) -> u64 {
        std::mem::take(&mut lock(&self.state.inner).max_held)
    }

    /// One line per request: its request line, and `-> FAULT` when one was injected.
    pub fn log(&self) -> Vec<String> {
        lock(&self.state.inner).log.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- fault proxy {} -> {} requests ----\n{}\n---- end ----",
                self.acceptor.addr,
                self.state.upstream,
                self.log().join("\n")
            );
        }
    }
}

impl ProxyState {
    fn decide(&self, request_line: &str) -> Option<Fault> {
        let mut inner = lock(&self.inner);
        inner.requests += 1;
        let mut chosen = None;
        if inner.enabled {
            for (rule, seen, fired) in &mut inner.rules {
                if rule
                    .needle
                    .as_deref()
                    .is_some_and(|n| !request_line.contains(n))
                {
                    continue;
                }
                *seen += 1;
                let due = *seen % rule.every == 0 && rule.limit.is_none_or(|l| *fired < l);
                if due && chosen.is_none() {
                    *fired += 1;
                    chosen = Some(rule.fault);
                }
            }
        }
        if chosen.is_some() {
            inner.faults += 1;
        }
        let entry = match chosen {
            Some(fault) => format!("{request_line} -> {fault:?}"),
            None => request_line.to_owned(),
        };
        inner.log.push(entry);
        chosen
    }

    fn serve(&self, mut client: &TcpStream) -> io::Result<()> {
        // A TLS ClientHello (record type 0x16): clients told to skip verification probe HTTPS
        // before falling back to HTTP (skopeo does). Close at once, as an HTTP-only server
        // would fail the handshake, instead of waiting out their handshake timeout.
        let mut first = [0u8; 1];
        if client.peek(&mut first)? == 0 || first[0] == 0x16 {
            return Ok(());
        }
        let Some((head, body_start)) = read_head(&mut client)? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let request_line = head.lines().next().unwrap_or("").to_owned();
        let fault = self.decide(&request_line);

        if let Some(Fault::Status(code)) = fault {
            let body = format!(
                "{{\"errors\":[{{\"code\":\"UNAVAILABLE\",\"message\":\"{code} injected by the \
                 fault proxy\"}}]}}"
            );
            client.write_all(&http_response(
                code,
                &[("Retry-After", "1"), ("Content-Type", "application/json")],
                body.as_bytes(),
            ))?;
            // Lingering close: read what the client still sends (a request body), so that
            // closing does not turn into a reset that could eat the response.
            client.shutdown(Shutdown::Write)?;
            client.set_read_timeout(Some(Duration::from_secs(2)))?;
            let _ = io::copy(&mut client, &mut io::sink());
            return Ok(());
        }

        if fault == Some(Fault::Redirect) {
            // `GET /v2/NAME/blobs/sha256:HEX HTTP/1.1` -> http://CDN/blobs/sha256:HEX?sig=ok
            let digest = request_line
                .split_whitespace()
                .nth(1)
                .and_then(|target| target.rsplit_once("/blobs/"))
                .map(|(_, d)| d.split('?').next().unwrap_or(d).to_owned())
                .unwrap_or_default();
            let cdn = lock(&self.redirect_to).clone().unwrap_or_default();
            let location = format!("http://{cdn}/blobs/{digest}?sig=ok");
            client.write_all(&http_response(307, &[("Location", &location)], b""))?;
            client.shutdown(Shutdown::Write)?;
            return Ok(());
        }

        if let Some(Fault::Hold(ms)) = fault {
            {
                let mut inner = lock(&self.inner);
                inner.held += 1;
                inner.max_held = inner.max_held.max(inner.held);
            }
            thread::sleep(Duration::from_millis(ms));
            lock(&self.inner).held -= 1;
        }

        let mut upstream = TcpStream::connect(&self.upstream)?;
        upstream.set_read_timeout(Some(IO_TIMEOUT))?;
        upstream.set_write_timeout(Some(IO_TIMEOUT))?;
        upstream.write_all(force_connection_close(&head).as_bytes())?;
        upstream.write_all(&body_start)?;

        // The rest of the request body, client -> upstream, on its own thread.
        let mut from_client = client.try_clone()?;
        let mut to_upstream = upstream.try_clone()?;
        let pump = thread::spawn(move || {
            let _ = io::copy(&mut from_client, &mut to_upstream);
            let _ = to_upstream.shutdown(Shutdown::Write);
        });

        // The response, upstream -> client, cut short for ResetAfter.
        let budget = match fault {
            Some(Fault::ResetAfter(n)) => Some(n),
            _ => None,
        };
        let mut sent = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        let mut reset = false;
        loop {
            let want = budget.map_or(buf.len(), |b| (b - sent).min(buf.len()));
            if want == 0 {
                reset = true;
                break;
            }
            let n = match upstream.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }

        let _ = upstream.shutdown(Shutdown::Both);
        if reset {
            // Linger 0 makes the last close (when the acceptor drops the stream after this
            // returns) send RST instead of FIN.
            socket2::SockRef::from(client).set_linger(Some(Duration::ZERO))?;
        } else {
            let _ = client.shutdown(Shutdown::Write);
        }
        // Unblocks the pump's read without sending anything.
        let _ = client.shutdown(Shutdown::Read);
        let _ = pump.join();
        Ok(())
    }
}

/// The request head with any `Connection`/`Keep-Alive` header replaced by `Connection: close`.
fn force_connection_close(head: &str) -> String {
    let mut out = String::with_capacity(head.len() + 20);
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection"
        ) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 and a bounded accept loop
// ---------------------------------------------------------------------------------------------

/// Reads up to the end of a request head (`\r\n\r\n`). Returns the head (terminator included)
/// and whatever body bytes came with it, or `None` when the peer closed before sending one.
fn read_head(stream: &mut impl Read) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched_from + pos + 4;
            let rest = buf.split_off(end);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

struct RequestHead<'a> {
    method: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl RequestHead<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

fn parse_head(head: &str) -> RequestHead<'_> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("");
    let target = first.next().unwrap_or("");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    RequestHead {
        method,
        target,
        headers,
    }
}

/// A complete `Connection: close` response.
fn http_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP proxy
// ---------------------------------------------------------------------------------------------

/// Debian's tinyproxy on 127.0.0.1, in the foreground: a real HTTP proxy (`CONNECT` tunnels and
/// absolute-form requests) that logs every request. Stopped when dropped.
pub struct TinyProxy {
    dir: TempDir,
    port: u16,
    child: Child,
}

impl TinyProxy {
    pub fn start() -> TinyProxy {
        let bin = require_tool("tinyproxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("tinyproxy.conf");
        fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\n\
                 MaxClients 64\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
                dir.path().join("log").display()
            ),
        )
        .expect("write tinyproxy.conf");
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let proxy = TinyProxy { dir, port, child };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tinyproxy did not listen on {port}: {}",
                proxy.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its log: a `Request (file descriptor N): METHOD TARGET HTTP/1.1` line per request.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Blob CDN
// ---------------------------------------------------------------------------------------------

/// What a CDN or an object store does with the blob downloads a registry redirects to it
/// ([`Fault::Redirect`]): serves `GET`/`HEAD /blobs/sha256:HEX?sig=ok` from the registry's
/// storage, with `Range: bytes=N-`; refuses a request that carries an `Authorization` header
/// (400, as S3 refuses a second credential beside a signed URL) or lacks the signature (403).
/// With `cut_after`, the first full `GET` of each larger blob is reset after that many body
/// bytes.
pub struct BlobCdn {
    state: Arc<CdnState>,
    acceptor: Acceptor,
}

struct CdnState {
    storage: PathBuf,
    cut_after: Option<usize>,
    inner: Mutex<CdnInner>,
}

#[derive(Default)]
struct CdnInner {
    served: u64,
    refused: u64,
    cut: BTreeSet<String>,
    log: Vec<String>,
}

impl BlobCdn {
    /// A CDN for the registry whose storage is `storage` ([`Registry::storage_dir`]).
    pub fn start(storage: &Path, cut_after: Option<usize>) -> BlobCdn {
        let state = Arc::new(CdnState {
            storage: storage.to_owned(),
            cut_after,
            inner: Mutex::default(),
        });
        let handler_state = Arc::clone(&state);
        let acceptor = Acceptor::spawn(
            "blob-cdn",
            Arc::new(move |stream| {
                let _ = handler_state.serve(stream);
            }),
        );
        BlobCdn { state, acceptor }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.acceptor.addr.to_string()
    }

    /// Requests answered 200 or 206.
    pub fn served(&self) -> u64 {
        lock(&self.state.inner).served
    }

    /// Requests refused (with `Authorization`, without the signature, or for no such blob).
    pub fn refused(&self) -> u64 {
        lock(&self.state.inner).refused
    }

    /// Downloads cut short.
    pub fn cut(&self) -> usize {
        lock(&self.state.inner).cut.len()
    }

    /// One line per request: its request line and the status answered.
    pub fn log(&self) -> Vec<String> {
        lock(&self.state.inner).log.clone()
    }
}

impl CdnState {
    fn serve(&self, mut client: &TcpStream) -> io::Result<()> {
        let Some((head, _)) = read_head(&mut client)? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or("").to_owned();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let digest = path.strip_prefix("/blobs/").unwrap_or("").to_owned();
        let file = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64)
            .map(|hex| {
                self.storage
                    .join("docker/registry/v2/blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data")
            });
        let refuse = if header("authorization").is_some() {
            Some((400, "a second credential beside the signature"))
        } else if query != "sig=ok" {
            Some((403, "no signature"))
        } else if !matches!(method, "GET" | "HEAD") {
            Some((400, "not a download"))
        } else {
            None
        };
        let bytes = match (refuse, &file) {
            (None, Some(f)) => std::fs::read(f).ok(),
            _ => None,
        };
        let Some(bytes) = bytes else {
            let (status, why) = refuse.unwrap_or((404, "no such blob"));
            let mut inner = lock(&self.inner);
            inner.refused += 1;
            inner.log.push(format!("{request_line} -> {status}"));
            drop(inner);
            return client.write_all(&http_response(status, &[], why.as_bytes()));
        };
        let from = header("range")
            .and_then(|r| {
                r.strip_prefix("bytes=")?
                    .strip_suffix('-')?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&n| n < bytes.len());
        let (status, body) = match from {
            Some(n) => (206, &bytes[n..]),
            None => (200, &bytes[..]),
        };
        let range = format!(
            "bytes {}-{}/{}",
            from.unwrap_or(0),
            bytes.len() - 1,
            bytes.len()
        );
        let mut response = http_response(status, &[("Content-Range", &range)], body);
        if method == "HEAD" {
            let end = response.len() - body.len();
            response.truncate(end);
        }
        let cut = {
            let mut inner = lock(&self.inner);
            inner.served += 1;
            inner.log.push(format!("{request_line} -> {status}"));
            match self.cut_after {
                Some(n) if method == "GET" && from.is_none() && body.len() > n => inner
                    .cut
                    .insert(digest)
                    .then(|| response.len() - body.len() + n),
                _ => None,
            }
        };
        match cut {
            Some(n) => {
                client.write_all(&response[..n])?;
                socket2::SockRef::from(client).set_linger(Some(Duration::ZERO))?;
            }
            None => {
                client.write_all(&response)?;
                let _ = client.shutdown(Shutdown::Write);
            }
        }
        Ok(())
    }
}

type Handler = Arc<dyn Fn(&TcpStream) + Send + Sync>;

/// The open connections' threads, and their sockets held weakly, so that a handler's return
/// really closes its socket (a reset needs the last close).
type Conns = Arc<Mutex<Vec<(JoinHandle<()>, Weak<TcpStream>)>>>;

/// A listener on 127.0.0.1:0 with one thread per connection, which closes the connection when
/// the handler returns. Dropping it stops accepting, shuts every open connection down and joins
/// all threads; socket timeouts bound each thread anyway.
struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Acceptor {
    fn spawn(name: &str, handler: Handler) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let thread = {
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            let name = name.to_owned();
            thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                        let stream = Arc::new(stream);
                        let shutdown_handle = Arc::downgrade(&stream);
                        let handler = Arc::clone(&handler);
                        let Ok(worker) = thread::Builder::new()
                            .name(format!("{name}-conn"))
                            .spawn(move || handler(&stream))
                        else {
                            continue;
                        };
                        let mut conns = lock(&conns);
                        conns.retain(|(t, _)| !t.is_finished());
                        conns.push((worker, shutdown_handle));
                    }
                })
                .expect("spawn the accept thread")
        };
        Acceptor {
            addr,
            stop,
            thread: Some(thread),
            conns,
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let conns = std::mem::take(&mut *lock(&self.conns));
        for (worker, stream) in conns {
            if let Some(stream) = stream.upgrade() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let _ = worker.join();
        }
    }
}

/// Locks, ignoring poisoning: a panicking test thread must not hide the harness's state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
