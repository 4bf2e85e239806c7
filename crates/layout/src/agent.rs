//! The agent image: the static `bundle-agent` and `stage0` binaries as a small OCI image that
//! `bundle create` puts into every archive (spec/format-v1.md, section 12), built here
//! byte-for-byte deterministically from the two files, and read back by `bundle deploy`.
//!
//! No IO: the caller reads the binaries and passes their bytes (and paths, for messages).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use bundle_format::{BlobInput, Content, Digest, ImageInput};
use serde::Serialize;

use crate::json::{LAYER_TAR, OCI_CONFIG, OCI_MANIFEST};
use crate::{Error, Resolved, Result};

/// The repository the agent image is named under in an archive; the tag is the version of
/// the `bundle` that created it. Bundle.yaml images may not use it.
pub const AGENT_IMAGE_REPOSITORY: &str = "bundle.local/bundle/agent";
/// The port the image's default command (`bundle-agent registry`) listens on.
pub const AGENT_PORT: u16 = 5000;
/// Where the image's default command keeps the registry's storage; `deploy` mounts a
/// writable volume there.
pub const AGENT_REGISTRY_ROOT: &str = "/var/lib/bundle-registry";
/// The agent binary's file name, in the agent directory and at the layer's root.
pub const AGENT_FILE: &str = "bundle-agent";
/// The stage0 loader's file name, in the agent directory and at the layer's root.
pub const STAGE0_FILE: &str = "stage0";
/// The one platform the agent image is for.
pub const AGENT_PLATFORM: &str = "linux/amd64";
/// The user the agent runs as (`nobody`): it needs no privilege.
pub const AGENT_USER: &str = "65534:65534";

/// The agent image's name for a `bundle` of `version`: `bundle.local/bundle/agent:VERSION`.
pub fn agent_image_name(version: &str) -> String {
    format!("{AGENT_IMAGE_REPOSITORY}:{version}")
}

/// Whether `name` is reserved for the agent image: the agent repository, bare or with a tag
/// or digest.
pub fn is_agent_image(name: &str) -> bool {
    name.strip_prefix(AGENT_IMAGE_REPOSITORY)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '@']))
}

/// The two files of the agent image's layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFiles {
    /// The static `bundle-agent`.
    pub agent: Vec<u8>,
    /// The static `stage0` loader.
    pub stage0: Vec<u8>,
}

/// Builds the agent image from the static `agent` and `stage0` binaries (read from
/// `agent_path` and `stage0_path`, which only name them in errors), named
/// [`agent_image_name`]`(version)`. Equal inputs give equal bytes.
///
/// The image has one uncompressed layer holding `bundle-agent` and `stage0` (mode 0755,
/// owner 0:0, mtime 0), a config whose default command is `bundle-agent registry` on
/// [`AGENT_PORT`] as [`AGENT_USER`], and an OCI image manifest; its blobs are in memory.
///
/// Each binary must be a static x86_64 ELF executable (no `PT_INTERP`), and `version` a valid
/// tag.
pub fn build_agent_image(
    agent: &[u8],
    agent_path: &Path,
    stage0: &[u8],
    stage0_path: &Path,
    version: &str,
) -> Result<Resolved> {
    check_static_x86_64(agent, agent_path)?;
    check_static_x86_64(stage0, stage0_path)?;
    if !is_tag(version) {
        return Err(Error::InvalidAgentVersion {
            version: version.to_owned(),
        });
    }
    let layer = layer_tar(agent, stage0)?;
    let layer_digest = Digest::of(&layer);
    let config = serde_json::to_vec(&Config {
        architecture: "amd64",
        os: "linux",
        config: ExecConfig {
            user: AGENT_USER,
            entrypoint: ["/bundle-agent"],
            cmd: [
                "registry".to_owned(),
                "--root".to_owned(),
                AGENT_REGISTRY_ROOT.to_owned(),
                "--listen".to_owned(),
                format!("0.0.0.0:{AGENT_PORT}"),
            ],
            working_dir: "/",
            labels: Labels {
                title: AGENT_FILE,
                version,
            },
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: [layer_digest],
        },
    })
    .map_err(|cause| json_error("agent image config", cause))?;
    let config_digest = Digest::of(&config);
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: Descriptor {
            media_type: OCI_CONFIG,
            digest: config_digest,
            size: config.len() as u64,
        },
        layers: [Descriptor {
            media_type: LAYER_TAR,
            digest: layer_digest,
            size: layer.len() as u64,
        }],
        annotations: Labels {
            title: AGENT_FILE,
            version,
        },
    })
    .map_err(|cause| json_error("agent image manifest", cause))?;
    let manifest_digest = Digest::of(&manifest);
    let blob = |digest, media_type: &str, bytes: Vec<u8>| BlobInput {
        digest,
        size: bytes.len() as u64,
        media_type: Some(media_type.to_owned()),
        content: Content::Bytes(Arc::from(bytes)),
    };
    Ok(Resolved {
        image: ImageInput {
            name: agent_image_name(version),
            digest: manifest_digest,
            media_type: OCI_MANIFEST.to_owned(),
            size: manifest.len() as u64,
            platforms: vec![AGENT_PLATFORM.to_owned()],
        },
        blobs: vec![
            blob(manifest_digest, OCI_MANIFEST, manifest),
            blob(config_digest, OCI_CONFIG, config),
            blob(layer_digest, LAYER_TAR, layer),
        ],
        notes: Vec::new(),
    })
}

