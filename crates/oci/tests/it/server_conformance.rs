//! The registry server (`bundle_oci::server`) against the areas of the OCI distribution-spec
//! conformance suite: pull (both backends), push, content discovery and content management,
//! then bad input, interrupted uploads and restarts of the filesystem store. The server runs
//! in-process on 127.0.0.1 and is spoken to over real HTTP: hyper's client for what a client
//! sends, a raw socket for what no well-behaved client does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use bundle_format::{Archive, BlobInput, BundleInput, Content, Digest, ImageInput, WriteOptions};
use bundle_oci::server::{ArchiveStore, Backend, FsStore, serve};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const SIGNATURE: &str = "application/vnd.example.signature.v1";
const SBOM: &str = "application/vnd.example.sbom.v1";

/// The repository holding the fixture's image, its index and two artifacts that refer to it.
const REPO: &str = "team/app";
/// A second repository: one manifest that names only the empty blob.
const OTHER: &str = "other/art";

/// How long any one socket read may take before a test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Fixture: one image, an index over it, two artifacts whose subject it is, and a second repo
// ---------------------------------------------------------------------------------------------

struct Fixture {
    config: Vec<u8>,
    layer: Vec<u8>,
    /// `{}`, the OCI empty descriptor's content.
    empty: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
    signature: Vec<u8>,
    sbom: Vec<u8>,
    other: Vec<u8>,
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": Digest::of(bytes).to_string(),
        "size": bytes.len(),
    })
}

fn to_json(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// An image manifest with `config` and `layers` (each a media type and content).
fn image_manifest(config: (&str, &[u8]), layers: &[(&str, &[u8])]) -> Vec<u8> {
    let layers: Vec<Value> = layers.iter().map(|(mt, b)| desc(mt, b)).collect();
    to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(config.0, config.1),
        "layers": layers,
    }))
}

/// An OCI 1.1 artifact of `artifact_type` about `subject`.
fn artifact(artifact_type: &str, subject: &[u8], empty: &[u8]) -> Vec<u8> {
    to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": desc(OCI_EMPTY, empty),
        "layers": [desc(OCI_EMPTY, empty)],
        "subject": desc(OCI_MANIFEST, subject),
        "annotations": { "org.example.kind": artifact_type },
    }))
}

impl Fixture {
    fn new() -> Fixture {
        let config = to_json(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [] },
        }));
        let layer = bundle_testimages::noise(1, 100_000);
        let empty = b"{}".to_vec();
        let manifest = image_manifest((OCI_CONFIG, &config), &[(OCI_LAYER, &layer)]);
        let mut child = desc(OCI_MANIFEST, &manifest);
        child["platform"] = json!({ "os": "linux", "architecture": "amd64" });
        let index = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [child],
        }));
        let signature = artifact(SIGNATURE, &manifest, &empty);
        let sbom = artifact(SBOM, &manifest, &empty);
        let other = image_manifest((OCI_EMPTY, &empty), &[]);
        Fixture {
            config,
            layer,
            empty,
            manifest,
            index,
            signature,
            sbom,
            other,
        }
    }

    /// Blobs by repository, in push order.
    fn blobs(&self) -> Vec<(&'static str, &[u8], &'static str)> {
        vec![
            (REPO, &self.config, OCI_CONFIG),
            (REPO, &self.layer, OCI_LAYER),
            (REPO, &self.empty, OCI_EMPTY),
            (OTHER, &self.empty, OCI_EMPTY),
        ]
    }

    /// Tagged manifests `(repository, tag, body, media type)`, children before parents.
    fn tagged(&self) -> Vec<(&'static str, &'static str, &[u8], &'static str)> {
        vec![
            (REPO, "1.0", &self.manifest, OCI_MANIFEST),
            (REPO, "multi", &self.index, OCI_INDEX),
            (REPO, "sig", &self.signature, OCI_MANIFEST),
            (REPO, "sbom", &self.sbom, OCI_MANIFEST),
            (OTHER, "1", &self.other, OCI_MANIFEST),
        ]
    }
}

/// The fixture as an archive, served read-only.
fn archive_backend(dir: &Path, f: &Fixture) -> Backend {
    let blob = |bytes: &[u8], media_type: &str| BlobInput {
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        media_type: Some(media_type.into()),
        content: Content::Bytes(Arc::from(bytes)),
    };
    let mut input = BundleInput {
        name: "conformance".into(),
        version: "1".into(),
        ..BundleInput::default()
    };
    for (_, bytes, media_type) in f.blobs() {
        input.blobs.push(blob(bytes, media_type));
    }
    for (repo, tag, bytes, media_type) in f.tagged() {
        input.blobs.push(blob(bytes, media_type));
        input.images.push(ImageInput {
            name: format!("registry.example/{repo}:{tag}"),
            digest: Digest::of(bytes),
            media_type: media_type.into(),
            size: bytes.len() as u64,
            platforms: vec!["linux/amd64".into()],
        });
    }
    let out = dir.join("conformance.bundle");
    let opts = WriteOptions {
        level: 1,
        split_size: None,
    };
    bundle_format::write(&input, &out, &opts).unwrap();
    Backend::Archive(ArchiveStore::new(Archive::open(&out).unwrap()).unwrap())
}

fn fs_backend(root: &Path) -> Backend {
    Backend::Fs(FsStore::open(root).unwrap())
}

/// Pushes the whole fixture over HTTP, the way a client would.
async fn push_fixture(c: &Http, f: &Fixture) {
    for (repo, bytes, _) in f.blobs() {
        c.push_blob(repo, bytes).await;
    }
    for (repo, tag, bytes, media_type) in f.tagged() {
        let r = c.put_manifest(repo, tag, Some(media_type), bytes).await;
        assert_eq!(r.status, StatusCode::CREATED, "{repo}:{tag}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Server and clients
// ---------------------------------------------------------------------------------------------

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), bundle_oci::server::Error>>,
}

impl Server {
    async fn start(backend: Backend) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(backend), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// A client that opens a connection per request: whether a connection outlives an error
    /// answer is `early_errors_keep_the_connection`'s business, not every test's.
    fn client(&self) -> Http {
        Http {
            base: format!("http://{}", self.addr),
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    /// Stops accepting and waits until `serve` has returned.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// A response, read whole.
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(400)]);
        write!(f, "{} {:?} {body}", self.status, self.headers)
    }
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header that must be there.
    #[track_caller]
    fn must(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// Checks an OCI error answer: `status`, a JSON body (unless HEAD) whose first error has
    /// one of `codes`.
    #[track_caller]
    fn expect_error(&self, head: bool, status: StatusCode, codes: &[&str]) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        if head {
            assert!(self.body.is_empty(), "HEAD with a body: {self:?}");
            return;
        }
        let v = self.json();
        let errors = v["errors"].as_array().expect("an errors array");
        assert!(!errors.is_empty(), "{self:?}");
        for e in errors {
            assert!(e["code"].is_string() && e["message"].is_string(), "{e}");
        }
        let code = errors[0]["code"].as_str().unwrap();
        assert!(
            codes.contains(&code),
            "code {code}, wanted {codes:?}: {self:?}"
        );
    }
}

/// A plain HTTP/1.1 client for one server.
struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn with_query(location: &str, query: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{query}")
}

impl Http {
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = tokio::time::timeout(IO_TIMEOUT, self.client.request(req))
            .await
            .expect("response in time")
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    async fn head(&self, path: &str) -> Resp {
        self.send(Method::HEAD, path, &[], Bytes::new()).await
    }

    async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, &[], Bytes::new()).await
    }

    /// `POST /v2/<repo>/blobs/uploads/`: the upload's location.
    async fn start_upload(&self, repo: &str) -> String {
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
        r.must("location").to_owned()
    }

    async fn patch(&self, location: &str, range: Option<(u64, u64)>, chunk: &[u8]) -> Resp {
        let range = range.map(|(a, b)| format!("{a}-{b}"));
        let mut h = vec![("content-type", "application/octet-stream")];
        if let Some(r) = &range {
            h.push(("content-range", r));
        }
        self.send(Method::PATCH, location, &h, chunk.to_vec()).await
    }

    async fn close(&self, location: &str, digest: &Digest, last: &[u8]) -> Resp {
        let url = with_query(location, &format!("digest={digest}"));
        let h = [("content-type", "application/octet-stream")];
        self.send(Method::PUT, &url, &h, last.to_vec()).await
    }

    /// Pushes `bytes` in one `POST ?digest=`.
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[("content-type", "application/octet-stream")],
                bytes.to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        d
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Resp {
        let h: Vec<(&str, &str)> = content_type
            .map(|t| ("content-type", t))
            .into_iter()
            .collect();
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.send(Method::PUT, &path, &h, body.to_vec()).await
    }
}

