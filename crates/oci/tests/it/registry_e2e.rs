//! Push and pull against the real registry in every mode, under faults, and after a kill.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bundle_format::{Archive, BlobInput, BundleInput, Content, Digest, ImageInput, WriteOptions};
use bundle_oci::auth::{CredentialStore, Credentials};
use bundle_oci::cache::BlobCache;
use bundle_oci::client::RetryPolicy;
use bundle_oci::push::{PushOptions, PushReport, Target};
use bundle_oci::{Client, Direct, Error, ProxyConfig, TlsOptions};

use crate::harness::{self, FaultProxy, Mode, Registry, Rule};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 6,
        base: Duration::from_millis(20),
        max: Duration::from_millis(400),
    }
}

/// A client for `host` with the registry's CA and credentials.
fn client(reg: &Registry, host: &str, creds: Option<(&str, &str)>) -> Client {
    client_via(reg, host, creds, ProxyConfig::Off)
}

/// [`client`], through `proxy`.
fn client_via(
    reg: &Registry,
    host: &str,
    creds: Option<(&str, &str)>,
    proxy: ProxyConfig,
) -> Client {
    let mut tls = TlsOptions {
        proxy,
        ..TlsOptions::default()
    };
    if reg.is_plain() {
        tls.insecure.insert(host.to_owned());
    }
    tls.ca_files.extend(reg.ca_file());
    // Credentials come the way people have them: a docker config.json with `auths`.
    let store = match creds {
        Some((u, p)) => {
            use base64::Engine as _;
            let dir = tempfile::tempdir().unwrap().keep();
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            let path = dir.join("config.json");
            std::fs::write(
                &path,
                format!(r#"{{"auths":{{"https://{host}":{{"auth":"{auth}"}}}}}}"#),
            )
            .unwrap();
            let store = CredentialStore::from_file(&path).unwrap();
            assert_eq!(
                store.get(host).unwrap(),
                Some(Credentials::Basic {
                    username: u.into(),
                    password: p.into()
                })
            );
            store
        }
        None => CredentialStore::empty(),
    };
    Client::new(Arc::new(Direct::new(&tls).unwrap()), store, tls).with_retry(fast_retry())
}

/// The small image set as an archive: app, multi (two platforms), plain, docker-archive.
fn small_archive(dir: &Path) -> (PathBuf, Arc<Archive>) {
    let set = bundle_testimages::small_set(&dir.join("images")).unwrap();
    let mut input = BundleInput {
        name: "e2e".into(),
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
        let spec = bundle_layout::SourceSpec::parse(&spec).unwrap();
        let r = bundle_layout::resolve(name, &spec, &[]).unwrap();
        input.images.push(r.image);
        input.blobs.extend(r.blobs);
    }
    let out = dir.join("e2e.bundle");
    bundle_format::write(&input, &out, &WriteOptions::default()).unwrap();
    let a = Arc::new(Archive::open(&out).unwrap());
    (out, a)
}

fn mem_blob(bytes: Vec<u8>, media_type: &str) -> BlobInput {
    BlobInput {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        media_type: Some(media_type.into()),
        content: Content::Bytes(Arc::from(bytes)),
    }
}

/// One image with `layers` incompressible layers of `size` bytes each.
fn big_archive(dir: &Path, layers: usize, size: usize) -> Arc<Archive> {
    big_archive_of(dir, layers, size, false)
}

/// [`big_archive`]; with `gzip_magic`, each layer starts with `1f 8b`, so that its frames after
/// the first are stored (spec/format-v1.md section 4).
fn big_archive_of(dir: &Path, layers: usize, size: usize, gzip_magic: bool) -> Arc<Archive> {
    big_archive_sized(dir, &vec![size; layers], gzip_magic)
}

/// [`big_archive_of`], with a layer of each of `sizes`.
fn big_archive_sized(dir: &Path, sizes: &[usize], gzip_magic: bool) -> Arc<Archive> {
    let mut blobs: Vec<BlobInput> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mut noise = bundle_testimages::noise(i as u64 + 1, size);
            if gzip_magic {
                noise[..2].copy_from_slice(&[0x1f, 0x8b]);
            }
            mem_blob(noise, "application/vnd.oci.image.layer.v1.tar+gzip")
        })
        .collect();
    let config = mem_blob(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
        "application/vnd.oci.image.config.v1+json",
    );
    let layer_json: Vec<String> = blobs
        .iter()
        .map(|b| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#, b.digest, b.size))
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.digest,
        config.size,
        layer_json.join(",")
    );
    let m = mem_blob(
        manifest.into_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let image = ImageInput {
        name: "registry.example/big/app:1".into(),
        digest: m.digest,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: m.size,
        platforms: vec!["linux/amd64".into()],
    };
    blobs.push(config);
    blobs.push(m);
    let out = dir.join("big.bundle");
    let input = BundleInput {
        name: "big".into(),
        version: "1".into(),
        created: None,
        images: vec![image],
        blobs,
    };
    bundle_format::write(
        &input,
        &out,
        &WriteOptions {
            level: 1,
            split_size: None,
        },
    )
    .unwrap();
    Arc::new(Archive::open(&out).unwrap())
}

