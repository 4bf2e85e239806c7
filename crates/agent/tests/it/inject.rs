//! `bundle-agent inject` with real clients: a payload (sub-archive as frame files beside
//! `index.cbor`) of one image, or of a multi-platform one, is pulled by skopeo and containerd
//! with the archive's digests; a payload that is not what `--index` names is refused at
//! startup with the culprit named; the frame files are the archive's own frames.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bundle_format::{Archive, Digest};
use bundle_oci::server::archive::Payload;

use crate::registry::{
    Agent, agent_cmd, assert_cause_once, containerd, copy_out, get_json, images_of, repo_ref,
    served_digest, small_archive,
};

const APP: &str = "registry.example/team/app:1.0";
const MULTI: &str = "registry.example/team/multi:1.0";

/// The payload of `names` written into a fresh `dir/chunks-N`.
fn write_payload(archive: &Archive, names: &[&str], dir: &Path) -> (Payload, PathBuf) {
    let chunks = (0..)
        .map(|i| dir.join(format!("chunks-{i}")))
        .find(|p| !p.exists())
        .unwrap();
    std::fs::create_dir(&chunks).unwrap();
    let payload = Payload::new(archive, names).unwrap();
    payload.write_to(archive, &chunks).unwrap();
    (payload, chunks)
}

/// `bundle-agent inject --chunks DIR --index DIGEST --listen 127.0.0.1:0`.
fn inject_cmd(chunks: &Path, index: &str) -> std::process::Command {
    let mut c = agent_cmd(&["inject", "--index", index, "--listen", "127.0.0.1:0"]);
    c.arg("--chunks").arg(chunks);
    c
}

#[test]
fn skopeo_and_containerd_pull_a_payload() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    let digests: BTreeMap<String, String> = images_of(&path).into_iter().collect();
    let containerd = containerd::Containerd::start();
    // Every image alone (skopeo), then one single-platform image and one image index with two
    // platforms together (skopeo and containerd).
    let mut cases: Vec<Vec<&str>> = digests.keys().map(|n| vec![n.as_str()]).collect();
    cases.push(vec![APP, MULTI]);
    for names in &cases {
        let (payload, chunks) = write_payload(&archive, names, dir.path());
        let agent = Agent::start(inject_cmd(&chunks, &payload.id.to_string()));
        let host = agent.host();
        for name in names {
            let r = repo_ref(name);
            let want = &digests[*name];
            assert_eq!(&served_digest(host, r).unwrap(), want, "{name}");
            assert_eq!(&copy_out(host, r, &dir.path().join("back")), want, "{name}");
        }

        // Only those images are there.
        let (status, catalog) = get_json(host, "/v2/_catalog");
        assert_eq!(status, 200, "{catalog}");
        let mut repos: Vec<&str> = names
            .iter()
            .map(|n| repo_ref(n).split_once(':').unwrap().0)
            .collect();
        repos.sort_unstable();
        assert_eq!(
            catalog["repositories"],
            serde_json::json!(repos),
            "{names:?}"
        );
        if !names.contains(&"registry.example/team/plain:1.0") {
            let err = served_digest(host, "team/plain:1.0").unwrap_err();
            assert!(err.contains("name unknown"), "{err}");
        }

        if names.len() == 2 {
            for name in names {
                let reference = format!("{host}/{}", repo_ref(name));
                assert_eq!(
                    containerd.pull_plain_http(&reference).unwrap(),
                    digests[*name],
                    "{reference}"
                );
                assert!(containerd.is_unpacked(&reference).unwrap(), "{reference}");
            }
        }
    }
}

/// Frames are checked once, at start (spec/format-v1.md, section 8: a frame is not hashed
/// again once checked). A frame file changed in place afterwards (a bad disk, a stray writer;
/// kubelet never does this, it swaps ConfigMap files by rename) no longer decompresses, so the
/// agent cuts the blob short, or it does and the client's digest check fails; either way the
/// pull fails and the agent keeps serving.
#[test]
fn a_frame_that_changes_after_startup_fails_the_pull() {
    use std::os::unix::fs::FileExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    let want = images_of(&path)
        .into_iter()
        .find(|(n, _)| n == APP)
        .unwrap()
        .1;
    let (payload, chunks) = write_payload(&archive, &[APP], dir.path());
    let mut agent = Agent::start(inject_cmd(&chunks, &payload.id.to_string()));
    let host = agent.host().to_owned();
    assert_eq!(
        copy_out(&host, repo_ref(APP), &dir.path().join("before")),
        want
    );

    // The largest frame is a layer's. Changed in place (no truncation, which would pull the
    // pages from under the agent's map), as a bad disk or a stray writer would.
    let largest = payload
        .frames
        .iter()
        .map(|&f| Payload::frame_name(&archive, f))
        .max_by_key(|n| std::fs::metadata(chunks.join(n)).unwrap().len())
        .unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(chunks.join(&largest))
        .unwrap();
    let mid = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, mid).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], mid).unwrap();
    drop(file);

    let err = crate::registry::skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{host}/{}", repo_ref(APP)),
        &format!("oci:{}:x", dir.path().join("after").display()),
    ])
    .unwrap_err();
    eprintln!("{err}");
    assert!(
        err.contains("digest") || err.contains("EOF"),
        "skopeo failed for another reason: {err}"
    );
    agent.assert_running();
    // The manifest is in another frame, still intact and served.
    assert_eq!(served_digest(&host, repo_ref(APP)).unwrap(), want);
}

