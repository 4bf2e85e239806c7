//! Request parsing: method, path and query of an OCI distribution request into a checked
//! [`Route`]. Pure and IO-free, so it is fuzzed on its own (`fuzz/fuzz_targets/route.rs`).
//! Repository names and tags are checked against the distribution grammar here, which is
//! what keeps a name from ever reaching the filesystem with `..`, `/` runs or odd bytes.

use bundle_format::Digest;

use super::error::{ApiError, Code};
use crate::reference::{valid_component, valid_tag};

/// Longest repository name accepted (distribution's limit).
pub const MAX_NAME: usize = 255;
/// Largest page a tags or catalog listing returns.
pub const MAX_PAGE: usize = 10_000;

/// What a manifest is asked for by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    /// A tag, checked against the tag grammar.
    Tag(String),
    /// A digest.
    Digest(Digest),
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Tag(t) => f.write_str(t),
            Ref::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// A page of a listing (`?n=&last=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// At most this many entries.
    pub n: Option<usize>,
    /// Entries after this one.
    pub last: Option<String>,
}

/// A parsed request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/healthz`, for probes.
    Health,
    /// `/v2/_catalog`
    Catalog(Page),
    /// `/v2/<name>/tags/list`
    Tags {
        /// Repository.
        name: String,
        /// Paging.
        page: Page,
    },
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        /// Repository.
        name: String,
        /// Tag or digest.
        reference: Ref,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob {
        /// Repository.
        name: String,
        /// The blob.
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/` with its options.
    UploadStart {
        /// Repository.
        name: String,
        /// `?digest=`: a monolithic upload in this one request.
        digest: Option<Digest>,
        /// `?mount=&from=`: mount this blob from another repository.
        mount: Option<(Digest, Option<String>)>,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        /// Repository.
        name: String,
        /// Upload session id.
        id: String,
        /// `?digest=` (closing PUT).
        digest: Option<Digest>,
    },
    /// `/v2/<name>/referrers/<digest>`
    Referrers {
        /// Repository.
        name: String,
        /// The subject.
        digest: Digest,
        /// `?artifactType=` filter.
        artifact_type: Option<String>,
    },
}

impl Route {
    /// The repository the route is about, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            Route::Base | Route::Health | Route::Catalog(_) => None,
            Route::Tags { name, .. }
            | Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name, .. }
            | Route::Upload { name, .. }
            | Route::Referrers { name, .. } => Some(name),
        }
    }
}

/// Whether `name` is a valid repository name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.split('/').all(valid_component)
}

/// Whether `id` can be an upload id of ours (`[A-Za-z0-9_-]{1,64}`).
pub fn valid_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decodes `%XX` escapes (and, in queries, `+`). Fails on a bad escape or non-UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query parameters, decoded; a malformed query is an error.
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k, true), percent_decode(v, true)) else {
            return Err(ApiError::new(
                Code::Unsupported,
                format!("query parameter {pair:?} is not valid percent-encoding"),
            ));
        };
        out.push((k, v));
    }
    Ok(out)
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn digest_param(pairs: &[(String, String)], key: &str) -> Result<Option<Digest>, ApiError> {
    param(pairs, key).map(parse_digest).transpose()
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>()
        .map_err(|e| ApiError::new(Code::DigestInvalid, format!("{e}")))
}

fn page(pairs: &[(String, String)]) -> Result<Page, ApiError> {
    let n = match param(pairs, "n") {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|&n| n <= MAX_PAGE)
                .ok_or_else(|| {
                    ApiError::new(
                        Code::PaginationNumberInvalid,
                        format!("n={v:?}: expected a number up to {MAX_PAGE}"),
                    )
                })?,
        ),
    };
    let last = param(pairs, "last")
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    Ok(Page { n, last })
}

fn checked_name(name: &str) -> Result<String, ApiError> {
    if valid_name(name) {
        Ok(name.to_owned())
    } else {
        Err(ApiError::new(
            Code::NameInvalid,
            format!(
                "repository name {:?} is invalid: lowercase path components [a-z0-9] joined by . _ __ or -, up to {MAX_NAME} characters",
                name.chars().take(300).collect::<String>()
            ),
        ))
    }
}

/// Parses a request target. `path` is the raw path (no query), `query` the raw query.
pub fn parse(path: &str, query: Option<&str>) -> Result<Route, ApiError> {
    if path == "/healthz" {
        return Ok(Route::Health);
    }
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Base);
    }
    let not_found = || {
        ApiError::new(
            Code::NotFound,
            format!(
                "no such endpoint: {:?}",
                path.chars().take(300).collect::<String>()
            ),
        )
    };
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found());
    };
    let pairs = query_pairs(query)?;
    if rest == "_catalog" {
        return Ok(Route::Catalog(page(&pairs)?));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name_of = |k: usize| -> Result<String, ApiError> {
        if n <= k {
            return Err(not_found());
        }
        checked_name(&segs[..n - k].join("/"))
    };
    let decoded_last = || percent_decode(segs[n - 1], false).ok_or_else(not_found);
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Ok(Route::Tags {
            name: name_of(2)?,
            page: page(&pairs)?,
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads"
        || n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" && segs[n - 1].is_empty()
    {
        let k = if segs[n - 1].is_empty() { 3 } else { 2 };
        let mount = match digest_param(&pairs, "mount")? {
            Some(d) => Some((
                d,
                param(&pairs, "from")
                    .filter(|f| !f.is_empty())
                    .map(checked_name)
                    .transpose()?,
            )),
            None => None,
        };
        return Ok(Route::UploadStart {
            name: name_of(k)?,
            digest: digest_param(&pairs, "digest")?,
            mount,
        });
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let id = decoded_last()?;
        if !valid_upload_id(&id) {
            return Err(ApiError::new(
                Code::BlobUploadUnknown,
                format!(
                    "upload id {:?} is not one of ours",
                    id.chars().take(80).collect::<String>()
                ),
            ));
        }
        return Ok(Route::Upload {
            name: name_of(3)?,
            id,
            digest: digest_param(&pairs, "digest")?,
        });
    }
    if n >= 3 && segs[n - 2] == "manifests" {
        let r = decoded_last()?;
        let reference = if r.contains(':') {
            Ref::Digest(parse_digest(&r)?)
        } else if valid_tag(&r) {
            Ref::Tag(r)
        } else {
            return Err(ApiError::new(
                Code::ManifestInvalid,
                format!(
                    "reference {:?} is neither a tag nor a digest",
                    r.chars().take(200).collect::<String>()
                ),
            )
            .with_status(http::StatusCode::BAD_REQUEST));
        };
        return Ok(Route::Manifest {
            name: name_of(2)?,
            reference,
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" {
        return Ok(Route::Blob {
            name: name_of(2)?,
            digest: parse_digest(&decoded_last()?)?,
        });
    }
    if n >= 3 && segs[n - 2] == "referrers" {
        return Ok(Route::Referrers {
            name: name_of(2)?,
            digest: parse_digest(&decoded_last()?)?,
            artifact_type: param(&pairs, "artifactType")
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
        });
    }
    Err(not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn d() -> Digest {
        D.parse().unwrap()
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Option<&str>, Route)> = vec![
            ("/v2/", None, Route::Base),
            ("/v2", None, Route::Base),
            ("/healthz", None, Route::Health),
            (
                "/v2/_catalog",
                Some("n=2&last=a"),
                Route::Catalog(Page {
                    n: Some(2),
                    last: Some("a".into()),
                }),
            ),
            (
                "/v2/a/b/tags/list",
                None,
                Route::Tags {
                    name: "a/b".into(),
                    page: Page::default(),
                },
            ),
            (
                "/v2/team/app/manifests/1.0",
                None,
                Route::Manifest {
                    name: "team/app".into(),
                    reference: Ref::Tag("1.0".into()),
                },
            ),
            (
                leak(format!("/v2/app/manifests/{D}")),
                None,
                Route::Manifest {
                    name: "app".into(),
                    reference: Ref::Digest(d()),
                },
            ),
            (
                "/v2/app/manifests/sha256%3Ae3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                None,
                Route::Manifest {
                    name: "app".into(),
                    reference: Ref::Digest(d()),
                },
            ),
            (
                leak(format!("/v2/x/blobs/{D}")),
                None,
                Route::Blob {
                    name: "x".into(),
                    digest: d(),
                },
            ),
            (
                "/v2/x/blobs/uploads/",
                None,
                Route::UploadStart {
                    name: "x".into(),
                    digest: None,
                    mount: None,
                },
            ),
            (
                "/v2/x/blobs/uploads",
                Some(leak(format!("digest={D}"))),
                Route::UploadStart {
                    name: "x".into(),
                    digest: Some(d()),
                    mount: None,
                },
            ),
            (
                "/v2/x/blobs/uploads/",
                Some(leak(format!("mount={D}&from=y/z"))),
                Route::UploadStart {
                    name: "x".into(),
                    digest: None,
                    mount: Some((d(), Some("y/z".into()))),
                },
            ),
            (
                "/v2/x/blobs/uploads/abc-1",
                Some(leak(format!("digest={D}"))),
                Route::Upload {
                    name: "x".into(),
                    id: "abc-1".into(),
                    digest: Some(d()),
                },
            ),
            (
                leak(format!("/v2/x/referrers/{D}")),
                Some("artifactType=a%2Fb"),
                Route::Referrers {
                    name: "x".into(),
                    digest: d(),
                    artifact_type: Some("a/b".into()),
                },
            ),
            // A repository may itself be called "blobs" or "manifests".
            (
                "/v2/blobs/manifests/latest",
                None,
                Route::Manifest {
                    name: "blobs".into(),
                    reference: Ref::Tag("latest".into()),
                },
            ),
        ];
        for (path, query, want) in cases {
            assert_eq!(parse(path, query).unwrap(), want, "{path} {query:?}");
        }
    }

    #[test]
    fn rejects() {
        let cases: Vec<(&str, Option<&str>, Code)> = vec![
            ("/", None, Code::NotFound),
            ("/v1/x", None, Code::NotFound),
            ("/v2/x", None, Code::NotFound),
            ("/v2/../etc/manifests/x", None, Code::NameInvalid),
            ("/v2/a//b/manifests/x", None, Code::NameInvalid),
            ("/v2/A/manifests/x", None, Code::NameInvalid),
            ("/v2/%2e%2e/manifests/x", None, Code::NameInvalid),
            ("/v2/a/manifests/..", None, Code::ManifestInvalid),
            ("/v2/a/manifests/sha256:abc", None, Code::DigestInvalid),
            ("/v2/a/blobs/sha256:..%2F..%2Fx", None, Code::DigestInvalid),
            ("/v2/a/blobs/sha256:../../x", None, Code::NotFound),
            ("/v2/a/blobs/uploads/..", None, Code::BlobUploadUnknown),
            ("/v2/a/blobs/uploads/a%2f..", None, Code::BlobUploadUnknown),
            ("/v2/_catalog", Some("n=-1"), Code::PaginationNumberInvalid),
            ("/v2/_catalog", Some("n=%zz"), Code::Unsupported),
            ("/v2/a/manifests/%ff", None, Code::NotFound),
        ];
        for (path, query, code) in cases {
            let e = parse(path, query).unwrap_err();
            assert_eq!(e.code, code, "{path} {query:?}: {e}");
        }
        let long = format!("/v2/{}/tags/list", "a".repeat(300));
        assert_eq!(parse(&long, None).unwrap_err().code, Code::NameInvalid);
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn component() -> impl Strategy<Value = String> {
            "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}"
        }

        fn name() -> impl Strategy<Value = String> {
            prop::collection::vec(component(), 1..4).prop_map(|c| c.join("/"))
        }

        proptest! {
            /// Any target parses or fails with an error; a parsed name is always valid.
            #[test]
            fn never_panics(path in "/v2/[ -~]{0,80}", query in proptest::option::of("[ -~]{0,40}")) {
                if let Ok(r) = parse(&path, query.as_deref())
                    && let Some(n) = r.name()
                {
                    prop_assert!(valid_name(n));
                    prop_assert!(!n.split('/').any(|c| c == ".." || c == "."));
                }
            }

            /// Arbitrary bytes, percent-encoded, never panic either.
            #[test]
            fn encoded_bytes(bytes in prop::collection::vec(any::<u8>(), 0..60)) {
                let enc: String = bytes.iter().map(|b| format!("%{b:02x}")).collect();
                let _ = parse(&format!("/v2/a/manifests/{enc}"), Some(&enc));
                let _ = parse(&format!("/v2/{enc}/blobs/uploads/"), None);
            }

            /// Valid names and tags come back as they went in.
            #[test]
            fn round_trip(n in name(), tag in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}") {
                let r = parse(&format!("/v2/{n}/manifests/{tag}"), None).unwrap();
                prop_assert_eq!(r, Route::Manifest { name: n.clone(), reference: Ref::Tag(tag) });
                let r = parse(&format!("/v2/{n}/tags/list"), Some("n=3")).unwrap();
                prop_assert_eq!(r, Route::Tags { name: n, page: Page { n: Some(3), last: None } });
            }
        }
    }
}
