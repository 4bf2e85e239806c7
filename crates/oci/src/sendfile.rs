//! Plain-HTTP/1.1 requests whose body is a [`FileBody`] (uploads to a registry named insecure
//! and answering over plain HTTP). The request head and in-memory pieces are written as
//! usual; file pieces are copied by the kernel from the archive file to the socket
//! (sendfile(2)) without passing through this process, which saves the two copies that cost
//! most of a push's client CPU. Not to a registry on a loopback address ([`Ranges::Auto`]):
//! there the pages are read and written, which costs the registry's receive less than the
//! copy costs this side. The response is read
//! whole (registries answer uploads with a head and at most a short error document).
//!
//! One connection per request, closed after it (`Connection: close`): bodies sent this way
//! are chunks of megabytes, beside which a connect costs little, and a closed connection
//! leaves no doubt where a response ends.

use std::io;
use std::os::unix::io::AsRawFd as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, Interest};
use tokio::net::TcpStream;

use crate::BoxError;
use crate::transport::{FileBody, Piece, ReqBody, RespBody, full};

/// Longest response head read.
const HEAD_LIMIT: usize = 64 << 10;
/// Longest response body read (registries answer uploads with short JSON documents).
const BODY_LIMIT: usize = 4 << 20;
/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn err(what: impl Into<String>) -> BoxError {
    what.into().into()
}

/// How file ranges reach the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ranges {
    /// sendfile(2), unless the registry is on this machine (a loopback address): then read
    /// and written. Over loopback no device reads the pages: the registry's own receive copies
    /// them, and an archive page lent to the socket costs it more than a buffer just written
    /// (measured, not explained; page references taken by one side and dropped by the other
    /// are a likely part): on the bench set its CPU was 3.87 s against 4.16 s with sendfile
    /// over 12 alternated pushes (ours 0.19 against 0.21 s), and 4.06 against 4.36 s over
    /// 10 others (ours 0.24 against 0.21 s).
    Auto,
    /// Always sendfile(2) (tests: their registry is on loopback).
    #[cfg(test)]
    Sendfile,
    /// Always read and written.
    #[cfg(test)]
    Copy,
}

/// Sends `req` (an `http://` URI; its own body is ignored) with the body of `files`.
pub(crate) async fn send(
    req: Request<ReqBody>,
    files: FileBody,
) -> Result<Response<RespBody>, BoxError> {
    send_with(req, files, Ranges::Auto).await
}

/// [`send`], with file ranges sent as `ranges` says.
pub(crate) async fn send_with(
    req: Request<ReqBody>,
    files: FileBody,
    ranges: Ranges,
) -> Result<Response<RespBody>, BoxError> {
    let (len, mut pieces) = files
        .take()
        .ok_or_else(|| err("a file body was sent twice"))?;
    let uri = req.uri();
    let authority = uri
        .authority()
        .ok_or_else(|| err(format!("{uri}: no host")))?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let head = request_head(
        req.method().as_str(),
        target,
        authority.as_str(),
        req.headers(),
        len,
    );
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| err(format!("connect to {addr}: timed out")))??;
    let copy = match ranges {
        Ranges::Auto => stream.peer_addr().is_ok_and(|a| a.ip().is_loopback()),
        #[cfg(test)]
        Ranges::Sendfile => false,
        #[cfg(test)]
        Ranges::Copy => true,
    };
    // Corked, the kernel sends full segments only: the head goes out with the body, and
    // the 128 KiB ranges of stored frames do not each end in a short segment.
    cork(&stream, true)?;
    // A failure of the body itself (a damaged frame, a short file) ends the request at
    // once: the registry waits for the rest of the body, so no answer would come. A failure
    // to write is the registry's doing: it may have answered before it read the whole body
    // (a refusal) and closed, and its answer, if it came, says more than the broken pipe.
    let mut write_failed = stream.write_all(&head).await.err();
    let mut sent = 0u64;
    // The buffer of copied ranges, made once per request.
    let mut buf = Vec::new();
    while write_failed.is_none() {
        let Some(piece) = pieces.recv().await else {
            break;
        };
        let piece = piece?;
        sent += piece.len();
        if sent > len {
            return Err(err(format!("body longer than its {len} bytes")));
        }
        let written = match piece {
            Piece::Bytes(b) => stream.write_all(&b).await,
            Piece::File { file, path, ranges } => {
                let buf = copy.then_some(&mut buf);
                send_ranges(&mut stream, &file, &ranges, buf)
                    .await
                    .map_err(|e| err(format!("{}: {e}", path.display())))?
            }
        };
        if let Err(e) = written {
            write_failed = Some(e);
        }
    }
    if write_failed.is_none() && sent != len {
        return Err(err(format!("body ended after {sent} of its {len} bytes")));
    }
    if let Err(e) = cork(&stream, false) {
        write_failed.get_or_insert(e);
    }
    match (write_failed, read_response(&mut stream).await) {
        (_, Ok(resp)) => Ok(resp),
        (Some(e), Err(_)) => Err(e.into()),
        (None, Err(e)) => Err(e),
    }
}