/// Kubelet updates a ConfigMap volume by writing new files and swapping a symlink: the
/// agent's mapped frames are the files it verified, whatever appears under the name later.
#[test]
fn a_frame_file_replaced_by_rename_after_startup_changes_nothing_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    let want = images_of(&path)
        .into_iter()
        .find(|(n, _)| n == APP)
        .unwrap()
        .1;
    let (payload, chunks) = write_payload(&archive, &[APP], dir.path());
    let _agent = Agent::start(inject_cmd(&chunks, &payload.id.to_string()));
    let host = _agent.host().to_owned();
    for &f in &payload.frames {
        let name = Payload::frame_name(&archive, f);
        let tmp = chunks.join(format!("{name}.new"));
        std::fs::write(&tmp, vec![0x55u8; 4096]).unwrap();
        std::fs::rename(&tmp, chunks.join(&name)).unwrap();
    }
    assert_eq!(
        copy_out(&host, repo_ref(APP), &dir.path().join("after")),
        want
    );
}

#[test]
fn payload_frames_are_the_archives_own_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    // sha256 (hex) of every frame of the archive -> its bytes.
    let frames: BTreeMap<String, &[u8]> = (0..archive.index().frames.len() as u32)
        .map(|f| {
            let bytes = archive.frame(f).unwrap();
            (Digest::of(bytes).hex(), bytes)
        })
        .collect();
    for names in [&[APP][..], &[MULTI], &[APP, MULTI]] {
        let (payload, chunks) = write_payload(&archive, names, dir.path());
        let index = std::fs::read(chunks.join("index.cbor")).unwrap();
        assert_eq!(Digest::of(&index), payload.id, "{names:?}");
        let mut files = 0;
        for e in std::fs::read_dir(&chunks).unwrap() {
            let p = e.unwrap().path();
            let file = p.file_name().unwrap().to_str().unwrap().to_owned();
            if file == "index.cbor" {
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(
                Digest::of(&bytes).hex(),
                file,
                "{names:?}: named by its sha256"
            );
            let frame = frames
                .get(&file)
                .unwrap_or_else(|| panic!("{names:?}: {file} is not a frame of the archive"));
            assert!(*frame == bytes.as_slice(), "{names:?}: {file}");
        }
        assert_eq!(files, payload.frames.len(), "{names:?}");
        assert!(
            files < frames.len(),
            "{names:?}: {files} of {} frames, not a strict subset",
            frames.len()
        );
    }
}

/// Flips one byte in the middle of a file.
fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_payload_that_is_not_what_index_names_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    type Spoil = fn(&Path, &str) -> (String, String);
    // (what, spoil the payload: returns the --index to pass and what stderr must name)
    let cases: &[(&str, Spoil)] = &[
        ("a frame with one byte flipped", |chunks, frame| {
            flip_byte(&chunks.join(frame));
            (String::new(), frame.to_owned())
        }),
        ("a truncated frame", |chunks, frame| {
            let p = chunks.join(frame);
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
            (String::new(), frame.to_owned())
        }),
        ("a missing frame", |chunks, frame| {
            std::fs::remove_file(chunks.join(frame)).unwrap();
            (String::new(), frame.to_owned())
        }),
        ("index.cbor with one byte flipped", |chunks, _| {
            flip_byte(&chunks.join("index.cbor"));
            (String::new(), "index.cbor".to_owned())
        }),
        ("--index naming another digest", |_, _| {
            let other = Digest::of(b"not the index").to_string();
            (other.clone(), other)
        }),
        ("--index that is no digest", |_, _| {
            ("sha256:xyz".to_owned(), "sha256:xyz".to_owned())
        }),
    ];
    for (what, spoil) in cases {
        let (payload, chunks) = write_payload(&archive, &[MULTI], dir.path());
        // A frame in the middle: a blob's, not the first or the index's.
        let frame = Payload::frame_name(&archive, payload.frames[payload.frames.len() / 2]);
        let (index, named) = spoil(&chunks, &frame);
        let index = if index.is_empty() {
            payload.id.to_string()
        } else {
            index
        };
        let exited = match Agent::try_start(inject_cmd(&chunks, &index)) {
            Ok(agent) => panic!("{what}: the agent listens on {}", agent.host()),
            Err(e) => e,
        };
        assert_eq!(exited.status.code(), Some(1), "{what}: {exited:?}");
        eprintln!("{what}: {}", exited.stderr.trim());
        assert!(
            exited.stderr.contains(&named) && !exited.stderr.contains("panicked"),
            "{what}: stderr does not name {named}: {}",
            exited.stderr
        );
    }
}

#[test]
fn a_missing_frame_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, path) = small_archive(dir.path());
    let archive = Archive::open(&path).unwrap();
    let (payload, chunks) = write_payload(&archive, &[APP], dir.path());
    let frame = Payload::frame_name(&archive, payload.frames[0]);
    std::fs::remove_file(chunks.join(&frame)).unwrap();
    let exited = match Agent::try_start(inject_cmd(&chunks, &payload.id.to_string())) {
        Ok(agent) => panic!("the agent listens on {}", agent.host()),
        Err(e) => e,
    };
    assert!(exited.stderr.contains(&frame), "{}", exited.stderr);
    assert_cause_once(&exited.stderr);
}