/// The largest layer of a [`big_archive`].
fn largest_layer(archive: &Archive) -> bundle_format::index::BlobEntry {
    archive
        .index()
        .blobs
        .iter()
        .max_by_key(|b| b.size)
        .unwrap()
        .clone()
}

/// Pushes `archive` (a [`big_archive`] with a damaged blob `bad`) into a fresh registry
/// without and with `verify`: each push must fail and leave `bad` out of the registry.
/// Returns each push's error, for the caller to check that it names the damage.
fn refused_pushes(
    rt: &tokio::runtime::Runtime,
    archive: &Arc<Archive>,
    bad: &Digest,
) -> Vec<(bool, String)> {
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let c = client(&reg, &host, None);
    let repo = bundle_oci::Repo {
        registry: host.clone(),
        name: "big/app".into(),
    };
    let scope = bundle_oci::Scope::Pull(repo.name.clone());
    [false, true]
        .into_iter()
        .map(|verify| {
            let o = PushOptions {
                verify,
                ..opts(&host, 1 << 20, 2)
            };
            let e = push_all(rt, &c, archive, &o).unwrap_err().to_string();
            let landed = rt.block_on(c.blob_size(&repo, &scope, bad)).unwrap();
            assert_eq!(landed, None, "verify {verify}: the damaged blob landed");
            (verify, e)
        })
        .collect()
}

fn opts(host: &str, chunk: u64, jobs: usize) -> PushOptions {
    PushOptions {
        target: host.parse::<Target>().unwrap(),
        images: Vec::new(),
        jobs,
        chunk_size: chunk,
        verify: false,
    }
}

/// Pushes every image of `archive`.
fn push_all(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    archive: &Arc<Archive>,
    o: &PushOptions,
) -> bundle_oci::Result<PushReport> {
    rt.block_on(bundle_oci::push::push(c, Arc::clone(archive), o))
}

/// Every pushed image is where it should be, with the archive's digest (read by skopeo).
fn check_with_skopeo(reg: &Registry, report: &PushReport) {
    for (name, to, digest) in &report.images {
        let repo_ref = format!("{}:{}", to.repository, to.tag.as_deref().unwrap());
        let raw = reg
            .inspect_raw(&repo_ref)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(Digest::of(&raw), *digest, "{name} at {to}");
    }
}

#[test]
fn push_repush_and_pull_in_every_mode() {
    // Over plain HTTP (PlainToken too) uploads go through the sendfile path with its bearer
    // tokens.
    for mode in [
        Mode::Plain,
        Mode::Tls,
        Mode::TlsBasicAuth,
        Mode::Token,
        Mode::PlainToken,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_, archive) = small_archive(dir.path());
        let reg = Registry::start(mode);
        let host = reg.host();
        let c = client(&reg, &host, reg.credentials());
        let rt = rt();
        let first = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 4)).unwrap();
        assert_eq!(first.images.len(), 4, "{mode:?}");
        assert!(
            first.uploaded > 0 && first.skipped == 0,
            "{mode:?}: {first:?}"
        );
        // The base layer is shared by app and multi in repository team/..., and docker's
        // layers live in another repository: blobs are uploaded once and mounted elsewhere.
        assert!(first.mounted > 0, "{mode:?}: {first:?}");
        check_with_skopeo(&reg, &first);
        // Re-push: nothing is uploaded again.
        let again = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 4)).unwrap();
        assert_eq!(
            (again.uploaded, again.mounted, again.bytes_sent),
            (0, 0, 0),
            "{mode:?}: {again:?}"
        );
        assert_eq!(again.skipped, first.uploaded + first.mounted, "{mode:?}");
        // Manifests too: each is found under its reference with its digest, none is put.
        assert_eq!(
            (again.manifests, again.manifests_present),
            (0, first.manifests),
            "{mode:?}: {again:?}"
        );
        assert!(first.manifests >= 5, "{first:?}");
        // Pull every image back into a fresh cache: same digests, every blob verified.
        let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
        for (name, to, digest) in &first.images {
            let pulled = rt
                .block_on(bundle_oci::pull::pull(&c, &cache, name, to, &[], 4))
                .unwrap_or_else(|e| panic!("{mode:?} pull {to}: {e}"));
            assert_eq!(pulled.pulled, *digest);
            assert_eq!(pulled.resolved.image.digest, *digest);
            for b in &pulled.resolved.blobs {
                if let Content::File { path, .. } = &b.content {
                    assert_eq!(Digest::of(&std::fs::read(path).unwrap()), b.digest);
                }
            }
        }
        if matches!(mode, Mode::Token | Mode::PlainToken) {
            let ts = reg.token_server().unwrap();
            // Tokens are cached per scope: a handful, not one per request.
            // Exactly one per scope, even with parallel uploads meeting the challenge at once.
            // (skopeo, checking our pushes, asks the same token server too.)
            let scopes = ts.scopes();
            let distinct: std::collections::BTreeSet<&String> = scopes.iter().collect();
            assert!(
                c.stats().token_requests > 0,
                "{mode:?}: no token was asked for"
            );
            assert_eq!(
                c.stats().token_requests as usize,
                distinct.len(),
                "tokens for the same scope fetched twice: {scopes:?}"
            );
        }
    }
}