/// Sends file ranges (by sendfile, or with a `copy` buffer read and written): `Err` for a
/// file that ends early or cannot be read (the body's fault), `Ok(Err)` for a socket that
/// fails.
async fn send_ranges(
    stream: &mut TcpStream,
    file: &std::fs::File,
    ranges: &[(u64, u64)],
    copy: Option<&mut Vec<u8>>,
) -> Result<io::Result<()>, io::Error> {
    if let Some(buf) = copy {
        return copy_ranges(stream, file, ranges, buf).await;
    }
    for &(off, n) in ranges {
        match send_file(stream, file, off, n).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(e),
            // EIO, or EINVAL/EBADF from a file that is not one sendfile reads: the file's.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EBADF)
                ) =>
            {
                return Err(e);
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(()))
}

/// Reads file ranges into `buf` (grown to at most [`COPY_BUF`] once, then reused) and writes
/// it to the socket whenever it is full and at the end; errors as [`send_ranges`].
async fn copy_ranges(
    stream: &mut TcpStream,
    file: &std::fs::File,
    ranges: &[(u64, u64)],
    buf: &mut Vec<u8>,
) -> Result<io::Result<()>, io::Error> {
    use std::os::unix::fs::FileExt as _;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let size = total.min(COPY_BUF as u64) as usize;
    if buf.len() < size {
        buf.resize(size, 0);
    }
    let mut filled = 0;
    for &(off, n) in ranges {
        let end = off + n;
        let mut at = off;
        while at < end {
            if filled == size {
                if let Err(e) = stream.write_all(&buf[..filled]).await {
                    return Ok(Err(e));
                }
                filled = 0;
            }
            let want = ((end - at) as usize).min(size - filled);
            let got = file.read_at(&mut buf[filled..filled + want], at)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before byte {end}"),
                ));
            }
            filled += got;
            at += got as u64;
        }
    }
    if let Err(e) = stream.write_all(&buf[..filled]).await {
        return Ok(Err(e));
    }
    Ok(Ok(()))
}

/// Largest buffer of copied ranges: a frame.
const COPY_BUF: usize = 1 << 20;

/// The request line and headers: the request's own, then `Host`, `Content-Length` and
/// `Connection: close` in place of any it had.
fn request_head(method: &str, target: &str, host: &str, headers: &HeaderMap, len: u64) -> Vec<u8> {
    let mut h = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
    for (name, value) in headers {
        if [
            header::HOST,
            header::CONTENT_LENGTH,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(format!("Content-Length: {len}\r\nConnection: close\r\n\r\n").as_bytes());
    h
}

/// Sets `TCP_CORK`; clearing it sends what it held.
fn cork(stream: &TcpStream, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    #[allow(unsafe_code)]
    // SAFETY: the socket is open (borrowed) and the option value is a live c_int of the size
    // passed.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            std::ptr::from_ref(&v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Copies `len` bytes of `file` from `off` to the socket in the kernel.
async fn send_file(stream: &TcpStream, file: &std::fs::File, off: u64, len: u64) -> io::Result<()> {
    let (mut off, mut left) = (off, len);
    while left > 0 {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                loop {
                    let mut at = off as libc::off_t;
                    #[allow(unsafe_code)]
                    // SAFETY: both descriptors are open for the call (the socket and file are
                    // borrowed), `at` is a live offset variable, and sendfile only reads the
                    // file and writes the socket.
                    let r = unsafe {
                        libc::sendfile(
                            stream.as_raw_fd(),
                            file.as_raw_fd(),
                            &mut at,
                            left.min(1 << 30) as usize,
                        )
                    };
                    if r >= 0 {
                        return Ok(r as u64);
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends before byte {}", off + left),
            ));
        }
        off += n;
        left -= n;
    }
    Ok(())
}

async fn read_response(stream: &mut TcpStream) -> Result<Response<RespBody>, BoxError> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 16 << 10];
        let n = stream.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(resp) = parse_response(&buf, n == 0).map_err(err)? {
            return Ok(resp.map(full));
        }
    }
}

