//! Test archives (the small image set, with or without an agent image built from fake static
//! ELF files) and an in-process registry that deploy's push reaches through a transport that
//! rewrites every request's host, standing in for the port-forward tunnel.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bundle_format::{Archive, BundleInput, Digest, WriteOptions};
use bundle_oci::server::{Backend, FsStore};
use bundle_oci::transport::{BoxFuture, ReqBody, RespBody};
use bundle_oci::{BoxError, Direct, TlsOptions, Transport};
use http::{Request, Response, Uri};
use http_body_util::BodyExt as _;

/// Errors of test code.
pub type BoxResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The name of the agent image `build_agent_image` makes for version 0.1.0.
pub const AGENT_NAME: &str = "bundle.local/bundle/agent:0.1.0";

/// The fake agent's size: more than one ConfigMap part (1,000,000 bytes), so it is cut in two.
pub const AGENT_SIZE: usize = 1_100_000;

/// A minimal ELF64 little-endian header of `e_type` for `machine`, with program headers of
/// `p_types`, then `tail` (as the layout crate's own tests make them).
pub fn elf(e_type: u16, machine: u16, p_types: &[u32], tail: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&e_type.to_le_bytes());
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&u16::try_from(p_types.len()).unwrap_or(0).to_le_bytes());
    for p in p_types {
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&p.to_le_bytes());
        b.extend_from_slice(&ph);
    }
    b.extend_from_slice(tail);
    b
}

/// A fake static-pie agent (ET_DYN, PT_LOAD and PT_DYNAMIC, no PT_INTERP) of [`AGENT_SIZE`]
/// bytes; the tail is noise, so that its parts differ and do not compress away.
pub fn fake_agent() -> Vec<u8> {
    let head = elf(3, 62, &[1, 2], b"");
    elf(
        3,
        62,
        &[1, 2],
        &bundle_testimages::noise(7, AGENT_SIZE - head.len()),
    )
}

/// A fake static stage0 (ET_EXEC, PT_LOAD).
pub fn fake_stage0() -> Vec<u8> {
    elf(
        2,
        62,
        &[1],
        b"stage0: joins the parts and executes the agent",
    )
}

/// An archive on disk and what went into it.
pub struct TestArchive {
    /// Keeps the files.
    pub _dir: tempfile::TempDir,
    /// The opened archive.
    pub archive: Arc<Archive>,
    /// The agent binary in its agent image (empty without one).
    pub agent: Vec<u8>,
    /// The stage0 binary (empty without one).
    pub stage0: Vec<u8>,
}

impl TestArchive {
    /// The agent image's manifest digest.
    pub fn agent_digest(&self) -> BoxResult<Digest> {
        Ok(self
            .archive
            .index()
            .images
            .iter()
            .find(|i| i.name == AGENT_NAME)
            .ok_or("no agent image in the archive")?
            .digest)
    }
}

/// The small image set (app, multi with two platforms, plain, a docker-archive), plus the
/// agent image built from [`fake_agent`] and [`fake_stage0`] when `with_agent`.
pub fn archive(with_agent: bool) -> BoxResult<TestArchive> {
    let dir = tempfile::tempdir()?;
    let set = bundle_testimages::small_set(&dir.path().join("images"))?;
    let mut input = BundleInput {
        name: "deploy-test".into(),
        version: "1".into(),
        ..BundleInput::default()
    };
    for (name, spec) in [
        (
            "registry.example/team/app:1.0",
            format!("oci-layout:{}:app-1.0", set.layout.display()),
        ),
        (
            "registry.example/team/multi:1.0",
            format!("oci-layout:{}:multi-1.0", set.layout.display()),
        ),
        (
            "registry.example/team/plain:1.0",
            format!("oci-layout:{}:plain-1.0", set.layout.display()),
        ),
        (
            "registry.example/other/docker:1.0",
            format!("docker-archive:{}", set.docker_archive.display()),
        ),
    ] {
        let spec = bundle_layout::SourceSpec::parse(&spec)?;
        let r = bundle_layout::resolve(name, &spec, &[])?;
        input.images.push(r.image);
        input.blobs.extend(r.blobs);
    }
    let (agent, stage0) = if with_agent {
        let (agent, stage0) = (fake_agent(), fake_stage0());
        let r = bundle_layout::agent::build_agent_image(
            &agent,
            Path::new("agent/bundle-agent"),
            &stage0,
            Path::new("agent/stage0"),
            "0.1.0",
        )?;
        input.images.push(r.image);
        input.blobs.extend(r.blobs);
        (agent, stage0)
    } else {
        (Vec::new(), Vec::new())
    };
    let out = dir.path().join("test.bundle");
    bundle_format::write(&input, &out, &WriteOptions::default())?;
    Ok(TestArchive {
        archive: Arc::new(Archive::open(&out)?),
        _dir: dir,
        agent,
        stage0,
    })
}

