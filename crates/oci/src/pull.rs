//! Pulls images from their registries into the blob cache and returns them as writer input.
//! Manifests, indexes and configs are fetched as the platform-aware walk of `bundle-layout`
//! asks for them (so filtering behaves exactly as for local sources); layers then download
//! in parallel, each verified before it enters the cache: hashed as it streams in by
//! [`pull`], or staged unchecked by [`Puller::start`] while the archive writer compresses the
//! blobs before it, and committed once the writer, which hashes every blob it stores, found its
//! digest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use bundle_format::{Content, Digest};
use bundle_layout::{BlobSource, Platform, Resolved, Root};

use crate::cache::{BlobCache, Staged};
use crate::{Client, Error, Reference, Repo, Result};

/// What a pull produced.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image as writer input (blobs point into the cache).
    pub resolved: Resolved,
    /// The digest the reference resolved to in the registry (before any platform filter):
    /// what the lock file pins.
    pub pulled: Digest,
    /// Bytes downloaded (0 when everything was cached).
    pub downloaded: u64,
}

struct RemoteSource {
    client: Client,
    cache: BlobCache,
    reference: Reference,
    handle: tokio::runtime::Handle,
}

impl BlobSource for RemoteSource {
    fn root(&self) -> &Path {
        self.cache.root()
    }

    fn locate(&self, digest: &Digest, size: u64, role: &str) -> bundle_layout::Result<PathBuf> {
        if self.cache.has(digest, size) || role == "layer" {
            return Ok(self.cache.path(digest));
        }
        let fail = |e: Error| bundle_layout::Error::Fetch {
            digest: *digest,
            role: role.to_owned(),
            source: Box::new(e),
        };
        let repo = Repo::of(&self.reference);
        match role {
            "manifest" | "image index" => {
                let r = self.reference.with_digest(*digest);
                let m = self
                    .handle
                    .block_on(self.client.get_manifest(&r))
                    .map_err(fail)?;
                if m.bytes.len() as u64 != size {
                    return Err(fail(Error::SizeMismatch {
                        reference: r.to_string(),
                        digest: *digest,
                        expected: size,
                        found: m.bytes.len() as u64,
                    }));
                }
                self.cache.put(digest, &m.bytes).map_err(fail)
            }
            _ => self
                .handle
                .block_on(self.cache.fetch(&self.client, &repo, digest, size))
                .map(|(p, _)| p)
                .map_err(fail),
        }
    }
}

/// Pulls `reference` as the bundle image `name`, keeping only `platforms` when given, with up
/// to `jobs` downloads at once ([`Puller`] for several images at once).
pub async fn pull(
    client: &Client,
    cache: &BlobCache,
    name: &str,
    reference: &Reference,
    platforms: &[Platform],
    jobs: usize,
) -> Result<Pulled> {
    Puller::new(client.clone(), cache.clone(), jobs)
        .pull(name, reference, platforms)
        .await
}

/// Pulls several images at once into one cache: one bound on downloads across all of them, and
/// a blob that several images share is downloaded once (the others wait for it).
#[derive(Clone)]
pub struct Puller {
    client: Client,
    cache: BlobCache,
    downloads: Arc<Semaphore>,
    /// Per blob, a lock held while it downloads.
    inflight: Arc<Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>,
}

/// An image whose manifests and config are in the cache and whose layers may still need
/// downloading ([`Puller::resolve`]).
#[derive(Debug, Clone)]
pub struct Resolution {
    /// The image as writer input (blobs point into the cache, where some are yet to arrive).
    pub resolved: Resolved,
    /// The digest the reference resolved to in the registry (before any platform filter):
    /// what the lock file pins.
    pub pulled: Digest,
    /// The blobs not in the cache yet.
    pub missing: Vec<Missing>,
}

/// A blob to download: which repository has it.
#[derive(Debug, Clone)]
pub struct Missing {
    /// A repository that holds it.
    pub repo: Repo,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

fn poisoned<T>(_: T) -> Error {
    Error::Invalid("download table poisoned".into())
}

impl Puller {
    /// A puller with up to `jobs` downloads at once.
    pub fn new(client: Client, cache: BlobCache, jobs: usize) -> Puller {
        Puller {
            client,
            cache,
            downloads: Arc::new(Semaphore::new(jobs.max(1))),
            inflight: Arc::default(),
        }
    }

