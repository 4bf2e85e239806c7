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
use kube::Api;
use tokio::sync::Semaphore;

/// The path and query of `uri`, or `/`.
fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
}

/// Idle connections, shared by the transport and the bodies that give theirs back.
type Idle = Arc<Mutex<Vec<SendRequest<ReqBody>>>>;

/// Port-forwarded HTTP/1.1 connections to one pod port, at most `max` at a time.
pub struct PortForward {
    pods: Api<Pod>,
    pod: String,
    namespace: String,
    port: u16,
    idle: Idle,
    slots: Arc<Semaphore>,
}

impl PortForward {
    /// Tunnels to `pod` (in the namespace of `pods`) on `port`, with up to `max` streams.
    pub fn new(pods: Api<Pod>, namespace: &str, pod: &str, port: u16, max: usize) -> PortForward {
        PortForward {
            pods,
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            port,
            idle: Arc::new(Mutex::new(Vec::new())),
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    async fn open(
        pods: Api<Pod>,
        namespace: String,
        pod: String,
        port: u16,
    ) -> Result<SendRequest<ReqBody>, BoxError> {
        let tunnel_err = |cause: String| -> BoxError {
            Box::new(crate::Error::Tunnel {
                namespace: namespace.clone(),
                pod: pod.clone(),
                port,
                cause,
            })
        };
        let mut pf = pods
            .portforward(&pod, &[port])
            .await
            .map_err(|e| tunnel_err(crate::error::describe(&e)))?;
        let stream = pf
            .take_stream(port)
            .ok_or_else(|| tunnel_err("the API server returned no stream".into()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| tunnel_err(e.to_string()))?;
        tokio::spawn(async move {
            // The connection ends when either side closes; then the websocket goes too.
            let _ = conn.await;
            pf.abort();
        });
        Ok(sender)
    }
}

/// A response body that gives its connection back to the pool once it is dropped, and its
/// stream slot with it.
struct Returning {
    body: hyper::body::Incoming,
    back: Option<(SendRequest<ReqBody>, Idle)>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some((sender, idle)) = self.back.take() {
            // A body dropped before its end leaves the connection unusable; hyper closes it
            // and the next taker sees `is_closed`.
            if let Ok(mut idle) = idle.lock() {
                idle.push(sender);
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
        let pods = self.pods.clone();
        let (namespace, pod, port) = (self.namespace.clone(), self.pod.clone(), self.port);
        let idle = Arc::clone(&self.idle);
        let slots = Arc::clone(&self.slots);
        Box::pin(async move {
            let permit = slots
                .acquire_owned()
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            // An idle connection that is still open and free, else a new tunnel.
            let mut sender = None;
            loop {
                let candidate = idle.lock().ok().and_then(|mut v| v.pop());
                match candidate {
                    Some(mut s) if !s.is_closed() => {
                        if s.ready().await.is_ok() {
                            sender = Some(s);
                            break;
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            let mut sender = match sender {
                Some(s) => s,
                None => PortForward::open(pods, namespace, pod, port).await?,
            };
            let host = format!("127.0.0.1:{port}");
            let pq = path_and_query(req.uri());
            *req.uri_mut() = pq.parse().map_err(|e| -> BoxError { Box::new(e) })?;
            req.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(&host).map_err(|e| -> BoxError { Box::new(e) })?,
            );
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            Ok(resp.map(|body| {
                Returning {
                    body,
                    back: Some((sender, idle)),
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
