//! Fuzzes what the registry server parses from a request before any store sees it: the
//! request target (path and query, into a checked route), the `Range` and `Content-Range`
//! headers, and manifest bodies. Input: `PATH[?QUERY]\nRANGE\nCONTENT-RANGE\nBODY`.
#![no_main]

use libfuzzer_sys::fuzz_target;

use bundle_oci::server::{http_io, route};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let target = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*target, None),
    };
    if let Ok(r) = route::parse(path, query) {
        // A parsed name never holds anything a filesystem path could escape with.
        if let Some(name) = r.name() {
            assert!(route::valid_name(name));
            assert!(!name.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
        }
    }
    let size = data.len() as u64;
    if let Some(range) = lines.next() {
        if let Ok(v) = http::HeaderValue::from_bytes(range) {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::RANGE, v.clone());
            if let Ok(Some((a, b))) = http_io::parse_range(&h, size) {
                assert!(a <= b && b < size);
            }
        }
    }
    if let Some(cr) = lines.next() {
        if let Ok(v) = http::HeaderValue::from_bytes(cr) {
            let _ = http_io::parse_content_range(&v);
        }
    }
    if let Some(body) = lines.next() {
        if let Ok(doc) = bundle_oci::manifest::Doc::parse(body) {
            for d in doc.blobs().chain(doc.manifests.iter().flatten()) {
                let _ = d.digest();
            }
        }
    }
});
