//! A registry that misbehaves (a small fake on 127.0.0.1; the real one never lies): each lie
//! is a clear error naming the reference and digest, and nothing unverified enters the cache.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use bundle_format::Digest;
use bundle_oci::auth::CredentialStore;
use bundle_oci::cache::BlobCache;
use bundle_oci::client::RetryPolicy;
use bundle_oci::{Client, Direct, Error, Reference, TlsOptions};

/// A canned answer: status, extra headers, body, and how many body bytes to claim.
#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    content_length: Option<usize>,
}

fn ok(body: &[u8], content_type: &str) -> Canned {
    Canned {
        status: 200,
        headers: vec![("Content-Type".into(), content_type.into())],
        body: body.to_vec(),
        content_length: None,
    }
}

/// Serves `GET path` from the table, one request per connection, until dropped.
struct Fake {
    host: String,
}

impl Fake {
    fn start(routes: HashMap<String, Canned>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                    // A TLS ClientHello: this fake speaks plain HTTP only.
                    if head == [0x16] {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut words = text.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let canned = match (method, routes.get(path)) {
                    ("GET" | "HEAD", Some(c)) => c.clone(),
                    ("GET" | "HEAD", None) if path == "/v2/" => ok(b"{}", "application/json"),
                    _ => Canned {
                        status: 404,
                        headers: Vec::new(),
                        body: br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#
                            .to_vec(),
                        content_length: None,
                    },
                };
                let mut out = format!(
                    "HTTP/1.1 {} X\r\nConnection: close\r\nContent-Length: {}\r\n",
                    canned.status,
                    canned.content_length.unwrap_or(canned.body.len())
                );
                for (k, v) in &canned.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = s.write_all(out.as_bytes());
                if method != "HEAD" {
                    let _ = s.write_all(&canned.body);
                }
            }
        });
        Fake { host }
    }
}

fn client(host: &str) -> Client {
    let mut tls = TlsOptions::default();
    tls.insecure.insert(host.to_owned());
    Client::new(
        Arc::new(Direct::new(&tls).unwrap()),
        CredentialStore::empty(),
        tls,
    )
    .with_retry(RetryPolicy {
        attempts: 2,
        base: Duration::from_millis(10),
        max: Duration::from_millis(20),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A manifest for a config and one layer, and the three blobs.
fn image(layer: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        Digest::of(&config),
        config.len(),
        Digest::of(layer),
        layer.len()
    );
    (manifest.into_bytes(), config)
}

fn cache_is_clean(cache: &BlobCache, d: &Digest) {
    assert!(
        !cache.path(d).exists(),
        "unverified blob {d} entered the cache"
    );
    let tmp: Vec<_> = std::fs::read_dir(cache.root().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "temp files left in the cache: {tmp:?}");
}

#[test]
fn lies_and_damage_are_named_and_never_cached() {
    let layer = b"layer bytes, the real ones".to_vec();
    let (manifest, config) = image(&layer);
    let (md, cd, ld) = (
        Digest::of(&manifest),
        Digest::of(&config),
        Digest::of(&layer),
    );
    let mut routes = HashMap::new();
    // A registry that lies about Docker-Content-Digest.
    let mut lie = ok(&manifest, MANIFEST);
    lie.headers.push((
        "Docker-Content-Digest".into(),
        Digest::of(b"other").to_string(),
    ));
    routes.insert("/v2/lie/app/manifests/1".to_owned(), lie);
    // A manifest asked for by digest that is not that digest.
    routes.insert(
        format!("/v2/swap/app/manifests/{md}"),
        ok(b"{\"schemaVersion\":2}", MANIFEST),
    );
    // A blob cut short, and a blob with the wrong bytes (same length).
    for repo in ["short", "wrong"] {
        routes.insert(
            format!("/v2/{repo}/app/manifests/1"),
            ok(&manifest, MANIFEST),
        );
        routes.insert(
            format!("/v2/{repo}/app/blobs/{cd}"),
            ok(&config, "application/octet-stream"),
        );
    }
    let mut short = ok(&layer[..10], "application/octet-stream");
    short.content_length = Some(10);
    routes.insert(format!("/v2/short/app/blobs/{ld}"), short);
    let mut wrong = layer.clone();
    wrong[0] ^= 1;
    routes.insert(
        format!("/v2/wrong/app/blobs/{ld}"),
        ok(&wrong, "application/octet-stream"),
    );
    // An index without the platform asked for.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{MANIFEST}","digest":"{md}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        manifest.len()
    );
    routes.insert(
        "/v2/multi/app/manifests/1".to_owned(),
        ok(index.as_bytes(), "application/vnd.oci.image.index.v1+json"),
    );
    let fake = Fake::start(routes);
    let host = fake.host.clone();
    let c = client(&host);
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path()).unwrap();
    let pull = |repo: &str, platforms: &[bundle_layout::Platform]| {
        let r: Reference = format!("{host}/{repo}/app:1").parse().unwrap();
        rt.block_on(bundle_oci::pull::pull(
            &c,
            &cache,
            &format!("x/{repo}:1"),
            &r,
            platforms,
            2,
        ))
    };

    let e = pull("lie", &[]).unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("lie/app:1") && msg.contains("Docker-Content-Digest"),
        "{msg}"
    );
    cache_is_clean(&cache, &md);

    let swapped: Reference = format!("{host}/swap/app@{md}").parse().unwrap();
    let e = rt.block_on(c.get_manifest(&swapped)).unwrap_err();
    assert!(
        matches!(e, Error::DigestMismatch { expected, .. } if expected == md),
        "{e}"
    );

    let e = pull("short", &[]).unwrap_err();
    let msg = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(msg.contains(&ld.to_string()), "{msg}");
    cache_is_clean(&cache, &ld);

    let e = pull("wrong", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::DigestMismatch { expected, .. } if expected == ld),
        "{msg}"
    );
    assert!(msg.contains("wrong/app"), "{msg}");
    cache_is_clean(&cache, &ld);

    let arm: bundle_layout::Platform = "linux/arm64".parse().unwrap();
    let e = pull("multi", &[arm]).unwrap_err().to_string();
    assert!(
        e.contains("x/multi:1") && e.contains("linux/arm64") && e.contains("linux/amd64"),
        "{e}"
    );

    let e = pull("absent", &[]).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("absent/app:1"), "{e}");
}

