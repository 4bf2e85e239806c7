//! Requests through an HTTP proxy, as docker and skopeo make them: the proxy the environment
//! names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, or lower case) for every host but
//! a loopback one. An https registry is reached through a `CONNECT` tunnel (TLS runs end to
//! end through it); a plain-HTTP one by requests in absolute form to the proxy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::BoxError;

/// Which requests go through an HTTP proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxyConfig {
    /// As the environment says (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, or lower
    /// case), read when the transport is built.
    #[default]
    FromEnv,
    /// These proxies (`http://[user:password@]host:port`) for https and http URLs, except for
    /// the hosts of `no` (`NO_PROXY` syntax). Taken as they are: loopback hosts too.
    Given {
        /// For https URLs.
        https: Option<String>,
        /// For http URLs.
        http: Option<String>,
        /// Hosts, domains and CIDR blocks reached straight, comma-separated.
        no: String,
    },
    /// None.
    Off,
}

/// The proxy rules in force.
#[derive(Debug, Default)]
pub(crate) struct Proxies {
    matcher: Option<Matcher>,
    /// Loopback hosts are reached straight whatever the rules say (the environment's rules).
    straight_loopback: bool,
}

/// Where a request to a URL goes through a proxy.
pub(crate) struct Via {
    /// `http://host:port` of the proxy.
    pub proxy: Uri,
    /// `Proxy-Authorization` for it.
    pub auth: Option<HeaderValue>,
}

impl Proxies {
    pub(crate) fn new(config: &ProxyConfig) -> Proxies {
        match config {
            ProxyConfig::Off => Proxies::default(),
            ProxyConfig::FromEnv => Proxies {
                matcher: Some(Matcher::from_env()),
                straight_loopback: true,
            },
            ProxyConfig::Given { https, http, no } => {
                let mut b = Matcher::builder().no(no.clone());
                if let Some(p) = https {
                    b = b.https(p.clone());
                }
                if let Some(p) = http {
                    b = b.http(p.clone());
                }
                Proxies {
                    matcher: Some(b.build()),
                    straight_loopback: false,
                }
            }
        }
    }

    /// The proxy for `dst`, if one applies. By the environment's rules, loopback hosts are
    /// always reached straight (as Go's, and so docker's and skopeo's, have it).
    pub(crate) fn via(&self, dst: &Uri) -> Option<Via> {
        let host = dst.host()?;
        if self.straight_loopback && is_loopback(host) {
            return None;
        }
        let i = self.matcher.as_ref()?.intercept(dst)?;
        Some(Via {
            proxy: i.uri().clone(),
            auth: i.basic_auth().cloned(),
        })
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Connects to a registry straight or through its proxy: a `CONNECT` tunnel for https, a
/// connection to the proxy marked as such (hyper then writes absolute-form requests) for http.
#[derive(Clone)]
pub(crate) struct ProxyConnector {
    pub(crate) http: HttpConnector,
    pub(crate) proxies: Arc<Proxies>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

impl Service<Uri> for ProxyConnector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let mut http = self.http.clone();
        let via = self.proxies.via(&dst);
        Box::pin(async move {
            let Some(via) = via else {
                let io = http.call(dst).await?;
                return Ok(Stream { io, proxied: false });
            };
            if via.proxy.scheme_str() != Some("http") {
                return Err(format!(
                    "proxy {}: only http:// proxies are supported (for {dst})",
                    via.proxy
                )
                .into());
            }
            if dst.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(via.proxy.clone(), http);
                if let Some(auth) = via.auth {
                    tunnel = tunnel.with_auth(auth);
                }
                let io = tunnel
                    .call(dst.clone())
                    .await
                    .map_err(|e| format!("proxy {}: CONNECT to {dst}: {e}", via.proxy))?;
                return Ok(Stream { io, proxied: false });
            }
            let io = http
                .call(via.proxy.clone())
                .await
                .map_err(|e| format!("proxy {}: {e}", via.proxy))?;
            Ok(Stream { io, proxied: true })
        })
    }
}

/// A connection to a registry, or to the proxy that forwards its plain-HTTP requests.
pub(crate) struct Stream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(https: Option<&str>, http: Option<&str>, no: &str) -> Proxies {
        Proxies::new(&ProxyConfig::Given {
            https: https.map(str::to_owned),
            http: http.map(str::to_owned),
            no: no.to_owned(),
        })
    }

    fn proxy_of(p: &Proxies, url: &str) -> Option<String> {
        p.via(&url.parse().unwrap()).map(|v| v.proxy.to_string())
    }

    #[test]
    fn loopback_hosts_and_no_proxy_go_straight() {
        let mut p = given(
            Some("http://proxy.corp:3128"),
            Some("http://plain.corp:8080"),
            "mirror.corp,.internal,10.0.0.0/8",
        );
        // Given rules are taken as they are; the environment's spare loopback hosts.
        assert_eq!(
            proxy_of(&p, "https://127.0.0.1:5000/v2/").as_deref(),
            Some("http://proxy.corp:3128/")
        );
        p.straight_loopback = true;
        assert_eq!(
            proxy_of(&p, "https://ghcr.io/v2/").as_deref(),
            Some("http://proxy.corp:3128/")
        );
        assert_eq!(
            proxy_of(&p, "http://registry.example:5000/v2/").as_deref(),
            Some("http://plain.corp:8080/")
        );
        for straight in [
            "https://127.0.0.1:5000/v2/",
            "https://[::1]:5000/v2/",
            "http://localhost:5000/v2/",
            "https://mirror.corp/v2/",
            "https://reg.internal/v2/",
            "https://10.1.2.3/v2/",
        ] {
            assert_eq!(proxy_of(&p, straight), None, "{straight}");
        }
        assert_eq!(
            proxy_of(&Proxies::new(&ProxyConfig::Off), "https://ghcr.io/"),
            None
        );
    }

    #[test]
    fn proxy_credentials_become_proxy_authorization() {
        let p = given(Some("http://user:pa%40ss@proxy.corp:3128"), None, "");
        let via = p.via(&"https://ghcr.io/v2/".parse().unwrap()).unwrap();
        // base64("user:pa@ss")
        assert_eq!(
            via.auth.unwrap().to_str().unwrap(),
            "Basic dXNlcjpwYUBzcw=="
        );
    }
}
