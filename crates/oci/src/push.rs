//! `bundle push`: every image of an archive into a registry, streamed from the archive's
//! frames. Blobs the registry has are skipped (HEAD), blobs already pushed to another
//! repository of the same registry are mounted, the rest upload in parallel: small ones in one
//! request, large ones in chunks that resume from the registry's offset after a failure.
//! Manifests follow their blobs, children before the index that names them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::sync::mpsc;

use bundle_format::{Archive, Digest};

use crate::api::{BodyFactory, UploadStart};
use crate::manifest::{Doc, OCI_MANIFEST};
use crate::pool::Pool;
use crate::transport::{FileBody, Piece, ReqBody};
use crate::{BoxError, Client, Error, Reference, Repo, Result, Scope};

/// Blobs at most this big go up in one request.
pub const MONOLITHIC_MAX: u64 = 16 << 20;

/// The default chunk of a chunked upload. Every chunk is a request that distribution closes
/// with an fsync of the upload and a saved hash state, so small chunks cost the registry CPU
/// (about a tenth of its CPU at 32 MiB against whole blobs, on the bench set); a failed chunk
/// is not sent again whole either way, since the upload goes on from the offset the registry
/// reports. Smaller chunks are for proxies that limit request bodies.
pub const DEFAULT_CHUNK: u64 = 128 << 20;

/// A `--map SRC_PREFIX=DST_PREFIX` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRule {
    /// Prefix of the normalised source name, e.g. `docker.io/`.
    pub from: String,
    /// What replaces it, e.g. `mirror.local/docker/`.
    pub to: String,
}

impl std::str::FromStr for MapRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<MapRule> {
        let (from, to) = s.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("--map {s:?}: expected SRC_PREFIX=DST_PREFIX"))
        })?;
        if from.is_empty() || to.is_empty() {
            return Err(Error::Invalid(format!(
                "--map {s:?}: both prefixes must be non-empty"
            )));
        }
        Ok(MapRule {
            from: from.to_owned(),
            to: to.to_owned(),
        })
    }
}

/// Where images go.
#[derive(Debug, Clone)]
pub struct Target {
    /// `HOST[:PORT]`.
    pub registry: String,
    /// Optional repository prefix, e.g. `mirror`.
    pub prefix: Option<String>,
    /// Ordered rules; the first whose prefix matches wins.
    pub maps: Vec<MapRule>,
}

impl std::str::FromStr for Target {
    type Err = Error;
    /// Parses `HOST[:PORT][/PREFIX]`.
    fn from_str(s: &str) -> Result<Target> {
        let s = s.trim_end_matches('/');
        let (registry, prefix) = match s.split_once('/') {
            Some((h, p)) => (h, Some(p.to_owned())),
            None => (s, None),
        };
        // Validate through the reference grammar.
        let probe = format!(
            "{registry}/{}x",
            prefix
                .as_deref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default()
        );
        let r: Reference = probe
            .parse()
            .map_err(|e| Error::Invalid(format!("--registry {s:?}: {e}")))?;
        if r.registry != registry {
            return Err(Error::Invalid(format!(
                "--registry {s:?}: {registry:?} is not a registry host (use HOST[:PORT], e.g. 127.0.0.1:5000)"
            )));
        }
        Ok(Target {
            registry: registry.to_owned(),
            prefix,
            maps: Vec::new(),
        })
    }
}

