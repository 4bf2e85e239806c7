//! Registry transports through the Kubernetes API server, for the push code of bundle-oci:
//! a pool of port-forward streams (one HTTP/1.1 connection each, reopened when one breaks,
//! so that a retry never reuses a dead tunnel), and the pod proxy subresource (only
//! `pods/proxy` permission needed). Both ignore the registry host in the request URI and route
//! to one pod and port.

use std::sync::{Arc, Mutex};

use bundle_oci::transport::{BoxFuture, ReqBody, RespBody};
use bundle_oci::{BoxError, Transport};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt as _;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::Semaphore;

/// The path and query of `uri`, or `/`.
fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
}

/// Idle connections, shared by the transport and the bodies that give theirs back.
type Idle = Arc<Mutex<Vec<Tunnel>>>;

/// What the pod side said on the error channel of a port-forward, if anything.
type Failure = Arc<Mutex<Option<String>>>;

/// One HTTP/1.1 connection through one port-forward.
struct Tunnel {
    sender: SendRequest<ReqBody>,
    failure: Failure,
}

/// Port-forwarded HTTP/1.1 connections to one pod port, at most `max` at a time.
pub struct PortForward {
    client: kube::Client,
    pod: String,
    namespace: String,
    port: u16,
    idle: Idle,
    slots: Arc<Semaphore>,
}

