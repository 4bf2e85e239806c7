//! The distribution API calls: manifests, blobs, uploads (monolithic, chunked, resumed) and
//! cross-repository mounts.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use bundle_format::Digest;

use crate::client::{Call, MANIFEST_ACCEPT, MANIFEST_LIMIT, content_digest, error_text, read_body};
use crate::transport::{FileBody, ReqBody, RespBody};
use crate::{Client, Error, Reference, Repo, Result, Scope};

/// A manifest or index as the registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its bytes, exactly as served.
    pub bytes: Bytes,
    /// The media type from `Content-Type` (or the document's `mediaType`).
    pub media_type: String,
    /// sha256 of the bytes.
    pub digest: Digest,
}

/// Makes the body of one upload attempt from an offset and a length: as bytes, and, where
/// the bytes lie in files, as a [`FileBody`] for a transport that sends files itself.
#[derive(Clone)]
pub struct BodyFactory {
    /// `(offset, len) -> body`.
    pub bytes: Arc<dyn Fn(u64, u64) -> ReqBody + Send + Sync>,
    /// `(offset, len) -> pieces`, when there are files to send from.
    pub files: Option<Arc<dyn Fn(u64, u64) -> FileBody + Send + Sync>>,
}

impl BodyFactory {
    /// The two makers of one attempt's body for `offset..offset + len`.
    fn at(
        &self,
        offset: u64,
        len: u64,
    ) -> (
        impl Fn() -> ReqBody + Send + Sync + use<>,
        Option<impl Fn() -> FileBody + Send + Sync + use<>>,
    ) {
        let bytes = Arc::clone(&self.bytes);
        let files = self.files.clone();
        (
            move || bytes(offset, len),
            files.map(|f| move || f(offset, len)),
        )
    }
}

/// How an upload session began.
pub enum UploadStart {
    /// The blob was mounted from another repository: nothing to send.
    Mounted,
    /// Send the blob to this location.
    Location(String),
}

fn status_error(repo: &Repo, action: &str, status: StatusCode, body: &[u8]) -> Error {
    Error::Status {
        registry: repo.registry.clone(),
        action: action.to_owned(),
        status,
        body: error_text(body),
    }
}

fn location(repo: &Repo, resp: &http::Response<RespBody>, action: &str) -> Result<String> {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| Error::Protocol {
            registry: repo.registry.clone(),
            what: format!("{action}: {} without a Location header", resp.status()),
        })
}

fn with_query(location: &str, query: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{query}")
}

