//! Pulls one image from its registry into the blob cache and returns it as writer input.
//! Manifests, indexes and configs are fetched as the platform-aware walk of `bundle-layout`
//! asks for them (so filtering behaves exactly as for local sources); layers then download
//! in parallel, each verified before it enters the cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

use bundle_format::{Content, Digest};
use bundle_layout::{BlobSource, Platform, Resolved, Root};

use crate::cache::BlobCache;
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

/// Pulls `reference` as the bundle image `name`, keeping only `platforms` when given.
pub async fn pull(
    client: &Client,
    cache: &BlobCache,
    name: &str,
    reference: &Reference,
    platforms: &[Platform],
    jobs: usize,
) -> Result<Pulled> {
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
    let mut resolved = tokio::task::spawn_blocking(move || {
        bundle_layout::resolve_remote(&name_owned, &root, source, &filter)
    })
    .await
    .map_err(|e| Error::Invalid(format!("pull of {reference}: {e}")))??;
    let repo = Repo::of(reference);
    let sem = Arc::new(Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for b in &resolved.blobs {
        // In-memory blobs (an index rewritten by the platform filter) need no download.
        if cache.has(&b.digest, b.size) || matches!(b.content, Content::Bytes(_)) {
            continue;
        }
        let (client, cache, repo, sem) = (
            client.clone(),
            cache.clone(),
            repo.clone(),
            Arc::clone(&sem),
        );
        let (digest, size) = (b.digest, b.size);
        tasks.spawn(async move {
            let _permit = sem
                .acquire_owned()
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?;
            cache
                .fetch(&client, &repo, &digest, size)
                .await
                .map(|(_, n)| (digest, n))
        });
    }
    let mut downloaded = top.bytes.len() as u64;
    let mut hashed = std::collections::BTreeSet::new();
    while let Some(j) = tasks.join_next().await {
        let (digest, n) = j.map_err(|e| Error::Invalid(format!("download task: {e}")))??;
        downloaded += n;
        if n > 0 {
            hashed.insert(digest);
        }
    }
    // What streamed through the hasher into the cache moments ago is not hashed again by the
    // writer (it was a fifth of a pull's CPU); blobs found in the cache are, as they are read.
    for b in &mut resolved.blobs {
        b.verified = hashed.contains(&b.digest);
    }
    Ok(Pulled {
        resolved,
        pulled: top.digest,
        downloaded,
    })
}