/// Reads the agent image's layer (an uncompressed tar) back into its two files. Anything but
/// exactly the regular files `bundle-agent` and `stage0`, each once, is an error naming the
/// entry.
pub fn read_agent_layer(layer_tar: &[u8]) -> Result<AgentFiles> {
    let bad = |entry: &str, reason: &str| Error::AgentLayer {
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let tar_error = |cause| Error::AgentLayerTar { cause };
    let mut archive = tar::Archive::new(layer_tar);
    let (mut agent, mut stage0) = (None, None);
    // Raw: a PAX or GNU long-name header is an entry of its own, and refused below.
    for entry in archive.entries().map_err(tar_error)?.raw(true) {
        let mut entry = entry.map_err(tar_error)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let slot = match name.as_str() {
            AGENT_FILE => &mut agent,
            STAGE0_FILE => &mut stage0,
            _ => {
                return Err(bad(
                    &name,
                    "unexpected entry (the agent layer holds only bundle-agent and stage0)",
                ));
            }
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(&name, "not a regular file"));
        }
        if slot.is_some() {
            return Err(bad(&name, "appears twice"));
        }
        let size = entry.header().entry_size().map_err(tar_error)?;
        // No capacity from the header: its size is outside input.
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(tar_error)?;
        if bytes.len() as u64 != size {
            return Err(bad(&name, "truncated"));
        }
        *slot = Some(bytes);
    }
    match (agent, stage0) {
        (Some(agent), Some(stage0)) => Ok(AgentFiles { agent, stage0 }),
        (None, _) => Err(bad(AGENT_FILE, "missing")),
        (_, None) => Err(bad(STAGE0_FILE, "missing")),
    }
}

/// The layer: `bundle-agent` then `stage0`, fixed ustar headers, end-of-archive zeros.
fn layer_tar(agent: &[u8], stage0: &[u8]) -> Result<Vec<u8>> {
    let tar_error = |cause| Error::AgentLayerTar { cause };
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in [(AGENT_FILE, agent), (STAGE0_FILE, stage0)] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).map_err(tar_error)?;
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(bytes.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        builder.append(&h, bytes).map_err(tar_error)?;
    }
    builder.into_inner().map_err(tar_error)
}

/// Refuses anything but a static x86_64 ELF executable: ELFCLASS64, little-endian,
/// `EM_X86_64`, `ET_EXEC` or `ET_DYN` (static-pie), and no `PT_INTERP` program header.
fn check_static_x86_64(b: &[u8], path: &Path) -> Result<()> {
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    let refuse = |reason: String| Error::NotStaticExecutable {
        path: path.to_owned(),
        reason,
    };
    if b.get(..4) != Some(b"\x7fELF") {
        return Err(refuse("not an ELF file (no ELF magic)".into()));
    }
    if b.get(4) != Some(&2) {
        return Err(refuse("not a 64-bit ELF (ELFCLASS64)".into()));
    }
    if b.get(5) != Some(&1) {
        return Err(refuse("not a little-endian ELF".into()));
    }
    let truncated = || refuse("truncated ELF header".into());
    let e_type = u16_at(b, 16).ok_or_else(truncated)?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(refuse(format!("not an executable (e_type {e_type})")));
    }
    let machine = u16_at(b, 18).ok_or_else(truncated)?;
    if machine != EM_X86_64 {
        return Err(refuse(format!(
            "built for machine {machine}, not x86_64 (62)"
        )));
    }
    let phoff = u64_at(b, 32).ok_or_else(truncated)?;
    let phentsize = u16_at(b, 54).ok_or_else(truncated)?;
    let phnum = u16_at(b, 56).ok_or_else(truncated)?;
    if phentsize < 56 {
        return Err(refuse(format!(
            "program header entries of {phentsize} bytes"
        )));
    }
    for i in 0..u64::from(phnum) {
        let p_type = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| u32_at(b, at))
            .ok_or_else(|| refuse("program headers past the end of the file".into()))?;
        if p_type == PT_INTERP {
            return Err(refuse(
                "dynamically linked (it has a PT_INTERP program header)".into(),
            ));
        }
    }
    Ok(())
}

fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    bytes_at(b, at).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    bytes_at(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    bytes_at(b, at).map(u64::from_le_bytes)
}

/// The distribution spec's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let ok = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    matches!(s.as_bytes(), [first, rest @ ..]
        if ok(*first) && rest.len() < 128 && rest.iter().all(|&c| ok(c) || c == b'.' || c == b'-'))
}

fn json_error(what: &str, cause: serde_json::Error) -> Error {
    Error::Json {
        what: what.to_owned(),
        cause,
    }
}

// The documents, with their keys in the order written (spec/format-v1.md, section 12).

#[derive(Serialize)]
struct Config<'a> {
    architecture: &'static str,
    os: &'static str,
    config: ExecConfig<'a>,
    rootfs: RootFs,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ExecConfig<'a> {
    user: &'static str,
    entrypoint: [&'static str; 1],
    cmd: [String; 5],
    working_dir: &'static str,
    labels: Labels<'a>,
}

#[derive(Serialize)]
struct Labels<'a> {
    #[serde(rename = "org.opencontainers.image.title")]
    title: &'static str,
    #[serde(rename = "org.opencontainers.image.version")]
    version: &'a str,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: [Digest; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: [Descriptor; 1],
    annotations: Labels<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: Digest,
    size: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use super::*;

    /// A minimal ELF64 x86_64 header of type `e_type` with program headers of `p_types`,
    /// then `tail` (the "program").
    fn elf(e_type: u16, machine: u16, p_types: &[u32], tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(p_types.len() as u16).to_le_bytes());
        for p in p_types {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(tail);
        b
    }

    fn fake_agent() -> Vec<u8> {
        // static-pie: ET_DYN with PT_LOAD and PT_DYNAMIC, no PT_INTERP.
        elf(3, 62, &[1, 2], b"the agent")
    }

    fn fake_stage0() -> Vec<u8> {
        elf(2, 62, &[1], b"stage0")
    }

    fn build(agent: &[u8], stage0: &[u8]) -> Result<Resolved> {
        build_agent_image(
            agent,
            Path::new("dir/bundle-agent"),
            stage0,
            Path::new("dir/stage0"),
            "0.1.0",
        )
    }

    fn blob<'a>(r: &'a Resolved, media_type: &str) -> &'a [u8] {
        let b = r
            .blobs
            .iter()
            .find(|b| b.media_type.as_deref() == Some(media_type))
            .unwrap();
        match &b.content {
            Content::Bytes(bytes) => bytes,
            Content::File { .. } => panic!("a file blob"),
        }
    }

    #[test]
    fn names() {
        assert_eq!(agent_image_name("0.1.0"), "bundle.local/bundle/agent:0.1.0");
        for (name, reserved) in [
            ("bundle.local/bundle/agent:0.1.0", true),
            ("bundle.local/bundle/agent:x", true),
            ("bundle.local/bundle/agent@sha256:00", true),
            ("bundle.local/bundle/agent", true),
            ("bundle.local/bundle/agents:1", false),
            ("bundle.local/bundle/agent-x:1", false),
            ("registry.example/bundle/agent:1", false),
            ("bundle.local/other:1", false),
        ] {
            assert_eq!(is_agent_image(name), reserved, "{name}");
        }
    }

    #[test]
    fn deterministic_and_pinned() {
        let a = build(&fake_agent(), &fake_stage0()).unwrap();
        let b = build(&fake_agent(), &fake_stage0()).unwrap();
        assert_eq!(a.image.digest, b.image.digest);
        for (x, y) in a.blobs.iter().zip(&b.blobs) {
            assert_eq!(x.digest, y.digest);
            assert_eq!(
                blob(&a, x.media_type.as_deref().unwrap()),
                blob(&b, y.media_type.as_deref().unwrap())
            );
        }
        assert_eq!(a.image.name, "bundle.local/bundle/agent:0.1.0");
        assert_eq!(a.image.platforms, ["linux/amd64"]);
        assert_eq!(a.image.media_type, OCI_MANIFEST);
        assert_eq!(a.blobs.len(), 3);
        for b in &a.blobs {
            let Content::Bytes(bytes) = &b.content else {
                panic!("a file blob")
            };
            assert_eq!(b.size, bytes.len() as u64);
            assert_eq!(b.digest, Digest::of(bytes));
        }
        // The bytes, pinned: a change here changes every archive's agent image.
        assert_eq!(
            a.image.digest.to_string(),
            "sha256:adf77ba4b66a92118d8b3b60223ffe12862aa2f7271265aca179824614d102b1"
        );
    }

    #[test]
    fn documents_are_as_specified() {
        let r = build(&fake_agent(), &fake_stage0()).unwrap();
        let layer = Digest::of(blob(&r, LAYER_TAR));
        let config = std::str::from_utf8(blob(&r, OCI_CONFIG)).unwrap();
        assert_eq!(
            config,
            format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"User":"65534:65534","Entrypoint":["/bundle-agent"],"Cmd":["registry","--root","/var/lib/bundle-registry","--listen","0.0.0.0:5000"],"WorkingDir":"/","Labels":{{"org.opencontainers.image.title":"bundle-agent","org.opencontainers.image.version":"0.1.0"}}}},"rootfs":{{"type":"layers","diff_ids":["{layer}"]}}}}"#
            )
        );
        let manifest = std::str::from_utf8(blob(&r, OCI_MANIFEST)).unwrap();
        let config_digest = Digest::of(config.as_bytes());
        assert_eq!(
            manifest,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}],"annotations":{{"org.opencontainers.image.title":"bundle-agent","org.opencontainers.image.version":"0.1.0"}}}}"#,
                config.len(),
                blob(&r, LAYER_TAR).len()
            )
        );
    }

    #[test]
    fn layer_headers_are_fixed() {
        let (agent, stage0) = (fake_agent(), fake_stage0());
        let r = build(&agent, &stage0).unwrap();
        let tar = blob(&r, LAYER_TAR);
        let padded = |n: usize| n.div_ceil(512) * 512;
        assert_eq!(
            tar.len(),
            512 + padded(agent.len()) + 512 + padded(stage0.len()) + 1024
        );
        let second = 512 + padded(agent.len());
        for (at, name, content) in [(0, AGENT_FILE, &agent), (second, STAGE0_FILE, &stage0)] {
            let h = &tar[at..at + 512];
            assert_eq!(&h[..name.len()], name.as_bytes());
            assert!(h[name.len()..100].iter().all(|&c| c == 0));
            assert_eq!(&h[100..108], b"0000755\0", "mode");
            assert_eq!(&h[108..116], b"0000000\0", "uid");
            assert_eq!(&h[116..124], b"0000000\0", "gid");
            assert_eq!(&h[136..148], b"00000000000\0", "mtime");
            assert_eq!(h[156], b'0', "typeflag");
            assert_eq!(&h[257..265], b"ustar\x0000", "magic and version");
            assert!(h[265..329].iter().all(|&c| c == 0), "uname, gname");
            assert_eq!(&tar[at + 512..at + 512 + content.len()], content.as_slice());
        }
        assert!(tar[tar.len() - 1024..].iter().all(|&c| c == 0));
    }

    #[test]
    fn round_trip() {
        let (agent, stage0) = (fake_agent(), fake_stage0());
        let r = build(&agent, &stage0).unwrap();
        let files = read_agent_layer(blob(&r, LAYER_TAR)).unwrap();
        assert_eq!(files, AgentFiles { agent, stage0 });
    }

    /// The error of a build that must fail (without printing the image when it did not).
    fn refused(r: Result<Resolved>) -> String {
        match r {
            Ok(r) => panic!("accepted, as {}", r.image.digest),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refuses_what_is_not_a_static_x86_64_executable() {
        let good = fake_stage0();
        let cases: [(Vec<u8>, &str); 8] = [
            (b"#!/bin/sh\necho hi\n".to_vec(), "no ELF magic"),
            (
                {
                    let mut b = fake_agent();
                    b[4] = 1;
                    b
                },
                "64-bit",
            ),
            (elf(3, 62, &[1, 3, 2], b""), "PT_INTERP"),
            (elf(1, 62, &[], b""), "e_type 1"),
            (elf(2, 183, &[1], b""), "machine 183"),
            (elf(2, 62, &[1], b"")[..40].to_vec(), "truncated"),
            (
                elf(2, 62, &[1, 1], b"")[..64 + 56 + 2].to_vec(),
                "past the end",
            ),
            (Vec::new(), "no ELF magic"),
        ];
        for (bad, why) in cases {
            let e = refused(build(&bad, &good));
            assert!(
                e.starts_with("dir/bundle-agent: ") && e.contains(why),
                "{why}: {e}"
            );
            let e = refused(build(&good, &bad));
            assert!(
                e.starts_with("dir/stage0: ") && e.contains(why),
                "{why}: {e}"
            );
        }
        // The real thing: Debian's /bin/ls is dynamically linked.
        if let Ok(ls) = std::fs::read("/bin/ls") {
            let e = refused(build_agent_image(
                &ls,
                &PathBuf::from("/bin/ls"),
                &good,
                Path::new("s"),
                "1",
            ));
            assert!(e.contains("/bin/ls") && e.contains("PT_INTERP"), "{e}");
        }
    }

    #[test]
    fn refuses_a_version_that_is_not_a_tag() {
        for v in ["", "1.0+build", ".1", &"1".repeat(129)] {
            let e = refused(build_agent_image(
                &fake_agent(),
                Path::new("a"),
                &fake_stage0(),
                Path::new("s"),
                v,
            ));
            assert!(e.contains("is not a valid tag"), "{v}: {e}");
        }
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(name, kind, bytes) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_entry_type(kind);
            h.set_size(bytes.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append(&h, bytes).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn reading_refuses_other_layers() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let cases: [(Vec<u8>, &str); 6] = [
            (
                tar_of(&[
                    ("bundle-agent", Regular, b"a"),
                    ("etc/passwd", Regular, b"x"),
                ]),
                r#"entry "etc/passwd": unexpected entry"#,
            ),
            (
                tar_of(&[("bundle-agent", Regular, b"a")]),
                r#"entry "stage0": missing"#,
            ),
            (
                tar_of(&[("stage0", Regular, b"s")]),
                r#"entry "bundle-agent": missing"#,
            ),
            (
                tar_of(&[("bundle-agent", Symlink, b""), ("stage0", Regular, b"s")]),
                r#"entry "bundle-agent": not a regular file"#,
            ),
            (
                tar_of(&[
                    ("stage0", Regular, b"s"),
                    ("stage0", Regular, b"s"),
                    ("bundle-agent", Regular, b"a"),
                ]),
                r#"entry "stage0": appears twice"#,
            ),
            (
                tar_of(&[("./", Directory, b""), ("bundle-agent", Regular, b"a")]),
                r#"entry "./": unexpected entry"#,
            ),
        ];
        for (tar, want) in cases {
            let e = read_agent_layer(&tar).unwrap_err().to_string();
            assert!(e.contains(want), "want {want}: {e}");
        }
        // A cut layer is an error, not a panic.
        let good = tar_of(&[
            ("bundle-agent", Regular, &[7; 600]),
            ("stage0", Regular, b"s"),
        ]);
        for cut in [100, 512, 700, 1100] {
            assert!(read_agent_layer(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        /// `bundle deploy` reads this layer out of an archive from elsewhere: any change to
        /// its bytes gives either the same two files or a clean error, never a panic.
        #[test]
        fn read_agent_layer_survives_mutation(
            edits in proptest::collection::vec((0usize..1 << 16, proptest::num::u8::ANY), 1..8),
            cut in proptest::option::of(0usize..1 << 16),
        ) {
            let a = build(&fake_agent(), &fake_stage0()).unwrap();
            let mut layer = blob(&a, LAYER_TAR).to_vec();
            for (at, byte) in edits {
                let at = at % layer.len();
                layer[at] = byte;
            }
            if let Some(c) = cut {
                layer.truncate(c % (layer.len() + 1));
            }
            if let Ok(files) = read_agent_layer(&layer) {
                proptest::prop_assert!(files.agent.len() + files.stage0.len() <= layer.len());
            }
        }

        /// Arbitrary bytes are refused cleanly.
        #[test]
        fn read_agent_layer_refuses_noise(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let _ = read_agent_layer(&bytes);
        }
    }
}