#[test]
fn skopeo_reads_what_we_pushed_and_we_pull_what_skopeo_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, archive) = small_archive(dir.path());
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let c = client(&reg, &host, None);
    let rt = rt();
    let report = rt
        .block_on(bundle_oci::push::push(
            &c,
            archive,
            &opts(&host, 1 << 20, 4),
        ))
        .unwrap();
    let multi = report
        .images
        .iter()
        .find(|i| i.0.contains("multi"))
        .unwrap();
    let out = dir.path().join("copied");
    let mut src = vec![
        "copy".to_owned(),
        "--all".into(),
        "--preserve-digests".into(),
    ];
    src.extend(reg.skopeo_src_args());
    src.push(reg.docker_ref("team/multi:1.0"));
    src.push(format!("oci:{}:x", out.display()));
    let args: Vec<&str> = src.iter().map(String::as_str).collect();
    harness::skopeo(&args).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], multi.2.to_string());

    // The other way: skopeo seeds, we pull (with a platform filter, as create does).
    let (_tmp, set) = harness::small_images();
    let dest = reg.docker_ref("seeded/multi:2");
    let mut extra = vec!["--all".to_owned()];
    extra.extend(reg.skopeo_dest_args());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    harness::skopeo_copy(&harness::oci_ref(&set, "multi-1.0"), &dest, &extra).unwrap();
    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let r: bundle_oci::Reference = format!("{host}/seeded/multi:2").parse().unwrap();
    let arm: bundle_layout::Platform = "linux/arm64".parse().unwrap();
    let pulled = rt
        .block_on(bundle_oci::pull::pull(
            &c,
            &cache,
            "x/multi:2",
            &r,
            &[arm],
            4,
        ))
        .unwrap();
    let want = set
        .images
        .iter()
        .find(|i| i.tag.as_deref() == Some("multi-1.0"))
        .unwrap();
    assert_eq!(
        Some(pulled.pulled.to_string()),
        want.descriptor.as_ref().map(|d| d.digest.clone())
    );
    assert_eq!(
        pulled.resolved.image.platforms,
        vec!["linux/arm64".to_owned()]
    );
    assert_eq!(
        pulled.resolved.notes.len(),
        1,
        "{:?}",
        pulled.resolved.notes
    );
}

