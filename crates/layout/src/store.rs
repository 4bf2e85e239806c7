//! Byte access to a source: files under a layout directory, or members of a plain tar file
//! found by their offsets (the tar is indexed once, never extracted).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bundle_format::Digest;

use crate::error::Place;
use crate::{Error, Result};

/// Largest JSON document (manifest, index, config, `manifest.json`) read into memory.
pub(crate) const JSON_LIMIT: u64 = 32 << 20;

/// How many links a member lookup follows before giving up.
const MAX_LINKS: usize = 16;

/// A located run of bytes.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    /// For messages.
    pub place: Place,
    /// The file holding the bytes.
    pub file: PathBuf,
    /// Where they start in it.
    pub offset: u64,
    /// How many there are.
    pub len: u64,
}

impl Located {
    /// Reads all of it, refusing more than `limit` bytes.
    pub fn read(&self, what: &str, limit: u64) -> Result<Vec<u8>> {
        if self.len > limit {
            return Err(Error::TooLarge {
                what: what.to_owned(),
                size: self.len,
                limit,
            });
        }
        let mut f = File::open(&self.file).map_err(|e| Error::io(&self.file, e))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(|e| Error::io(&self.file, e))?;
        let mut out = Vec::with_capacity(self.len as usize);
        f.take(self.len)
            .read_to_end(&mut out)
            .map_err(|e| Error::io(&self.file, e))?;
        if out.len() as u64 != self.len {
            return Err(Error::SizeMismatch {
                what: format!("{what}: file shrank while reading"),
                expected: self.len,
                found: out.len() as u64,
            });
        }
        Ok(out)
    }
}

/// A member as indexed.
#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Symlink(String),
    Hardlink(String),
}

/// The regular files and links of a plain tar file, by normalized name.
#[derive(Debug)]
pub(crate) struct TarIndex {
    path: PathBuf,
    members: HashMap<String, Member>,
}

impl TarIndex {
    /// Indexes `path`, reading only headers (data is skipped by seeking).
    pub fn open(path: &Path) -> Result<TarIndex> {
        check_not_compressed(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| Error::io(path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            let raw = entry.path_bytes();
            let Ok(name) = std::str::from_utf8(&raw) else {
                return Err(Error::BadMember {
                    archive: path.to_owned(),
                    member: String::from_utf8_lossy(&raw).into_owned(),
                    reason: "name is not UTF-8".into(),
                });
            };
            let Some(norm) = normalize(name) else {
                return Err(Error::UnsafeMember {
                    archive: path.to_owned(),
                    member: name.to_owned(),
                });
            };
            let kind = entry.header().entry_type();
            let link = || -> Result<String> {
                let target = entry.link_name_bytes().unwrap_or_default();
                match std::str::from_utf8(&target) {
                    Ok(t) => Ok(t.to_owned()),
                    Err(_) => Err(Error::BadMember {
                        archive: path.to_owned(),
                        member: name.to_owned(),
                        reason: "link target is not UTF-8".into(),
                    }),
                }
            };
            let member = if kind.is_file() || kind.is_contiguous() {
                Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                }
            } else if kind.is_symlink() {
                Member::Symlink(link()?)
            } else if kind.is_hard_link() {
                Member::Hardlink(link()?)
            } else {
                continue;
            };
            if !norm.is_empty() {
                members.insert(norm, member);
            }
        }
        Ok(TarIndex {
            path: path.to_owned(),
            members,
        })
    }

