//! The registry client: one per process, shared by every pull and push. It knows the scheme
//! of each registry, speaks the bearer-token and basic challenges, caches tokens per scope,
//! and retries transient failures (connection errors, 5xx, 429 with `Retry-After`) with
//! backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;

use bundle_format::Digest;

use crate::auth::{self, CredentialStore, Credentials};
use crate::transport::{FileBody, ReqBody, RespBody, TlsOptions, Transport, empty};
use crate::{Error, Reference, Result};

/// Largest manifest or index the client reads (the distribution spec suggests 4 MiB).
pub const MANIFEST_LIMIT: usize = 32 << 20;

/// Media types a pull accepts for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A repository on a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    /// The registry as written in references (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path (`library/nginx`).
    pub name: String,
}

impl Repo {
    /// The repository of a reference.
    pub fn of(r: &Reference) -> Repo {
        Repo {
            registry: r.registry.clone(),
            name: r.repository.clone(),
        }
    }

    fn api_host(&self) -> &str {
        if self.registry == crate::reference::DOCKER_HUB {
            crate::reference::DOCKER_HUB_API
        } else {
            &self.registry
        }
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// What a request needs to be allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read the repository.
    Pull(String),
    /// Read and write the repository, and read another one to mount from.
    Push {
        /// The repository written.
        repo: String,
        /// A repository blobs are mounted from.
        mount_from: Option<String>,
    },
}

impl Scope {
    fn scopes(&self) -> Vec<String> {
        match self {
            Scope::Pull(r) => vec![format!("repository:{r}:pull")],
            Scope::Push { repo, mount_from } => {
                let mut v = vec![format!("repository:{repo}:pull,push")];
                if let Some(from) = mount_from.as_ref().filter(|f| *f != repo) {
                    v.push(format!("repository:{from}:pull"));
                }
                v
            }
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.scopes().join(" "))
    }
}

/// How often and how long to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// First backoff.
    pub base: Duration,
    /// Longest wait, for backoff and for `Retry-After`.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(200),
            max: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `n` (1-based retries).
    pub fn backoff(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max)
    }
}

#[derive(Default)]
struct HostState {
    /// `https` or `http`, once known.
    scheme: Option<&'static str>,
    /// `Authorization` values by scope string.
    tokens: HashMap<String, String>,
    /// The registry asked for basic auth.
    basic: bool,
}

/// Held while a token for one (host, scope) is fetched.
type TokenGate = Arc<tokio::sync::Mutex<()>>;

/// Counters for tests and `--stats`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Requests sent (retries included).
    pub requests: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Token requests.
    pub token_requests: u64,
}

/// A registry client.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    creds: CredentialStore,
    tls: TlsOptions,
    hosts: Mutex<HashMap<String, HostState>>,
    retry: RetryPolicy,
    stats: Mutex<Stats>,
    user_agent: HeaderValue,
    /// One async lock per (host, scope), held while a token is fetched.
    token_gates: Mutex<HashMap<(String, String), TokenGate>>,
    /// Held while an insecure host's scheme is probed, so that the first calls of a push,
    /// made together, probe it once between them.
    probing: tokio::sync::Mutex<()>,
}

/// A request to send, rebuildable for retries.
pub struct Call<'a> {
    /// Method.
    pub method: Method,
    /// Path and query, starting with `/v2/`, or an absolute URL (upload locations).
    pub path: String,
    /// Extra headers.
    pub headers: HeaderMap,
    /// Makes the body; called once per attempt.
    pub body: &'a (dyn Fn() -> ReqBody + Send + Sync),
    /// Makes the same body as a [`FileBody`], for a transport that sends files itself
    /// ([`Transport::sends_files`]); called instead of `body` then.
    pub files: Option<&'a (dyn Fn() -> FileBody + Send + Sync)>,
    /// For messages: `GET manifest library/nginx:1.27`.
    pub action: String,
    /// Whether a connection failure may be retried blindly. Uploads are not: the registry
    /// may have taken the bytes, so their callers ask it where it stands instead.
    pub idempotent: bool,
}

fn no_body() -> ReqBody {
    empty()
}