#[test]
fn refused_credentials_and_unknown_ca_are_named() {
    let reg = Registry::start(Mode::TlsBasicAuth);
    let host = reg.host();
    let rt = rt();
    let r: bundle_oci::Reference = format!("{host}/team/app:1.0").parse().unwrap();
    let wrong = client(&reg, &host, Some(("tester", "wrong")));
    let e = rt.block_on(wrong.get_manifest(&r)).unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains(&host), "{e}");
    let none = client(&reg, &host, None);
    let e = rt.block_on(none.get_manifest(&r)).unwrap_err().to_string();
    assert!(e.contains("no credentials"), "{e}");
    // TLS without the CA: a certificate error, not a hang or a panic.
    let tls = TlsOptions::default();
    let c = Client::new(
        Arc::new(Direct::new(&tls).unwrap()),
        CredentialStore::empty(),
        tls,
    )
    .with_retry(RetryPolicy {
        attempts: 1,
        ..fast_retry()
    });
    let e = rt.block_on(c.get_manifest(&r)).unwrap_err();
    let chain = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(
        chain.to_lowercase().contains("certificate") || chain.contains("UnknownIssuer"),
        "{chain}"
    );
    // Nothing listens: the error names the registry.
    let port = harness::free_port();
    let gone: bundle_oci::Reference = format!("127.0.0.1:{port}/x/y:1").parse().unwrap();
    let mut tls = TlsOptions::default();
    tls.insecure.insert(format!("127.0.0.1:{port}"));
    let c = Client::new(
        Arc::new(Direct::new(&tls).unwrap()),
        CredentialStore::empty(),
        tls,
    )
    .with_retry(RetryPolicy {
        attempts: 2,
        ..fast_retry()
    });
    let e = rt.block_on(c.get_manifest(&gone)).unwrap_err().to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn faults_from_a_proxy_do_not_stop_push_or_pull() {
    let dir = tempfile::tempdir().unwrap();
    // Layers that start like gzip: their stored frames go out by sendfile, through faults.
    let archive = big_archive_of(dir.path(), 3, 3 << 20, true);
    let reg = Registry::start(Mode::Plain);
    let proxy = FaultProxy::start(
        &reg.host(),
        vec![
            Rule::new(harness::Fault::Status(503)).every(3),
            Rule::new(harness::Fault::Status(429)).every(5),
            Rule::new(harness::Fault::ResetAfter(200)).every(7),
        ],
    );
    let host = proxy.host();
    let c = client(&reg, &host, None);
    let rt = rt();
    let report = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2)).unwrap();
    assert!(proxy.faults() > 0, "the proxy injected nothing");
    assert!(c.stats().retries > 0);
    assert!(report.bytes_from_files > 0, "{report:?}");
    proxy.set_enabled(false);
    check_with_skopeo(&reg, &report);
    proxy.set_enabled(true);
    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let (name, to, digest) = &report.images[0];
    let pulled = rt
        .block_on(bundle_oci::pull::pull(&c, &cache, name, to, &[], 2))
        .unwrap();
    assert_eq!(pulled.pulled, *digest);
    for b in &archive.index().blobs {
        assert!(cache.has(&b.digest, b.size), "{} not cached", b.digest);
    }
}

#[test]
fn blobs_go_up_largest_first() {
    let dir = tempfile::tempdir().unwrap();
    // 24 sizes listed out of order (7 is coprime to 24); one upload at a time shows the order
    // they are taken in.
    let sizes: Vec<usize> = (0..24).map(|i| (1 + i * 7 % 24) << 15).collect();
    let archive = big_archive_sized(dir.path(), &sizes, false);
    let reg = Registry::start(Mode::Plain);
    let proxy = FaultProxy::start(&reg.host(), Vec::new());
    let host = proxy.host();
    let c = client(&reg, &host, None);
    // Many runtime threads: tasks that merely wait their turn are first polled in any order,
    // which a single push may or may not show; the re-pushes (a HEAD per blob) repeat it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(8)
        .enable_all()
        .build()
        .unwrap();
    for push in 0..16 {
        let before = proxy.log().len();
        let report = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 1)).unwrap();
        let blobs = sizes.len() as u64 + 1;
        match push {
            0 => assert_eq!(report.uploaded, blobs, "{report:?}"),
            _ => assert_eq!(report.skipped, blobs, "{report:?}"),
        }
        // Each blob's first request is the HEAD asking whether the registry has it.
        let started: Vec<u64> = proxy.log()[before..]
            .iter()
            .filter(|l| l.starts_with("HEAD ") && l.contains("/blobs/sha256:"))
            .map(|l| {
                let hex = l.split("/blobs/sha256:").nth(1).unwrap();
                let d: Digest = format!("sha256:{}", &hex[..64]).parse().unwrap();
                archive.index().blob(&d).unwrap().size
            })
            .collect();
        assert_eq!(started.len(), sizes.len() + 1, "{:#?}", proxy.log());
        assert!(
            started.is_sorted_by(|a, b| a >= b),
            "push {push}: blobs were started in this order of sizes: {started:?}"
        );
    }
}

/// Blob transfers overlap, and never more than `jobs` at once, in a push and in a pull: the
/// proxy holds every blob request (HEAD, upload, download) a while and counts how many it holds
/// together.
#[test]
fn blob_transfers_are_parallel_and_bounded_by_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let archive = big_archive_of(dir.path(), 10, 64 << 10, false);
    let rt = rt();
    for jobs in [1, 3] {
        let reg = Registry::start(Mode::Plain);
        let proxy = FaultProxy::start(
            &reg.host(),
            vec![Rule::new(harness::Fault::Hold(40)).when("/blobs/")],
        );
        let host = proxy.host();
        let c = client(&reg, &host, None);
        let report = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, jobs)).unwrap();
        assert_eq!(report.uploaded, 11, "{report:?}");
        let pushed = proxy.take_max_held();
        let cache = BlobCache::open(&dir.path().join(format!("cache-{jobs}"))).unwrap();
        let r: bundle_oci::Reference = format!("{host}/big/app:1").parse().unwrap();
        rt.block_on(bundle_oci::pull::pull(
            &c,
            &cache,
            "big/app:1",
            &r,
            &[],
            jobs,
        ))
        .unwrap();
        let pulled = proxy.take_max_held();
        let log = proxy.log();
        assert!(
            log.iter()
                .filter(|l| l.starts_with("GET ") && l.contains("/blobs/"))
                .count()
                >= 11,
            "{log:#?}"
        );
        match jobs {
            1 => assert_eq!((pushed, pulled), (1, 1), "jobs 1"),
            _ => {
                assert!(
                    (2..=jobs as u64).contains(&pushed),
                    "push: {pushed} at once with --jobs {jobs}"
                );
                assert!(
                    (2..=jobs as u64).contains(&pulled),
                    "pull: {pulled} at once with --jobs {jobs}"
                );
            }
        }
    }
}