    /// Downloads `digest` unless cached or downloaded by another pull of this puller, holding
    /// `permit` (or one taken once no other pull is downloading the same blob). Returns the
    /// bytes this call downloaded.
    async fn fetch(
        &self,
        m: &Missing,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<u64> {
        let lock = Arc::clone(
            self.inflight
                .lock()
                .map_err(poisoned)?
                .entry(m.digest)
                .or_default(),
        );
        let _one = lock.lock().await;
        let _permit = match permit {
            Some(p) => p,
            None => Arc::clone(&self.downloads)
                .acquire_owned()
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?,
        };
        let (_, n) = self
            .cache
            .fetch(&self.client, &m.repo, &m.digest, m.size)
            .await?;
        Ok(n)
    }

    /// Downloads `m` into a staged temp file of the cache, unchecked ([`BlobCache::stage`]),
    /// holding `permit`.
    async fn stage(
        &self,
        m: &Missing,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(Staged, u64)> {
        self.cache
            .stage(&self.client, &m.repo, &m.digest, m.size)
            .await
    }

    /// Fetches the manifests, indexes and configs of `reference` as the bundle image `name`
    /// (keeping only `platforms` when given) and says which layers are not cached yet.
    pub async fn resolve(
        &self,
        name: &str,
        reference: &Reference,
        platforms: &[Platform],
    ) -> Result<Resolution> {
        let (client, cache) = (&self.client, &self.cache);
        let top = client.get_manifest(reference).await?;
        cache.put(&top.digest, &top.bytes)?;
        let root = Root {
            digest: top.digest,
            size: top.bytes.len() as u64,
            media_type: top.media_type.clone(),
        };
        let source = Arc::new(RemoteSource {
            client: client.clone(),
            cache: cache.clone(),
            reference: reference.clone(),
            handle: tokio::runtime::Handle::current(),
        });
        let name_owned = name.to_owned();
        let filter = platforms.to_vec();
        let resolved = tokio::task::spawn_blocking(move || {
            bundle_layout::resolve_remote(&name_owned, &root, source, &filter)
        })
        .await
        .map_err(|e| Error::Invalid(format!("pull of {reference}: {e}")))??;
        let repo = Repo::of(reference);
        let missing = resolved
            .blobs
            .iter()
            // In-memory blobs (an index rewritten by the platform filter) need no download.
            .filter(|b| !matches!(b.content, Content::Bytes(_)) && !cache.has(&b.digest, b.size))
            .map(|b| Missing {
                repo: repo.clone(),
                digest: b.digest,
                size: b.size,
            })
            .collect();
        Ok(Resolution {
            resolved,
            pulled: top.digest,
            missing,
        })
    }

    /// Pulls `reference` as the bundle image `name`, keeping only `platforms` when given:
    /// [`Puller::resolve`], then every missing layer downloaded before it returns.
    pub async fn pull(
        &self,
        name: &str,
        reference: &Reference,
        platforms: &[Platform],
    ) -> Result<Pulled> {
        let Resolution {
            resolved,
            pulled,
            missing,
        } = self.resolve(name, reference, platforms).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for m in missing {
            let this = self.clone();
            tasks.spawn(async move { this.fetch(&m, None).await });
        }
        let mut downloaded = 0;
        while let Some(j) = tasks.join_next().await {
            downloaded += j.map_err(|e| Error::Invalid(format!("download task: {e}")))??;
        }
        Ok(Pulled {
            resolved,
            pulled,
            downloaded,
        })
    }

    /// Starts downloading `missing` (repeats allowed) in the order an archive holds blobs (by
    /// digest), on the current runtime, and returns at once: the returned [`Arrivals`] lets
    /// the archive writer compress each blob as soon as it is in the cache.
    ///
    /// [`Arrivals`]: bundle_format::Arrivals
    pub fn start(&self, missing: Vec<Missing>) -> Downloads {
        // A stable sort keeps the first repository named for a digest.
        let mut order = missing;
        order.sort_by_key(|m| m.digest);
        order.dedup_by_key(|m| m.digest);
        let board = Arc::new(Board::default());
        if let Ok(mut states) = board.states.lock() {
            for m in &order {
                states.insert(m.digest, Arrival::Pending);
            }
        }
        let (this, b) = (self.clone(), Arc::clone(&board));
        let driver = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for m in order {
                // Permits are taken in archive order, so the writer's next blob is never
                // queued behind later ones.
                let Ok(permit) = Arc::clone(&this.downloads).acquire_owned().await else {
                    break;
                };
                let (this, b) = (this.clone(), Arc::clone(&b));
                tasks.spawn(async move {
                    let (state, downloaded) = match this.stage(&m, permit).await {
                        Ok((staged, n)) => (Arrival::Staged(staged), n),
                        Err(e) => (Arrival::Failed(Some(e)), 0),
                    };
                    b.set(m.digest, state);
                    downloaded
                });
            }
            let mut downloaded = 0;
            while let Some(j) = tasks.join_next().await {
                downloaded += j.unwrap_or(0);
            }
            // A task that panicked left its blob pending: no writer may wait on it for ever.
            b.fail_pending();
            downloaded
        });
        Downloads {
            cache: self.cache.clone(),
            board,
            driver: Some(driver),
        }
    }
}

/// Where a download stands.
enum Arrival {
    Pending,
    /// Downloaded, unchecked: the writer hashes it and says what it found.
    Staged(Staged),
    /// Already in the cache (another process put it there meanwhile), or checked.
    Done,
    /// Failed with this error (taken by the first wait).
    Failed(Option<Error>),
}

#[derive(Default)]
struct Board {
    states: Mutex<HashMap<Digest, Arrival>>,
    changed: std::sync::Condvar,
}

impl Board {
    fn set(&self, digest: Digest, state: Arrival) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(digest, state);
        }
        self.changed.notify_all();
    }

    fn fail_pending(&self) {
        if let Ok(mut states) = self.states.lock() {
            for s in states.values_mut() {
                if matches!(s, Arrival::Pending) {
                    *s = Arrival::Failed(None);
                }
            }
        }
        self.changed.notify_all();
    }
}

