//! Stored frames (spec section 4): zstd frames whose blocks are all raw, for the bytes of a
//! blob that is already compressed. Writing one costs a copy and an XXH64; zstd's match
//! search on such bytes costs about ten times that and saves under 1% of them.

/// Largest raw block: zstd's `Block_Maximum_Size` (128 KiB).
pub(crate) const BLOCK: usize = 128 << 10;

/// zstd's frame magic, little-endian on the wire.
const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Frame header descriptor: `Frame_Content_Size` in 4 bytes (flag 2), `Single_Segment_flag`
/// set (no window descriptor; the window is the content), `Content_Checksum_flag` set, no
/// dictionary.
const DESCRIPTOR: u8 = 0b1010_0100;

/// Bytes a stored frame of `len` content bytes takes.
pub(crate) fn stored_len(len: usize) -> usize {
    4 + 1 + 4 + 3 * blocks(len).count() + len + 4
}

/// Writes `data` into `out` (cleared first) as one stored frame ([`pieces`]).
#[cfg(test)]
pub(crate) fn store(data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(stored_len(data.len()));
    let done: Result<(), std::convert::Infallible> = pieces(data, checksum(data), |p| {
        out.extend_from_slice(p);
        Ok(())
    });
    let Ok(()) = done;
}

/// The `Content_Checksum` of a stored frame of `data`: the low 32 bits of its XXH64 (seed 0).
pub(crate) fn checksum(data: &[u8]) -> u32 {
    xxh64(data, 0) as u32
}

/// Hands `f` the stored frame of `data` (whose [`checksum`] is `checksum`) piece by piece, in
/// order, without copying the content: magic, descriptor, the content size as u32le, raw
/// blocks of 128 KiB (the last one shorter, with `Last_Block` set; one empty block for empty
/// content), each a 3-byte header and then a slice of `data`, and the checksum as u32le.
/// `data` is at most `CHUNK` bytes, so its size fits the field. Stops at `f`'s first error.
pub(crate) fn pieces<E>(
    data: &[u8],
    checksum: u32,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    f(&header(data.len()))?;
    let mut at = 0;
    for (n, last) in blocks(data.len()) {
        f(&block_header(n, last))?;
        f(&data[at..at + n])?;
        at += n;
    }
    f(&checksum.to_le_bytes())
}

/// The blocks of a stored frame of `len` content bytes: each one's content length and whether
/// it is the last (one empty block for empty content).
pub(crate) fn blocks(len: usize) -> impl Iterator<Item = (usize, bool)> {
    let count = len.div_ceil(BLOCK).max(1);
    (0..count).map(move |k| (BLOCK.min(len - k * BLOCK), k + 1 == count))
}

/// A stored frame's first 9 bytes: magic, descriptor, content size.
pub(crate) fn header(len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = DESCRIPTOR;
    h[5..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// `Block_Header` of a raw block: `Last_Block` (bit 0), `Block_Type` 0 (bits 1-2),
/// `Block_Size` (bits 3-23), little-endian.
pub(crate) fn block_header(len: usize, last: bool) -> [u8; 3] {
    let v = ((len as u32) << 3) | u32::from(last);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// XXH64 of `data` (the checksum zstd frames carry), as specified by xxHash.
pub(crate) fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        let mut stripes = rest.chunks_exact(32);
        for s in &mut stripes {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, u64_at(&s[i * 8..]));
            }
        }
        rest = stripes.remainder();
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        h = (h ^ round(0, u64_at(w)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
    }
    rest = words.remainder();
    if rest.len() >= 4 {
        h = (h ^ u64::from(u32_at(rest)).wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h = (h ^ u64::from(b).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn xxh64_known_values() {
        // xxHash's reference values.
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
    }

    proptest! {
        /// zstd decodes every stored frame to its content, checking the block layout, the
        /// content size and the checksum (a wrong XXH64 fails its decoding).
        #[test]
        fn zstd_decodes_stored_frames(
            len in prop_oneof![0usize..300, 131_000usize..263_000, Just(crate::CHUNK as usize)],
            seed in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut frame = Vec::new();
            store(&data, &mut frame);
            prop_assert_eq!(frame.len(), stored_len(len));
            let back = zstd::bulk::decompress(&frame, len.max(1)).expect("zstd decodes it");
            prop_assert!(back == data);
            // A damaged checksum is refused.
            let n = frame.len();
            frame[n - 1] ^= 1;
            prop_assert!(zstd::bulk::decompress(&frame, len.max(1)).is_err());
        }
    }
}