impl PortForward {
    /// Tunnels to `pod` in `namespace` on `port`, with up to `max` streams.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        pod: &str,
        port: u16,
        max: usize,
    ) -> PortForward {
        PortForward {
            client,
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            port,
            idle: Arc::new(Mutex::new(Vec::new())),
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    async fn open(
        client: kube::Client,
        namespace: String,
        pod: String,
        port: u16,
    ) -> Result<Tunnel, BoxError> {
        let tunnel_err = |cause: String| -> BoxError {
            Box::new(crate::Error::Tunnel {
                namespace: namespace.clone(),
                pod: pod.clone(),
                port,
                cause,
            })
        };
        use kube::Resource as _;
        let req = kube::core::Request::new(Pod::url_path(&(), Some(&namespace)))
            .portforward(&pod, &[port])
            .map_err(|e| tunnel_err(e.to_string()))?;
        let ws = client
            .connect(req)
            .await
            .map_err(|e| tunnel_err(crate::error::describe(&e)))?
            .into_stream();
        let (ours, theirs) = tokio::io::duplex(BRIDGE_BUFFER);
        let failure = Arc::new(Mutex::new(None));
        tokio::spawn(bridge(ws, theirs, port, Arc::clone(&failure)));
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .map_err(|e| tunnel_err(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Tunnel { sender, failure })
    }
}

/// The buffer between the HTTP connection and the websocket, each way.
const BRIDGE_BUFFER: usize = 4 << 20;
/// Bytes per websocket message towards the pod. kube's own port-forward sends 4 KiB messages,
/// which caps a stream well below what the API server carries; large messages cut the
/// per-message cost (framing, channel hops, the API server's and kubelet's copies).
const MESSAGE: usize = 1 << 20;

/// Moves bytes between `io` and a port-forward websocket (`portforward.k8s.io` channels:
/// 0 data, 1 error; each channel's first message from the server is the port, little-endian).
/// Ends when either side ends; an error-channel message is kept in `failure`.
async fn bridge<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    io: tokio::io::DuplexStream,
    port: u16,
    failure: Failure,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::Message;

    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(io);
    let from_pod = async {
        let mut seen_port = [false; 2];
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if b.len() > 1 => {
                    let ch = usize::from(b[0]);
                    let data = &b[1..];
                    if ch > 1 {
                        break;
                    }
                    if !seen_port[ch] {
                        seen_port[ch] = true;
                        if data.len() != 2 || u16::from_le_bytes([data[0], data[1]]) != port {
                            break;
                        }
                        continue;
                    }
                    if ch == 1 {
                        if let Ok(mut f) = failure.lock() {
                            *f = Some(String::from_utf8_lossy(data).into_owned());
                        }
                        break;
                    }
                    if wr.write_all(data).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let to_pod = async {
        let mut buf = vec![0u8; MESSAGE + 1];
        loop {
            let n = match rd.read(&mut buf[1..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let msg = Message::binary(bytes::Bytes::copy_from_slice(&buf[..=n]));
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        () = from_pod => {}
        () = to_pod => {}
    }
}

/// A response body that gives its connection back to the pool once it is dropped, and its
/// stream slot with it.
struct Returning {
    body: hyper::body::Incoming,
    back: Option<(Tunnel, Idle)>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some((tunnel, idle)) = self.back.take() {
            // A body dropped before its end leaves the connection unusable; hyper closes it
            // and the next taker sees `is_closed`.
            if let Ok(mut idle) = idle.lock() {
                idle.push(tunnel);
            }
        }
    }
}

impl http_body::Body for Returning {
    type Data = bytes::Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| -> BoxError { Box::new(e) })
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Transport for PortForward {
    fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> BoxFuture<'static, Result<Response<RespBody>, BoxError>> {
        let client = self.client.clone();
        let (namespace, pod, port) = (self.namespace.clone(), self.pod.clone(), self.port);
        let idle = Arc::clone(&self.idle);
        let slots = Arc::clone(&self.slots);
        Box::pin(async move {
            let permit = slots
                .acquire_owned()
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            // An idle connection that is still open and free, else a new tunnel.
            let mut tunnel = None;
            loop {
                let candidate = idle.lock().ok().and_then(|mut v| v.pop());
                match candidate {
                    Some(mut t) if !t.sender.is_closed() => {
                        if t.sender.ready().await.is_ok() {
                            tunnel = Some(t);
                            break;
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            let mut tunnel = match tunnel {
                Some(t) => t,
                None => PortForward::open(client, namespace.clone(), pod.clone(), port).await?,
            };
            let host = format!("127.0.0.1:{port}");
            let pq = path_and_query(req.uri());
            *req.uri_mut() = pq.parse().map_err(|e| -> BoxError { Box::new(e) })?;
            req.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(&host).map_err(|e| -> BoxError { Box::new(e) })?,
            );
            let resp = match tunnel.sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    // What the pod side said, if anything, explains a broken stream best.
                    let said = tunnel.failure.lock().ok().and_then(|mut f| f.take());
                    let cause = match said {
                        Some(s) => format!("{e}; the node said: {}", s.trim()),
                        None => e.to_string(),
                    };
                    return Err(Box::new(crate::Error::Tunnel {
                        namespace,
                        pod,
                        port,
                        cause,
                    }) as BoxError);
                }
            };
            Ok(resp.map(|body| {
                Returning {
                    body,
                    back: Some((tunnel, idle)),
                    _permit: permit,
                }
                .boxed_unsync()
            }))
        })
    }
}

/// Requests through `/api/v1/namespaces/NS/pods/POD:PORT/proxy/...` on the API server, sent
/// by the kube client (so every kubeconfig credential kind works). The kube client takes whole
/// request bodies, so each body is gathered first: push bounds them by its chunk size.
pub struct Proxy {
    client: kube::Client,
    prefix: String,
}

impl Proxy {
    /// A proxy to `pod:port` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, pod: &str, port: u16) -> Proxy {
        Proxy {
            client,
            prefix: format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"),
        }
    }

    /// The API server path a registry path goes to.
    pub fn path_for(&self, registry_path_and_query: &str) -> String {
        format!("{}{registry_path_and_query}", self.prefix)
    }
}

impl Transport for Proxy {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> BoxFuture<'static, Result<Response<RespBody>, BoxError>> {
        let target = self.path_for(&path_and_query(req.uri()));
        let prefix = self.prefix.clone();
        let client = self.client.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            parts.uri = target.parse().map_err(|e| -> BoxError { Box::new(e) })?;
            parts.headers.remove(http::header::HOST);
            let req = Request::from_parts(parts, kube::client::Body::from(bytes));
            let resp = client
                .send(req)
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            let (mut parts, body) = resp.into_parts();
            // The registry's upload locations are its own paths; should the API server have
            // turned one into a proxy path, turn it back.
            let loc = parts
                .headers
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            if let Some(rest) = loc.and_then(|l| l.strip_prefix(&prefix))
                && let Ok(v) = HeaderValue::from_str(rest)
            {
                parts.headers.insert(http::header::LOCATION, v);
            }
            Ok(Response::from_parts(
                parts,
                body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
            ))
        })
    }
}