#[test]
fn registry_killed_mid_push_then_rerun_skips_what_arrived() {
    let dir = tempfile::tempdir().unwrap();
    // Stored frames: the registry dies under a sendfile too.
    let archive = big_archive_of(dir.path(), 12, 4 << 20, true);
    let total: u64 = archive.index().blobs.iter().map(|b| b.size).sum();
    let mut reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let storage = reg.storage_dir();
    let rt = rt();
    let c = client(&reg, &host, None).with_retry(RetryPolicy {
        attempts: 2,
        base: Duration::from_millis(10),
        max: Duration::from_millis(20),
    });
    let task = {
        let (c, archive, o) = (c.clone(), Arc::clone(&archive), opts(&host, 1 << 20, 1));
        rt.spawn(async move { bundle_oci::push::push(&c, archive, &o).await })
    };
    // Kill the registry once a few blobs have landed.
    let blobs_dir = storage.join("docker/registry/v2/blobs/sha256");
    let count = || walk_count(&blobs_dir);
    let started = std::time::Instant::now();
    while count() < 3 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    reg.stop();
    let first = rt.block_on(task).unwrap();
    assert!(
        first.is_err(),
        "the push finished before the registry was killed; make the blobs bigger"
    );
    reg.restart();
    let c = client(&reg, &host, None);
    let second = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2)).unwrap();
    assert!(second.skipped >= 2, "{second:?}");
    assert!(second.bytes_sent < total, "re-sent everything: {second:?}");
    check_with_skopeo(&reg, &second);
}

/// distribution writes a blob's repository link in place, so a registry killed at that moment
/// keeps an empty link and answers 500 ("invalid checksum digest format") to every HEAD of that
/// blob. A re-push uploads such blobs again, which rewrites the links, instead of failing.
#[test]
fn blobs_a_killed_registry_left_half_linked_are_pushed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_, archive) = small_archive(dir.path());
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let c = client(&reg, &host, None);
    let rt = rt();
    let first = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2)).unwrap();
    let repos = reg.storage_dir().join("docker/registry/v2/repositories");
    let mut links = Vec::new();
    collect_named(&repos, "link", &mut links);
    let mut emptied = 0;
    for link in links
        .iter()
        .filter(|p| p.to_string_lossy().contains("/_layers/"))
    {
        std::fs::write(link, b"").unwrap();
        emptied += 1;
    }
    assert!(emptied > 0, "no layer links under {}", repos.display());
    let again = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2))
        .unwrap_or_else(|e| panic!("re-push over emptied links: {e}"));
    assert!(again.uploaded + again.mounted > 0, "{again:?}");
    check_with_skopeo(&reg, &again);
    assert_eq!(again.images, first.images);
}

fn collect_named(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_named(&p, name, out);
        } else if e.file_name() == name {
            out.push(p);
        }
    }
}

/// Without `verify`, frames are not hashed on the way out. A frame forged so that zstd's own
/// checksum still holds sends other content, which the registry refuses (its digest does not
/// match); push then hashes that blob's frames and names the forged one. With `verify`, the
/// frame is refused before it is sent. Either way the blob never lands.
#[test]
fn a_forged_frame_is_named_with_and_without_verify() {
    let dir = tempfile::tempdir().unwrap();
    let archive = big_archive(dir.path(), 1, 3 << 20);
    let layer = largest_layer(&archive);
    let k = layer.first_frame + 1;
    let frame = &archive.index().frames[k as usize];
    let (offset, csize) = (frame.offset(), frame.csize() as usize);
    let mut content = Vec::new();
    archive.decompress_frame(k, &mut content).unwrap();
    content[1000] ^= 1;
    // Noise compresses to raw blocks: the forged frame has the length of the real one.
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .unwrap();
    let forged = z.compress(&content).unwrap();
    assert_eq!(forged.len(), csize);
    drop(archive);
    let path = dir.path().join("big.bundle");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize..offset as usize + csize].copy_from_slice(&forged);
    std::fs::write(&path, &bytes).unwrap();
    let archive = Arc::new(Archive::open(&path).unwrap());
    for (verify, e) in refused_pushes(&rt(), &archive, &layer.digest) {
        assert!(
            e.contains(&format!("frame {k} ")) && e.contains("sha256 mismatch"),
            "verify {verify}: {e}"
        );
    }
}

