//! The local blob cache: `ROOT/blobs/sha256/<hex>`, content-addressed. A blob enters it only
//! once its bytes hash to its digest: downloads stream into `ROOT/tmp/` while hashing, resume
//! with a `Range` request after a dropped connection, and are renamed into place at the end.

use std::path::{Path, PathBuf};

use http_body_util::BodyExt as _;
use tokio::io::AsyncWriteExt as _;

use bundle_format::{Digest, Hasher};

use crate::{Client, Error, Repo, Result};

/// A content-addressed blob directory.
#[derive(Debug, Clone)]
pub struct BlobCache {
    root: PathBuf,
}

/// The default cache directory: `$XDG_CACHE_HOME/bundle`, else `~/.cache/bundle`.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("bundle");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("bundle"),
        None => std::env::temp_dir().join("bundle-cache"),
    }
}

impl BlobCache {
    /// Opens (creating) a cache at `root`.
    pub fn open(root: &Path) -> Result<BlobCache> {
        for d in [root.join("blobs").join("sha256"), root.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        Ok(BlobCache {
            root: root.to_owned(),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `digest` lives (or will).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Whether the cache holds `digest` with this size.
    pub fn has(&self, digest: &Digest, size: u64) -> bool {
        std::fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    fn tmp_path(&self, digest: &Digest) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}.{}.{n}", digest.hex(), std::process::id()))
    }

    /// Stores bytes already in memory after checking their digest.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<PathBuf> {
        let found = Digest::of(bytes);
        if found != *digest {
            return Err(Error::DigestMismatch {
                reference: digest.to_string(),
                what: "content put into the cache".into(),
                expected: *digest,
                found,
            });
        }
        let path = self.path(digest);
        if self.has(digest, bytes.len() as u64) {
            return Ok(path);
        }
        let tmp = self.tmp_path(digest);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Downloads blob `digest` of `size` bytes from `repo` unless already cached. The bytes
    /// are verified before the blob becomes visible; a dropped transfer resumes where it
    /// stopped. Returns the cached path and the bytes downloaded.
    pub async fn fetch(
        &self,
        client: &Client,
        repo: &Repo,
        digest: &Digest,
        size: u64,
    ) -> Result<(PathBuf, u64)> {
        let path = self.path(digest);
        if self.has(digest, size) {
            return Ok((path, 0));
        }
        let tmp = self.tmp_path(digest);
        let result = self.download(client, repo, digest, size, &tmp).await;
        match result {
            Ok(n) => {
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(|e| Error::io(&path, e))?;
                Ok((path, n))
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    async fn download(
        &self,
        client: &Client,
        repo: &Repo,
        digest: &Digest,
        size: u64,
        tmp: &Path,
    ) -> Result<u64> {
        // Buffered: each write to a tokio file is a trip to a blocking thread, and bodies
        // arrive in frames of a few KiB.
        let mut file = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(tmp)
                .await
                .map_err(|e| Error::io(tmp, e))?,
        );
        let mut hasher = Hasher::new();
        let mut have: u64 = 0;
        let mut downloaded: u64 = 0;
        let mut failures = 0u32;
        let reference = format!("{repo}@{digest}");
        loop {
            let attempt = async {
                let (resp, partial) = client.get_blob(repo, digest, have).await?;
                if have > 0 && !partial {
                    // The registry ignored the range: start over.
                    file.flush().await.map_err(|e| Error::io(tmp, e))?;
                    file.get_mut()
                        .set_len(0)
                        .await
                        .map_err(|e| Error::io(tmp, e))?;
                    use tokio::io::AsyncSeekExt as _;
                    file.get_mut()
                        .seek(std::io::SeekFrom::Start(0))
                        .await
                        .map_err(|e| Error::io(tmp, e))?;
                    hasher = Hasher::new();
                    have = 0;
                }
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| Error::Transport {
                        registry: repo.registry.clone(),
                        action: format!("GET blob {reference} at byte {have}"),
                        cause: e,
                    })?;
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if have + data.len() as u64 > size {
                        return Err(Error::SizeMismatch {
                            reference: reference.clone(),
                            digest: *digest,
                            expected: size,
                            found: have + data.len() as u64,
                        });
                    }
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(|e| Error::io(tmp, e))?;
                    have += data.len() as u64;
                    downloaded += data.len() as u64;
                }
                Ok::<(), Error>(())
            }
            .await;
            match attempt {
                Ok(()) if have == size => break,
                Ok(()) => {
                    // The body ended early: resume like after a reset.
                    failures += 1;
                    if failures > 8 {
                        return Err(Error::SizeMismatch {
                            reference,
                            digest: *digest,
                            expected: size,
                            found: have,
                        });
                    }
                }
                Err(e) if e.is_transient() && failures < 8 => {
                    failures += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 << failures.min(6)))
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
        file.flush().await.map_err(|e| Error::io(tmp, e))?;
        let found = hasher.finish();
        if found != *digest {
            return Err(Error::DigestMismatch {
                reference,
                what: "blob content".into(),
                expected: *digest,
                found,
            });
        }
        Ok(downloaded)
    }
}