/// Sends `request` on a fresh connection and returns whatever comes back before the server
/// closes (empty when it closed or reset without answering). With `half_close`, the sending
/// side is shut after the request: the way to say "nothing more is coming" to a server that
/// waits for the rest of a head or body. (hyper answers nothing to a client that half-closes
/// while its request is being handled, so a complete request must not half-close.)
async fn raw(addr: SocketAddr, request: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it read everything: a failed write is fine.
    let _ = s.write_all(request).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf)).await {
            Err(_) => panic!("the server neither answered nor closed within {IO_TIMEOUT:?}"),
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one answer off a keep-alive connection into (status, head, body); `buf` keeps what
/// was read beyond it. `None` when the connection ends first.
async fn read_response(
    s: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> Option<(u16, String, Vec<u8>)> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let status = head.get(9..12)?.parse().ok()?;
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some((status, head, body));
            }
        }
        match tokio::time::timeout(IO_TIMEOUT, s.read(&mut chunk)).await {
            Err(_) => panic!("no answer within {IO_TIMEOUT:?}"),
            Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The status and body of a raw HTTP/1.1 answer with a `Content-Length`.
fn parse_raw(bytes: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, bytes[end + 4..].to_vec()))
}

/// The server still answers a plain request.
async fn assert_alive(c: &Http) {
    let r = c.get("/v2/").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

/// Every file under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// The store's invariant: every file under blobs/sha256 is named by its content's digest.
fn assert_blobs_verified(root: &Path) -> BTreeSet<String> {
    let dir = root.join("blobs/sha256");
    let mut names = BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(
            Digest::of(&bytes).hex(),
            name,
            "blob file {name} holds other content"
        );
        names.insert(name);
    }
    names
}

fn empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

// ---------------------------------------------------------------------------------------------
// 1. Pull
// ---------------------------------------------------------------------------------------------

enum Want {
    /// 200 with this manifest, served as this media type.
    Manifest(&'static str, Vec<u8>),
    /// This blob: whole (200) or the inclusive range (206).
    Blob(Vec<u8>, Option<(u64, u64)>),
    /// 416 with `Content-Range: bytes */SIZE`.
    Unsatisfiable(u64),
    /// An OCI error: status and the codes the spec allows.
    Error(StatusCode, &'static [&'static str]),
}

struct Case {
    what: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    want: Want,
}

fn case(what: &'static str, path: String, headers: &[(&'static str, &str)], want: Want) -> Case {
    Case {
        what,
        path,
        headers: headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        want,
    }
}

fn pull_cases(f: &Fixture) -> Vec<Case> {
    let m = Digest::of(&f.manifest);
    let ix = Digest::of(&f.index);
    let layer = Digest::of(&f.layer);
    let size = f.layer.len() as u64;
    let unknown = Digest::of(b"not in the registry");
    let man = |r: &str| format!("/v2/{REPO}/manifests/{r}");
    let blob = |d: &Digest| format!("/v2/{REPO}/blobs/{d}");
    let manifest = || Want::Manifest(OCI_MANIFEST, f.manifest.clone());
    let index = || Want::Manifest(OCI_INDEX, f.index.clone());
    let whole = |b: &[u8]| Want::Blob(b.to_vec(), None);
    let part = |a: u64, b: u64| Want::Blob(f.layer.clone(), Some((a, b)));
    let e404 = |codes| Want::Error(StatusCode::NOT_FOUND, codes);
    let oci_and_docker = format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.9");
    vec![
        case("manifest by tag", man("1.0"), &[], manifest()),
        case("manifest by digest", man(&m.to_string()), &[], manifest()),
        case(
            "index by tag",
            man("multi"),
            &[("accept", OCI_INDEX)],
            index(),
        ),
        case("index by digest", man(&ix.to_string()), &[], index()),
        case("Accept */*", man("1.0"), &[("accept", "*/*")], manifest()),
        case(
            "Accept list with parameters",
            man("1.0"),
            &[("accept", &oci_and_docker)],
            manifest(),
        ),
        case(
            "Accept lacks the index type",
            man("multi"),
            &[("accept", OCI_MANIFEST)],
            e404(&["MANIFEST_UNKNOWN"]),
        ),
        case(
            "Accept lacks the manifest type",
            man(&m.to_string()),
            &[("accept", DOCKER_MANIFEST)],
            e404(&["MANIFEST_UNKNOWN"]),
        ),
        case("unknown tag", man("nope"), &[], e404(&["MANIFEST_UNKNOWN"])),
        case(
            "unknown digest",
            man(&unknown.to_string()),
            &[],
            e404(&["MANIFEST_UNKNOWN"]),
        ),
        case(
            "manifest of another repository",
            format!("/v2/{OTHER}/manifests/{m}"),
            &[],
            e404(&["MANIFEST_UNKNOWN"]),
        ),
        // The spec allows either code; distribution answers MANIFEST_UNKNOWN, as FsStore does.
        case(
            "manifest of an unknown repository",
            "/v2/no/such/manifests/1.0".into(),
            &[],
            e404(&["NAME_UNKNOWN", "MANIFEST_UNKNOWN"]),
        ),
        case("layer", blob(&layer), &[], whole(&f.layer)),
        case(
            "config",
            blob(&Digest::of(&f.config)),
            &[],
            whole(&f.config),
        ),
        case(
            "range",
            blob(&layer),
            &[("range", "bytes=0-99")],
            part(0, 99),
        ),
        case(
            "range inside",
            blob(&layer),
            &[("range", "bytes=1000-1999")],
            part(1000, 1999),
        ),
        case(
            "open range",
            blob(&layer),
            &[("range", "bytes=99000-")],
            part(99_000, size - 1),
        ),
        case(
            "suffix range",
            blob(&layer),
            &[("range", "bytes=-500")],
            part(size - 500, size - 1),
        ),
        case(
            "last byte",
            blob(&layer),
            &[("range", &format!("bytes={}-", size - 1))],
            part(size - 1, size - 1),
        ),
        case(
            "range past the end is cut",
            blob(&layer),
            &[("range", &format!("bytes=10-{}", size + 100))],
            part(10, size - 1),
        ),
        case(
            "range starting at the end",
            blob(&layer),
            &[("range", &format!("bytes={size}-"))],
            Want::Unsatisfiable(size),
        ),
        case(
            "range starting past the end",
            blob(&layer),
            &[("range", &format!("bytes={}-{}", size + 10, size + 20))],
            Want::Unsatisfiable(size),
        ),
        case(
            "empty suffix",
            blob(&layer),
            &[("range", "bytes=-0")],
            Want::Unsatisfiable(size),
        ),
        case("unknown blob", blob(&unknown), &[], e404(&["BLOB_UNKNOWN"])),
        case(
            "blob of another repository",
            format!("/v2/{OTHER}/blobs/{layer}"),
            &[],
            e404(&["BLOB_UNKNOWN"]),
        ),
        case(
            "blob of an unknown repository",
            format!("/v2/no/such/blobs/{layer}"),
            &[],
            e404(&["BLOB_UNKNOWN", "NAME_UNKNOWN"]),
        ),
        case(
            "tags of an unknown repository",
            "/v2/no/such/tags/list".into(),
            &[],
            e404(&["NAME_UNKNOWN"]),
        ),
    ]
}