/// One request deploy's push sent through a tunnel.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The pod the tunnel was opened to.
    pub pod: String,
    /// The host the URI named (before it was rewritten).
    pub host: String,
    /// Method.
    pub method: http::Method,
    /// Path.
    pub path: String,
    /// When.
    pub at: Instant,
}

/// The direct transport with every request's host rewritten to `to`: what the port-forward
/// tunnel does (it ignores the registry host in the URI and reaches one pod).
struct Redirect {
    inner: Direct,
    to: http::uri::Authority,
    pod: String,
    log: Arc<Mutex<Vec<Sent>>>,
}

impl Transport for Redirect {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> BoxFuture<'static, Result<Response<RespBody>, BoxError>> {
        let (mut parts, body) = req.into_parts();
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Sent {
                pod: self.pod.clone(),
                host: parts
                    .uri
                    .authority()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                at: Instant::now(),
            });
        let mut uri = parts.uri.clone().into_parts();
        uri.authority = Some(self.to.clone());
        match Uri::from_parts(uri) {
            Ok(u) => parts.uri = u,
            Err(e) => return Box::pin(async move { Err(Box::new(e) as BoxError) }),
        }
        parts.headers.remove(http::header::HOST);
        self.inner.send(Request::from_parts(parts, body))
    }
}

/// A real registry (bundle-oci's server on a directory) on 127.0.0.1, and the tunnels deploy
/// reaches it by.
pub struct Registry {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its store's directory.
    pub dir: tempfile::TempDir,
    direct: Direct,
    /// Every request deploy sent through a tunnel.
    pub log: Arc<Mutex<Vec<Sent>>>,
    /// The pods deploy asked tunnels to.
    pub pods: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Registry {
    /// Starts it.
    pub async fn start() -> BoxResult<Registry> {
        let dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backend = Arc::new(Backend::Fs(FsStore::open(dir.path())?));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = bundle_oci::server::serve(listener, backend, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Registry {
            addr,
            dir,
            direct: Direct::new(&TlsOptions::default())?,
            log: Arc::default(),
            pods: Arc::default(),
            stop: Some(stop),
        })
    }

    /// A transport to this registry for the pod `pod` (recorded).
    #[allow(
        clippy::result_large_err,
        reason = "the signature of deploy_with's tunnels"
    )]
    pub fn tunnel(&self, pod: &str) -> bundle_deploy::Result<Arc<dyn Transport>> {
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pod.to_owned());
        let to = self
            .addr
            .to_string()
            .parse()
            .map_err(|e: http::uri::InvalidUri| bundle_deploy::Error::Invalid(e.to_string()))?;
        Ok(Arc::new(Redirect {
            inner: self.direct.clone(),
            to,
            pod: pod.to_owned(),
            log: Arc::clone(&self.log),
        }))
    }

    /// The manifest `repo@digest` as the registry serves it, `None` on 404.
    pub async fn manifest(&self, repo: &str, digest: &Digest) -> BoxResult<Option<Vec<u8>>> {
        let req = Request::get(format!("http://{}/v2/{repo}/manifests/{digest}", self.addr))
            .header(
                http::header::ACCEPT,
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .body(bundle_oci::transport::empty())?;
        let resp = self.direct.send(req).await?;
        let code = resp.status();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        match code.as_u16() {
            200 => Ok(Some(body)),
            404 => Ok(None),
            c => Err(format!("GET manifest {repo}@{digest}: {c}").into()),
        }
    }

    /// What deploy sent through tunnels so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The pods deploy opened tunnels to so far.
    pub fn pods(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The blob files in the store.
    pub fn blob_count(&self) -> BoxResult<usize> {
        Ok(std::fs::read_dir(self.dir.path().join("blobs/sha256"))?.count())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