/// Downloads under way ([`Puller::start`]); as [`bundle_format::Arrivals`], it blocks the writer
/// until the blob it needs is in the cache. Dropping it stops the downloads.
pub struct Downloads {
    cache: BlobCache,
    board: Arc<Board>,
    driver: Option<tokio::task::JoinHandle<u64>>,
}

impl Downloads {
    /// Waits for every download to end and returns the bytes downloaded.
    pub async fn finish(mut self) -> Result<u64> {
        match self.driver.take() {
            Some(d) => d
                .await
                .map_err(|e| Error::Invalid(format!("download task: {e}"))),
            None => Ok(0),
        }
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}

impl bundle_format::Arrivals for Downloads {
    fn wait(
        &self,
        blob: &bundle_format::BlobInput,
    ) -> std::result::Result<bundle_format::Arrival, bundle_format::ArrivalError> {
        use bundle_format::Arrival as Read;
        // Only blobs meant to be read from the cache are ours; a local source of the same
        // digest is read as it is.
        let ours = matches!(&blob.content, Content::File { path, offset: 0 }
            if *path == self.cache.path(&blob.digest));
        if !ours {
            return Ok(Read::AsNamed);
        }
        let mut states = self.board.states.lock().map_err(poisoned)?;
        loop {
            match states.get_mut(&blob.digest) {
                None | Some(Arrival::Done) => return Ok(Read::AsNamed),
                Some(Arrival::Staged(s)) => return Ok(Read::Staged(s.tmp_path().to_owned())),
                Some(Arrival::Failed(e)) => {
                    return Err(match e.take() {
                        Some(e) => Box::new(e),
                        None => format!("the download of {} failed", blob.digest).into(),
                    });
                }
                Some(Arrival::Pending) => {
                    states = self.board.changed.wait(states).map_err(poisoned)?;
                }
            }
        }
    }

    fn checked(
        &self,
        blob: &bundle_format::BlobInput,
        found: &Digest,
    ) -> std::result::Result<(), bundle_format::ArrivalError> {
        let mut states = self.board.states.lock().map_err(poisoned)?;
        match states.insert(blob.digest, Arrival::Done) {
            Some(Arrival::Staged(s)) => {
                s.commit(found)?;
                Ok(())
            }
            _ => Err(format!("{} was not staged by this pull", blob.digest).into()),
        }
    }
}