async fn check_pull(c: &Http, f: &Fixture) {
    for case in pull_cases(f) {
        for method in [Method::GET, Method::HEAD] {
            let head = method == Method::HEAD;
            let h: Vec<(&str, &str)> = case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = c.send(method.clone(), &case.path, &h, Bytes::new()).await;
            let what = format!("{method} {}: {}", case.what, case.path);
            match &case.want {
                Want::Manifest(media_type, body) => {
                    assert_eq!(r.status, StatusCode::OK, "{what}: {r:?}");
                    assert_eq!(r.header("content-type"), Some(*media_type), "{what}");
                    let d = Digest::of(body).to_string();
                    assert_eq!(
                        r.header("docker-content-digest"),
                        Some(d.as_str()),
                        "{what}"
                    );
                    assert_eq!(r.must("content-length"), body.len().to_string(), "{what}");
                    if head {
                        assert!(r.body.is_empty(), "{what}");
                    } else {
                        assert_eq!(Digest::of(&r.body).to_string(), d, "{what}");
                    }
                }
                Want::Blob(blob, range) => {
                    let (a, b) = range.unwrap_or((0, blob.len() as u64 - 1));
                    let want = &blob[a as usize..=b as usize];
                    let status = match range {
                        Some(_) => StatusCode::PARTIAL_CONTENT,
                        None => StatusCode::OK,
                    };
                    assert_eq!(r.status, status, "{what}: {r:?}");
                    let d = Digest::of(blob).to_string();
                    assert_eq!(
                        r.header("docker-content-digest"),
                        Some(d.as_str()),
                        "{what}"
                    );
                    assert_eq!(r.must("content-length"), want.len().to_string(), "{what}");
                    if range.is_some() {
                        let cr = format!("bytes {a}-{b}/{}", blob.len());
                        assert_eq!(r.header("content-range"), Some(cr.as_str()), "{what}");
                    }
                    if head {
                        assert!(r.body.is_empty(), "{what}");
                    } else {
                        assert!(r.body == want, "{what}: wrong bytes");
                    }
                }
                Want::Unsatisfiable(size) => {
                    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{what}: {r:?}");
                    let cr = format!("bytes */{size}");
                    assert_eq!(r.header("content-range"), Some(cr.as_str()), "{what}");
                }
                Want::Error(status, codes) => r.expect_error(head, *status, codes),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_archive() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(archive_backend(dir.path(), &f)).await;
    check_pull(&s.client(), &f).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_fs_store() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    push_fixture(&c, &f).await;
    check_pull(&c, &f).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Push (FsStore)
// ---------------------------------------------------------------------------------------------

/// Checks a 201 for `digest` in `repo` and that the blob reads back as `bytes`.
async fn assert_blob_created(c: &Http, r: &Resp, repo: &str, bytes: &[u8]) {
    let d = Digest::of(bytes);
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.must("location"), format!("/v2/{repo}/blobs/{d}"));
    assert_eq!(r.must("docker-content-digest"), d.to_string());
    let got = c.get(&format!("/v2/{repo}/blobs/{d}")).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert!(got.body == bytes, "blob {d} reads back other bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_blob_monolithic() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let blob = bundle_testimages::noise(2, 70_000);
    let d = Digest::of(&blob);

    // POST, then PUT ?digest= with the whole body.
    let r = c
        .send(
            Method::POST,
            "/v2/mono/put/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let location = r.must("location").to_owned();
    assert!(
        location.starts_with("/v2/mono/put/blobs/uploads/"),
        "{location}"
    );
    assert_eq!(r.must("range"), "0-0");
    assert!(r.header("docker-upload-uuid").is_some());
    let r = c.close(&location, &d, &blob).await;
    assert_blob_created(&c, &r, "mono/put", &blob).await;
    let h = c.head(&format!("/v2/mono/put/blobs/{d}")).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.must("content-length"), blob.len().to_string());
    // The session is over.
    let r = c.get(&location).await;
    r.expect_error(false, StatusCode::NOT_FOUND, &["BLOB_UPLOAD_UNKNOWN"]);

    // POST ?digest= in a single request, then the same with a digest the body does not have.
    let r = c
        .send(
            Method::POST,
            &format!("/v2/mono/post/blobs/uploads/?digest={d}"),
            &[("content-type", "application/octet-stream")],
            blob.clone(),
        )
        .await;
    assert_blob_created(&c, &r, "mono/post", &blob).await;
    let wrong = Digest::of(b"something else");
    let r = c
        .send(
            Method::POST,
            &format!("/v2/mono/post/blobs/uploads/?digest={wrong}"),
            &[],
            blob.clone(),
        )
        .await;
    r.expect_error(false, StatusCode::BAD_REQUEST, &["DIGEST_INVALID"]);
    let r = c.head(&format!("/v2/mono/post/blobs/{wrong}")).await;
    r.expect_error(true, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);

    // An empty blob is a blob too.
    let r = c
        .send(
            Method::POST,
            &format!("/v2/mono/post/blobs/uploads/?digest={}", Digest::of(b"")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_blob_created(&c, &r, "mono/post", b"").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_blob_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let blob = bundle_testimages::noise(3, 300_000);
    let d = Digest::of(&blob);
    // (what, the last chunk goes in the closing PUT)
    for (what, last_in_put) in [
        ("closing PUT with body", true),
        ("closing PUT empty", false),
    ] {
        let repo = if last_in_put {
            "chunked/a"
        } else {
            "chunked/b"
        };
        let location = c.start_upload(repo).await;
        for (i, chunk) in blob.chunks(100_000).enumerate() {
            let a = (i * 100_000) as u64;
            let b = a + chunk.len() as u64 - 1;
            if i == 2 && last_in_put {
                let r = c.close(&location, &d, chunk).await;
                assert_blob_created(&c, &r, repo, &blob).await;
                break;
            }
            let r = c.patch(&location, Some((a, b)), chunk).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{what} chunk {i}: {r:?}");
            assert_eq!(r.must("range"), format!("0-{b}"), "{what}");
            assert_eq!(r.must("location"), location, "{what}");
            let st = c.get(&location).await;
            assert_eq!(st.status, StatusCode::NO_CONTENT, "{what}: {st:?}");
            assert_eq!(st.must("range"), format!("0-{b}"), "{what}");
            assert_eq!(st.must("location"), location, "{what}");
            // Out of order: a gap, then a repeat of this very chunk. Neither changes anything.
            if i == 0 {
                for range in [(b + 1001, b + 2000), (a, b)] {
                    let r = c.patch(&location, Some(range), &chunk[..1000]).await;
                    r.expect_error(
                        false,
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        &["RANGE_INVALID", "BLOB_UPLOAD_INVALID"],
                    );
                    let st = c.get(&location).await;
                    assert_eq!(
                        st.must("range"),
                        format!("0-{b}"),
                        "{what}: after {range:?}"
                    );
                }
            }
        }
        if !last_in_put {
            let r = c.close(&location, &d, b"").await;
            assert_blob_created(&c, &r, repo, &blob).await;
        }
    }

    // A chunk without Content-Range is appended (docker's streamed upload).
    let location = c.start_upload("chunked/c").await;
    for chunk in blob.chunks(128 << 10) {
        let r = c.patch(&location, None, chunk).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    }
    let r = c.close(&location, &d, b"").await;
    assert_blob_created(&c, &r, "chunked/c", &blob).await;
    s.stop().await;
}

/// A closing PUT with the wrong digest: 400 DIGEST_INVALID, and nothing becomes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_wrong_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    let blob = bundle_testimages::noise(4, 50_000);
    let actual = Digest::of(&blob);
    let claimed = Digest::of(b"what the client thought it sent");
    let location = c.start_upload("wrong/digest").await;
    let r = c.patch(&location, Some((0, 49_999)), &blob).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = c.close(&location, &claimed, b"").await;
    r.expect_error(false, StatusCode::BAD_REQUEST, &["DIGEST_INVALID"]);
    for d in [actual, claimed] {
        let r = c.head(&format!("/v2/wrong/digest/blobs/{d}")).await;
        r.expect_error(true, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);
    }
    let names = assert_blobs_verified(&root);
    assert!(
        !names.contains(&actual.hex()) && !names.contains(&claimed.hex()),
        "{names:?}"
    );
    // The session is discarded with its data; a new one is needed.
    let r = c.get(&location).await;
    r.expect_error(false, StatusCode::NOT_FOUND, &["BLOB_UPLOAD_UNKNOWN"]);
    assert!(empty_dir(&root.join("uploads")));
    s.stop().await;
}

/// A chunk whose Content-Range and Content-Length disagree is refused whole (distribution
/// answers 416), rather than stored at the length that arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_chunk_whose_range_disagrees_with_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let blob = bundle_testimages::noise(5, 4000);

    // (Content-Range, body length): a body shorter, then longer, than its range.
    let mut accepted = Vec::new();
    for ((a, b), len) in [((0, 999), 500), ((0, 99), 500)] {
        let location = c.start_upload("length/range").await;
        let r = c.patch(&location, Some((a, b)), &blob[..len]).await;
        let st = c.get(&location).await;
        if r.status != StatusCode::RANGE_NOT_SATISFIABLE && r.status != StatusCode::BAD_REQUEST
            || st.must("range") != "0-0"
        {
            accepted.push(format!(
                "Content-Range {a}-{b} with {len} bytes: {}, upload now Range {}",
                r.status,
                st.must("range")
            ));
        }
    }
    assert!(
        accepted.is_empty(),
        "chunks stored at a length their range does not give: {accepted:#?}"
    );
    s.stop().await;
}

/// Content-Length 1000, then 500 bytes and the end of the stream: refused (or the connection
/// closed), and the upload holds what did arrive, so the client can go on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_truncated_chunk_keeps_what_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let blob = bundle_testimages::noise(5, 4000);
    let location = c.start_upload("length/short").await;
    let mut req = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\n\
        Content-Range: 0-999\r\nContent-Length: 1000\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&blob[..500]);
    let answer = raw(s.addr, &req, true).await;
    if let Some((status, _)) = parse_raw(&answer) {
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    }
    let st = c.get(&location).await;
    assert_eq!(st.must("range"), "0-499");
    let r = c.patch(&location, Some((500, 3999)), &blob[500..]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = c.close(&location, &Digest::of(&blob), b"").await;
    assert_blob_created(&c, &r, "length/short", &blob).await;
    s.stop().await;
}

/// A single `POST ?digest=` that fails hands the client no upload to resume or cancel, so the
/// server must not keep one: its data would stay in ROOT/uploads for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_single_post_leaves_no_upload_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let d = Digest::of(b"hello world");
    let post = format!("POST /v2/single/post/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\n");
    // (what, rest of the request); each is answered 400 on an open connection.
    let cases = [
        ("wrong digest", "Content-Length: 5\r\n\r\nhello".to_owned()),
        // A chunked body that breaks after its first chunk.
        (
            "body breaks off",
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_owned(),
        ),
    ];
    let mut left = Vec::new();
    for (what, rest) in cases {
        let answer = raw(
            s.addr,
            format!("{post}Connection: close\r\n{rest}").as_bytes(),
            false,
        )
        .await;
        let (status, _) = parse_raw(&answer).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&answer));
        if !empty_dir(&root.join("uploads")) {
            left.push((what, tree(&root.join("uploads"))));
            let _ = std::fs::remove_dir_all(root.join("uploads"));
            std::fs::create_dir(root.join("uploads")).unwrap();
        }
    }
    assert!(
        left.is_empty(),
        "failed single POSTs left uploads behind: {left:?}"
    );
    assert!(assert_blobs_verified(&root).is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_cross_repository_mount() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let blob = bundle_testimages::noise(6, 10_000);
    let d = c.push_blob("mount/source", &blob).await;
    let other = c.push_blob("mount/elsewhere", b"elsewhere").await;
    let unknown = Digest::of(b"never pushed");
    let mount = |repo: &str, digest: &Digest, from: Option<&str>| {
        let q = match from {
            Some(f) => format!("mount={digest}&from={f}"),
            None => format!("mount={digest}"),
        };
        format!("/v2/{repo}/blobs/uploads/?{q}")
    };
    // (what, target, blob, from, mounted)
    let cases: Vec<(&str, &str, Digest, Option<&str>, bool)> = vec![
        (
            "from the repository that has it",
            "mount/a",
            d,
            Some("mount/source"),
            true,
        ),
        ("without from (OCI 1.1)", "mount/b", d, None, true),
        (
            "of an unknown blob",
            "mount/c",
            unknown,
            Some("mount/source"),
            false,
        ),
        (
            "of an unknown blob, no from",
            "mount/c",
            unknown,
            None,
            false,
        ),
        (
            "from a repository that lacks it",
            "mount/d",
            other,
            Some("mount/source"),
            false,
        ),
        (
            "from an unknown repository",
            "mount/d",
            d,
            Some("no/such"),
            false,
        ),
    ];
    for (what, repo, digest, from, mounted) in cases {
        let r = c
            .send(Method::POST, &mount(repo, &digest, from), &[], Bytes::new())
            .await;
        let path = format!("/v2/{repo}/blobs/{digest}");
        if mounted {
            assert_eq!(r.status, StatusCode::CREATED, "{what}: {r:?}");
            assert_eq!(r.must("location"), path, "{what}");
            assert_eq!(
                r.must("docker-content-digest"),
                digest.to_string(),
                "{what}"
            );
            let got = c.get(&path).await;
            assert!(
                got.status == StatusCode::OK && got.body == blob,
                "{what}: {got:?}"
            );
        } else {
            // Falls back to an upload session, which works like any other.
            assert_eq!(r.status, StatusCode::ACCEPTED, "{what}: {r:?}");
            let location = r.must("location").to_owned();
            let st = c.get(&location).await;
            assert_eq!(st.status, StatusCode::NO_CONTENT, "{what}: {st:?}");
            let r = c.head(&path).await;
            r.expect_error(true, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);
            let r = c.delete(&location).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{what}: {r:?}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let f = Fixture::new();
    for (repo, bytes, _) in f.blobs() {
        c.push_blob(repo, bytes).await;
    }
    let m = Digest::of(&f.manifest);
    // By tag, then by digest, then the same manifest under a second tag: each 201.
    for reference in ["1.0".to_owned(), m.to_string(), "latest".to_owned()] {
        let r = c
            .put_manifest(REPO, &reference, Some(OCI_MANIFEST), &f.manifest)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{reference}: {r:?}");
        assert_eq!(r.must("location"), format!("/v2/{REPO}/manifests/{m}"));
        assert_eq!(r.must("docker-content-digest"), m.to_string());
        assert!(r.header("oci-subject").is_none());
        let got = c.get(&format!("/v2/{REPO}/manifests/{reference}")).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert!(got.body == f.manifest);
    }
    // An index by digest; no Content-Type needed when the body says its mediaType.
    let ix = Digest::of(&f.index);
    let r = c.put_manifest(REPO, &ix.to_string(), None, &f.index).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let got = c.get(&format!("/v2/{REPO}/manifests/{ix}")).await;
    assert_eq!(got.must("content-type"), OCI_INDEX);
    // A tag moves to the manifest pushed last.
    let r = c
        .put_manifest(REPO, "latest", Some(OCI_INDEX), &f.index)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let got = c.head(&format!("/v2/{REPO}/manifests/latest")).await;
    assert_eq!(got.must("docker-content-digest"), ix.to_string());
    s.stop().await;
}

/// (what, repository, reference, Content-Type, body, status, code)
type BadManifest<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    StatusCode,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_bad_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    let f = Fixture::new();
    for (repo, bytes, _) in f.blobs() {
        c.push_blob(repo, bytes).await;
    }
    let missing = b"a layer nobody pushed".to_vec();
    let names_missing = image_manifest((OCI_CONFIG, &f.config), &[(OCI_LAYER, &missing)]);
    let missing_config = image_manifest((OCI_CONFIG, &missing), &[(OCI_LAYER, &f.layer)]);
    // The layer is in REPO, not in OTHER.
    let names_foreign = image_manifest((OCI_EMPTY, &f.empty), &[(OCI_LAYER, &f.layer)]);
    // f.index names f.manifest, which this registry has not seen yet.
    let mut v1: Value = serde_json::from_slice(&f.manifest).unwrap();
    v1["schemaVersion"] = json!(1);
    let big = {
        let pad = "x".repeat(4 << 20);
        let mut v: Value = serde_json::from_slice(&f.manifest).unwrap();
        v["annotations"] = json!({ "pad": pad });
        to_json(&v)
    };
    let untyped = to_json(&json!({
        "schemaVersion": 2,
        "config": desc(OCI_CONFIG, &f.config),
        "layers": [],
    }));
    let other_digest = Digest::of(b"another body").to_string();
    let bad = StatusCode::BAD_REQUEST;
    let cases: Vec<BadManifest> = vec![
        (
            "names a missing layer",
            REPO,
            "t",
            Some(OCI_MANIFEST),
            names_missing,
            bad,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "names a missing config",
            REPO,
            "t",
            Some(OCI_MANIFEST),
            missing_config,
            bad,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "names a blob of another repository",
            OTHER,
            "t",
            Some(OCI_MANIFEST),
            names_foreign,
            bad,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "index names a missing manifest",
            REPO,
            "t",
            Some(OCI_INDEX),
            f.index.clone(),
            bad,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "not JSON",
            REPO,
            "t",
            Some(OCI_MANIFEST),
            b"{\"schemaVersion\": 2,".to_vec(),
            bad,
            "MANIFEST_INVALID",
        ),
        (
            "mediaType differs from Content-Type",
            REPO,
            "t",
            Some(OCI_INDEX),
            f.manifest.clone(),
            bad,
            "MANIFEST_INVALID",
        ),
        (
            "no media type at all",
            REPO,
            "t",
            None,
            untyped,
            bad,
            "MANIFEST_INVALID",
        ),
        (
            "not a manifest type",
            REPO,
            "t",
            Some("text/plain"),
            br#"{"schemaVersion":2}"#.to_vec(),
            bad,
            "MANIFEST_INVALID",
        ),
        (
            "schemaVersion 1",
            REPO,
            "t",
            Some(OCI_MANIFEST),
            to_json(&v1),
            bad,
            "MANIFEST_INVALID",
        ),
        (
            "by a digest the body does not have",
            REPO,
            &other_digest,
            Some(OCI_MANIFEST),
            f.manifest.clone(),
            bad,
            "DIGEST_INVALID",
        ),
        (
            "larger than 4 MiB",
            REPO,
            "t",
            Some(OCI_MANIFEST),
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "SIZE_INVALID",
        ),
    ];
    for (what, repo, reference, content_type, body, status, code) in cases {
        let r = c.put_manifest(repo, reference, content_type, &body).await;
        assert_eq!(r.status, status, "{what}: {r:?}");
        r.expect_error(false, status, &[code]);
        // Nothing was stored under the reference or the body's digest.
        for reference in [reference.to_owned(), Digest::of(&body).to_string()] {
            let got = c.head(&format!("/v2/{repo}/manifests/{reference}")).await;
            assert_eq!(
                got.status,
                StatusCode::NOT_FOUND,
                "{what}: {reference}: {got:?}"
            );
        }
    }
    assert_alive(&c).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_cancel_and_foreign_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    let blob = b"some bytes".to_vec();
    let d = Digest::of(&blob);

    let location = c.start_upload("cancel/me").await;
    let r = c.patch(&location, Some((0, 9)), &blob).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = c.delete(&location).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let gone = [
        c.get(&location).await,
        c.patch(&location, None, &blob).await,
        c.close(&location, &d, b"").await,
        c.delete(&location).await,
    ];
    for r in gone {
        r.expect_error(false, StatusCode::NOT_FOUND, &["BLOB_UPLOAD_UNKNOWN"]);
    }
    assert!(empty_dir(&root.join("uploads")));

    // An upload of one repository cannot be used, read or cancelled through another.
    let location = c.start_upload("owner/repo").await;
    let id = location.rsplit('/').next().unwrap().to_owned();
    let foreign = format!("/v2/thief/repo/blobs/uploads/{id}");
    let refused = [
        c.get(&foreign).await,
        c.patch(&foreign, Some((0, 9)), &blob).await,
        c.close(&foreign, &d, &blob).await,
        c.delete(&foreign).await,
        c.get("/v2/owner/repo/blobs/uploads/0000000000000000-00000000")
            .await,
    ];
    for r in refused {
        r.expect_error(false, StatusCode::NOT_FOUND, &["BLOB_UPLOAD_UNKNOWN"]);
    }
    let st = c.get(&location).await;
    assert_eq!(st.status, StatusCode::NO_CONTENT, "{st:?}");
    assert_eq!(
        st.must("range"),
        "0-0",
        "the foreign requests changed the upload"
    );
    let r = c.close(&location, &d, &blob).await;
    assert_blob_created(&c, &r, "owner/repo", &blob).await;
    let r = c.head(&format!("/v2/thief/repo/blobs/{d}")).await;
    r.expect_error(true, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Content discovery
// ---------------------------------------------------------------------------------------------

/// Follows `Link: <...>; rel="next"` from `first`, returning the pages.
async fn pages(c: &Http, first: &str, key: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(url) = next.take() {
        let r = c.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let items: Vec<String> = r.json()[key]
            .as_array()
            .unwrap_or_else(|| panic!("{url}: no {key}: {r:?}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        out.push(items);
        if let Some(link) = r.header("link") {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            let target = link.split_once('<').unwrap().1.split_once('>').unwrap().0;
            next = Some(target.to_owned());
        }
        assert!(out.len() < 20, "{first}: the Link chain does not end");
    }
    out
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// What both backends list for the fixture.
async fn check_listings(c: &Http, f: &Fixture) {
    let r = c.get(&format!("/v2/{REPO}/tags/list")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        r.json(),
        json!({ "name": REPO, "tags": ["1.0", "multi", "sbom", "sig"] })
    );
    assert!(r.header("link").is_none());
    let r = c.get("/v2/_catalog").await;
    assert_eq!(r.json(), json!({ "repositories": [OTHER, REPO] }));

    // Referrers: both artifacts, with their artifactType; filtered; of an unknown subject.
    let m = Digest::of(&f.manifest);
    let url = format!("/v2/{REPO}/referrers/{m}");
    let r = c.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert!(r.header("oci-filters-applied").is_none());
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let mut got: Vec<(String, String)> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["mediaType"], OCI_MANIFEST, "{d}");
            let digest: Digest = d["digest"].as_str().unwrap().parse().unwrap();
            let body = if digest == Digest::of(&f.signature) {
                &f.signature
            } else {
                &f.sbom
            };
            assert_eq!(d["size"], body.len(), "{d}");
            assert_eq!(
                d["annotations"]["org.example.kind"], d["artifactType"],
                "{d}"
            );
            (
                d["artifactType"].as_str().unwrap().to_owned(),
                d["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    let want = vec![
        (SBOM.to_owned(), Digest::of(&f.sbom).to_string()),
        (SIGNATURE.to_owned(), Digest::of(&f.signature).to_string()),
    ];
    assert_eq!(got, want);
    for (artifact_type, body) in [(SIGNATURE, &f.signature), (SBOM, &f.sbom)] {
        let r = c.get(&format!("{url}?artifactType={artifact_type}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
        let list = r.json()["manifests"].as_array().unwrap().clone();
        assert_eq!(list.len(), 1, "{artifact_type}: {list:?}");
        assert_eq!(list[0]["digest"], Digest::of(body).to_string());
    }
    let r = c
        .get(&format!("{url}?artifactType=application/vnd.none"))
        .await;
    assert_eq!(r.json()["manifests"], json!([]));
    for subject in [Digest::of(&f.index), Digest::of(b"unknown")] {
        let r = c.get(&format!("/v2/{REPO}/referrers/{subject}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        let v = r.json();
        assert_eq!(
            (&v["mediaType"], &v["manifests"]),
            (&json!(OCI_INDEX), &json!([]))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_on_archive() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(archive_backend(dir.path(), &f)).await;
    let c = s.client();
    check_listings(&c, &f).await;
    assert_eq!(
        pages(&c, &format!("/v2/{REPO}/tags/list?n=3"), "tags").await,
        vec![strings(&["1.0", "multi", "sbom"]), strings(&["sig"])]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_on_fs_store() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    push_fixture(&c, &f).await;
    // The subject header of a referrer push.
    let r = c
        .put_manifest(REPO, "sig", Some(OCI_MANIFEST), &f.signature)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(
        r.header("oci-subject"),
        Some(Digest::of(&f.manifest).to_string().as_str())
    );
    check_listings(&c, &f).await;

    // Referrers without artifactType: a manifest is listed under its config's media type, an
    // index without one.
    let legacy_config = "application/vnd.example.legacy.config.v1+json";
    let legacy = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(legacy_config, &f.empty),
        "layers": [],
        "subject": desc(OCI_INDEX, &f.index),
    }));
    let index_referrer = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_MANIFEST, &f.manifest)],
        "subject": desc(OCI_INDEX, &f.index),
        "annotations": { "org.example.note": "an index" },
    }));
    for (body, media_type) in [(&legacy, OCI_MANIFEST), (&index_referrer, OCI_INDEX)] {
        let d = Digest::of(body).to_string();
        let r = c.put_manifest(REPO, &d, Some(media_type), body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(
            r.header("oci-subject"),
            Some(Digest::of(&f.index).to_string().as_str())
        );
    }
    let r = c
        .get(&format!("/v2/{REPO}/referrers/{}", Digest::of(&f.index)))
        .await;
    let mut got = r.json()["manifests"].as_array().unwrap().clone();
    got.sort_by_key(|d| d["mediaType"].as_str().unwrap().to_owned());
    assert_eq!(
        got,
        vec![
            json!({
                "mediaType": OCI_INDEX,
                "digest": Digest::of(&index_referrer).to_string(),
                "size": index_referrer.len(),
                "annotations": { "org.example.note": "an index" },
            }),
            json!({
                "mediaType": OCI_MANIFEST,
                "digest": Digest::of(&legacy).to_string(),
                "size": legacy.len(),
                "artifactType": legacy_config,
            }),
        ]
    );

    // Tags pushed out of order, listed sorted, paged with n and last.
    for tag in ["e", "b", "a", "d", "c"] {
        let r = c
            .put_manifest(OTHER, tag, Some(OCI_MANIFEST), &f.other)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    let tags = format!("/v2/{OTHER}/tags/list");
    // (query, pages following Link)
    let cases: Vec<(&str, Vec<Vec<String>>)> = vec![
        ("", vec![strings(&["1", "a", "b", "c", "d", "e"])]),
        (
            "?n=2",
            vec![
                strings(&["1", "a"]),
                strings(&["b", "c"]),
                strings(&["d", "e"]),
            ],
        ),
        (
            "?n=4",
            vec![strings(&["1", "a", "b", "c"]), strings(&["d", "e"])],
        ),
        ("?n=6", vec![strings(&["1", "a", "b", "c", "d", "e"])]),
        ("?n=100", vec![strings(&["1", "a", "b", "c", "d", "e"])]),
        ("?last=b", vec![strings(&["c", "d", "e"])]),
        (
            "?n=2&last=a",
            vec![strings(&["b", "c"]), strings(&["d", "e"])],
        ),
        ("?n=2&last=bb", vec![strings(&["c", "d"]), strings(&["e"])]),
        ("?last=e", vec![vec![]]),
        ("?n=0", vec![vec![]]),
        ("?n=0&last=a", vec![vec![]]),
    ];
    for (query, want) in cases {
        assert_eq!(
            pages(&c, &format!("{tags}{query}"), "tags").await,
            want,
            "{query}"
        );
    }
    let r = c.get(&format!("{tags}?n=2")).await;
    assert_eq!(
        r.header("link"),
        Some(format!("</v2/{OTHER}/tags/list?n=2&last=a>; rel=\"next\"").as_str())
    );

    // The catalog likewise.
    for repo in ["zz/last", "aa", "mm/nested/deep"] {
        c.push_blob(repo, &f.empty).await;
        let r = c
            .put_manifest(repo, "1", Some(OCI_MANIFEST), &f.other)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    // A repository with blobs but no manifest is not listed.
    c.push_blob("blobs/only", &f.empty).await;
    let all = strings(&["aa", "mm/nested/deep", OTHER, REPO, "zz/last"]);
    assert_eq!(
        pages(&c, "/v2/_catalog", "repositories").await,
        vec![all.clone()]
    );
    assert_eq!(
        pages(&c, "/v2/_catalog?n=2", "repositories").await,
        vec![all[..2].to_vec(), all[2..4].to_vec(), all[4..].to_vec()]
    );
    assert_eq!(
        pages(&c, "/v2/_catalog?n=10&last=mm/nested/deep", "repositories").await,
        vec![all[2..].to_vec()]
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Content management
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_tags_manifests_and_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    push_fixture(&c, &f).await;
    let r = c
        .put_manifest(REPO, "latest", Some(OCI_MANIFEST), &f.manifest)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let man = |r: &str| format!("/v2/{REPO}/manifests/{r}");
    let (m, sig, layer) = (
        Digest::of(&f.manifest),
        Digest::of(&f.signature),
        Digest::of(&f.layer),
    );

    // A tag: gone, the manifest stays.
    let r = c.delete(&man("sbom")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    c.get(&man("sbom"))
        .await
        .expect_error(false, StatusCode::NOT_FOUND, &["MANIFEST_UNKNOWN"]);
    let r = c.get(&man(&Digest::of(&f.sbom).to_string())).await;
    assert_eq!(r.status, StatusCode::OK);

    // A manifest by digest: gone, and so are both tags that pointed at it.
    let r = c.delete(&man(&m.to_string())).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    for reference in [m.to_string(), "1.0".into(), "latest".into()] {
        let r = c.get(&man(&reference)).await;
        r.expect_error(false, StatusCode::NOT_FOUND, &["MANIFEST_UNKNOWN"]);
    }
    let r = c.get(&format!("/v2/{REPO}/tags/list")).await;
    assert_eq!(r.json()["tags"], json!(["multi", "sig"]));

    // A referrer deleted by digest leaves the referrers list.
    let r = c.delete(&man(&sig.to_string())).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = c.get(&format!("/v2/{REPO}/referrers/{m}")).await;
    let listed: Vec<Value> = r.json()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["artifactType"].clone())
        .collect();
    assert_eq!(listed, vec![json!(SBOM)]);

    // A blob: 202, then unknown; other repositories keep theirs.
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    let r = c.delete(&blob).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    c.head(&blob)
        .await
        .expect_error(true, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);
    c.get(&blob)
        .await
        .expect_error(false, StatusCode::NOT_FOUND, &["BLOB_UNKNOWN"]);
    let r = c
        .head(&format!("/v2/{OTHER}/blobs/{}", Digest::of(&f.empty)))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // What is not there cannot be deleted.
    let unknown = Digest::of(b"unknown");
    let cases = [
        (man("nope"), "MANIFEST_UNKNOWN"),
        (man(&unknown.to_string()), "MANIFEST_UNKNOWN"),
        (man(&m.to_string()), "MANIFEST_UNKNOWN"),
        (blob.clone(), "BLOB_UNKNOWN"),
        (format!("/v2/{REPO}/blobs/{unknown}"), "BLOB_UNKNOWN"),
    ];
    for (path, code) in cases {
        let r = c.delete(&path).await;
        r.expect_error(false, StatusCode::NOT_FOUND, &[code]);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(archive_backend(dir.path(), &f)).await;
    let c = s.client();
    let m = Digest::of(&f.manifest);
    let layer = Digest::of(&f.layer);
    let upload = format!("/v2/{REPO}/blobs/uploads/0123456789abcdef-00000000");
    // (method, path, body)
    let cases: Vec<(Method, String, Vec<u8>)> = vec![
        (Method::DELETE, format!("/v2/{REPO}/manifests/1.0"), vec![]),
        (Method::DELETE, format!("/v2/{REPO}/manifests/{m}"), vec![]),
        (Method::DELETE, format!("/v2/{REPO}/blobs/{layer}"), vec![]),
        (
            Method::PUT,
            format!("/v2/{REPO}/manifests/1.0"),
            f.manifest.clone(),
        ),
        (
            Method::PUT,
            format!("/v2/{REPO}/manifests/{m}"),
            f.manifest.clone(),
        ),
        (Method::PUT, format!("/v2/{REPO}/blobs/{layer}"), vec![]),
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/"), vec![]),
        (
            Method::POST,
            format!("/v2/{REPO}/blobs/uploads/?digest={layer}"),
            f.layer.clone(),
        ),
        (
            Method::POST,
            format!("/v2/new/repo/blobs/uploads/?mount={layer}&from={REPO}"),
            vec![],
        ),
        (Method::PATCH, upload.clone(), b"chunk".to_vec()),
        (Method::PUT, format!("{upload}?digest={layer}"), vec![]),
        (Method::GET, upload.clone(), vec![]),
        (Method::DELETE, upload, vec![]),
        (Method::PATCH, format!("/v2/{REPO}/manifests/1.0"), vec![]),
        (Method::POST, "/v2/_catalog".into(), vec![]),
        (Method::DELETE, format!("/v2/{REPO}/tags/list"), vec![]),
    ];
    for (method, path, body) in cases {
        let r = c.send(method.clone(), &path, &[], body).await;
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {r:?}"
        );
        r.expect_error(false, StatusCode::METHOD_NOT_ALLOWED, &["UNSUPPORTED"]);
    }
    let r = c.get(&format!("/v2/{REPO}/manifests/1.0")).await;
    assert!(r.status == StatusCode::OK && r.body == f.manifest);
    let r = c.head(&format!("/v2/{REPO}/blobs/{layer}")).await;
    assert_eq!(r.status, StatusCode::OK);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Bad input and robustness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_cannot_leave_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    let f = Fixture::new();
    push_fixture(&c, &f).await;
    let escape = format!("bundle-conformance-escape-{}", std::process::id());
    let escape_path = std::env::temp_dir().join(&escape);
    let before = tree(dir.path());
    let d = Digest::of(&f.layer);
    let up = "../../../../../..";
    let names = [
        "..".to_owned(),
        "../x".to_owned(),
        format!("{up}/tmp/{escape}"),
        "%2e%2e".to_owned(),
        "%2e%2e/%2e%2e/x".to_owned(),
        "team/../../x".to_owned(),
        "a//b".to_owned(),
        "/a".to_owned(),
        "a/".to_owned(),
        "Team/App".to_owned(),
        ".hidden".to_owned(),
        "a/_manifests".to_owned(),
        "a%2fb".to_owned(),
        "a%20b".to_owned(),
        "a%00b".to_owned(),
        "x".repeat(256),
    ];
    let mut paths: Vec<(&str, String)> = Vec::new();
    for n in &names {
        paths.push(("GET", format!("/v2/{n}/manifests/1.0")));
        paths.push(("PUT", format!("/v2/{n}/manifests/1.0")));
        paths.push(("POST", format!("/v2/{n}/blobs/uploads/")));
        paths.push(("POST", format!("/v2/{n}/blobs/uploads/?digest={d}")));
        paths.push(("GET", format!("/v2/{n}/blobs/{d}")));
        paths.push(("DELETE", format!("/v2/{n}/blobs/{d}")));
        paths.push(("GET", format!("/v2/{n}/tags/list")));
        // A query value is percent-decoded: `from=a%2fb` names the valid `a/b`.
        if n != "a%2fb" {
            paths.push((
                "POST",
                format!("/v2/{REPO}/blobs/uploads/?mount={d}&from={n}"),
            ));
        }
    }
    // Bad references, digests and upload ids in a good repository.
    for r in [
        "..",
        "%2e%2e",
        "..%2f..%2fx",
        ".x",
        "-x",
        "a%2fb",
        &"t".repeat(129),
    ] {
        paths.push(("GET", format!("/v2/{REPO}/manifests/{r}")));
        paths.push(("PUT", format!("/v2/{REPO}/manifests/{r}")));
        paths.push(("DELETE", format!("/v2/{REPO}/manifests/{r}")));
        paths.push(("GET", format!("/v2/{REPO}/blobs/uploads/{r}")));
        paths.push(("PATCH", format!("/v2/{REPO}/blobs/uploads/{r}")));
    }
    for digest in [
        "sha256:..%2f..%2fx",
        "sha256:../../x",
        "sha256:abc",
        "md5:00",
        "sha256",
    ] {
        paths.push(("GET", format!("/v2/{REPO}/blobs/{digest}")));
        paths.push(("GET", format!("/v2/{REPO}/manifests/{digest}")));
        paths.push(("POST", format!("/v2/{REPO}/blobs/uploads/?digest={digest}")));
        paths.push(("GET", format!("/v2/{REPO}/referrers/{digest}")));
    }
    for (method, path) in &paths {
        // No body: these are refused before one is read (see `early_errors_keep_the_connection`).
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
            Content-Type: {OCI_MANIFEST}\r\nContent-Length: 0\r\n\r\n"
        );
        let answer = raw(s.addr, req.as_bytes(), false).await;
        let text = String::from_utf8_lossy(&answer);
        let (status, body) =
            parse_raw(&answer).unwrap_or_else(|| panic!("{method} {path}: {text}"));
        assert!(matches!(status, 400 | 404), "{method} {path}: {text}");
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
        assert!(
            v["errors"][0]["code"].is_string(),
            "{method} {path}: {text}"
        );
    }
    assert_eq!(
        tree(dir.path()),
        before,
        "a bad name changed the filesystem"
    );
    assert!(
        !escape_path.exists(),
        "{} was created",
        escape_path.display()
    );
    assert_alive(&c).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(fs_backend(dir.path())).await;
    let c = s.client();
    // A request head of `lines`, then `body`.
    let head =
        |lines: &[&str], body: &str| format!("{}\r\n\r\n{body}", lines.join("\r\n")).into_bytes();
    let big_header = format!("X-Big: {}", "a".repeat(1 << 20));
    let many_headers: Vec<String> = (0..200).map(|i| format!("X-H{i}: v")).collect();
    let mut many: Vec<&str> = vec!["GET /v2/ HTTP/1.1", "Host: x"];
    many.extend(many_headers.iter().map(String::as_str));
    let long_target = format!("GET /v2/{}/tags/list HTTP/1.1", "a/".repeat(512 << 10));
    let put = "PUT /v2/a/manifests/t HTTP/1.1";
    // (what, request); the server answers 4xx or closes, and then serves the next client.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage line", head(&["GARBAGE"], "")),
        (
            "binary",
            vec![0, 1, 2, 0xff, 0xfe, 0x80, b'\r', b'\n', b'\r', b'\n'],
        ),
        ("no version", head(&["GET /v2/"], "")),
        ("HTTP/7.0", head(&["GET /v2/ HTTP/7.0", "Host: x"], "")),
        ("no target", head(&["GET  HTTP/1.1", "Host: x"], "")),
        (
            "bad header line",
            head(&["GET /v2/ HTTP/1.1", "Host: x", "no colon"], ""),
        ),
        (
            "non-UTF-8 target",
            b"GET /v2/\xff\xfe/manifests/a HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "bad Content-Length",
            head(&[put, "Host: x", "Content-Length: abc"], ""),
        ),
        (
            "two Content-Lengths",
            head(
                &[put, "Host: x", "Content-Length: 2", "Content-Length: 3"],
                "{}",
            ),
        ),
        (
            "unknown Transfer-Encoding",
            head(
                &[
                    "POST /v2/a/blobs/uploads/ HTTP/1.1",
                    "Host: x",
                    "Transfer-Encoding: gzip",
                ],
                "",
            ),
        ),
        (
            "bad chunked body",
            head(&[put, "Host: x", "Transfer-Encoding: chunked"], "zz\r\n"),
        ),
        (
            "head never ends",
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n".to_vec(),
        ),
        (
            "huge header",
            head(&["GET /v2/ HTTP/1.1", "Host: x", &big_header], ""),
        ),
        ("too many headers", head(&many, "")),
        ("huge target", head(&[&long_target, "Host: x"], "")),
    ];
    for (what, req) in cases {
        // The one that waits for more bytes learns from the half-close that none will come.
        let half_close = what == "head never ends";
        let answer = raw(s.addr, &req, half_close).await;
        if !answer.is_empty() {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
            let (status, _) = parse_raw(&answer).unwrap_or_else(|| panic!("{what}: {text}"));
            assert!((400..500).contains(&status), "{what}: {text}");
        }
        assert_alive(&c).await;
    }
    s.stop().await;
}

/// An error answered before the request body was read (a write to an archive, an out-of-order
/// chunk, an unknown upload, a bad name, an oversized manifest) must leave the connection
/// usable or say `Connection: close`. Clients keep connections alive; one that the server
/// closes after an answer that did not say so fails the client's next request (hyper's client
/// reports IncompleteMessage, Go's net/http "server closed idle connection" or EOF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_errors_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let archive = Server::start(archive_backend(dir.path(), &f)).await;
    let fs = Server::start(fs_backend(&dir.path().join("root"))).await;
    let c = fs.client();
    let location = c.start_upload("early/err").await;
    let body = bundle_testimages::noise(13, 1 << 20);
    let big_manifest = {
        let mut v: Value = serde_json::from_slice(&f.manifest).unwrap();
        v["annotations"] = json!({ "pad": "x".repeat(5 << 20) });
        to_json(&v)
    };
    let d = Digest::of(&body);
    let unknown_upload = "/v2/early/err/blobs/uploads/0000000000000000-00000000";
    // (what, server, request line and headers, body, status)
    let cases: Vec<(&str, SocketAddr, String, &[u8], u16)> = vec![
        (
            "write to an archive",
            archive.addr,
            format!("POST /v2/{REPO}/blobs/uploads/?digest={d}"),
            &body,
            405,
        ),
        (
            "out-of-order chunk",
            fs.addr,
            format!("PATCH {location}\r\nContent-Range: 7-{}", body.len() + 6),
            &body,
            416,
        ),
        (
            "chunk for an unknown upload",
            fs.addr,
            format!("PATCH {unknown_upload}"),
            &body,
            404,
        ),
        (
            "bad repository name",
            fs.addr,
            "PUT /v2/Bad/Name/manifests/1".into(),
            &body,
            400,
        ),
        (
            "manifest over 4 MiB",
            fs.addr,
            "PUT /v2/early/err/manifests/1".into(),
            &big_manifest,
            413,
        ),
    ];
    let mut broken = Vec::new();
    for (what, addr, line, body, status) in cases {
        let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
        let (line, rest) = line
            .split_once("\r\n")
            .map_or((line.as_str(), None), |(a, b)| (a, Some(b)));
        let mut req = format!("{line} HTTP/1.1\r\nHost: x\r\n");
        if let Some(h) = rest {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut req = req.into_bytes();
        req.extend_from_slice(body);
        // The body is sent while the answer is read: the server may answer before it is all in.
        let writer = tokio::spawn(async move {
            let ok = wr.write_all(&req).await.is_ok();
            (wr, ok)
        });
        let mut buf = Vec::new();
        let (got, head, _) = read_response(&mut rd, &mut buf)
            .await
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(got, status, "{what}: {head}");
        if head.lines().any(|l| l == "connection: close") {
            continue;
        }
        let (mut wr, sent) = tokio::time::timeout(IO_TIMEOUT, writer)
            .await
            .unwrap_or_else(|_| panic!("{what}: the server neither reads the body nor closes"))
            .unwrap();
        let next = if sent {
            let _ = wr.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
            read_response(&mut rd, &mut buf).await
        } else {
            None
        };
        if next.map(|(status, _, _)| status) != Some(200) {
            broken.push(what);
        }
    }
    assert!(
        broken.is_empty(),
        "the server answered without Connection: close, then closed the connection instead of \
         serving the next request on it: {broken:?}"
    );
    archive.stop().await;
    fs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_page_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let s = Server::start(archive_backend(dir.path(), &f)).await;
    let c = s.client();
    for base in ["/v2/_catalog".to_owned(), format!("/v2/{REPO}/tags/list")] {
        for n in ["abc", "-1", "1.5", "0x10", "99999999999999999999", "10001"] {
            let r = c.get(&format!("{base}?n={n}")).await;
            r.expect_error(
                false,
                StatusCode::BAD_REQUEST,
                &["PAGINATION_NUMBER_INVALID"],
            );
        }
        let r = c.get(&format!("{base}?n=%zz")).await;
        assert_eq!(r.status.as_u16() / 100, 4, "{r:?}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_blob() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = Arc::new(s.client());
    let blob = Arc::new(bundle_testimages::noise(8, 512 << 10));
    let d = Digest::of(&blob);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (c, blob) = (c.clone(), blob.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let location = c.start_upload("same/blob").await;
                    for (k, chunk) in blob.chunks(128 << 10).enumerate() {
                        let a = (k * (128 << 10)) as u64;
                        let r = c
                            .patch(&location, Some((a, a + chunk.len() as u64 - 1)), chunk)
                            .await;
                        assert_eq!(r.status, StatusCode::ACCEPTED, "task {i}: {r:?}");
                    }
                    c.close(&location, &d, b"").await
                } else {
                    let url = format!("/v2/same/blob/blobs/uploads/?digest={d}");
                    c.send(Method::POST, &url, &[], blob.to_vec()).await
                }
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "task {i}: {r:?}");
    }
    let r = c.get(&format!("/v2/same/blob/blobs/{d}")).await;
    assert!(r.status == StatusCode::OK && r.body == blob[..], "{r:?}");
    assert_eq!(assert_blobs_verified(&root), BTreeSet::from([d.hex()]));
    assert!(empty_dir(&root.join("uploads")));
    assert!(empty_dir(&root.join("tmp")));
    s.stop().await;
}

/// A PATCH announcing 1 MiB whose client vanishes after 100 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_upload_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    let blob = bundle_testimages::noise(9, 1 << 20);
    let sent = 100 << 10;
    let location = c.start_upload("resume/me").await;
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
            Content-Range: 0-{}\r\nContent-Length: {}\r\n\r\n",
        blob.len() - 1,
        blob.len()
    );
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&blob[..sent]).await.unwrap();
    // Close the sending side and wait for the server to finish with the request: it answers
    // 400 or just closes.
    conn.shutdown().await.unwrap();
    let answer = read_to_close(&mut conn).await;
    if let Some((status, _)) = parse_raw(&answer) {
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    }
    drop(conn);
    assert_alive(&c).await;

    let st = c.get(&location).await;
    assert_eq!(st.status, StatusCode::NO_CONTENT, "{st:?}");
    assert_eq!(st.must("range"), format!("0-{}", sent - 1));
    let r = c
        .patch(
            &location,
            Some((sent as u64, blob.len() as u64 - 1)),
            &blob[sent..],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = c.close(&location, &Digest::of(&blob), b"").await;
    assert_blob_created(&c, &r, "resume/me", &blob).await;
    assert_blobs_verified(&root);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Restart safety (FsStore)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_content_and_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let f = Fixture::new();
    let good = bundle_testimages::noise(10, 200_000);
    let bad = bundle_testimages::noise(11, 200_000);

    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    push_fixture(&c, &f).await;
    let mut uploads = Vec::new();
    for blob in [&good, &bad] {
        let location = c.start_upload("restart/up").await;
        let r = c.patch(&location, Some((0, 69_999)), &blob[..70_000]).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
        uploads.push(location);
    }
    drop(c);
    s.stop().await;

    // A crash leaves temp files behind; opening the store removes them.
    std::fs::write(root.join("tmp/leftover"), b"half a manifest").unwrap();
    let s = Server::start(fs_backend(&root)).await;
    assert!(
        empty_dir(&root.join("tmp")),
        "leftover temp files survived the restart"
    );
    let c = s.client();
    check_pull(&c, &f).await;
    check_listings(&c, &f).await;

    // Both uploads resume at their offset; the store hashes what it kept.
    for (location, blob) in uploads.iter().zip([&good, &bad]) {
        let st = c.get(location).await;
        assert_eq!(st.status, StatusCode::NO_CONTENT, "{st:?}");
        assert_eq!(st.must("range"), "0-69999");
        let r = c
            .patch(location, Some((70_000, 149_999)), &blob[70_000..150_000])
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    }
    let r = c
        .close(&uploads[0], &Digest::of(&good), &good[150_000..])
        .await;
    assert_blob_created(&c, &r, "restart/up", &good).await;
    // The other is closed with the digest of a different content: refused after re-hashing.
    let r = c
        .close(&uploads[1], &Digest::of(&good[..150_000]), &bad[150_000..])
        .await;
    r.expect_error(false, StatusCode::BAD_REQUEST, &["DIGEST_INVALID"]);
    let names = assert_blobs_verified(&root);
    assert!(!names.contains(&Digest::of(&bad).hex()));
    s.stop().await;
}

/// Upload data stays out of blobs/sha256 until its digest was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_file_appears_only_after_its_digest_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let s = Server::start(fs_backend(&root)).await;
    let c = s.client();
    let blob = bundle_testimages::noise(12, 64 << 10);
    let d = Digest::of(&blob);
    let blob_file = root.join("blobs/sha256").join(d.hex());
    // (closing digest, whether the file may appear)
    for (digest, ok) in [(Digest::of(b"wrong"), false), (d, true)] {
        let location = c.start_upload("visible/late").await;
        let r = c
            .patch(&location, Some((0, blob.len() as u64 - 1)), &blob)
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
        // All bytes arrived, none are visible.
        assert!(!blob_file.exists());
        assert!(assert_blobs_verified(&root).is_empty());
        let r = c.close(&location, &digest, b"").await;
        if ok {
            assert_blob_created(&c, &r, "visible/late", &blob).await;
            assert_eq!(std::fs::read(&blob_file).unwrap(), blob);
        } else {
            r.expect_error(false, StatusCode::BAD_REQUEST, &["DIGEST_INVALID"]);
            assert!(!blob_file.exists());
            assert!(!root.join("blobs/sha256").join(digest.hex()).exists());
        }
        assert_blobs_verified(&root);
        assert!(empty_dir(&root.join("uploads")));
        assert!(empty_dir(&root.join("tmp")));
    }
    s.stop().await;
}

/// More parallel blob streams than the archive store has frame buffers
/// (`archive::OUT_BUFFERS`): every stream completes with the right bytes (streams wait for
/// buffers, none deadlocks), and streams whose client walks away mid-blob give their buffers
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_streams_than_frame_buffers() {
    use bundle_oci::server::archive::OUT_BUFFERS;
    let dir = tempfile::tempdir().unwrap();
    let layer = bundle_testimages::noise(7, 3 * (1 << 20) + 12_345);
    let config = to_json(&json!({ "architecture": "amd64", "os": "linux" }));
    let manifest = image_manifest((OCI_CONFIG, &config), &[(OCI_LAYER, &layer)]);
    let blob = |bytes: &[u8], media_type: &str| BlobInput {
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        media_type: Some(media_type.into()),
        content: Content::Bytes(Arc::from(bytes)),
    };
    let input = BundleInput {
        name: "streams".into(),
        version: "1".into(),
        blobs: vec![
            blob(&config, OCI_CONFIG),
            blob(&layer, OCI_LAYER),
            blob(&manifest, OCI_MANIFEST),
        ],
        images: vec![ImageInput {
            name: "registry.example/big/layer:1".into(),
            digest: Digest::of(&manifest),
            media_type: OCI_MANIFEST.into(),
            size: manifest.len() as u64,
            platforms: vec!["linux/amd64".into()],
        }],
        ..BundleInput::default()
    };
    let out = dir.path().join("streams.bundle");
    let opts = WriteOptions {
        level: 1,
        split_size: None,
    };
    bundle_format::write(&input, &out, &opts).unwrap();
    let backend = Backend::Archive(ArchiveStore::new(Archive::open(&out).unwrap()).unwrap());
    let server = Server::start(backend).await;
    let path = format!("/v2/big/layer/blobs/{}", Digest::of(&layer));
    let want = Digest::of(&layer);
    let streams = OUT_BUFFERS * 2 + 5;
    for round in 0..2 {
        // Clients that read a little and walk away, holding buffers until they go.
        let mut quitters = Vec::new();
        for _ in 0..OUT_BUFFERS {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut first = [0u8; 4096];
            let _ = s.read(&mut first).await.unwrap();
            quitters.push(s);
        }
        drop(quitters);
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let c = server.client();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let r = c.send(Method::GET, &path, &[], Bytes::new()).await;
                (r.status, Digest::of(&r.body))
            }));
        }
        for t in tasks {
            let (status, got) = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("every stream finishes")
                .unwrap();
            assert_eq!(status, StatusCode::OK, "round {round}");
            assert_eq!(got, want, "round {round}");
        }
    }
    server.stop().await;
}
