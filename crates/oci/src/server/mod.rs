//! The registry side of the distribution protocol: one HTTP/1.1 front end ([`serve`]) over
//! two stores, an archive served read-only ([`ArchiveStore`]: `bundle serve`, the agent's
//! `inject` mode) and a read-write registry on a filesystem ([`FsStore`]: the agent's
//! `registry` mode). Requests are parsed into checked [`route::Route`]s first; every failure
//! answers with a status and an OCI error body, and a bad request never stops the server.

pub mod archive;
pub mod error;
pub mod fs;
pub mod http_io;
pub mod route;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use bundle_format::Digest;

pub use archive::ArchiveStore;
pub use error::{ApiError, Code, Error};
pub use fs::FsStore;
pub use http_io::Body;
use route::{Page, Ref, Route};

use crate::manifest::{Doc, OCI_INDEX};

/// A manifest as a store returns it.
pub struct ManifestHit {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub body: Bytes,
}

/// Where a store streams a blob: `ready` waits until the next chunk can be taken (false: the
/// client went away), so that a store reads ahead by one chunk at most; `send` hands it over.
pub trait BlobSink {
    /// Waits for room for one more chunk.
    fn ready(&mut self) -> bool;
    /// Hands over a chunk; false when the client went away.
    fn send(&mut self, chunk: Bytes) -> bool;
}

/// A [`BlobSink`] into the channel a response body reads from.
struct ChannelSink {
    tx: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    permit: Option<mpsc::OwnedPermit<Result<Bytes, std::io::Error>>>,
    rt: tokio::runtime::Handle,
}

impl BlobSink for ChannelSink {
    fn ready(&mut self) -> bool {
        if self.permit.is_none() {
            let Some(tx) = self.tx.take() else {
                return false;
            };
            self.permit = self.rt.block_on(tx.reserve_owned()).ok();
        }
        self.permit.is_some()
    }

    fn send(&mut self, chunk: Bytes) -> bool {
        match self.permit.take() {
            Some(p) => {
                self.tx = Some(p.send(Ok(chunk)));
                true
            }
            None => false,
        }
    }
}

/// A sorted list of repository names or tags.
pub type Listing = Vec<String>;

/// What the server serves.
#[allow(clippy::large_enum_variant, reason = "one per server")]
pub enum Backend {
    /// An archive, read-only.
    Archive(ArchiveStore),
    /// A directory, read-write.
    Fs(FsStore),
}

/// The descriptor of a referrer, as listed by the referrers API.
pub(crate) fn referrer_descriptor(
    doc: &Doc,
    media_type: &str,
    digest: Digest,
    size: u64,
) -> serde_json::Value {
    let artifact_type = doc
        .artifact_type
        .clone()
        .or_else(|| doc.config.as_ref().and_then(|c| c.media_type.clone()));
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": size,
    });
    if let Some(a) = artifact_type {
        d["artifactType"] = a.into();
    }
    if let Some(a) = &doc.annotations {
        d["annotations"] = serde_json::to_value(a).unwrap_or_default();
    }
    d
}

impl Backend {
    fn fs(&self) -> Result<&FsStore, ApiError> {
        match self {
            Backend::Fs(s) => Ok(s),
            Backend::Archive(_) => Err(ApiError::new(
                Code::Unsupported,
                "this registry is read-only: it serves an archive",
            )),
        }
    }

    fn manifest(&self, name: &str, r: &Ref) -> Result<ManifestHit, ApiError> {
        match self {
            Backend::Archive(s) => s.manifest(name, r),
            Backend::Fs(s) => s.manifest(name, r),
        }
    }

    fn blob_size(&self, name: &str, d: &Digest) -> Result<u64, ApiError> {
        match self {
            Backend::Archive(s) => s.blob_size(name, d),
            Backend::Fs(s) => s.blob_size(name, d),
        }
    }

    fn stream_blob(
        &self,
        d: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn BlobSink,
    ) -> Result<(), Error> {
        match self {
            Backend::Archive(s) => s.stream_blob(d, offset, len, sink),
            Backend::Fs(s) => s.stream_blob(d, offset, len, sink),
        }
    }

