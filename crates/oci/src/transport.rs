//! How requests reach a registry. The client speaks HTTP through a [`Transport`]: today
//! straight over TCP (with TLS), next through the Kubernetes API server (a port-forward tunnel
//! or the pod proxy), without the client knowing the difference.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::proxy::{Proxies, ProxyConnector};
use crate::{BoxError, Error, Result};

/// A request body.
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// A response body.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;
/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends one HTTP request to a registry. The URI is absolute (`https://host:port/v2/...`);
/// a tunnelling transport may route it elsewhere.
pub trait Transport: Send + Sync + 'static {
    /// Sends `req` and returns the response head with a streaming body.
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> BoxFuture<'static, Result<Response<RespBody>, BoxError>>;

    /// Whether a request to `url` may carry its body as a [`FileBody`] (in its extensions,
    /// beside an empty body) for the transport to send from the files itself. No by default.
    fn sends_files(&self, url: &str) -> bool {
        let _ = url;
        false
    }
}

/// One piece of a [`FileBody`].
#[derive(Debug)]
pub enum Piece {
    /// Bytes in memory.
    Bytes(Bytes),
    /// `(offset, length)` ranges of a file, sent in order.
    File {
        /// The file.
        file: Arc<std::fs::File>,
        /// Its path, for messages.
        path: std::path::PathBuf,
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
}

impl Piece {
    /// Bytes this piece sends.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { ranges, .. } => ranges.iter().map(|r| r.1).sum(),
        }
    }

    /// Whether it sends nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pieces of a [`FileBody`], as they are made.
pub type Pieces = tokio::sync::mpsc::Receiver<Result<Piece, BoxError>>;

/// A request body of `len` bytes as pieces that name file ranges where they can, so that a
/// transport over a plain socket can have the kernel copy them (sendfile) instead of reading
/// them. Carried in a request's extensions (see [`Transport::sends_files`]).
#[derive(Clone)]
pub struct FileBody(Arc<std::sync::Mutex<Option<(u64, Pieces)>>>);

impl FileBody {
    /// A body of `len` bytes whose pieces arrive on `rx`.
    pub fn new(len: u64, rx: Pieces) -> FileBody {
        FileBody(Arc::new(std::sync::Mutex::new(Some((len, rx)))))
    }

    /// The length and the pieces, once.
    pub fn take(&self) -> Option<(u64, Pieces)> {
        match self.0.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

/// An empty request body.
pub fn empty() -> ReqBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A request body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// TLS and plain-HTTP settings.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Hosts (`host[:port]`) to reach over plain HTTP or TLS without verification.
    pub insecure: BTreeSet<String>,
    /// Extra PEM files of CA certificates to trust, beside the system's.
    pub ca_files: Vec<std::path::PathBuf>,
    /// Which requests go through an HTTP proxy (by default, as the environment says).
    pub proxy: crate::ProxyConfig,
}

impl TlsOptions {
    /// Whether `host` was named insecure. Loopback registries are not insecure by default:
    /// name them, as with docker.
    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure.contains(host)
    }
}

type Https = hyper_rustls::HttpsConnector<ProxyConnector>;

/// The direct transport: TCP, TLS by rustls with the system roots (plus `ca_files`), and an
/// unverified TLS client for hosts named insecure. Connections are pooled and reused.
#[derive(Clone)]
pub struct Direct {
    /// Built on the first request that verifies a certificate: reading the system's roots
    /// (a file per certificate) takes several milliseconds, which a command that only talks
    /// to insecure or plain-HTTP registries (a re-push to one takes about 30 ms in all) should
    /// not pay.
    verified: std::sync::OnceLock<HyperClient<Https, ReqBody>>,
    unverified: HyperClient<Https, ReqBody>,
    insecure: Arc<BTreeSet<String>>,
    proxies: Arc<Proxies>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The certificates of `ca_files`, read and checked when the transport is built.
    extra_roots: rustls::RootCertStore,
}

fn load_pem(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    let certs: std::result::Result<Vec<_>, _> =
        rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
            .collect();
    let certs = certs.map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Direct {
    /// Builds the transport. The certificates of `ca_files` are read and checked now; the
    /// system's roots on the first request that needs them.
    pub fn new(opts: &TlsOptions) -> Result<Direct> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut extra_roots = rustls::RootCertStore::empty();
        for f in &opts.ca_files {
            for cert in load_pem(f)? {
                extra_roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("{}: {e}", f.display())))?;
            }
        }
        let unverified_cfg = tls_config(&provider)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(Arc::clone(&provider))))
            .with_no_client_auth();
        let proxies = Arc::new(Proxies::new(&opts.proxy));
        Ok(Direct {
            verified: std::sync::OnceLock::new(),
            unverified: hyper_client(unverified_cfg, &proxies),
            insecure: Arc::new(opts.insecure.clone()),
            proxies,
            provider,
            extra_roots,
        })
    }

    /// The client that verifies certificates against the system's roots and `ca_files`.
    fn verified(&self) -> Result<&HyperClient<Https, ReqBody>> {
        if let Some(c) = self.verified.get() {
            return Ok(c);
        }
        let mut roots = self.extra_roots.clone();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate should not stop registries that use others.
            let _ = roots.add(cert);
        }
        let cfg = tls_config(&self.provider)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Two first requests at once may both build one; either is kept.
        Ok(self
            .verified
            .get_or_init(|| hyper_client(cfg, &self.proxies)))
    }
}

/// A TLS client configuration with `provider` and its safe protocol versions.
fn tls_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))
}

/// A pooling HTTP/1.1 client over TCP, through `proxies` where they apply, that speaks TLS
/// with `cfg` to https URLs.
fn hyper_client(cfg: rustls::ClientConfig, proxies: &Arc<Proxies>) -> HyperClient<Https, ReqBody> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(30)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_or_http()
        .enable_http1()
        .wrap_connector(ProxyConnector {
            http,
            proxies: Arc::clone(proxies),
        });
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        .build(connector)
}

impl Transport for Direct {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> BoxFuture<'static, Result<Response<RespBody>, BoxError>> {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let via = self.proxies.via(req.uri());
        if let Some(files) = req.extensions().get::<FileBody>().cloned() {
            if req.uri().scheme_str() == Some("http") && via.is_none() {
                return Box::pin(crate::sendfile::send(req, files));
            }
            // (`sends_files` said no: the client does not make such a request.)
            let uri = req.uri().to_string();
            return Box::pin(async move {
                Err(
                    format!("{uri}: a file body is sent over plain HTTP without a proxy only")
                        .into(),
                )
            });
        }
        let mut req = req;
        // A plain-HTTP request through a proxy carries the proxy's credentials itself (an
        // https one gives them to the CONNECT).
        if let Some(auth) = via.and_then(|v| v.auth)
            && req.uri().scheme_str() == Some("http")
        {
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        let client = if self.insecure.contains(&host) {
            self.unverified.clone()
        } else {
            match self.verified() {
                Ok(c) => c.clone(),
                Err(e) => return Box::pin(async move { Err(Box::new(e) as BoxError) }),
            }
        };
        Box::pin(async move {
            let resp = client
                .request(req)
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            Ok(resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()))
        })
    }

    /// Plain-HTTP requests send file pieces themselves (sendfile(2), see `sendfile.rs`), on a
    /// connection of their own, unless they go through a proxy.
    fn sends_files(&self, url: &str) -> bool {
        url.starts_with("http://")
            && url
                .parse::<http::Uri>()
                .is_ok_and(|u| self.proxies.via(&u).is_none())
    }
}