impl Client {
    /// Fetches the manifest or index `r` names, checks it against the reference's digest and
    /// the registry's `Docker-Content-Digest`.
    pub async fn get_manifest(&self, r: &Reference) -> Result<Manifest> {
        let repo = Repo::of(r);
        let action = format!("GET manifest {r}");
        let mut call = Call::new(
            Method::GET,
            format!("/v2/{}/manifests/{}", repo.name, r.object()),
            action.clone(),
        );
        call.headers
            .insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self
            .send(&repo, &Scope::Pull(repo.name.clone()), &call)
            .await?;
        let status = resp.status();
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let claimed = content_digest(resp.headers());
        if status == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                reference: r.to_string(),
                what: "manifest".into(),
            });
        }
        let body = read_body(resp.into_body(), MANIFEST_LIMIT)
            .await
            .map_err(|e| Error::Protocol {
                registry: r.registry.clone(),
                what: format!("{action}: reading body: {e}"),
            })?;
        if !status.is_success() {
            return Err(status_error(&repo, &action, status, &body));
        }
        let digest = Digest::of(&body);
        if let Some(want) = r.digest
            && want != digest
        {
            return Err(Error::DigestMismatch {
                reference: r.to_string(),
                what: "manifest content".into(),
                expected: want,
                found: digest,
            });
        }
        match claimed {
            Some(Ok(c)) if c != digest => {
                return Err(Error::DigestMismatch {
                    reference: r.to_string(),
                    what: "Docker-Content-Digest header against the manifest served".into(),
                    expected: c,
                    found: digest,
                });
            }
            Some(Err(e)) => {
                return Err(Error::Protocol {
                    registry: r.registry.clone(),
                    what: format!("{action}: bad Docker-Content-Digest: {e}"),
                });
            }
            _ => {}
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Sniff {
            media_type: Option<String>,
        }
        let sniffed = serde_json::from_slice::<Sniff>(&body)
            .ok()
            .and_then(|s| s.media_type);
        let media_type = sniffed
            .or(media_type)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| Error::Protocol {
                registry: r.registry.clone(),
                what: format!("{action}: no media type in the document or Content-Type"),
            })?;
        Ok(Manifest {
            bytes: body,
            media_type,
            digest,
        })
    }

    /// The size of a blob if the repository has it.
    pub async fn blob_size(
        &self,
        repo: &Repo,
        scope: &Scope,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        let action = format!("HEAD blob {repo}@{digest}");
        let call = Call::new(
            Method::HEAD,
            format!("/v2/{}/blobs/{digest}", repo.name),
            action.clone(),
        );
        let resp = self.send(repo, scope, &call).await?;
        match resp.status() {
            s if s.is_success() => Ok(resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(repo, &action, s, b"")),
        }
    }

    /// Starts reading a blob at `offset` (a `Range` request when not zero). Returns the
    /// response and whether the registry honoured the range.
    pub async fn get_blob(
        &self,
        repo: &Repo,
        digest: &Digest,
        offset: u64,
    ) -> Result<(http::Response<RespBody>, bool)> {
        let action = format!("GET blob {repo}@{digest}");
        let mut call = Call::new(
            Method::GET,
            format!("/v2/{}/blobs/{digest}", repo.name),
            action.clone(),
        );
        if offset > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
        {
            call.headers.insert(header::RANGE, v);
        }
        let resp = self
            .send(repo, &Scope::Pull(repo.name.clone()), &call)
            .await?;
        match resp.status() {
            StatusCode::OK => Ok((resp, false)),
            StatusCode::PARTIAL_CONTENT => Ok((resp, true)),
            StatusCode::NOT_FOUND => Err(Error::NotFound {
                reference: format!("{repo}@{digest}"),
                what: "blob".into(),
            }),
            s => {
                let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                Err(status_error(repo, &action, s, &body))
            }
        }
    }

    /// Opens an upload session, mounting `digest` from `from` when given.
    pub async fn start_upload(
        &self,
        repo: &Repo,
        scope: &Scope,
        mount: Option<(&Digest, &str)>,
    ) -> Result<UploadStart> {
        let action = format!("POST upload {repo}");
        let path = match mount {
            Some((d, from)) => format!("/v2/{}/blobs/uploads/?mount={d}&from={from}", repo.name),
            None => format!("/v2/{}/blobs/uploads/", repo.name),
        };
        let mut call = Call::new(Method::POST, path, action.clone());
        call.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(repo, scope, &call).await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED => Ok(UploadStart::Location(location(repo, &resp, &action)?)),
            s => {
                let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                Err(status_error(repo, &action, s, &body))
            }
        }
    }

    /// How many bytes an upload session holds (for resuming), from `GET location`.
    pub async fn upload_offset(
        &self,
        repo: &Repo,
        scope: &Scope,
        location: &str,
    ) -> Result<Option<(u64, String)>> {
        let action = format!("GET upload status {repo}");
        let call = Call::new(Method::GET, location.to_owned(), action.clone());
        let resp = self.send(repo, scope, &call).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => {
                let loc = location_or(&resp, location);
                let end = resp
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|r| r.rsplit_once('-'))
                    .and_then(|(_, end)| end.trim().parse::<u64>().ok());
                // "0-0" is ambiguous in distribution: it also means empty.
                Ok(Some((
                    end.map_or(0, |e| if e == 0 { 0 } else { e + 1 }),
                    loc,
                )))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(repo, &action, s, b"")),
        }
    }

    /// Sends a whole blob to an upload location and closes it (`PUT ?digest=`).
    pub async fn put_blob(
        &self,
        repo: &Repo,
        scope: &Scope,
        location: &str,
        digest: &Digest,
        size: u64,
        body: &BodyFactory,
    ) -> Result<()> {
        let action = format!("PUT blob {repo}@{digest}");
        let (make, files) = body.at(0, size);
        let mut call = Call {
            method: Method::PUT,
            path: with_query(location, &format!("digest={digest}")),
            headers: http::HeaderMap::new(),
            body: &make,
            files: files.as_ref().map(|f| f as _),
            action: action.clone(),
            idempotent: false,
        };
        call.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        call.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self.send(repo, scope, &call).await?;
        finish_blob(repo, &action, digest, resp).await
    }

    /// Sends `[offset, offset+len)` as one PATCH chunk; returns the next location.
    pub async fn patch_chunk(
        &self,
        repo: &Repo,
        scope: &Scope,
        location: &str,
        offset: u64,
        len: u64,
        body: &BodyFactory,
    ) -> Result<String> {
        let action = format!("PATCH upload {repo} bytes {offset}-{}", offset + len - 1);
        let (make, files) = body.at(offset, len);
        let mut call = Call {
            method: Method::PATCH,
            path: location.to_owned(),
            headers: http::HeaderMap::new(),
            body: &make,
            files: files.as_ref().map(|f| f as _),
            action: action.clone(),
            idempotent: false,
        };
        call.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        call.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("{offset}-{}", offset + len - 1)) {
            call.headers.insert(header::CONTENT_RANGE, v);
        }
        let resp = self.send(repo, scope, &call).await?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(location_or(&resp, location)),
            s => {
                let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
                Err(status_error(repo, &action, s, &body))
            }
        }
    }

    /// Closes a chunked upload (`PUT ?digest=` without a body).
    pub async fn close_upload(
        &self,
        repo: &Repo,
        scope: &Scope,
        location: &str,
        digest: &Digest,
    ) -> Result<()> {
        let action = format!("PUT blob {repo}@{digest} (close)");
        let mut call = Call::new(
            Method::PUT,
            with_query(location, &format!("digest={digest}")),
            action.clone(),
        );
        call.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(repo, scope, &call).await?;
        finish_blob(repo, &action, digest, resp).await
    }

    /// The digest of what a repository holds under a manifest reference (a tag or a digest),
    /// from a HEAD request's `Docker-Content-Digest`; `None` when it holds nothing there or does
    /// not say.
    pub async fn manifest_digest(
        &self,
        repo: &Repo,
        scope: &Scope,
        reference: &str,
    ) -> Result<Option<Digest>> {
        let action = format!("HEAD manifest {repo}:{reference}");
        let mut call = Call::new(
            Method::HEAD,
            format!("/v2/{}/manifests/{reference}", repo.name),
            action.clone(),
        );
        call.headers
            .insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self.send(repo, scope, &call).await?;
        match resp.status() {
            s if s.is_success() => Ok(content_digest(resp.headers()).and_then(Result::ok)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(repo, &action, s, b"")),
        }
    }

    /// Uploads a manifest under `reference` (a tag or its digest); checks the digest the
    /// registry reports.
    pub async fn put_manifest(
        &self,
        repo: &Repo,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        let digest = Digest::of(&bytes);
        let action = format!("PUT manifest {repo}:{reference}");
        let make = {
            let bytes = bytes.clone();
            move || crate::transport::full(bytes.clone())
        };
        let mut call = Call {
            method: Method::PUT,
            path: format!("/v2/{}/manifests/{reference}", repo.name),
            headers: http::HeaderMap::new(),
            body: &make,
            files: None,
            action: action.clone(),
            idempotent: true,
        };
        let ct = HeaderValue::from_str(media_type)
            .map_err(|_| Error::Invalid(format!("media type {media_type:?}")))?;
        call.headers.insert(header::CONTENT_TYPE, ct);
        call.headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(bytes.len() as u64),
        );
        let scope = Scope::Push {
            repo: repo.name.clone(),
            mount_from: None,
        };
        let resp = self.send(repo, &scope, &call).await?;
        let status = resp.status();
        let claimed = content_digest(resp.headers());
        let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
        if !status.is_success() {
            return Err(status_error(repo, &action, status, &body));
        }
        if let Some(Ok(c)) = claimed
            && c != digest
        {
            return Err(Error::DigestMismatch {
                reference: format!("{repo}:{reference}"),
                what: "Docker-Content-Digest of the manifest pushed".into(),
                expected: digest,
                found: c,
            });
        }
        Ok(())
    }
}

fn location_or(resp: &http::Response<RespBody>, fallback: &str) -> String {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| fallback.to_owned(), str::to_owned)
}

async fn finish_blob(
    repo: &Repo,
    action: &str,
    digest: &Digest,
    resp: http::Response<RespBody>,
) -> Result<()> {
    let status = resp.status();
    let claimed = content_digest(resp.headers());
    let body = read_body(resp.into_body(), 4096).await.unwrap_or_default();
    if status != StatusCode::CREATED && !status.is_success() {
        return Err(status_error(repo, action, status, &body));
    }
    if let Some(Ok(c)) = claimed
        && c != *digest
    {
        return Err(Error::DigestMismatch {
            reference: format!("{repo}@{digest}"),
            what: "Docker-Content-Digest of the blob pushed".into(),
            expected: *digest,
            found: c,
        });
    }
    Ok(())
}