    fn tags(&self, name: &str) -> Result<Listing, ApiError> {
        match self {
            Backend::Archive(s) => s.tags(name),
            Backend::Fs(s) => s.tags(name),
        }
    }

    fn catalog(&self) -> Result<Listing, ApiError> {
        match self {
            Backend::Archive(s) => Ok(s.catalog()),
            Backend::Fs(s) => Ok(s.catalog()?),
        }
    }

    fn referrers(&self, name: &str, d: &Digest) -> Result<Vec<serde_json::Value>, ApiError> {
        match self {
            Backend::Archive(s) => s.referrers(name, d),
            Backend::Fs(s) => s.referrers(name, d),
        }
    }
}

/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `backend` on `listener` until `shutdown` resolves. Connection errors (a client
/// that goes away, a malformed request line) end that connection only.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<Backend>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return Ok(()),
            p = limit.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { return Ok(()) };
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let backend = backend.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(backend, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

/// Answers one request.
pub async fn handle(backend: Arc<Backend>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    // An error may be answered before the body is read; the connection cannot be reused then.
    let has_body = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let result = match route::parse(parts.uri.path(), parts.uri.query()) {
        Ok(r) => dispatch(backend, &method, &parts.headers, r, body).await,
        Err(e) => Err(e),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                eprintln!("{method} {}: {e}", parts.uri);
            }
            let mut r = error_response(&method, &e);
            if has_body {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

fn error_response(method: &Method, e: &ApiError) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    let mut r = Response::new(if method == Method::HEAD {
        Body::empty()
    } else {
        Body::full(body)
    });
    *r.status_mut() = e.status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

type Answer = Result<Response<Body>, ApiError>;

fn respond(status: StatusCode, headers: &[(&'static str, String)], body: Body) -> Answer {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        let v = HeaderValue::from_str(v).map_err(|_| {
            ApiError::new(Code::Internal, format!("header {k}: value is not valid"))
        })?;
        r.headers_mut().insert(*k, v);
    }
    Ok(r)
}

fn json(status: StatusCode, v: &serde_json::Value, extra: &[(&'static str, String)]) -> Answer {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut h = vec![
        ("content-type", "application/json".to_owned()),
        ("content-length", body.len().to_string()),
    ];
    h.extend_from_slice(extra);
    respond(status, &h, Body::full(body))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(Code::Internal, format!("worker failed: {e}")))?
}

fn not_allowed(method: &Method, what: &str) -> ApiError {
    ApiError::new(
        Code::Unsupported,
        format!("{method} is not allowed on {what}"),
    )
}

async fn dispatch(
    backend: Arc<Backend>,
    method: &Method,
    headers: &HeaderMap,
    route: Route,
    body: Incoming,
) -> Answer {
    let read = method == Method::GET || method == Method::HEAD;
    match route {
        Route::Base | Route::Health if read => json(StatusCode::OK, &serde_json::json!({}), &[]),
        Route::Base | Route::Health => Err(not_allowed(method, "/v2/")),
        Route::Catalog(page) if read => {
            let b = backend.clone();
            let all = blocking(move || b.catalog()).await?;
            let (items, link) = paginate(all, &page, "/v2/_catalog");
            json(
                StatusCode::OK,
                &serde_json::json!({ "repositories": items }),
                &link,
            )
        }
        Route::Catalog(_) => Err(not_allowed(method, "the catalog")),
        Route::Tags { name, page } if read => {
            let b = backend.clone();
            let n = name.clone();
            let all = blocking(move || b.tags(&n)).await?;
            let (items, link) = paginate(all, &page, &format!("/v2/{name}/tags/list"));
            json(
                StatusCode::OK,
                &serde_json::json!({ "name": name, "tags": items }),
                &link,
            )
        }
        Route::Tags { .. } => Err(not_allowed(method, "a tag list")),
        Route::Manifest { name, reference } => {
            manifest(backend, method, headers, name, reference, body).await
        }
        Route::Blob { name, digest } => blob(backend, method, headers, name, digest).await,
        Route::UploadStart {
            name,
            digest,
            mount,
        } => {
            if method != Method::POST {
                return Err(not_allowed(method, "an upload start"));
            }
            backend.fs()?;
            upload_start(backend, headers, name, digest, mount, body).await
        }
        Route::Upload { name, id, digest } => {
            backend.fs()?;
            upload(backend, method, headers, name, id, digest, body).await
        }
        Route::Referrers {
            name,
            digest,
            artifact_type,
        } if read => {
            let b = backend.clone();
            let mut list = blocking(move || b.referrers(&name, &digest)).await?;
            let mut extra = Vec::new();
            if let Some(a) = &artifact_type {
                list.retain(|d| d["artifactType"].as_str() == Some(a));
                extra.push(("oci-filters-applied", "artifactType".to_owned()));
            }
            let v = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": list,
            });
            let body = serde_json::to_vec(&v).unwrap_or_default();
            extra.push(("content-type", OCI_INDEX.to_owned()));
            extra.push(("content-length", body.len().to_string()));
            respond(StatusCode::OK, &extra, Body::full(body))
        }
        Route::Referrers { .. } => Err(not_allowed(method, "referrers")),
    }
}

/// Applies `?n=&last=`; adds a `Link` header when more entries follow.
fn paginate(all: Listing, page: &Page, base: &str) -> (Listing, Vec<(&'static str, String)>) {
    let start = match &page.last {
        Some(l) => all.partition_point(|x| x <= l),
        None => 0,
    };
    let rest = &all[start..];
    let n = page.n.unwrap_or(rest.len());
    let items: Listing = rest.iter().take(n).cloned().collect();
    let mut link = Vec::new();
    if rest.len() > n
        && let Some(last) = items.last()
    {
        link.push(("link", format!("<{base}?n={n}&last={last}>; rel=\"next\"")));
    }
    (items, link)
}

/// Whether the client's `Accept` headers allow `media_type` (no header allows anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == "*/*" || t == "application/*" || t.eq_ignore_ascii_case(media_type) {
                return true;
            }
        }
    }
    !any
}