impl Target {
    /// Where the image `name` (as stored in the archive) lands. Digests never change; tags
    /// are kept.
    pub fn map(&self, name: &str) -> Result<Reference> {
        let src: Reference = name.parse()?;
        let full = src.to_string();
        for rule in &self.maps {
            if let Some(rest) = full.strip_prefix(&rule.from) {
                let mapped = format!("{}{rest}", rule.to);
                return mapped.parse().map_err(|e| {
                    Error::Invalid(format!(
                        "--map {}={} turns {name} into {mapped:?}: {e}",
                        rule.from, rule.to
                    ))
                });
            }
        }
        let repository = match &self.prefix {
            Some(p) => format!("{p}/{}", src.repository),
            None => src.repository.clone(),
        };
        let mut text = format!("{}/{repository}", self.registry);
        if let Some(t) = &src.tag {
            text.push(':');
            text.push_str(t);
        }
        if let Some(d) = &src.digest {
            text.push('@');
            text.push_str(&d.to_string());
        }
        text.parse()
    }
}

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Where to.
    pub target: Target,
    /// Only these image names (all when empty).
    pub images: Vec<String>,
    /// Parallel blob uploads.
    pub jobs: usize,
    /// Chunk size for chunked uploads.
    pub chunk_size: u64,
    /// Hash every frame against the archive's index before sending it. Without it, each blob
    /// is checked by the registry against its digest (and compressed frames by their zstd
    /// content checksums as they are decompressed; stored frames are sent as they lie); a
    /// blob the registry refuses has its frames hashed then, to name the damaged one.
    pub verify: bool,
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    /// Each image and where it went, with its digest.
    pub images: Vec<(String, Reference, Digest)>,
    /// Blobs uploaded.
    pub uploaded: u64,
    /// Blobs the registry already had.
    pub skipped: u64,
    /// Blobs mounted from another repository.
    pub mounted: u64,
    /// Content bytes sent (resent bytes included).
    pub bytes_sent: u64,
    /// Of those, bytes sent straight from the archive file as they lie there (over plain
    /// HTTP: the stored frames of already compressed blobs, by sendfile(2) to a remote
    /// registry, read and written to one on this machine).
    pub bytes_from_files: u64,
    /// Manifests and indexes put.
    pub manifests: u64,
    /// Manifests and indexes the registry already held under the same reference.
    pub manifests_present: u64,
}

/// One image's plan: its blobs, and its manifests in push order (children first).
struct ImagePlan {
    name: String,
    target: Reference,
    root: Digest,
    blobs: BTreeSet<Digest>,
    manifests: Vec<(Digest, String)>,
}

fn plan_image(
    archive: &Archive,
    name: &str,
    target: Reference,
    root: Digest,
    root_type: &str,
) -> Result<ImagePlan> {
    let mut plan = ImagePlan {
        name: name.to_owned(),
        target,
        root,
        blobs: BTreeSet::new(),
        manifests: Vec::new(),
    };
    fn walk(
        archive: &Archive,
        plan: &mut ImagePlan,
        d: Digest,
        media_type: &str,
        depth: usize,
    ) -> Result<()> {
        if depth > 8 || plan.manifests.iter().any(|(m, _)| *m == d) {
            return Ok(());
        }
        let bytes = archive.read_blob(&d)?;
        let doc = Doc::parse(&bytes)
            .map_err(|e| Error::Invalid(format!("archive manifest {d} of {}: {e}", plan.name)))?;
        let parse = |s: &str| -> Result<Digest> {
            s.parse::<Digest>()
                .map_err(|e| Error::Invalid(format!("archive manifest {d}: {e}")))
        };
        for child in doc.manifests.iter().flatten() {
            let cd = parse(&child.digest)?;
            if archive.index().blob(&cd).is_none() {
                // A platform dropped at create time is absent; the index was rewritten then.
                continue;
            }
            let mt = child
                .media_type
                .clone()
                .unwrap_or_else(|| OCI_MANIFEST.into());
            walk(archive, plan, cd, &mt, depth + 1)?;
        }
        for b in doc.blobs() {
            plan.blobs.insert(parse(&b.digest)?);
        }
        let mt = doc.media_type.unwrap_or_else(|| media_type.to_owned());
        plan.manifests.push((d, mt));
        Ok(())
    }
    walk(archive, &mut plan, root, root_type, 0)?;
    Ok(plan)
}