/// Stored frames (an already compressed layer's) are sent as they lie in the file, block
/// contents only: the pushed blob is exactly the layer (skopeo reads it back by digest). A
/// stored frame whose content was changed on disk is not hashed on the way out without
/// `verify`; the registry refuses the blob and push names the frame. One whose block header
/// was damaged is decompressed instead, which names it too.
#[test]
fn stored_frames_are_sent_as_they_lie_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let archive = big_archive_of(dir.path(), 2, 3 << 20, true);
    let layer = largest_layer(&archive);
    let k = layer.first_frame + 1;
    let mut content = Vec::new();
    assert!(
        archive.read_stored(k, &mut content).unwrap(),
        "frame {k} is stored"
    );
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let c = client(&reg, &host, None);
    let rt = rt();
    let report = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2)).unwrap();
    check_with_skopeo(&reg, &report);
    // Over plain HTTP the stored frames' content went from the file by sendfile: exactly
    // those bytes, the rest (first frames, small blobs) from memory.
    let stored: u64 = archive
        .index()
        .blobs
        .iter()
        .flat_map(|b| archive.blob_frames(&b.digest, 0, b.size).unwrap())
        .filter(|(f, _)| archive.stored_frame(*f).unwrap().is_some())
        .map(|(_, r)| r.len() as u64)
        .sum();
    assert!(stored > 4 << 20, "{stored}");
    assert_eq!(report.bytes_from_files, stored, "{report:?}");
    // Over TLS every byte is read and encrypted here; the registry holds the same images.
    let tls = Registry::start(Mode::Tls);
    let tls_host = tls.host();
    let tls_client = client(&tls, &tls_host, None);
    let over_tls = push_all(&rt, &tls_client, &archive, &opts(&tls_host, 1 << 20, 2)).unwrap();
    assert_eq!(
        (over_tls.bytes_from_files, over_tls.bytes_sent),
        (0, report.bytes_sent)
    );
    check_with_skopeo(&tls, &over_tls);

    let frame = &archive.index().frames[k as usize];
    let offset = frame.offset() as usize;
    drop(archive);
    let path = dir.path().join("big.bundle");
    let pristine = std::fs::read(&path).unwrap();
    // A content byte of the second block, then the second block's header.
    for (at, what) in [
        (9 + 131_072 + 3 + 100, "content"),
        (9 + 131_072 + 1, "block header"),
    ] {
        let mut bytes = pristine.clone();
        bytes[offset + at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let archive = Arc::new(Archive::open(&path).unwrap());
        for (verify, e) in refused_pushes(&rt, &archive, &layer.digest) {
            assert!(
                e.contains(&format!("frame {k} ")),
                "{what}, verify {verify}: {e}"
            );
        }
    }
}

#[test]
fn chunked_upload_survives_lost_chunk_responses() {
    let dir = tempfile::tempdir().unwrap();
    let archive = big_archive_of(dir.path(), 1, 40 << 20, true);
    let reg = Registry::start(Mode::Plain);
    // Reset the connection of a few PATCH requests after part of the response.
    let proxy = FaultProxy::start(
        &reg.host(),
        vec![
            Rule::new(harness::Fault::ResetAfter(10))
                .when("PATCH")
                .every(2)
                .limit(3),
        ],
    );
    let host = proxy.host();
    let c = client(&reg, &host, None);
    let rt = rt();
    let report = push_all(&rt, &c, &archive, &opts(&host, 8 << 20, 1)).unwrap();
    assert!(proxy.faults() >= 1);
    let size = 40u64 << 20;
    // distribution 2.8 signs the upload offset into its `_state` parameter, so once a chunk
    // landed but its answer was lost, the session cannot be resumed and the blob restarts
    // (at most once per injected fault). Registries without that state resume in place.
    assert!(
        report.bytes_sent >= size && report.bytes_sent <= 4 * size,
        "{report:?}"
    );
    proxy.set_enabled(false);
    check_with_skopeo(&reg, &report);
}

fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| walk_count(&e.path()).max(usize::from(e.file_name() == "data")))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn insecure_registry_accepts_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, archive) = small_archive(dir.path());
    let reg = Registry::start(Mode::Tls);
    let host = reg.host();
    let mut tls = TlsOptions::default();
    tls.insecure.insert(host.clone());
    let c = Client::new(
        Arc::new(Direct::new(&tls).unwrap()),
        CredentialStore::empty(),
        tls,
    )
    .with_retry(fast_retry());
    let report = rt()
        .block_on(bundle_oci::push::push(
            &c,
            archive,
            &opts(&host, 1 << 20, 4),
        ))
        .unwrap();
    check_with_skopeo(&reg, &report);
}

/// The first image `report` pushed, named through `host`: its bundle name and reference.
fn first_image(report: &PushReport, host: &str) -> (String, bundle_oci::Reference) {
    let (name, to, _) = &report.images[0];
    let r = format!("{host}/{}:{}", to.repository, to.tag.as_deref().unwrap())
        .parse()
        .unwrap();
    (name.clone(), r)
}

/// Checks a pull of [`first_image`] of `report` (a [`big_archive`] of two layers, whose
/// downloads were cut): the pushed digest, every blob in `cache`, and downloads resumed, not
/// restarted (well under the 2 MiB a restart would resend per cut layer). `context` goes with
/// a failure.
fn pull_resumed(
    pulled: bundle_oci::Result<bundle_oci::pull::Pulled>,
    report: &PushReport,
    archive: &Archive,
    cache: &BlobCache,
    context: &str,
) -> bundle_oci::pull::Pulled {
    let pulled = pulled.unwrap_or_else(|e| panic!("{e}\n{context}"));
    assert_eq!(pulled.pulled, report.images[0].2, "{context}");
    for b in &archive.index().blobs {
        assert!(
            cache.has(&b.digest, b.size),
            "{} not cached\n{context}",
            b.digest
        );
    }
    let layers: u64 = archive.index().blobs.iter().map(|b| b.size).sum();
    assert!(
        pulled.downloaded < layers + (1 << 20),
        "downloaded {} for {layers} bytes of blobs: restarted, not resumed\n{context}",
        pulled.downloaded
    );
    pulled
}

#[test]
fn pull_resumes_a_cut_download_with_range_and_a_cached_pull_downloads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3usize << 20;
    let archive = big_archive(dir.path(), 2, size);
    let reg = Registry::start(Mode::Plain);
    let rt = rt();
    let direct = client(&reg, &reg.host(), None);
    let report = push_all(&rt, &direct, &archive, &opts(&reg.host(), 1 << 20, 2)).unwrap();
    // Cut each of the two layer downloads after 2 MiB.
    let proxy = FaultProxy::start(
        &reg.host(),
        vec![
            Rule::new(harness::Fault::ResetAfter(2 << 20))
                .when("/blobs/")
                .limit(2),
        ],
    );
    let host = proxy.host();
    let c = client(&reg, &host, None);
    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let (name, r) = first_image(&report, &host);
    let pulled = pull_resumed(
        rt.block_on(bundle_oci::pull::pull(&c, &cache, &name, &r, &[], 2)),
        &report,
        &archive,
        &cache,
        "",
    );
    assert!(proxy.faults() >= 1, "no download was cut");
    let first: Vec<Digest> = pulled
        .resolved
        .blobs
        .iter()
        .filter(|b| b.size == size as u64)
        .map(|b| b.digest)
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    // A second pull of the same image downloads only its manifest.
    let again = rt
        .block_on(bundle_oci::pull::pull(&c, &cache, &name, &r, &[], 2))
        .unwrap();
    assert!(
        again.downloaded < 4096,
        "a cached pull downloaded {} bytes",
        again.downloaded
    );
    // What comes from the cache is hashed by the writer as it reads it: a cached layer
    // damaged on disk since it was fetched is named, and no archive appears.
    let bad = first[0];
    let path = cache.path(&bad);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[size / 2] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let input = BundleInput {
        name: "again".into(),
        version: "1".into(),
        images: vec![again.resolved.image.clone()],
        blobs: again.resolved.blobs.clone(),
        ..BundleInput::default()
    };
    let out = dir.path().join("again.bundle");
    let err = bundle_format::write(&input, &out, &WriteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&bad.to_string()) && err.contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!out.exists());
}