async fn manifest(
    backend: Arc<Backend>,
    method: &Method,
    headers: &HeaderMap,
    name: String,
    reference: Ref,
    body: Incoming,
) -> Answer {
    match *method {
        Method::GET | Method::HEAD => {
            let b = backend.clone();
            let (n, r) = (name.clone(), reference.clone());
            let hit = blocking(move || b.manifest(&n, &r)).await?;
            if !accepts(headers, &hit.media_type) {
                return Err(ApiError::new(
                    Code::ManifestUnknown,
                    format!(
                        "{name}:{reference} is a {}, which the request's Accept header does not list",
                        hit.media_type
                    ),
                ));
            }
            let h = [
                ("content-type", hit.media_type.clone()),
                ("docker-content-digest", hit.digest.to_string()),
                ("etag", format!("\"{}\"", hit.digest)),
                ("content-length", hit.body.len().to_string()),
            ];
            let body = if *method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(hit.body)
            };
            respond(StatusCode::OK, &h, body)
        }
        Method::PUT => {
            backend.fs()?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
                .filter(|s| !s.is_empty());
            let bytes = http_io::collect_limited(body, fs::MAX_MANIFEST).await?;
            let b = backend.clone();
            let (n, r) = (name.clone(), reference.clone());
            let (digest, subject) = blocking(move || {
                b.fs()?
                    .put_manifest(&n, &r, content_type.as_deref(), &bytes)
            })
            .await?;
            let mut h = vec![
                ("location", format!("/v2/{name}/manifests/{digest}")),
                ("docker-content-digest", digest.to_string()),
                ("content-length", "0".to_owned()),
            ];
            if let Some(s) = subject {
                h.push(("oci-subject", s.to_string()));
            }
            respond(StatusCode::CREATED, &h, Body::empty())
        }
        Method::DELETE => {
            backend.fs()?;
            let b = backend.clone();
            blocking(move || b.fs()?.delete_manifest(&name, &reference)).await?;
            respond(
                StatusCode::ACCEPTED,
                &[("content-length", "0".to_owned())],
                Body::empty(),
            )
        }
        _ => Err(not_allowed(method, "a manifest")),
    }
}