    /// The archive file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finds a regular file by name, following links inside the archive.
    pub fn locate(&self, name: &str) -> Result<Option<Located>> {
        let Some(mut cur) = normalize(name) else {
            return Ok(None);
        };
        for _ in 0..=MAX_LINKS {
            let next = match self.members.get(&cur) {
                None => return Ok(None),
                Some(Member::File { offset, size }) => {
                    return Ok(Some(Located {
                        place: Place::Member {
                            archive: self.path.clone(),
                            member: cur,
                        },
                        file: self.path.clone(),
                        offset: *offset,
                        len: *size,
                    }));
                }
                Some(Member::Hardlink(target)) => normalize(target),
                Some(Member::Symlink(target)) => {
                    let dir = cur.rsplit_once('/').map_or("", |(d, _)| d);
                    if target.starts_with('/') {
                        None
                    } else {
                        normalize_within(&format!("{dir}/{target}"))
                    }
                }
            };
            cur = next.ok_or_else(|| Error::BadMember {
                archive: self.path.clone(),
                member: cur.clone(),
                reason: "link points outside the archive".into(),
            })?;
        }
        Err(Error::BadMember {
            archive: self.path.clone(),
            member: name.to_owned(),
            reason: format!("more than {MAX_LINKS} levels of links"),
        })
    }
}

/// A name with `.` and empty components removed; `None` when it is absolute or has `..`.
fn normalize(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Like [`normalize`] but lets `..` climb back up, as long as it stays inside the root.
fn normalize_within(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Refuses gzip, zstd, bzip2 and xz files: members of a compressed tar have no byte offset.
pub(crate) fn check_not_compressed(path: &Path) -> Result<()> {
    let mut head = [0u8; 6];
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    if let Some((kind, tool)) = compression(&head[..n]) {
        return Err(Error::Compressed {
            path: path.to_owned(),
            kind,
            tool,
        });
    }
    Ok(())
}

/// The compression whose magic bytes `head` starts with, and a tool that undoes it.
pub(crate) fn compression(head: &[u8]) -> Option<(&'static str, &'static str)> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(("gzip", "gunzip"))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(("zstd", "unzstd"))
    } else if head.starts_with(b"BZh") {
        Some(("bzip2", "bunzip2"))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(("xz", "unxz"))
    } else {
        None
    }
}

/// Where the bytes of a source are: a layout directory or an indexed tar.
#[derive(Debug)]
pub(crate) enum Store {
    Dir(PathBuf),
    Tar(TarIndex),
    /// Blobs fetched on demand into a content-addressed directory (registry pulls).
    Remote(std::sync::Arc<dyn crate::BlobSource>),
}

impl std::fmt::Debug for dyn crate::BlobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobSource({})", self.root().display())
    }
}

impl Store {
    /// The directory or archive, for messages.
    pub fn root(&self) -> &Path {
        match self {
            Store::Dir(p) => p,
            Store::Tar(t) => t.path(),
            Store::Remote(r) => r.root(),
        }
    }

