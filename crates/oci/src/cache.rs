//! The local blob cache: `ROOT/blobs/sha256/<hex>`, content-addressed. A blob enters it only
//! once its bytes hash to its digest: downloads stream into `ROOT/tmp/` while hashing, resume
//! with a `Range` request after a dropped connection, and are renamed into place at the end.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use http_body_util::BodyExt as _;

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
        // Removed on every way out but success, a cancelled download (the writer of a
        // streaming pull failed) included.
        let mut guard = TmpFile(Some(tmp.clone()));
        let n = self
            .download(client, repo, digest, size, &tmp, true)
            .await?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| Error::io(&path, e))?;
        guard.0 = None;
        Ok((path, n))
    }

    /// Downloads blob `digest` of `size` bytes from `repo` into a temp file of the cache
    /// without hashing it, for a reader that hashes it anyway (the archive writer): the blob
    /// enters the cache only through [`Staged::commit`] with the digest that reader found.
    /// A dropped transfer resumes where it stopped. Returns the staged file and the bytes
    /// downloaded.
    pub async fn stage(
        &self,
        client: &Client,
        repo: &Repo,
        digest: &Digest,
        size: u64,
    ) -> Result<(Staged, u64)> {
        let tmp = self.tmp_path(digest);
        let guard = TmpFile(Some(tmp.clone()));
        let n = self
            .download(client, repo, digest, size, &tmp, false)
            .await?;
        Ok((
            Staged {
                tmp: guard,
                path: self.path(digest),
                reference: format!("{repo}@{digest}"),
                digest: *digest,
            },
            n,
        ))
    }

    async fn download(
        &self,
        client: &Client,
        repo: &Repo,
        digest: &Digest,
        size: u64,
        tmp: &Path,
        hash: bool,
    ) -> Result<u64> {
        let mut file = Spool::create(tmp)?;
        let fresh = || hash.then(Hasher::new);
        let mut hasher = fresh();
        let mut have: u64 = 0;
        let mut downloaded: u64 = 0;
        let mut failures = 0u32;
        let reference = format!("{repo}@{digest}");
        loop {
            let attempt = async {
                let (resp, partial) = client.get_blob(repo, digest, have).await?;
                if have > 0 && !partial {
                    // The registry ignored the range: start over.
                    file.restart().await?;
                    hasher = fresh();
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
                    if let Some(h) = &mut hasher {
                        h.update(&data);
                    }
                    let n = data.len() as u64;
                    file.write(data).await?;
                    have += n;
                    downloaded += n;
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
        file.flush().await?;
        let Some(hasher) = hasher else {
            return Ok(downloaded);
        };
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

/// A downloaded blob not checked yet ([`BlobCache::stage`]); its temp file goes when dropped.
pub struct Staged {
    tmp: TmpFile,
    path: PathBuf,
    reference: String,
    digest: Digest,
}

impl Staged {
    /// The temp file holding the bytes.
    pub fn tmp_path(&self) -> &Path {
        self.tmp.0.as_deref().unwrap_or(&self.path)
    }

    /// Moves the bytes into the cache if `found` (their sha256, computed by the caller) is the
    /// blob's digest; otherwise drops them and says so.
    pub fn commit(mut self, found: &Digest) -> Result<PathBuf> {
        if *found != self.digest {
            return Err(Error::DigestMismatch {
                reference: self.reference.clone(),
                what: "blob content".into(),
                expected: self.digest,
                found: *found,
            });
        }
        if let Some(tmp) = self.tmp.0.take() {
            std::fs::rename(&tmp, &self.path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(&self.path, e)
            })?;
        }
        Ok(self.path.clone())
    }
}

/// Removes a temp file when dropped, unless taken out.
struct TmpFile(Option<PathBuf>);

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A download's temp file. Body chunks are gathered as they arrive (no copy) and written by
/// a blocking thread a MiB at a time, each at its offset: a write per chunk would cost a trip
/// to a blocking thread each, and copying them into one buffer first was 5% of a pull's CPU.
struct Spool {
    path: PathBuf,
    file: Arc<std::fs::File>,
    chunks: Vec<Bytes>,
    gathered: usize,
    written: u64,
}

/// Bytes gathered before a write.
const SPOOL_BATCH: usize = 1 << 20;

impl Spool {
    fn create(path: &Path) -> Result<Spool> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(Spool {
            path: path.to_owned(),
            file: Arc::new(file),
            chunks: Vec::new(),
            gathered: 0,
            written: 0,
        })
    }

    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.gathered += data.len();
        self.chunks.push(data);
        if self.gathered >= SPOOL_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes what is gathered.
    async fn flush(&mut self) -> Result<()> {
        let chunks = std::mem::take(&mut self.chunks);
        let mut at = self.written;
        let n = self.gathered as u64;
        self.gathered = 0;
        self.blocking(move |file| {
            for c in &chunks {
                file.write_all_at(c, at)?;
                at += c.len() as u64;
            }
            Ok(())
        })
        .await?;
        self.written += n;
        Ok(())
    }

    /// Runs `f` on the file in a blocking thread; its error names the file.
    async fn blocking(
        &self,
        f: impl FnOnce(&std::fs::File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Drops everything written or gathered.
    async fn restart(&mut self) -> Result<()> {
        self.chunks.clear();
        self.gathered = 0;
        self.written = 0;
        self.blocking(|file| file.set_len(0)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A download cancelled mid-body (a streaming pull's writer failed and dropped it)
    /// leaves no temp file behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_download_leaves_no_temp_file() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        // Answers every request with the head and half of a 2 MiB body, then stalls.
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = s.read(&mut head).await;
                    let body = vec![b'x'; 1 << 20];
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n")
                        .await;
                    let _ = s.write_all(&body).await;
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                });
            }
        });
        let mut tls = crate::TlsOptions::default();
        tls.insecure.insert(host.clone());
        let client = Client::new(
            Arc::new(crate::Direct::new(&tls).unwrap()),
            crate::auth::CredentialStore::empty(),
            tls,
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let repo: crate::Reference = format!("{host}/a/b:1").parse().unwrap();
        let repo = Repo::of(&repo);
        let digest = Digest::of(b"whatever");
        let task = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.fetch(&client, &repo, &digest, 2 << 20).await })
        };
        let tmp = dir.path().join("tmp");
        let started = std::time::Instant::now();
        while std::fs::read_dir(&tmp).unwrap().next().is_none() {
            assert!(
                started.elapsed().as_secs() < 20,
                "the download never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        task.abort();
        let _ = task.await;
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
        assert!(!cache.path(&digest).exists());
    }

    /// Chunks land in order at their offsets across batches; a restart (a registry that
    /// ignored the Range of a resumed download) leaves only what follows it.
    #[tokio::test]
    async fn spooled_chunks_land_in_order_and_a_restart_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let mut spool = Spool::create(&path).unwrap();
        let chunk = |b: u8, n: usize| Bytes::from(vec![b; n]);
        let mut want = Vec::new();
        for (i, n) in [700_000usize, 500_000, 3, 1 << 20, 17]
            .into_iter()
            .enumerate()
        {
            spool.write(chunk(i as u8, n)).await.unwrap();
            want.extend(std::iter::repeat_n(i as u8, n));
        }
        spool.flush().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        spool.write(chunk(9, 1 << 20)).await.unwrap();
        spool.restart().await.unwrap();
        spool.write(chunk(7, 5)).await.unwrap();
        spool.write(chunk(8, SPOOL_BATCH)).await.unwrap();
        spool.write(chunk(6, 2)).await.unwrap();
        spool.flush().await.unwrap();
        let mut want = vec![7u8; 5];
        want.extend(vec![8u8; SPOOL_BATCH]);
        want.extend([6, 6]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