async fn blob(
    backend: Arc<Backend>,
    method: &Method,
    headers: &HeaderMap,
    name: String,
    digest: Digest,
) -> Answer {
    match *method {
        Method::GET | Method::HEAD => {
            let b = backend.clone();
            let n = name.clone();
            let size = blocking(move || b.blob_size(&n, &digest)).await?;
            let range = match http_io::parse_range(headers, size) {
                Ok(r) => r,
                Err(http_io::Unsatisfiable) => {
                    return respond(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        &[
                            ("content-range", format!("bytes */{size}")),
                            ("content-length", "0".to_owned()),
                        ],
                        Body::empty(),
                    );
                }
            };
            let (status, offset, len) = match range {
                Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
                None => (StatusCode::OK, 0, size),
            };
            let mut h = vec![
                ("content-type", "application/octet-stream".to_owned()),
                ("docker-content-digest", digest.to_string()),
                ("etag", format!("\"{digest}\"")),
                ("accept-ranges", "bytes".to_owned()),
                ("content-length", len.to_string()),
            ];
            if status == StatusCode::PARTIAL_CONTENT {
                h.push((
                    "content-range",
                    format!("bytes {offset}-{}/{size}", offset + len - 1),
                ));
            }
            if *method == Method::HEAD || len == 0 {
                return respond(status, &h, Body::empty());
            }
            // One chunk (up to a frame) queued while the next is read: memory per stream stays at
            // about two frames, which matters with dozens of parallel layer pulls.
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
            let b = backend.clone();
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut sink = ChannelSink {
                    tx: Some(tx),
                    permit: None,
                    rt,
                };
                if let Err(e) = b.stream_blob(&digest, offset, len, &mut sink) {
                    eprintln!("GET blob {digest} of {name}: {e}");
                    if sink.ready() {
                        let err = std::io::Error::other(e.to_string());
                        if let Some(p) = sink.permit.take() {
                            p.send(Err(err));
                        }
                    }
                }
            });
            respond(status, &h, Body::stream(rx))
        }
        Method::DELETE => {
            backend.fs()?;
            let b = backend.clone();
            blocking(move || b.fs()?.delete_blob(&name, &digest)).await?;
            respond(
                StatusCode::ACCEPTED,
                &[("content-length", "0".to_owned())],
                Body::empty(),
            )
        }
        _ => Err(not_allowed(method, "a blob")),
    }
}

fn upload_headers(name: &str, id: &str, size: u64) -> Vec<(&'static str, String)> {
    vec![
        ("location", format!("/v2/{name}/blobs/uploads/{id}")),
        ("range", format!("0-{}", size.saturating_sub(1))),
        ("docker-upload-uuid", id.to_owned()),
        ("content-length", "0".to_owned()),
    ]
}

fn created_blob(name: &str, digest: &Digest) -> Answer {
    respond(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{digest}")),
            ("docker-content-digest", digest.to_string()),
            ("content-length", "0".to_owned()),
        ],
        Body::empty(),
    )
}

async fn upload_start(
    backend: Arc<Backend>,
    headers: &HeaderMap,
    name: String,
    digest: Option<Digest>,
    mount: Option<(Digest, Option<String>)>,
    body: Incoming,
) -> Answer {
    if let Some((d, from)) = mount {
        let b = backend.clone();
        let n = name.clone();
        if blocking(move || b.fs()?.mount(&n, &d, from.as_deref())).await? {
            return created_blob(&name, &d);
        }
    }
    let b = backend.clone();
    let n = name.clone();
    let id = blocking(move || Ok(b.fs()?.start_upload(&n)?)).await?;
    match digest {
        Some(d) => {
            let r = write_upload(backend.clone(), headers, &name, &id, None, Some(d), body).await;
            if r.is_err() {
                // The client never learnt this upload's id: nothing could resume it.
                backend.fs()?.discard(&id);
            }
            r.and_then(|_| created_blob(&name, &d))
        }
        None => respond(
            StatusCode::ACCEPTED,
            &upload_headers(&name, &id, 0),
            Body::empty(),
        ),
    }
}