/// A request body fed by a blocking thread that reads the archive's frames
/// ([`Source::produce`]).
struct ChannelBody {
    rx: mpsc::Receiver<std::result::Result<Piece, BoxError>>,
    remaining: u64,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(Piece::Bytes(b)))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(http_body::Frame::data(b))))
            }
            Poll::Ready(Some(Ok(Piece::File { .. }))) => {
                Poll::Ready(Some(Err("a file range in a body of bytes".into())))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// Decompressed frames (about 1 MiB each) that upload bodies hold at once, per job: one
/// being filled, one in the channel, one or two being written to the socket.
const BUFFERS_PER_JOB: usize = 4;

/// Where one blob's upload bodies come from.
#[derive(Clone)]
struct Source {
    archive: Arc<Archive>,
    digest: Digest,
    /// Content bytes handed to bodies, and those of them handed as file ranges.
    sent: Arc<AtomicU64>,
    from_files: Arc<AtomicU64>,
    pool: Arc<Pool>,
    verify: bool,
}

impl Source {
    /// Reads the frames that hold content bytes `[offset, offset+len)` into `tx`, as pieces:
    /// a stored frame's content with one positional read, or with `files` (and without
    /// `verify`) as the file ranges that hold it; any other frame decompressed (with `verify`,
    /// each checked against the index's sha256 first). Blocking.
    /// The blob's digest is not computed here: the registry computes it from what it receives
    /// and refuses the closing PUT on a mismatch, so hashing the content again would only take
    /// CPU from the registry on the same machine.
    fn produce(
        &self,
        offset: u64,
        len: u64,
        files: bool,
        tx: mpsc::Sender<std::result::Result<Piece, BoxError>>,
    ) {
        let fail = |e: bundle_format::Error| {
            let _ = tx.blocking_send(Err(Box::new(e) as BoxError));
        };
        let frames = match self.archive.blob_frames(&self.digest, offset, len) {
            Ok(f) => f,
            Err(e) => return fail(e),
        };
        for (frame, range) in frames {
            if tx.is_closed() {
                return;
            }
            let n = range.len() as u64;
            let piece = if files && !self.verify {
                match self.archive.stored_frame(frame) {
                    Ok(Some(stored)) => Some(Piece::File {
                        ranges: stored.slice(range.start as u64..range.end as u64),
                        file: stored.file,
                        path: stored.path,
                    }),
                    Ok(None) => None,
                    Err(e) => return fail(e),
                }
            } else {
                None
            };
            let from_file = piece.is_some();
            let piece = match piece {
                Some(p) => p,
                None => {
                    let mut buf = self.pool.take();
                    // Hashed only with `verify`; stored frames are read as they lie.
                    let read = match self.verify {
                        true => Ok(false),
                        false => self.archive.read_stored(frame, &mut buf.0),
                    }
                    .and_then(|stored| match stored {
                        true => Ok(()),
                        false => self.archive.read_frame(frame, self.verify, &mut buf.0),
                    });
                    if let Err(e) = read {
                        return fail(e);
                    }
                    Piece::Bytes(Bytes::from_owner(buf).slice(range))
                }
            };
            if tx.blocking_send(Ok(piece)).is_err() {
                return;
            }
            self.sent.fetch_add(n, Ordering::Relaxed);
            if from_file {
                self.from_files.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Bodies for `[offset, offset+len)` of the blob, as bytes or as pieces with file ranges
    /// (see [`Source::produce`]).
    fn factory(self) -> BodyFactory {
        let start = |src: &Source, offset: u64, len: u64, files: bool| {
            let (tx, rx) = mpsc::channel(1);
            let src = src.clone();
            tokio::task::spawn_blocking(move || src.produce(offset, len, files, tx));
            rx
        };
        let bytes_src = self.clone();
        BodyFactory {
            bytes: Arc::new(move |offset, len| -> ReqBody {
                let rx = start(&bytes_src, offset, len, false);
                ChannelBody { rx, remaining: len }.boxed_unsync()
            }),
            files: Some(Arc::new(move |offset, len| {
                FileBody::new(len, start(&self, offset, len, true))
            })),
        }
    }
}

enum Outcome {
    Skipped,
    Mounted,
    Uploaded,
}

/// What every blob upload of one push shares.
struct Uploader {
    client: Client,
    archive: Arc<Archive>,
    /// Chunk size for chunked uploads.
    chunk: u64,
    /// Content bytes sent so far, and those of them sent from the archive file.
    sent: Arc<AtomicU64>,
    from_files: Arc<AtomicU64>,
    pool: Arc<Pool>,
    /// [`PushOptions::verify`].
    verify: bool,
}

/// Puts one blob into `repo`: HEAD, else mount from `mount_from`, else upload.
async fn push_blob(
    up: &Uploader,
    repo: &Repo,
    digest: Digest,
    mount_from: Option<&str>,
) -> Result<Outcome> {
    let (client, archive, chunk) = (&up.client, &up.archive, up.chunk);
    let size = archive
        .index()
        .blob(&digest)
        .map(|b| b.size)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{repo}: blob {digest} is named by a manifest but not in the archive"
            ))
        })?;
    let scope = Scope::Push {
        repo: repo.name.clone(),
        mount_from: mount_from.map(str::to_owned),
    };
    match client.blob_size(repo, &scope, &digest).await {
        Ok(Some(_)) => return Ok(Outcome::Skipped),
        Ok(None) => {}
        // A registry killed while it wrote a blob's repository link can answer 500 for that
        // blob ever after (distribution: "invalid checksum digest format"); uploading it again
        // rewrites the link. Were the registry truly broken, the upload fails with its error.
        Err(Error::Status { status, .. }) if status.is_server_error() => {}
        Err(e) => return Err(e),
    }
    let body = Source {
        archive: Arc::clone(archive),
        digest,
        sent: Arc::clone(&up.sent),
        from_files: Arc::clone(&up.from_files),
        pool: Arc::clone(&up.pool),
        verify: up.verify,
    }
    .factory();
    let mut restarts = 0u32;
    'session: loop {
        let mount = mount_from.map(|f| (&digest, f));
        let mut location = match client.start_upload(repo, &scope, mount).await? {
            UploadStart::Mounted => return Ok(Outcome::Mounted),
            UploadStart::Location(l) => l,
        };
        if size <= MONOLITHIC_MAX {
            match client
                .put_blob(repo, &scope, &location, &digest, size, &body)
                .await
            {
                Ok(()) => return Ok(Outcome::Uploaded),
                Err(e) if restarts < MAX_RESTARTS && retryable(&e) => {
                    restarts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50 << restarts)).await;
                    // The registry may have taken it all before the connection broke.
                    if landed(client, repo, &scope, &digest).await {
                        return Ok(Outcome::Uploaded);
                    }
                    continue 'session;
                }
                Err(e) => return Err(e),
            }
        }
        let mut offset = 0u64;
        let mut failures = 0u32;
        while offset < size {
            let len = chunk.min(size - offset);
            match client
                .patch_chunk(repo, &scope, &location, offset, len, &body)
                .await
            {
                Ok(next) => {
                    location = next;
                    offset += len;
                    failures = 0;
                }
                Err(e) if failures < 8 && retryable(&e) => {
                    failures += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(250 << failures.min(5)))
                        .await;
                    // Ask the registry how much arrived, and go on from there.
                    match client.upload_offset(repo, &scope, &location).await {
                        Ok(Some((have, loc))) if have <= size => {
                            offset = have;
                            location = loc;
                        }
                        Ok(_) if restarts < MAX_RESTARTS => {
                            restarts += 1;
                            continue 'session;
                        }
                        Ok(_) => return Err(e),
                        Err(e) if e.is_transient() => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        match client.close_upload(repo, &scope, &location, &digest).await {
            Ok(()) => return Ok(Outcome::Uploaded),
            Err(e) if restarts < MAX_RESTARTS && retryable(&e) => {
                restarts += 1;
                if landed(client, repo, &scope, &digest).await {
                    return Ok(Outcome::Uploaded);
                }
                continue 'session;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Puts one blob into the first of `repos` (upload), then mounts it into the others.
async fn push_everywhere(up: &Uploader, digest: Digest, repos: &[Repo]) -> Result<Vec<Outcome>> {
    let first = &repos[0];
    let pushed = push_blob(up, first, digest, None).await;
    let mut outcomes = vec![pushed.map_err(|e| damaged_frame(up, &digest, e))?];
    for r in &repos[1..] {
        outcomes.push(push_blob(up, r, digest, Some(&first.name)).await?);
    }
    Ok(outcomes)
}

/// When the registry refused a blob's content (a 400: its digest did not match what arrived)
/// and frames were not hashed on the way, hashes the blob's frames: a damaged one is the error
/// to report, named. Otherwise the registry's error stands.
fn damaged_frame(up: &Uploader, digest: &Digest, e: Error) -> Error {
    let refused =
        matches!(&e, Error::Status { status, .. } if *status == http::StatusCode::BAD_REQUEST);
    let Some(blob) = up
        .archive
        .index()
        .blob(digest)
        .filter(|_| refused && !up.verify)
    else {
        return e;
    };
    (blob.first_frame..blob.first_frame + blob.frames)
        .find_map(|f| up.archive.check_frame(f).err())
        .map_or(e, Error::from)
}

/// Upload sessions a blob may start before its push fails.
const MAX_RESTARTS: u32 = 5;

/// Whether an upload error is worth asking the registry about and going on.
fn retryable(e: &Error) -> bool {
    e.is_transient() || is_upload_gone(e)
}

/// Whether the registry now has the blob (an upload whose answer was lost may have landed).
async fn landed(client: &Client, repo: &Repo, scope: &Scope, digest: &Digest) -> bool {
    matches!(client.blob_size(repo, scope, digest).await, Ok(Some(_)))
}

/// A 404 or 416 on an upload session: the registry lost or closed it, or holds other bytes
/// than we thought; ask where it stands and go on, or start over.
fn is_upload_gone(e: &Error) -> bool {
    matches!(e, Error::Status { status, .. }
        if *status == http::StatusCode::NOT_FOUND || *status == http::StatusCode::RANGE_NOT_SATISFIABLE)
}

/// Pushes the archive's images (all, or those named) to the target registry.
pub async fn push(
    client: &Client,
    archive: Arc<Archive>,
    opts: &PushOptions,
) -> Result<PushReport> {
    let mut plans: Vec<Arc<ImagePlan>> = Vec::new();
    for img in &archive.index().images {
        if !opts.images.is_empty() && !opts.images.iter().any(|n| n == &img.name) {
            continue;
        }
        let target = opts.target.map(&img.name)?;
        plans.push(Arc::new(plan_image(
            &archive,
            &img.name,
            target,
            img.digest,
            &img.media_type,
        )?));
    }
    // Images go up in parallel: two that land on one reference would race for it.
    if let Some(e) = shared_target(plans.iter().map(|p| (p.name.as_str(), &p.target, &p.root))) {
        return Err(e);
    }
    for n in &opts.images {
        if !archive.index().images.iter().any(|i| &i.name == n) {
            return Err(Error::Invalid(format!(
                "--image {n:?} is not in the archive (it holds: {})",
                archive
                    .index()
                    .images
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    // Each blob goes to the first repository that needs it, then is mounted into the others.
    let mut by_blob: BTreeMap<Digest, Vec<Repo>> = BTreeMap::new();
    for p in &plans {
        let repo = Repo::of(&p.target);
        for d in &p.blobs {
            let repos = by_blob.entry(*d).or_default();
            if !repos.contains(&repo) {
                repos.push(repo.clone());
            }
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let from_files = Arc::new(AtomicU64::new(0));
    let up = Arc::new(Uploader {
        client: client.clone(),
        archive: Arc::clone(&archive),
        chunk: opts.chunk_size.max(1 << 20),
        sent: Arc::clone(&sent),
        from_files: Arc::clone(&from_files),
        pool: Arc::new(Pool::new(opts.jobs.max(1) * BUFFERS_PER_JOB)),
        verify: opts.verify,
    });
    // Each image's manifests go up as soon as the last of its blobs is in, while other
    // images' blobs still go.
    let mut waiting: Vec<usize> = plans.iter().map(|p| p.blobs.len()).collect();
    let mut images_of: BTreeMap<Digest, Vec<usize>> = BTreeMap::new();
    for (i, p) in plans.iter().enumerate() {
        for d in &p.blobs {
            images_of.entry(*d).or_default().push(i);
        }
    }
    let mut manifests = tokio::task::JoinSet::new();
    let mut put = |i: usize| {
        let (client, archive, plan) = (client.clone(), Arc::clone(&archive), Arc::clone(&plans[i]));
        manifests.spawn(async move { put_manifests(&client, &archive, &plan).await });
    };
    for (i, n) in waiting.iter().enumerate() {
        if *n == 0 {
            put(i);
        }
    }
    // Largest blobs first, so that the long uploads start early and the last ones to finish
    // are short. `jobs` workers take them from one queue in this order: tasks waiting on a
    // semaphore would take them in the order the runtime first polls them, which on a
    // multi-threaded runtime is not the order they were spawned in (the largest blobs could
    // start last, and run alone at the end).
    let mut order: Vec<(Digest, Vec<Repo>)> = by_blob.into_iter().collect();
    order.sort_by_key(|(d, _)| std::cmp::Reverse(archive.index().blob(d).map_or(0, |b| b.size)));
    let workers = opts.jobs.max(1).min(order.len());
    let queue = Arc::new(std::sync::Mutex::new(VecDeque::from(order)));
    let (done_tx, mut done) = mpsc::unbounded_channel::<Result<(Digest, Vec<Outcome>)>>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (up, queue, done_tx) = (Arc::clone(&up), Arc::clone(&queue), done_tx.clone());
        tasks.spawn(async move {
            loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pop_front();
                let Some((digest, repos)) = next else {
                    return;
                };
                let pushed = push_everywhere(&up, digest, &repos).await;
                let failed = pushed.is_err();
                // A closed channel: the push has failed and is being torn down.
                if done_tx.send(pushed.map(|o| (digest, o))).is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(done_tx);
    let mut report = PushReport::default();
    // Ends when every worker has ended (each holds a sender); the first error ends the push,
    // and dropping `tasks` stops the other workers.
    while let Some(pushed) = done.recv().await {
        let (digest, outcomes) = pushed?;
        for &i in images_of.get(&digest).into_iter().flatten() {
            waiting[i] -= 1;
            if waiting[i] == 0 {
                put(i);
            }
        }
        for o in outcomes {
            match o {
                Outcome::Skipped => report.skipped += 1,
                Outcome::Mounted => report.mounted += 1,
                Outcome::Uploaded => report.uploaded += 1,
            }
        }
    }
    // A worker that panicked left its blob unreported.
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| Error::Invalid(format!("upload task failed: {e}")))?;
    }
    // Images in parallel; within one, children before the index that names them.
    while let Some(joined) = manifests.join_next().await {
        let (put, present) =
            joined.map_err(|e| Error::Invalid(format!("manifest task failed: {e}")))??;
        report.manifests += put;
        report.manifests_present += present;
    }
    for p in &plans {
        report
            .images
            .push((p.name.clone(), p.target.clone(), p.root));
    }
    report.bytes_sent = sent.load(Ordering::Relaxed);
    report.bytes_from_files = from_files.load(Ordering::Relaxed);
    Ok(report)
}

/// Two different images mapped onto the same target reference, named.
fn shared_target<'a>(
    plans: impl Iterator<Item = (&'a str, &'a Reference, &'a Digest)>,
) -> Option<Error> {
    let mut seen: BTreeMap<&Reference, (&str, &Digest)> = BTreeMap::new();
    for (name, target, root) in plans {
        match seen.get(target) {
            Some((first, d)) if *d != root => {
                return Some(Error::Invalid(format!(
                    "{first} and {name} both map to {target}; change the --map rules so that \
                     each image lands on a reference of its own"
                )));
            }
            _ => {
                seen.insert(target, (name, root));
            }
        }
    }
    None
}

/// Puts an image's manifests in plan order, skipping each the registry already holds under
/// the same reference with the same digest (a re-push then writes nothing). Returns how many
/// were put and how many were there.
async fn put_manifests(client: &Client, archive: &Archive, p: &ImagePlan) -> Result<(u64, u64)> {
    let repo = Repo::of(&p.target);
    let scope = Scope::Push {
        repo: repo.name.clone(),
        mount_from: None,
    };
    let (mut put, mut present) = (0, 0);
    for (d, mt) in &p.manifests {
        let reference = if *d == p.root {
            p.target.tag.clone().unwrap_or_else(|| d.to_string())
        } else {
            d.to_string()
        };
        // A registry that cannot answer the HEAD is simply sent the manifest.
        if let Ok(Some(have)) = client.manifest_digest(&repo, &scope, &reference).await
            && have == *d
        {
            present += 1;
            continue;
        }
        let bytes = Bytes::from(archive.read_blob(d)?);
        client.put_manifest(&repo, &reference, mt, bytes).await?;
        put += 1;
    }
    Ok((put, present))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_images_on_one_reference_are_refused() {
        let t: Reference = "127.0.0.1:5000/team/app:1.0".parse().unwrap();
        let u: Reference = "127.0.0.1:5000/team/app:2.0".parse().unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert!(shared_target([("x", &t, &a), ("y", &u, &b)].into_iter()).is_none());
        // The same image under two names is fine.
        assert!(shared_target([("x", &t, &a), ("y", &t, &a)].into_iter()).is_none());
        let e = shared_target([("x", &t, &a), ("y", &u, &b), ("z", &t, &b)].into_iter())
            .unwrap()
            .to_string();
        assert!(
            e.contains("x and z both map to 127.0.0.1:5000/team/app:1.0"),
            "{e}"
        );
    }

    #[test]
    fn default_and_mapped_names() {
        let mut t: Target = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            t.map("docker.io/library/nginx:1.27").unwrap().to_string(),
            "127.0.0.1:5000/library/nginx:1.27"
        );
        assert_eq!(
            t.map("nginx").unwrap().to_string(),
            "127.0.0.1:5000/library/nginx:latest"
        );
        assert_eq!(
            t.map("registry.example/team/app:1.0").unwrap().to_string(),
            "127.0.0.1:5000/team/app:1.0"
        );
        t.maps = vec![
            "docker.io/=mirror.local/docker/".parse().unwrap(),
            "ghcr.io/org/=mirror.local/gh/".parse().unwrap(),
        ];
        assert_eq!(
            t.map("nginx:1").unwrap().to_string(),
            "mirror.local/docker/library/nginx:1"
        );
        assert_eq!(
            t.map("ghcr.io/org/app:2").unwrap().to_string(),
            "mirror.local/gh/app:2"
        );
        assert_eq!(
            t.map("quay.io/x/y:3").unwrap().to_string(),
            "127.0.0.1:5000/x/y:3"
        );
        let p: Target = "127.0.0.1:5000/mirror".parse().unwrap();
        assert_eq!(
            p.map("quay.io/x/y:3").unwrap().to_string(),
            "127.0.0.1:5000/mirror/x/y:3"
        );
        assert!("not a host".parse::<Target>().is_err());
        assert!("=x".parse::<MapRule>().is_err());
        assert!("x".parse::<MapRule>().is_err());
    }
}