/// The streaming pull of `bundle create`: layers download while the writer compresses those
/// already in. Two images sharing a layer download it once; a damaged layer stops the write
/// with the blob and repository named, leaving no archive and nothing unverified in the cache.
#[test]
fn streamed_pulls_share_downloads_and_stop_on_a_bad_blob() {
    let shared = b"a layer both images carry".repeat(5000);
    let own = b"a layer of the second image only".repeat(3000);
    let (m1, c1) = image(&shared);
    // The second image: the shared layer and one of its own.
    let c2 =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"x":2}"#
            .to_vec();
    let layer = |l: &[u8]| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#,
            Digest::of(l),
            l.len()
        )
    };
    let m2 = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{},{}]}}"#,
        Digest::of(&c2),
        c2.len(),
        layer(&shared),
        layer(&own)
    )
    .into_bytes();
    let mut routes = HashMap::new();
    for (repo, m, c, layers) in [
        ("one", &m1, &c1, vec![&shared]),
        ("two", &m2, &c2, vec![&shared, &own]),
    ] {
        routes.insert(format!("/v2/{repo}/app/manifests/1"), ok(m, MANIFEST));
        routes.insert(
            format!("/v2/{repo}/app/blobs/{}", Digest::of(c)),
            ok(c, "application/octet-stream"),
        );
        for l in layers {
            routes.insert(
                format!("/v2/{repo}/app/blobs/{}", Digest::of(l)),
                ok(l, "application/octet-stream"),
            );
        }
    }
    // A third image whose layer comes back damaged.
    let mut damaged = own.clone();
    damaged[7] ^= 1;
    let (m3, c3) = image(&own);
    routes.insert("/v2/bad/app/manifests/1".into(), ok(&m3, MANIFEST));
    routes.insert(
        format!("/v2/bad/app/blobs/{}", Digest::of(&c3)),
        ok(&c3, "application/octet-stream"),
    );
    routes.insert(
        format!("/v2/bad/app/blobs/{}", Digest::of(&own)),
        ok(&damaged, "application/octet-stream"),
    );
    let fake = Fake::start(routes);
    let host = fake.host.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    let create = |repos: &[&str], cache: &BlobCache, out: &std::path::Path| {
        let puller = bundle_oci::pull::Puller::new(client(&host), cache.clone(), 2);
        let mut input = bundle_format::BundleInput {
            name: "streamed".into(),
            version: "1".into(),
            ..Default::default()
        };
        let mut missing = Vec::new();
        for repo in repos {
            let r: Reference = format!("{host}/{repo}/app:1").parse().unwrap();
            let res = rt
                .block_on(puller.resolve(&format!("x/{repo}:1"), &r, &[]))
                .unwrap();
            missing.extend(res.missing);
            input.images.push(res.resolved.image);
            input.blobs.extend(res.resolved.blobs);
        }
        let downloads = {
            let _rt = rt.enter();
            puller.start(missing)
        };
        let written = bundle_format::write_arriving(
            &input,
            out,
            &bundle_format::WriteOptions::default(),
            Some(&downloads),
        );
        (written, rt.block_on(downloads.finish()).unwrap())
    };

    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let out = dir.path().join("good.bundle");
    let (written, downloaded) = create(&["one", "two"], &cache, &out);
    written.unwrap();
    // The shared layer once, the other layer once; configs came with the manifests.
    assert_eq!(downloaded, (shared.len() + own.len()) as u64);
    let archive = bundle_format::Archive::open(&out).unwrap();
    archive.verify(true).unwrap();
    assert_eq!(archive.index().images.len(), 2);
    // Everything is cached now: a second run downloads nothing.
    let again = dir.path().join("again.bundle");
    let (written, downloaded) = create(&["one", "two"], &cache, &again);
    written.unwrap();
    assert_eq!(downloaded, 0);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());

    let cache = BlobCache::open(&dir.path().join("fresh")).unwrap();
    let out = dir.path().join("bad.bundle");
    let (written, _) = create(&["one", "bad"], &cache, &out);
    let e = written.unwrap_err();
    let od = Digest::of(&own);
    let chain = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    assert!(
        matches!(&e, bundle_format::Error::Arrival { digest, .. } if *digest == od),
        "{chain}"
    );
    assert!(
        chain.contains("bad/app") && chain.contains(&od.to_string()),
        "{chain}"
    );
    assert!(!out.exists(), "an archive was left at {}", out.display());
    cache_is_clean(&cache, &od);
}
