//! Fuzzes the archive reader: trailer, index decoding and validation, part checks, frame
//! verification, decompression, tar header checks and blob streaming.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how many parts the input is cut into, to reach the part logic.
    let (n, rest) = match data.split_first() {
        Some((n, rest)) => ((*n % 3) as usize + 1, rest),
        None => return,
    };
    let step = rest.len() / n + 1;
    let parts: Vec<Vec<u8>> = rest.chunks(step).map(<[u8]>::to_vec).collect();
    let Ok(archive) = bundle_format::Archive::from_bytes(parts) else {
        return;
    };
    let _ = archive.verify(false);
    let _ = archive.verify(true);
    let _ = archive.file("index.json");
    for b in archive.index().blobs.iter().take(8) {
        if let Ok(mut r) = archive.blob(&b.digest) {
            let mut sink = Vec::new();
            let _ = r.by_ref().take(4 << 20).read_to_end(&mut sink);
        }
    }
});
