//! Source strings (`oci-layout:PATH[:TAG]` and friends) and platforms (`os/arch[/variant]`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{Error, Result};

/// Where an image comes from: a local source in one of the forms skopeo names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// An OCI image layout directory (`oci-layout:PATH[:TAG]`).
    OciLayout {
        /// The layout directory.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick; `None` when the layout holds one image.
        tag: Option<String>,
    },
    /// A tar file holding an OCI image layout (`oci-archive:FILE[:TAG]`).
    OciArchive {
        /// The tar file.
        path: PathBuf,
        /// As for [`SourceSpec::OciLayout`].
        tag: Option<String>,
    },
    /// A `docker save` tar file (`docker-archive:FILE[:REF]`).
    DockerArchive {
        /// The tar file.
        path: PathBuf,
        /// One of the `RepoTags` of its `manifest.json`, or `@N` for the N-th entry (from 0);
        /// `None` when it holds one image.
        reference: Option<String>,
    },
}

impl SourceSpec {
    /// Parses `oci-layout:PATH[:TAG]`, `oci-archive:FILE[:TAG]` or `docker-archive:FILE[:REF]`.
    ///
    /// As in skopeo, the rest after the transport is split at its first `:`, so a path cannot
    /// hold a `:` but a reference can (`docker-archive:app.tar:registry:5000/app:1.0`). An empty
    /// tag counts as none. `oci:` is accepted as another name for `oci-layout:`, as skopeo
    /// spells it.
    pub fn parse(s: &str) -> Result<SourceSpec> {
        let invalid = |reason| Error::InvalidSpec {
            spec: s.to_owned(),
            reason,
        };
        let (transport, rest) = s
            .split_once(':')
            .ok_or_else(|| invalid("expected TRANSPORT:PATH, e.g. oci-layout:./dir:1.0"))?;
        let (path, tag) = match rest.split_once(':') {
            Some((p, t)) => (p, (!t.is_empty()).then(|| t.to_owned())),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(invalid("the path is empty"));
        }
        let path = PathBuf::from(path);
        Ok(match transport {
            "oci-layout" | "oci" => SourceSpec::OciLayout { path, tag },
            "oci-archive" => SourceSpec::OciArchive { path, tag },
            "docker-archive" => SourceSpec::DockerArchive {
                path,
                reference: tag,
            },
            other => {
                return Err(Error::UnknownTransport {
                    spec: s.to_owned(),
                    transport: other.to_owned(),
                });
            }
        })
    }

    /// Makes a relative path relative to `base` (the directory of the file that named it).
    #[must_use]
    pub fn relative_to(self, base: &Path) -> SourceSpec {
        let fix = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        match self {
            SourceSpec::OciLayout { path, tag } => SourceSpec::OciLayout {
                path: fix(path),
                tag,
            },
            SourceSpec::OciArchive { path, tag } => SourceSpec::OciArchive {
                path: fix(path),
                tag,
            },
            SourceSpec::DockerArchive { path, reference } => SourceSpec::DockerArchive {
                path: fix(path),
                reference,
            },
        }
    }

    /// The directory or file the source reads.
    pub fn path(&self) -> &Path {
        match self {
            SourceSpec::OciLayout { path, .. }
            | SourceSpec::OciArchive { path, .. }
            | SourceSpec::DockerArchive { path, .. } => path,
        }
    }
}

