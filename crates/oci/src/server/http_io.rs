//! HTTP plumbing of the server: the response body type, request bodies read with a limit or
//! pumped to a writer thread, and the `Range` / `Content-Range` headers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::error::{ApiError, Code};

/// A response body: nothing, bytes in memory, or chunks fed by a blocking reader.
pub enum Body {
    /// No bytes.
    Empty,
    /// Bytes in memory (taken on first poll).
    Full(Option<Bytes>),
    /// Chunks from a channel; an error aborts the response.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body {
    /// No bytes.
    pub fn empty() -> Body {
        Body::Empty
    }
    /// Bytes in memory.
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
    /// Chunks from a channel.
    pub fn stream(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
        Body::Stream(rx)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::full(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut *self {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Empty => http_body::SizeHint::with_exact(0),
            Body::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            Body::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

/// Reads a whole request body of at most `limit` bytes.
pub async fn collect_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::new(Code::BlobUploadInvalid, format!("request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(ApiError::new(
                    Code::SizeInvalid,
                    format!("request body is larger than {limit} bytes"),
                )
                .with_status(http::StatusCode::PAYLOAD_TOO_LARGE));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Forwards a request body to a writer; a body error is forwarded too. Stops early when the
/// writer is gone.
pub async fn pump(mut body: Incoming, tx: mpsc::Sender<Result<Bytes, String>>) {
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data()
                    && tx.send(Ok(data)).await.is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    }
}

/// A `Range` header that lies wholly outside the content (416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The one byte range a `Range: bytes=...` header asks for, as inclusive `(first, last)`.
/// `Ok(None)`: no header, or one we do not handle (several ranges, other units), so the whole
/// content goes out.
pub fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        return Ok(Some((size - n.min(size), size - 1)));
    }
    let Ok(first) = a.parse::<u64>() else {
        return Ok(None);
    };
    let last = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l.min(size.saturating_sub(1)),
            _ => return Ok(None),
        }
    };
    if first >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some((first, last)))
}

/// The inclusive `(start, end)` of a `Content-Range: START-END` (also `bytes START-END/TOTAL`)
/// of a PATCH.
pub fn parse_content_range(v: &HeaderValue) -> Option<(u64, u64)> {
    let s = v.to_str().ok()?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next()?;
    let (a, b) = s.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=90-500", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=-0", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=5-1", 100), Ok(None));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=x-1", 100), Ok(None));
        assert_eq!(
            range("bytes=18446744073709551615-", 100),
            Err(Unsatisfiable)
        );
    }

    #[test]
    fn content_ranges() {
        let p = |s: &str| parse_content_range(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("0-99"), Some((0, 99)));
        assert_eq!(p("100-199"), Some((100, 199)));
        assert_eq!(p("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(p("9-1"), None);
        assert_eq!(p("x"), None);
    }
}