/// Registries send blob downloads, and their HEADs, to a CDN or an object store (Docker Hub,
/// GHCR, Quay, ECR, distribution on S3). Through a proxy that redirects every blob request
/// of the real registry (bearer tokens) to a CDN on another port: the pull follows, without the
/// registry's token (the CDN refuses a request that carries one), resumes a cut download with
/// `Range` through a fresh redirect, and a push's HEADs follow too (a re-push sends nothing).
#[test]
fn blobs_redirected_to_another_host_are_followed_without_the_registry_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3usize << 20;
    let archive = big_archive(dir.path(), 2, size);
    let reg = Registry::start(Mode::PlainToken);
    let rt = rt();
    let direct = client(&reg, &reg.host(), reg.credentials());
    let report = push_all(&rt, &direct, &archive, &opts(&reg.host(), 1 << 20, 2)).unwrap();
    let cdn = harness::BlobCdn::start(&reg.storage_dir(), Some(1 << 20));
    let proxy = FaultProxy::start(
        &reg.host(),
        vec![Rule::new(harness::Fault::Redirect).when("/blobs/sha256:")],
    );
    proxy.set_redirect(&cdn.host());
    let host = proxy.host();
    let c = client(&reg, &host, reg.credentials());
    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let (name, r) = first_image(&report, &host);
    let log = || {
        format!(
            "CDN:\n{}\nproxy:\n{}",
            cdn.log().join("\n"),
            proxy.log().join("\n")
        )
    };
    pull_resumed(
        rt.block_on(bundle_oci::pull::pull(&c, &cache, &name, &r, &[], 2)),
        &report,
        &archive,
        &cache,
        &log(),
    );
    let log = log();
    assert_eq!(cdn.refused(), 0, "the CDN refused requests:\n{log}");
    // Config and both layers came from the CDN, the layers twice (cut once each, resumed).
    assert_eq!(cdn.cut(), 2, "{log}");
    assert!(cdn.served() >= 5, "{log}");
    assert!(log.contains("-> 206"), "no resumed download:\n{log}");
    assert!(
        reg.token_server().unwrap().requests() > 0,
        "no token was used"
    );
    // A push's HEADs are redirected as well, and find every blob.
    let served = cdn.served();
    let again = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 2)).unwrap();
    assert_eq!(again.uploaded, 0, "{again:?}");
    assert!(again.skipped > 0 && cdn.served() > served, "{again:?}");
    assert_eq!(cdn.refused(), 0, "{}", cdn.log().join("\n"));
}

/// Behind a corporate proxy (Debian's tinyproxy): https registries through `CONNECT` tunnels
/// (the token server's too), plain-HTTP ones by absolute-form requests (not sendfile); push and
/// pull work and every request went through the proxy; a registry named in the no-proxy list is
/// reached straight.
#[test]
fn push_and_pull_through_an_http_proxy() {
    for mode in [Mode::Token, Mode::Plain] {
        let dir = tempfile::tempdir().unwrap();
        let (_, archive) = small_archive(dir.path());
        let reg = Registry::start(mode);
        let host = reg.host();
        let proxy = harness::TinyProxy::start();
        let via = |no: &str| ProxyConfig::Given {
            https: Some(proxy.url()),
            http: Some(proxy.url()),
            no: no.to_owned(),
        };
        let c = client_via(&reg, &host, reg.credentials(), via(""));
        let rt = rt();
        let pushed = push_all(&rt, &c, &archive, &opts(&host, 1 << 20, 4))
            .unwrap_or_else(|e| panic!("{mode:?}: {e}\nproxy log:\n{}", proxy.log()));
        check_with_skopeo(&reg, &pushed);
        assert_eq!(
            pushed.bytes_from_files, 0,
            "{mode:?}: sendfile past the proxy"
        );
        let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
        for (name, to, digest) in &pushed.images {
            let pulled = rt
                .block_on(bundle_oci::pull::pull(&c, &cache, name, to, &[], 4))
                .unwrap_or_else(|e| panic!("{mode:?} pull {to}: {e}"));
            assert_eq!(pulled.pulled, *digest);
        }
        let log = proxy.log();
        let through = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        match mode {
            Mode::Plain => {
                for method in ["HEAD", "POST", "PUT", "GET"] {
                    let line = format!("{method} http://{host}/v2/");
                    assert!(through(&line) > 0, "no {line} in the proxy log:\n{log}");
                }
            }
            _ => {
                assert!(through(&format!("CONNECT {host}")) > 0, "{log}");
                let token = reg.token_server().unwrap().realm();
                let token_host = token.split('/').nth(2).unwrap();
                assert!(through(&format!("CONNECT {token_host}")) > 0, "{log}");
            }
        }
        // Named in the no-proxy list (by host, as NO_PROXY names them): reached straight.
        let connections = |log: &str| log.matches("Connect (file descriptor").count();
        let before = connections(&proxy.log());
        let ip = host.rsplit_once(':').unwrap().0;
        let straight = client_via(&reg, &host, reg.credentials(), via(ip));
        push_all(&rt, &straight, &archive, &opts(&host, 1 << 20, 4)).unwrap();
        assert_eq!(
            connections(&proxy.log()),
            before,
            "{mode:?}: went through the proxy:\n{}",
            proxy.log()
        );
    }
}