async fn upload(
    backend: Arc<Backend>,
    method: &Method,
    headers: &HeaderMap,
    name: String,
    id: String,
    digest: Option<Digest>,
    body: Incoming,
) -> Answer {
    let fs = backend.fs()?;
    match *method {
        Method::GET => {
            let lock = fs.upload(&name, &id)?;
            let size = FsStore::upload_size(&*lock.lock().await);
            let mut h = upload_headers(&name, &id, size);
            h.retain(|(k, _)| *k != "content-length");
            h.push(("content-length", "0".to_owned()));
            respond(StatusCode::NO_CONTENT, &h, Body::empty())
        }
        Method::PATCH => {
            let range = match headers.get(header::CONTENT_RANGE) {
                None => None,
                Some(v) => Some(http_io::parse_content_range(v).ok_or_else(|| {
                    ApiError::new(
                        Code::RangeInvalid,
                        format!("upload {id}: Content-Range {v:?} is not START-END"),
                    )
                })?),
            };
            let size = write_upload(backend, headers, &name, &id, range, None, body).await?;
            respond(
                StatusCode::ACCEPTED,
                &upload_headers(&name, &id, size),
                Body::empty(),
            )
        }
        Method::PUT => {
            let Some(d) = digest else {
                return Err(ApiError::new(
                    Code::DigestInvalid,
                    format!("upload {id}: the closing PUT needs ?digest="),
                ));
            };
            write_upload(backend, headers, &name, &id, None, Some(d), body).await?;
            created_blob(&name, &d)
        }
        Method::DELETE => {
            fs.upload(&name, &id)?;
            fs.discard(&id);
            respond(
                StatusCode::NO_CONTENT,
                &[("content-length", "0".to_owned())],
                Body::empty(),
            )
        }
        _ => Err(not_allowed(method, "an upload")),
    }
}

/// Streams a request body into an upload (on a blocking thread that writes and hashes), then
/// closes it against `finish` when given. Returns the upload's size.
async fn write_upload(
    backend: Arc<Backend>,
    headers: &HeaderMap,
    name: &str,
    id: &str,
    range: Option<(u64, u64)>,
    finish: Option<Digest>,
    body: Incoming,
) -> Result<u64, ApiError> {
    let fs = backend.fs()?;
    let lock = fs.upload(name, id)?;
    let mut guard = lock.lock_owned().await;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, String>>(16);
    let b = backend.clone();
    let (n, i) = (name.to_owned(), id.to_owned());
    let writer = tokio::task::spawn_blocking(move || {
        let fs = b.fs()?;
        let before = FsStore::upload_size(&guard);
        fs.append(&i, &mut guard, range.map(|r| r.0), &mut rx)?;
        let got = FsStore::upload_size(&guard) - before;
        // A chunk that is not what its headers say leaves the upload as it was.
        if let Some((a, z)) = range
            && got != z - a + 1
        {
            fs.rollback(&i, &mut guard, before)?;
            return Err(ApiError::new(
                Code::RangeInvalid,
                format!(
                    "upload {i}: Content-Range {a}-{z} is {} bytes, the body {got}",
                    z - a + 1
                ),
            ));
        }
        if let Some(want) = declared
            && got != want
        {
            fs.rollback(&i, &mut guard, before)?;
            return Err(ApiError::new(
                Code::SizeInvalid,
                format!("upload {i}: Content-Length {want}, body {got} bytes"),
            ));
        }
        if let Some(d) = finish {
            fs.finish(&n, &i, &mut guard, &d)?;
        }
        Ok(FsStore::upload_size(&guard))
    });
    http_io::pump(body, tx).await;
    writer
        .await
        .map_err(|e| ApiError::new(Code::Internal, format!("upload {id}: writer failed: {e}")))?
}