    /// Finds a file by its path relative to the layout root.
    pub fn locate(&self, rel: &str) -> Result<Option<Located>> {
        match self {
            Store::Tar(t) => t.locate(rel),
            Store::Remote(_) => Ok(None),
            Store::Dir(root) => {
                let path = root.join(rel);
                match std::fs::metadata(&path) {
                    Ok(md) if md.is_file() => Ok(Some(Located {
                        place: Place::File(path.clone()),
                        file: path,
                        offset: 0,
                        len: md.len(),
                    })),
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(path, e)),
                }
            }
        }
    }

    /// Finds blob `digest` and checks its length against the descriptor's `size`.
    pub fn blob(&self, digest: &Digest, size: u64, role: &str) -> Result<Located> {
        if let Store::Remote(source) = self {
            let file = source.locate(digest, size, role)?;
            return Ok(Located {
                place: Place::File(file.clone()),
                file,
                offset: 0,
                len: size,
            });
        }
        let loc = self
            .locate(&bundle_format::tar::blob_path(digest))?
            .ok_or_else(|| Error::BlobMissing {
                digest: *digest,
                place: self.blob_place(digest),
            })?;
        if loc.len != size {
            return Err(Error::SizeMismatch {
                what: format!("{role} {digest} at {}", loc.place),
                expected: size,
                found: loc.len,
            });
        }
        Ok(loc)
    }

    /// Reads blob `digest` whole and checks its digest before anyone parses it.
    pub fn read_blob(&self, digest: &Digest, size: u64, role: &str) -> Result<Vec<u8>> {
        let what = format!("{role} {digest}");
        if size > JSON_LIMIT {
            return Err(Error::TooLarge {
                what: format!("{what} in {}", self.root().display()),
                size,
                limit: JSON_LIMIT,
            });
        }
        let loc = self.blob(digest, size, role)?;
        let what = format!("{what} at {}", loc.place);
        let bytes = loc.read(&what, JSON_LIMIT)?;
        let found = Digest::of(&bytes);
        if found != *digest {
            return Err(Error::DigestMismatch {
                what,
                expected: *digest,
                found,
            });
        }
        Ok(bytes)
    }

    fn blob_place(&self, digest: &Digest) -> Place {
        let rel = bundle_format::tar::blob_path(digest);
        match self {
            Store::Dir(root) => Place::File(root.join(rel)),
            Store::Remote(r) => Place::File(r.root().join(rel)),
            Store::Tar(t) => Place::Member {
                archive: t.path().to_owned(),
                member: rel,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_names() {
        let table = [
            ("./index.json", Some("index.json")),
            ("blobs//sha256/./ab", Some("blobs/sha256/ab")),
            ("./", Some("")),
            ("/etc/passwd", None),
            ("a/../b", None),
            ("..", None),
        ];
        for (name, want) in table {
            assert_eq!(normalize(name).as_deref(), want, "{name}");
        }
        assert_eq!(normalize_within("a/b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize_within("a/../../c"), None);
    }

    #[test]
    fn detects_compression() {
        assert_eq!(compression(&[0x1f, 0x8b, 8, 0]).map(|c| c.0), Some("gzip"));
        assert_eq!(
            compression(&[0x28, 0xb5, 0x2f, 0xfd, 0]).map(|c| c.0),
            Some("zstd")
        );
        assert_eq!(compression(b"BZh91AY").map(|c| c.0), Some("bzip2"));
        assert_eq!(compression(b"\xfd7zXZ\0").map(|c| c.0), Some("xz"));
        assert_eq!(compression(b"index.json\0\0"), None);
        assert_eq!(compression(b""), None);
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Bypass the builder's path checks: archives from elsewhere may hold anything.
            let field = &mut h.as_old_mut().name;
            field[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn indexes_members_and_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let bytes = tar_with(&[
            ("./", tar::EntryType::Directory, b"", None),
            ("./x/data", tar::EntryType::Regular, b"hello", None),
            ("y/sym", tar::EntryType::Symlink, b"", Some("../x/data")),
            ("z", tar::EntryType::Link, b"", Some("./y/sym")),
            ("loop", tar::EntryType::Symlink, b"", Some("loop")),
            (
                "out",
                tar::EntryType::Symlink,
                b"",
                Some("../../etc/passwd"),
            ),
        ]);
        std::fs::write(&path, &bytes).unwrap();
        let idx = TarIndex::open(&path).unwrap();
        for name in ["x/data", "./x/data", "y/sym", "z"] {
            let loc = idx.locate(name).unwrap().unwrap();
            assert_eq!(loc.len, 5);
            assert_eq!(loc.read("t", 100).unwrap(), b"hello");
        }
        assert!(idx.locate("nothing").unwrap().is_none());
        assert!(matches!(idx.locate("loop"), Err(Error::BadMember { .. })));
        assert!(matches!(idx.locate("out"), Err(Error::BadMember { .. })));
    }

    #[test]
    fn rejects_unsafe_members() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../evil", "/abs", "a/../../b"] {
            let path = dir.path().join("bad.tar");
            std::fs::write(
                &path,
                tar_with(&[(bad, tar::EntryType::Regular, b"x", None)]),
            )
            .unwrap();
            match TarIndex::open(&path) {
                Err(Error::UnsafeMember { member, .. }) => assert_eq!(member, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