/// Parses a whole HTTP/1.1 response from the bytes read so far: `Ok(None)` while more are
/// needed (`eof`: no more will come). Skips informational (1xx) heads; the body is framed
/// by `Transfer-Encoding: chunked`, `Content-Length`, or the end of the connection.
pub(crate) fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response<Bytes>>, String> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let n = match r.parse(rest).map_err(|e| format!("response head: {e}"))? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial if rest.len() > HEAD_LIMIT => {
                return Err(format!("response head longer than {HEAD_LIMIT} bytes"));
            }
            httparse::Status::Partial if eof => {
                return Err(match rest.is_empty() {
                    true => "connection closed without a response".into(),
                    false => "connection closed inside the response head".into(),
                });
            }
            httparse::Status::Partial => return Ok(None),
        };
        let code = r.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| format!("response status {code} is not valid"))?;
        if status.is_informational() {
            at += n;
            continue;
        }
        let mut map = HeaderMap::new();
        for h in r.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("response header name {:?} is not valid", h.name))?;
            let value = HeaderValue::from_bytes(h.value)
                .map_err(|_| format!("response header {name} has a value that is not valid"))?;
            map.append(name, value);
        }
        let body = &rest[n..];
        let chunked = map.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
        let content = if chunked {
            match dechunk(body)? {
                Some(b) => b,
                None if eof => return Err("connection closed inside a chunked body".into()),
                None => return Ok(None),
            }
        } else if let Some(cl) = content_length(&map)? {
            if cl > BODY_LIMIT as u64 {
                return Err(format!(
                    "response body of {cl} bytes is larger than {BODY_LIMIT}"
                ));
            }
            match body.get(..cl as usize) {
                Some(b) => b.to_vec(),
                None if eof => {
                    return Err(format!(
                        "connection closed after {} of {cl} response body bytes",
                        body.len()
                    ));
                }
                None => return Ok(None),
            }
        } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Vec::new()
        } else if body.len() > BODY_LIMIT {
            return Err(format!("response body larger than {BODY_LIMIT} bytes"));
        } else if eof {
            body.to_vec()
        } else {
            return Ok(None);
        };
        let mut resp = Response::new(Bytes::from(content));
        *resp.status_mut() = status;
        *resp.headers_mut() = map;
        return Ok(Some(resp));
    }
}

fn content_length(map: &HeaderMap) -> Result<Option<u64>, String> {
    let mut found = None;
    for v in map.get_all(header::CONTENT_LENGTH) {
        let n = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("response Content-Length {v:?} is not a number"))?;
        if found.is_some_and(|f| f != n) {
            return Err("response has two different Content-Length headers".into());
        }
        found = Some(n);
    }
    Ok(found)
}