impl<'a> Call<'a> {
    /// A call without a body.
    pub fn new(method: Method, path: String, action: String) -> Call<'a> {
        Call {
            method,
            path,
            headers: HeaderMap::new(),
            body: &no_body,
            files: None,
            action,
            idempotent: true,
        }
    }
}

/// Reads a whole body, at most `limit` bytes.
pub async fn read_body(mut body: RespBody, limit: usize) -> std::result::Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("body larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Client {
    /// A client over `transport`, with `creds` and the TLS settings (which decide the
    /// scheme: hosts named insecure are tried over https without verification, then http).
    pub fn new(transport: Arc<dyn Transport>, creds: CredentialStore, tls: TlsOptions) -> Client {
        Client {
            inner: Arc::new(Inner {
                transport,
                creds,
                tls,
                hosts: Mutex::new(HashMap::new()),
                retry: RetryPolicy::default(),
                stats: Mutex::new(Stats::default()),
                user_agent: HeaderValue::from_static(concat!("bundle/", env!("CARGO_PKG_VERSION"))),
                token_gates: Mutex::new(HashMap::new()),
                probing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The same client with another retry policy (tests use short waits).
    pub fn with_retry(self, retry: RetryPolicy) -> Client {
        let inner = Inner {
            transport: Arc::clone(&self.inner.transport),
            creds: self.inner.creds.clone(),
            tls: self.inner.tls.clone(),
            hosts: Mutex::new(HashMap::new()),
            retry,
            stats: Mutex::new(Stats::default()),
            user_agent: self.inner.user_agent.clone(),
            token_gates: Mutex::new(HashMap::new()),
            probing: tokio::sync::Mutex::new(()),
        };
        Client {
            inner: Arc::new(inner),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.inner.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn bump(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.inner.stats.lock() {
            f(&mut s);
        }
    }

    fn token_gate(&self, host: &str, scope: &str) -> TokenGate {
        let mut gates = match self.inner.token_gates.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(
            gates
                .entry((host.to_owned(), scope.to_owned()))
                .or_default(),
        )
    }

    fn host_state<T>(&self, host: &str, f: impl FnOnce(&mut HostState) -> T) -> T {
        let mut hosts = match self.inner.hosts.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(hosts.entry(host.to_owned()).or_default())
    }

    async fn raw(
        &self,
        req: Request<ReqBody>,
    ) -> std::result::Result<Response<RespBody>, crate::BoxError> {
        self.bump(|s| s.requests += 1);
        self.inner.transport.send(req).await
    }

    /// The scheme for `host`: https, or for hosts named insecure whichever answers `/v2/`.
    async fn scheme(&self, host: &str) -> Result<&'static str> {
        if let Some(s) = self.host_state(host, |h| h.scheme) {
            return Ok(s);
        }
        if !self.inner.tls.is_insecure(host) {
            self.host_state(host, |h| h.scheme = Some("https"));
            return Ok("https");
        }
        let _probing = self.inner.probing.lock().await;
        if let Some(s) = self.host_state(host, |h| h.scheme) {
            return Ok(s);
        }
        let https = match Request::get(format!("https://{host}/v2/")).body(empty()) {
            Ok(req) => self.raw(req).await.is_ok(),
            Err(_) => false,
        };
        let scheme = if https { "https" } else { "http" };
        self.host_state(host, |h| h.scheme = Some(scheme));
        Ok(scheme)
    }

    /// Resolves a path or absolute URL against the registry's base URL.
    async fn url(&self, host: &str, path: &str) -> Result<String> {
        if path.starts_with("http://") || path.starts_with("https://") {
            return Ok(path.to_owned());
        }
        let scheme = self.scheme(host).await?;
        Ok(format!("{scheme}://{host}{path}"))
    }

    /// Sends a call to `repo`'s registry with authentication and retries. Returns any
    /// response that is not a transient failure; the caller judges its status.
    pub async fn send(
        &self,
        repo: &Repo,
        scope: &Scope,
        call: &Call<'_>,
    ) -> Result<Response<RespBody>> {
        let host = repo.api_host().to_owned();
        let scope_key = scope.to_string();
        let mut tried_auth = false;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let url = self.url(&host, &call.path).await?;
            let auth = self.host_state(&host, |s| {
                s.tokens
                    .get(&scope_key)
                    .cloned()
                    .or_else(|| s.basic.then(String::new))
            });
            let sent_token = auth.clone().filter(|v| !v.is_empty());
            let authorization = match auth {
                Some(v) if !v.is_empty() => Some(v),
                Some(_) => self.basic_header(&repo.registry)?,
                None => None,
            }
            .and_then(|v| HeaderValue::from_str(&v).ok());
            let mut builder = Request::builder().method(call.method.clone()).uri(&url);
            if let Some(h) = builder.headers_mut() {
                h.extend(call.headers.clone());
                h.insert(header::USER_AGENT, self.inner.user_agent.clone());
                if let Some(v) = &authorization {
                    h.insert(header::AUTHORIZATION, v.clone());
                }
            }
            let files = call
                .files
                .filter(|_| self.inner.transport.sends_files(&url))
                .map(|f| f());
            let body = match files {
                Some(_) => empty(),
                None => (call.body)(),
            };
            let mut req = builder.body(body).map_err(|e| Error::Protocol {
                registry: host.clone(),
                what: format!("{}: cannot build request for {url}: {e}", call.action),
            })?;
            if let Some(files) = files {
                req.extensions_mut().insert(files);
            }
            let mut result = self.raw(req).await;
            if let Ok(resp) = &result
                && is_redirect(resp.status())
                && (call.method == Method::GET || call.method == Method::HEAD)
            {
                result = match result {
                    Ok(resp) => self.follow(resp, call, &url, authorization.as_ref()).await,
                    other => other,
                };
            }
            let transient = match result {
                Err(e) => Err(Error::Transport {
                    registry: host.clone(),
                    action: call.action.clone(),
                    cause: e,
                }),
                Ok(resp) => {
                    let status = resp.status();
                    if status == StatusCode::UNAUTHORIZED && !tried_auth {
                        tried_auth = true;
                        let challenge = resp
                            .headers()
                            .get(header::WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(auth::parse_challenge);
                        self.authenticate(repo, scope, challenge, sent_token.as_deref())
                            .await?;
                        attempt -= 1;
                        continue;
                    }
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                        return Err(Error::Unauthorized {
                            registry: repo.registry.clone(),
                            scope: scope_key,
                            reason: format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
                        });
                    }
                    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                        let wait = retry_after(resp.headers());
                        let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                        if attempt < self.inner.retry.attempts {
                            let wait = wait
                                .unwrap_or_else(|| self.inner.retry.backoff(attempt))
                                .min(self.inner.retry.max);
                            self.bump(|s| s.retries += 1);
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        Err(Error::Status {
                            registry: repo.registry.clone(),
                            action: call.action.clone(),
                            status,
                            body: String::from_utf8_lossy(&body).chars().take(512).collect(),
                        })
                    } else {
                        return Ok(resp);
                    }
                }
            };
            match transient {
                Err(e @ Error::Transport { .. }) if !call.idempotent => return Err(e),
                Err(e) if e.is_transient() && attempt < self.inner.retry.attempts => {
                    self.bump(|s| s.retries += 1);
                    tokio::time::sleep(self.inner.retry.backoff(attempt)).await;
                }
                Err(e) => return Err(e),
                Ok(()) => unreachable!(),
            }
        }
    }

    /// Follows the redirects of a GET or HEAD from `url`: registries send blob downloads (and
    /// their HEADs) to a CDN or an object store (Docker Hub, GHCR, Quay, ECR, distribution on
    /// S3). The call's headers go along (a `Range` too), its `Authorization` only to the same
    /// origin: a signed object-store URL carries its own, and would refuse a second.
    async fn follow(
        &self,
        mut resp: Response<RespBody>,
        call: &Call<'_>,
        url: &str,
        authorization: Option<&HeaderValue>,
    ) -> std::result::Result<Response<RespBody>, crate::BoxError> {
        let mut from = url.to_owned();
        for _ in 0..MAX_REDIRECTS {
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let Some(location) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                // Without a Location the caller reports the status as it is.
                return Ok(resp);
            };
            let to = resolve_location(&from, location).ok_or_else(|| {
                format!(
                    "{}: bad redirect Location {location:?} from {from}",
                    call.action
                )
            })?;
            let mut builder = Request::builder().method(call.method.clone()).uri(&to);
            if let Some(h) = builder.headers_mut() {
                h.extend(call.headers.clone());
                h.insert(header::USER_AGENT, self.inner.user_agent.clone());
                if let Some(v) = authorization
                    && origin(&to) == origin(url)
                {
                    h.insert(header::AUTHORIZATION, v.clone());
                }
            }
            let req = builder
                .body(empty())
                .map_err(|e| format!("{}: cannot build request for {to}: {e}", call.action))?;
            resp = self.raw(req).await?;
            from = to;
        }
        Err(format!(
            "{}: more than {MAX_REDIRECTS} redirects (last to {from})",
            call.action
        )
        .into())
    }

    fn basic_header(&self, registry: &str) -> Result<Option<String>> {
        Ok(self
            .inner
            .creds
            .get(registry)?
            .and_then(|c| c.basic_header()))
    }

    /// Answers a challenge: fetches a bearer token for the scope, or switches to basic auth.
    async fn authenticate(
        &self,
        repo: &Repo,
        scope: &Scope,
        challenge: Option<auth::Challenge>,
        sent: Option<&str>,
    ) -> Result<()> {
        let host = repo.api_host().to_owned();
        let unauthorized = |reason: String| Error::Unauthorized {
            registry: repo.registry.clone(),
            scope: scope.to_string(),
            reason,
        };
        let Some(ch) = challenge else {
            return Err(unauthorized(
                "401 without a WWW-Authenticate challenge".into(),
            ));
        };
        match ch.scheme.as_str() {
            "basic" => {
                if self.basic_header(&repo.registry)?.is_none() {
                    return Err(unauthorized(
                        "the registry wants basic auth and no credentials are configured (docker login, or DOCKER_CONFIG)".into(),
                    ));
                }
                self.host_state(&host, |h| h.basic = true);
                Ok(())
            }
            "bearer" => {
                // One token request per scope at a time: parallel requests that all met the
                // challenge wait for the first one's token instead of each fetching their own.
                let gate = self.token_gate(&host, &scope.to_string());
                let _held = gate.lock().await;
                let current = self.host_state(&host, |h| h.tokens.get(&scope.to_string()).cloned());
                if current.is_some() && current.as_deref() != sent {
                    return Ok(());
                }
                let realm = ch
                    .params
                    .get("realm")
                    .ok_or_else(|| unauthorized("bearer challenge without realm".into()))?;
                let token = self
                    .fetch_token(repo, scope, realm, ch.params.get("service"))
                    .await?;
                self.host_state(&host, |h| {
                    h.tokens
                        .insert(scope.to_string(), format!("Bearer {token}"));
                });
                Ok(())
            }
            other => Err(unauthorized(format!("unsupported auth scheme {other:?}"))),
        }
    }

    async fn fetch_token(
        &self,
        repo: &Repo,
        scope: &Scope,
        realm: &str,
        service: Option<&String>,
    ) -> Result<String> {
        self.bump(|s| s.token_requests += 1);
        let unauthorized = |reason: String| Error::Unauthorized {
            registry: repo.registry.clone(),
            scope: scope.to_string(),
            reason,
        };
        let creds = self.inner.creds.get(&repo.registry)?;
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let mut params: Vec<String> = Vec::new();
        if let Some(s) = service {
            params.push(format!("service={}", enc(s)));
        }
        for sc in scope.scopes() {
            params.push(format!("scope={}", enc(&sc)));
        }
        if http::Uri::try_from(realm).map_or(true, |u| u.authority().is_none()) {
            return Err(unauthorized(format!("realm {realm:?} is not a URL")));
        }
        let build = || -> Result<Request<ReqBody>> {
            let req = match &creds {
                Some(Credentials::IdentityToken(tok)) => {
                    let mut form = params.clone();
                    form.push("grant_type=refresh_token".into());
                    form.push("client_id=bundle".into());
                    form.push(format!("refresh_token={}", enc(tok)));
                    Request::post(realm)
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .header(header::USER_AGENT, self.inner.user_agent.clone())
                        .body(crate::transport::full(form.join("&")))
                }
                _ => {
                    let sep = if realm.contains('?') { '&' } else { '?' };
                    let mut b = Request::get(format!("{realm}{sep}{}", params.join("&")))
                        .header(header::USER_AGENT, self.inner.user_agent.clone());
                    if let Some(v) = creds.as_ref().and_then(Credentials::basic_header) {
                        b = b.header(header::AUTHORIZATION, v);
                    }
                    b.body(empty())
                }
            };
            req.map_err(|e| unauthorized(format!("token request: {e}")))
        };
        let mut last: Option<Error> = None;
        for attempt in 1..=self.inner.retry.attempts {
            match self.raw(build()?).await {
                Ok(resp) if resp.status().is_success() => {
                    let body = read_body(resp.into_body(), 1 << 20)
                        .await
                        .map_err(|e| unauthorized(format!("token response: {e}")))?;
                    #[derive(serde::Deserialize)]
                    struct TokenResponse {
                        token: Option<String>,
                        access_token: Option<String>,
                    }
                    let t: TokenResponse = serde_json::from_slice(&body)
                        .map_err(|e| unauthorized(format!("token response is not JSON: {e}")))?;
                    return t
                        .token
                        .or(t.access_token)
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| unauthorized("token response holds no token".into()));
                }
                Ok(resp)
                    if resp.status().is_server_error()
                        || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
                {
                    last = Some(unauthorized(format!(
                        "token service answered {}",
                        resp.status()
                    )));
                }
                Ok(resp) => {
                    let status = resp.status();
                    let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                    return Err(unauthorized(format!(
                        "token service {realm} answered {status}: {}",
                        String::from_utf8_lossy(&body).trim()
                    )));
                }
                Err(e) => last = Some(unauthorized(format!("token service {realm}: {e}"))),
            }
            self.bump(|s| s.retries += 1);
            tokio::time::sleep(self.inner.retry.backoff(attempt)).await;
        }
        Err(last.unwrap_or_else(|| unauthorized("token service unreachable".into())))
    }
}

/// An OCI error body's first message, for messages.
pub fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| {
                format!(
                    "{} {}",
                    i.code.clone().unwrap_or_default(),
                    i.message.clone().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).chars().take(300).collect(),
    }
}

/// The digest a registry claims in `Docker-Content-Digest`, if it sent one.
pub fn content_digest(h: &HeaderMap) -> Option<std::result::Result<Digest, String>> {
    let v = h.get("docker-content-digest")?;
    Some(
        v.to_str()
            .map_err(|e| e.to_string())
            .and_then(|s| s.parse::<Digest>().map_err(|e| e.to_string())),
    )
}

/// Redirects a GET or HEAD follows, at most.
const MAX_REDIRECTS: usize = 10;

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// `(scheme, authority)` of an absolute URL, lower-cased.
fn origin(url: &str) -> Option<(String, String)> {
    let uri: http::Uri = url.parse().ok()?;
    Some((
        uri.scheme_str()?.to_ascii_lowercase(),
        uri.authority()?.as_str().to_ascii_lowercase(),
    ))
}

/// The absolute URL a `Location` header names, relative to the request's URL `base` (RFC 3986
/// section 5.2, for the forms servers send: absolute, `//authority/path`, `/path`, `path`);
/// `None` unless it is an http(s) URL with a host.
fn resolve_location(base: &str, location: &str) -> Option<String> {
    let to = if location.contains("://") {
        location.to_owned()
    } else {
        let uri: http::Uri = base.parse().ok()?;
        let (scheme, authority) = (uri.scheme_str()?, uri.authority()?);
        if let Some(rest) = location.strip_prefix("//") {
            format!("{scheme}://{rest}")
        } else if location.starts_with('/') {
            format!("{scheme}://{authority}{location}")
        } else {
            let dir = uri.path().rsplit_once('/').map_or("", |(d, _)| d);
            format!("{scheme}://{authority}{dir}/{location}")
        }
    };
    let uri: http::Uri = to.parse().ok()?;
    let web = matches!(uri.scheme_str(), Some("http" | "https"));
    (web && uri.authority().is_some()).then_some(to)
}

#[cfg(test)]
mod redirect_tests {
    use super::*;

    #[test]
    fn locations_resolve_against_the_request() {
        let base = "https://registry.example:5000/v2/app/blobs/sha256:ab?x=1";
        for (location, want) in [
            (
                "https://cdn.example/blobs/ab?sig=1",
                Some("https://cdn.example/blobs/ab?sig=1"),
            ),
            ("//cdn.example/b", Some("https://cdn.example/b")),
            (
                "/elsewhere/b?q",
                Some("https://registry.example:5000/elsewhere/b?q"),
            ),
            (
                "other",
                Some("https://registry.example:5000/v2/app/blobs/other"),
            ),
            ("ftp://cdn.example/b", None),
            ("https://", None),
            ("http://bad host/", None),
        ] {
            assert_eq!(
                resolve_location(base, location).as_deref(),
                want,
                "{location}"
            );
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let o = |u: &str| origin(u);
        assert_eq!(o("https://Reg.Example/v2/"), o("https://reg.example/x"));
        assert_ne!(o("https://reg.example/v2/"), o("http://reg.example/v2/"));
        assert_ne!(
            o("https://reg.example/v2/"),
            o("https://reg.example:444/v2/")
        );
        assert_ne!(o("https://reg.example/v2/"), o("https://cdn.example/v2/"));
    }

    proptest::proptest! {
        /// Whatever a registry puts in `Location`, resolving it never panics, and what comes
        /// out is an absolute http(s) URL with a host.
        #[test]
        fn any_location_resolves_to_a_web_url_or_nothing(location in ".{0,80}", path in "[a-z/:.]{0,20}") {
            let base = format!("https://registry.example/v2/{path}");
            if let Some(to) = resolve_location(&base, &location) {
                let uri: http::Uri = to.parse().unwrap();
                proptest::prop_assert!(matches!(uri.scheme_str(), Some("http" | "https")));
                proptest::prop_assert!(uri.host().is_some());
            }
        }
    }

    #[test]
    fn only_redirect_statuses_are_followed() {
        for code in [301, 302, 303, 307, 308] {
            assert!(is_redirect(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 206, 300, 304, 305, 400, 401, 404, 500] {
            assert!(!is_redirect(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}

#[cfg(test)]
mod scheme_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A registry over plain HTTP: a TLS attempt fails (after a moment, so that calls made
    /// together overlap it), a plain request is answered 200.
    struct PlainOnly {
        tls_attempts: Arc<AtomicUsize>,
    }

    impl Transport for PlainOnly {
        fn send(
            &self,
            req: Request<ReqBody>,
        ) -> crate::transport::BoxFuture<
            'static,
            std::result::Result<Response<RespBody>, crate::BoxError>,
        > {
            let tls = req.uri().scheme_str() == Some("https");
            let attempts = Arc::clone(&self.tls_attempts);
            Box::pin(async move {
                if tls {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    return Err("tls handshake: the server answered in plain HTTP".into());
                }
                let body = http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync();
                Ok(Response::new(body))
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_made_together_probe_an_insecure_host_once() {
        let tls_attempts = Arc::new(AtomicUsize::new(0));
        let transport = Arc::new(PlainOnly {
            tls_attempts: Arc::clone(&tls_attempts),
        });
        let tls = TlsOptions {
            insecure: ["reg.example:5000".to_owned()].into(),
            ..TlsOptions::default()
        };
        let client = Client::new(transport, CredentialStore::empty(), tls);
        let calls = (0..8).map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.scheme("reg.example:5000").await })
        });
        for s in futures_util::future::join_all(calls).await {
            assert_eq!(s.expect("task").expect("scheme"), "http");
        }
        assert_eq!(tls_attempts.load(Ordering::SeqCst), 1);
        // A host not named insecure is https without a probe.
        assert_eq!(
            client.scheme("other.example").await.expect("scheme"),
            "https"
        );
        assert_eq!(tls_attempts.load(Ordering::SeqCst), 1);
    }
}