impl FromStr for SourceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<SourceSpec> {
        SourceSpec::parse(s)
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (transport, path, tag) = match self {
            SourceSpec::OciLayout { path, tag } => ("oci-layout", path, tag),
            SourceSpec::OciArchive { path, tag } => ("oci-archive", path, tag),
            SourceSpec::DockerArchive { path, reference } => ("docker-archive", path, reference),
        };
        write!(f, "{transport}:{}", path.display())?;
        if let Some(t) = tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

/// A platform, written `os/arch[/variant]` (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// CPU variant, e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// Whether `candidate` (an image's platform) is what this filter asks for: same os and
    /// architecture, and the same variant when the filter names one. An arm64 image without a
    /// variant counts as `v8`, the only arm64 variant in use.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        match (&self.variant, &candidate.variant) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(want), None) => self.architecture == "arm64" && want == "v8",
        }
    }

    /// Attestation manifests carry `unknown/unknown`; they are not a platform of the image.
    pub(crate) fn is_unknown(&self) -> bool {
        self.os == "unknown" && self.architecture == "unknown"
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Platform> {
        let bad = |reason| Error::InvalidPlatform {
            value: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("expected os/arch[/variant] with no empty part"));
        }
        match parts[..] {
            [os, arch] => Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: None,
            }),
            [os, arch, variant] => Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: Some(variant.to_owned()),
            }),
            _ => Err(bad("expected os/arch[/variant]")),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn parses_sources() {
        let table = [
            (
                "oci-layout:./img",
                SourceSpec::OciLayout {
                    path: p("./img"),
                    tag: None,
                },
            ),
            (
                "oci-layout:/a/b:1.0",
                SourceSpec::OciLayout {
                    path: p("/a/b"),
                    tag: Some("1.0".into()),
                },
            ),
            (
                "oci:dir:",
                SourceSpec::OciLayout {
                    path: p("dir"),
                    tag: None,
                },
            ),
            (
                "oci-archive:app.tar:latest",
                SourceSpec::OciArchive {
                    path: p("app.tar"),
                    tag: Some("latest".into()),
                },
            ),
            (
                "docker-archive:app.tar:registry:5000/team/app:1.0",
                SourceSpec::DockerArchive {
                    path: p("app.tar"),
                    reference: Some("registry:5000/team/app:1.0".into()),
                },
            ),
            (
                "docker-archive:app.tar",
                SourceSpec::DockerArchive {
                    path: p("app.tar"),
                    reference: None,
                },
            ),
        ];
        for (text, want) in table {
            assert_eq!(SourceSpec::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn displays_sources_back() {
        for text in [
            "oci-layout:./img",
            "oci-archive:app.tar:latest",
            "docker-archive:a.tar:r:5000/x:1",
        ] {
            assert_eq!(SourceSpec::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_sources() {
        match SourceSpec::parse("docker-daemon:app:1.0") {
            Err(Error::UnknownTransport { transport, .. }) => {
                assert_eq!(transport, "docker-daemon")
            }
            other => panic!("{other:?}"),
        }
        let e = SourceSpec::parse("docker://app").unwrap_err().to_string();
        assert!(e.contains("unknown transport \"docker\""), "{e}");
        for bad in ["no-transport", "oci-layout:", "oci-archive::tag"] {
            assert!(
                matches!(SourceSpec::parse(bad), Err(Error::InvalidSpec { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn relative_paths_join_the_base() {
        let base = Path::new("/etc/bundle");
        let s = SourceSpec::parse("oci-layout:img:1")
            .unwrap()
            .relative_to(base);
        assert_eq!(s.path(), Path::new("/etc/bundle/img"));
        let s = SourceSpec::parse("docker-archive:/abs.tar")
            .unwrap()
            .relative_to(base);
        assert_eq!(s.path(), Path::new("/abs.tar"));
    }

    #[test]
    fn platforms_parse_print_and_match() {
        for text in ["linux/amd64", "linux/arm64/v8", "windows/amd64"] {
            assert_eq!(text.parse::<Platform>().unwrap().to_string(), text);
        }
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux//v8"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        let pl = |s: &str| s.parse::<Platform>().unwrap();
        assert!(pl("linux/arm64").matches(&pl("linux/arm64/v8")));
        assert!(pl("linux/arm64/v8").matches(&pl("linux/arm64")));
        assert!(!pl("linux/arm/v7").matches(&pl("linux/arm/v6")));
        assert!(!pl("linux/arm/v7").matches(&pl("linux/arm")));
        assert!(!pl("linux/amd64").matches(&pl("linux/arm64")));
    }
}