/// Decodes a chunked body: `Ok(None)` while it is incomplete.
fn dechunk(mut b: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return match b.len() > 1024 {
                true => Err("chunk size line longer than 1 KiB".into()),
                false => Ok(None),
            };
        };
        let line = std::str::from_utf8(&b[..eol]).map_err(|_| "chunk size is not text")?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| format!("chunk size {hex:?} is not a hex number"))?;
        b = &b[eol + 2..];
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                b = &b[eol + 2..];
                if eol == 0 {
                    return Ok(Some(out));
                }
            }
        }
        if out.len().saturating_add(size) > BODY_LIMIT {
            return Err(format!("response body larger than {BODY_LIMIT} bytes"));
        }
        let Some(data) = b.get(..size + 2) else {
            return Ok(None);
        };
        if &data[size..] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        out.extend_from_slice(&data[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(bytes: &[u8]) -> Response<Bytes> {
        parse_response(bytes, false).unwrap().unwrap()
    }

    #[test]
    fn framings() {
        let r =
            parsed(b"HTTP/1.1 201 Created\r\nLocation: /v2/a/blobs/x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()[header::LOCATION], "/v2/a/blobs/x");
        let r = parsed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!((r.status().as_u16(), &r.body()[..]), (400, &b"hello"[..]));
        let r = parsed(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n");
        assert_eq!(&r.body()[..], b"abcde");
        let eof = b"HTTP/1.1 500 Oops\r\n\r\nall of it";
        assert!(parse_response(eof, false).unwrap().is_none());
        assert_eq!(
            &parse_response(eof, true).unwrap().unwrap().body()[..],
            b"all of it"
        );
        let r = parsed(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert!(r.body().is_empty());
    }

    #[test]
    fn bad_responses_are_named() {
        let cases: [(&[u8], &str); 6] = [
            (b"", "without a response"),
            (b"HTTP/1.1 200 OK\r\nContent-Le", "inside the response head"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
                "after 3 of 9",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "not a number",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "not a hex number",
            ),
            (b"SMTP ready\r\n\r\n", "response head"),
        ];
        for (bytes, want) in cases {
            let e = parse_response(bytes, true).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    /// What a one-shot test server saw of a request.
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    /// Serves one connection on 127.0.0.1: reads the head, then (with `read_body`) the body
    /// its Content-Length names, and answers `answer` (then drains what is still sent).
    async fn one_shot(
        answer: &'static [u8],
        read_body: bool,
    ) -> (String, tokio::task::JoinHandle<Seen>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let end = loop {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b).await.unwrap();
                buf.extend_from_slice(&b[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                assert!(n > 0, "closed inside the head");
            };
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let mut body = buf[end..].to_vec();
            if read_body {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                while body.len() < len {
                    let mut b = vec![0u8; 1 << 16];
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => body.extend_from_slice(&b[..n]),
                        // The client gave up on the body: nothing to answer.
                        _ => return Seen { head, body },
                    }
                }
            }
            s.write_all(answer).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            Seen { head, body }
        });
        (addr, task)
    }

    /// A PUT to `addr` (its own body empty) and a file body of `len` bytes: `pieces`, each
    /// `Ok` or the error a damaged frame would give.
    fn request(
        addr: &str,
        len: u64,
        pieces: Vec<Result<Piece, BoxError>>,
    ) -> (Request<ReqBody>, FileBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for p in pieces {
            tx.try_send(p).unwrap();
        }
        let req = Request::put(format!("http://{addr}/v2/a/blobs/uploads/x?digest=d"))
            .header("Authorization", "Bearer t")
            .header("Content-Length", "999")
            .body(crate::transport::empty())
            .unwrap();
        (req, FileBody::new(len, rx))
    }

    #[tokio::test]
    async fn file_bodies_go_out_whole_and_answers_are_read() {
        for ranges in [Ranges::Sendfile, Ranges::Copy] {
            file_bodies_go_out_whole(ranges).await;
        }
    }

    async fn file_bodies_go_out_whole(ranges: Ranges) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
        let pieces = || {
            vec![
                Ok(Piece::Bytes(Bytes::from_static(b"head-"))),
                Ok(Piece::File {
                    file: std::sync::Arc::clone(&file),
                    path: path.clone(),
                    ranges: vec![(10, 100), (3000, 2000)],
                }),
                Ok(Piece::Bytes(Bytes::from_static(b"-tail"))),
            ]
        };
        let mut want = b"head-".to_vec();
        want.extend_from_slice(&content[10..110]);
        want.extend_from_slice(&content[3000..5000]);
        want.extend_from_slice(b"-tail");
        let len = want.len() as u64;

        // A whole exchange: the body as declared, the request's headers but its length.
        let (addr, seen) = one_shot(
            b"HTTP/1.1 201 Created\r\nLocation: /v2/a/blobs/d\r\nContent-Length: 0\r\n\r\n",
            true,
        )
        .await;
        let (req, files) = request(&addr, len, pieces());
        let resp = send_with(req, files, ranges).await.unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers()[header::LOCATION], "/v2/a/blobs/d");
        let seen = seen.await.unwrap();
        assert!(seen.body == want);
        let lines: Vec<&str> = seen.head.split("\r\n").collect();
        assert_eq!(lines[0], "PUT /v2/a/blobs/uploads/x?digest=d HTTP/1.1");
        // The request's headers once each, its own length replaced by the body's.
        for want in [
            format!("Host: {addr}"),
            "authorization: Bearer t".into(),
            format!("Content-Length: {len}"),
            "Connection: close".into(),
        ] {
            let n = lines.iter().filter(|l| **l == want).count();
            assert_eq!(n, 1, "{want:?} in {}", seen.head);
        }
        let lengths = lines
            .iter()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length"))
            .count();
        assert_eq!(lengths, 1, "{}", seen.head);

        // A refusal before the body was read is the answer, not a broken pipe.
        let (addr, _seen) = one_shot(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"\r\nContent-Length: 2\r\n\r\nno", false).await;
        let (req, files) = request(&addr, len, pieces());
        let resp = send_with(req, files, ranges).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));

        // A server that closes without an answer, and a body shorter than declared.
        let (addr, _seen) = one_shot(b"", true).await;
        let (req, files) = request(&addr, len, pieces());
        let e = send_with(req, files, ranges).await.unwrap_err().to_string();
        assert!(e.contains("without a response"), "{e}");
        let (addr, _seen) = one_shot(b"", false).await;
        let (req, files) = request(&addr, len + 1, pieces());
        let e = send_with(req, files, ranges).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("after {len} of its {} bytes", len + 1)),
            "{e}"
        );
        // A body that fails midway (a damaged frame) ends the request at once, though the
        // server still waits for the rest of the body.
        let (addr, seen) =
            one_shot(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", true).await;
        let pieces = vec![
            Ok(Piece::Bytes(Bytes::from_static(b"head-"))),
            Err("frame 7 is damaged".into()),
        ];
        let (req, files) = request(&addr, len, pieces);
        let e = tokio::time::timeout(Duration::from_secs(20), send_with(req, files, ranges))
            .await
            .expect("a failed body waited for an answer")
            .unwrap_err();
        assert!(e.to_string().contains("frame 7 is damaged"), "{e}");
        assert_eq!(seen.await.unwrap().body, b"head-");
        // A range past the file's end.
        let (addr, _seen) = one_shot(b"", false).await;
        let past = vec![Ok(Piece::File {
            file: std::sync::Arc::clone(&file),
            path: path.clone(),
            ranges: vec![(4000, 2000)],
        })];
        let (req, files) = request(&addr, 2000, past);
        let e = send_with(req, files, ranges).await.unwrap_err().to_string();
        let want = format!("{}: the file ends before byte 6000", path.display());
        assert!(e.contains(&want), "{e}");
    }

    /// A response as a registry might frame it.
    fn response() -> impl Strategy<Value = (u16, Vec<(String, String)>, Vec<u8>, u8)> {
        (
            200u16..600,
            proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,20}"), 0..4),
            proptest::collection::vec(any::<u8>(), 0..300),
            0u8..3,
        )
    }

    fn encode(
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
        framing: u8,
        cuts: &[usize],
    ) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
        for (k, v) in headers {
            if ["content-length", "transfer-encoding"].contains(&k.to_ascii_lowercase().as_str()) {
                continue;
            }
            out.extend_from_slice(format!("{k}: {}\r\n", v.trim()).as_bytes());
        }
        match framing {
            0 => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes())
            }
            1 => out.extend_from_slice(b"\r\n"),
            _ => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
        }
        if framing < 2 {
            out.extend_from_slice(body);
            return out;
        }
        let mut at = 0;
        for &c in cuts {
            let c = (c % (body.len() + 1)).max(at);
            if c > at {
                out.extend_from_slice(format!("{:x}\r\n", c - at).as_bytes());
                out.extend_from_slice(&body[at..c]);
                out.extend_from_slice(b"\r\n");
                at = c;
            }
        }
        if at < body.len() {
            out.extend_from_slice(format!("{:X}\r\n", body.len() - at).as_bytes());
            out.extend_from_slice(&body[at..]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        /// Whatever the framing, a response parses to what was sent, and no prefix of it is
        /// taken for a whole one (an unframed body ends with the connection).
        #[test]
        fn responses_round_trip((status, headers, body, framing) in response(),
                                cuts in proptest::collection::vec(any::<usize>(), 0..4),
                                split in any::<usize>()) {
            let bytes = encode(status, &headers, &body, framing, &cuts);
            let no_body = status == 204 || status == 304;
            let want: &[u8] = if framing == 1 && no_body { b"" } else { &body };
            let split = split % bytes.len();
            if !(framing == 1 && no_body) {
                prop_assert!(matches!(parse_response(&bytes[..split], false), Ok(None)));
            }
            let r = match parse_response(&bytes, false).unwrap() {
                Some(r) => r,
                None => {
                    prop_assert_eq!(framing, 1);
                    parse_response(&bytes, true).unwrap().unwrap()
                }
            };
            prop_assert_eq!(r.status().as_u16(), status);
            prop_assert_eq!(&r.body()[..], want);
        }

        /// Any bytes at all: an answer or an error, never a panic.
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), eof in any::<bool>()) {
            let _ = parse_response(&bytes, eof);
        }

        /// Bytes that start like a response head and go on at random.
        #[test]
        fn response_like_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..400), eof in any::<bool>()) {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            bytes.extend_from_slice(&tail);
            let _ = parse_response(&bytes, eof);
            let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec();
            bytes.extend_from_slice(&tail);
            let _ = parse_response(&bytes, eof);
        }
    }
}
