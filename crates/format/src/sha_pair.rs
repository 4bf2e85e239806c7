//! sha256 of two messages at once, for the writer's frame digests.
//!
//! One SHA-256 stream keeps the CPU's SHA unit waiting on its own previous round; two
//! independent streams interleaved round by round fill those gaps (on the bench machine, a
//! Xeon with SHA-NI: 1.25 GB/s for one stream, 1.6 GB/s for two together). Without SHA-NI
//! both messages go through `sha2` one after the other. The result is plain sha256 (FIPS
//! 180-4) either way; the property test below holds it to `sha2`.

use sha2::{Digest as _, Sha256};

/// sha256 of `a` and of `b`.
pub(crate) fn digest_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
    if !ni::available() {
        return (Sha256::digest(a).into(), Sha256::digest(b).into());
    }
    let (mut sa, mut sb) = (Sha::new(), Sha::new());
    update_pair(&mut sa, a, &mut sb, b);
    (sa.finish(), sb.finish())
}

const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A streaming sha256 whose input can be fed together with another's ([`update_pair`]), for
/// the writer: a blob's content and the frame that stores it are hashed side by side.
#[derive(Clone)]
pub(crate) struct Sha {
    state: [u32; 8],
    buf: [u8; 64],
    buffered: usize,
    total: u64,
}

impl Sha {
    /// A fresh hash.
    pub(crate) fn new() -> Sha {
        Sha {
            state: IV,
            buf: [0; 64],
            buffered: 0,
            total: 0,
        }
    }

    /// Feeds `data`.
    #[cfg(test)]
    pub(crate) fn update(&mut self, data: &[u8]) {
        let rest = self.head(data);
        let whole = rest.len() / 64 * 64;
        blocks(&mut self.state, &rest[..whole]);
        self.tail(&rest[whole..]);
    }

    /// Completes a partly filled block from `data`; returns what is left of `data`.
    fn head<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buffered == 0 {
            return data;
        }
        let n = (64 - self.buffered).min(data.len());
        self.buf[self.buffered..self.buffered + n].copy_from_slice(&data[..n]);
        self.buffered += n;
        if self.buffered == 64 {
            let block = self.buf;
            blocks(&mut self.state, &block);
            self.buffered = 0;
        }
        &data[n..]
    }

    /// Keeps the bytes after the last whole block (only ever called with an empty buffer
    /// unless `tail` is empty).
    fn tail(&mut self, tail: &[u8]) {
        if !tail.is_empty() {
            self.buf[..tail.len()].copy_from_slice(tail);
            self.buffered = tail.len();
        }
    }

    /// The digest of everything fed.
    pub(crate) fn finish(mut self) -> [u8; 32] {
        let mut last = [0u8; 128];
        last[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        last[self.buffered] = 0x80;
        let end = if self.buffered < 56 { 64 } else { 128 };
        last[end - 8..end].copy_from_slice(&self.total.wrapping_mul(8).to_be_bytes());
        blocks(&mut self.state, &last[..end]);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// Feeds `a` to `sa` and `b` to `sb`, their whole blocks interleaved as far as both have them.
pub(crate) fn update_pair(sa: &mut Sha, a: &[u8], sb: &mut Sha, b: &[u8]) {
    let (ra, rb) = (sa.head(a), sb.head(b));
    let (wa, wb) = (ra.len() / 64 * 64, rb.len() / 64 * 64);
    let common = wa.min(wb);
    if ni::available() {
        ni::blocks2(&mut sa.state, &ra[..common], &mut sb.state, &rb[..common]);
    } else {
        blocks(&mut sa.state, &ra[..common]);
        blocks(&mut sb.state, &rb[..common]);
    }
    blocks(&mut sa.state, &ra[common..wa]);
    blocks(&mut sb.state, &rb[common..wb]);
    sa.tail(&ra[wa..]);
    sb.tail(&rb[wb..]);
}

/// Runs whole 64-byte blocks into `state`: SHA-NI when the CPU has it, else `sha2`'s own.
fn blocks(state: &mut [u32; 8], data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if ni::available() {
        ni::blocks1(state, data);
        return;
    }
    for block in data.chunks_exact(64) {
        sha2::compress256(
            state,
            &[*sha2::digest::generic_array::GenericArray::from_slice(
                block,
            )],
        );
    }
}

/// The SHA-NI block functions (x86_64 only; elsewhere `available` is false).
mod ni {
    #![allow(unsafe_code)]

    #[cfg(target_arch = "x86_64")]
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("ssse3")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn available() -> bool {
        false
    }

    /// Runs the blocks of `a` into `sa` and those of `b` into `sb`, interleaved. Both
    /// lengths are the same multiple of 64.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn blocks2(sa: &mut [u32; 8], a: &[u8], sb: &mut [u32; 8], b: &[u8]) {
        assert!(a.len() == b.len() && a.len().is_multiple_of(64) && available());
        // SAFETY: the CPU has the features the function is compiled for (checked just
        // above); it reads whole 64-byte blocks within `a` and `b` only.
        unsafe { x86::blocks2(sa, a, sb, b) }
    }

    /// Runs the blocks of `a` (a multiple of 64 bytes) into `sa`.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn blocks1(sa: &mut [u32; 8], a: &[u8]) {
        assert!(a.len().is_multiple_of(64) && available());
        // SAFETY: as in `blocks2`.
        unsafe { x86::blocks1(sa, a) }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn blocks2(_: &mut [u32; 8], _: &[u8], _: &mut [u32; 8], _: &[u8]) {
        unreachable!("SHA-NI is never reported available here")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn blocks1(_: &mut [u32; 8], _: &[u8]) {
        unreachable!("SHA-NI is never reported available here")
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// The 64 round constants, loaded four at a time.
        const K: [u32; 64] = [
            0x428a_2f98,
            0x7137_4491,
            0xb5c0_fbcf,
            0xe9b5_dba5,
            0x3956_c25b,
            0x59f1_11f1,
            0x923f_82a4,
            0xab1c_5ed5,
            0xd807_aa98,
            0x1283_5b01,
            0x2431_85be,
            0x550c_7dc3,
            0x72be_5d74,
            0x80de_b1fe,
            0x9bdc_06a7,
            0xc19b_f174,
            0xe49b_69c1,
            0xefbe_4786,
            0x0fc1_9dc6,
            0x240c_a1cc,
            0x2de9_2c6f,
            0x4a74_84aa,
            0x5cb0_a9dc,
            0x76f9_88da,
            0x983e_5152,
            0xa831_c66d,
            0xb003_27c8,
            0xbf59_7fc7,
            0xc6e0_0bf3,
            0xd5a7_9147,
            0x06ca_6351,
            0x1429_2967,
            0x27b7_0a85,
            0x2e1b_2138,
            0x4d2c_6dfc,
            0x5338_0d13,
            0x650a_7354,
            0x766a_0abb,
            0x81c2_c92e,
            0x9272_2c85,
            0xa2bf_e8a1,
            0xa81a_664b,
            0xc24b_8b70,
            0xc76c_51a3,
            0xd192_e819,
            0xd699_0624,
            0xf40e_3585,
            0x106a_a070,
            0x19a4_c116,
            0x1e37_6c08,
            0x2748_774c,
            0x34b0_bcb5,
            0x391c_0cb3,
            0x4ed8_aa4a,
            0x5b9c_ca4f,
            0x682e_6ff3,
            0x748f_82ee,
            0x78a5_636f,
            0x84c8_7814,
            0x8cc7_0208,
            0x90be_fffa,
            0xa450_6ceb,
            0xbef9_a3f7,
            0xc671_78f2,
        ];

        /// State words a..h as the two registers the SHA instructions take (ABEF, CDGH).
        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        fn load(s: &[u32; 8]) -> (__m128i, __m128i) {
            // SAFETY: `s` is 32 readable bytes; unaligned loads.
            let (dcba, efgh) = unsafe {
                let p = s.as_ptr().cast::<__m128i>();
                (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
            };
            let cdab = _mm_shuffle_epi32(dcba, 0xB1);
            let efgh = _mm_shuffle_epi32(efgh, 0x1B);
            (
                _mm_alignr_epi8(cdab, efgh, 8),
                _mm_blend_epi16(efgh, cdab, 0xF0),
            )
        }

        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        fn store(s: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
            let feba = _mm_shuffle_epi32(abef, 0x1B);
            let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
            // SAFETY: `s` is 32 writable bytes; unaligned stores.
            unsafe {
                let p = s.as_mut_ptr().cast::<__m128i>();
                _mm_storeu_si128(p, _mm_blend_epi16(feba, dchg, 0xF0));
                _mm_storeu_si128(p.add(1), _mm_alignr_epi8(dchg, feba, 8));
            }
        }

        /// The 16 message words of a 64-byte block, big-endian, as four registers.
        ///
        /// # Safety
        /// `p` points at 64 readable bytes.
        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        unsafe fn words(p: *const u8) -> [__m128i; 4] {
            let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
            let p = p.cast::<__m128i>();
            // SAFETY: the caller's promise; unaligned loads.
            unsafe {
                [
                    _mm_shuffle_epi8(_mm_loadu_si128(p), swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(1)), swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(2)), swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(3)), swap),
                ]
            }
        }

        /// Constants of rounds `4r..4r+4`.
        ///
        /// # Safety
        /// `r < 16`.
        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        unsafe fn k(r: usize) -> __m128i {
            // SAFETY: K holds 16 groups of four words; unaligned load.
            unsafe { _mm_loadu_si128(K.as_ptr().add(4 * r).cast::<__m128i>()) }
        }

        /// Replaces `$w0` (words t-16..t-13) by the next four message words, from the
        /// sixteen before them (`$w0`..`$w3`, oldest first).
        macro_rules! schedule {
            ($w0:ident, $w1:ident, $w2:ident, $w3:ident) => {{
                let t = _mm_sha256msg1_epu32($w0, $w1);
                let t = _mm_add_epi32(t, _mm_alignr_epi8($w3, $w2, 4));
                $w0 = _mm_sha256msg2_epu32(t, $w3);
            }};
        }

        /// # Safety
        /// The CPU supports SHA, SSE4.1 and SSSE3; `a.len() == b.len()`, a multiple of 64.
        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        pub(super) unsafe fn blocks2(sa: &mut [u32; 8], a: &[u8], sb: &mut [u32; 8], b: &[u8]) {
            let (mut a0, mut c0) = load(sa);
            let (mut a1, mut c1) = load(sb);
            // Four rounds of both streams, message words `$x` and `$y` (constants `$r`).
            macro_rules! rounds {
                ($x:ident, $y:ident, $r:expr) => {{
                    // SAFETY: $r < 16.
                    let kr = unsafe { k($r) };
                    let (mx, my) = (_mm_add_epi32($x, kr), _mm_add_epi32($y, kr));
                    c0 = _mm_sha256rnds2_epu32(c0, a0, mx);
                    c1 = _mm_sha256rnds2_epu32(c1, a1, my);
                    a0 = _mm_sha256rnds2_epu32(a0, c0, _mm_shuffle_epi32(mx, 0x0E));
                    a1 = _mm_sha256rnds2_epu32(a1, c1, _mm_shuffle_epi32(my, 0x0E));
                }};
            }
            for (x, y) in a.chunks_exact(64).zip(b.chunks_exact(64)) {
                let (sa0, sc0, sa1, sc1) = (a0, c0, a1, c1);
                // SAFETY: both chunks are 64 bytes.
                let ([mut x0, mut x1, mut x2, mut x3], [mut y0, mut y1, mut y2, mut y3]) =
                    unsafe { (words(x.as_ptr()), words(y.as_ptr())) };
                rounds!(x0, y0, 0);
                rounds!(x1, y1, 1);
                rounds!(x2, y2, 2);
                rounds!(x3, y3, 3);
                for r in [4, 8, 12] {
                    schedule!(x0, x1, x2, x3);
                    schedule!(y0, y1, y2, y3);
                    rounds!(x0, y0, r);
                    schedule!(x1, x2, x3, x0);
                    schedule!(y1, y2, y3, y0);
                    rounds!(x1, y1, r + 1);
                    schedule!(x2, x3, x0, x1);
                    schedule!(y2, y3, y0, y1);
                    rounds!(x2, y2, r + 2);
                    schedule!(x3, x0, x1, x2);
                    schedule!(y3, y0, y1, y2);
                    rounds!(x3, y3, r + 3);
                }
                a0 = _mm_add_epi32(a0, sa0);
                c0 = _mm_add_epi32(c0, sc0);
                a1 = _mm_add_epi32(a1, sa1);
                c1 = _mm_add_epi32(c1, sc1);
            }
            store(sa, a0, c0);
            store(sb, a1, c1);
        }

        /// # Safety
        /// The CPU supports SHA, SSE4.1 and SSSE3; `a.len()` is a multiple of 64.
        #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
        pub(super) unsafe fn blocks1(sa: &mut [u32; 8], a: &[u8]) {
            let (mut a0, mut c0) = load(sa);
            macro_rules! rounds {
                ($x:ident, $r:expr) => {{
                    // SAFETY: $r < 16.
                    let mx = _mm_add_epi32($x, unsafe { k($r) });
                    c0 = _mm_sha256rnds2_epu32(c0, a0, mx);
                    a0 = _mm_sha256rnds2_epu32(a0, c0, _mm_shuffle_epi32(mx, 0x0E));
                }};
            }
            for x in a.chunks_exact(64) {
                let (sa0, sc0) = (a0, c0);
                // SAFETY: the chunk is 64 bytes.
                let [mut x0, mut x1, mut x2, mut x3] = unsafe { words(x.as_ptr()) };
                rounds!(x0, 0);
                rounds!(x1, 1);
                rounds!(x2, 2);
                rounds!(x3, 3);
                for r in [4, 8, 12] {
                    schedule!(x0, x1, x2, x3);
                    rounds!(x0, r);
                    schedule!(x1, x2, x3, x0);
                    rounds!(x1, r + 1);
                    schedule!(x2, x3, x0, x1);
                    rounds!(x2, r + 2);
                    schedule!(x3, x0, x1, x2);
                    rounds!(x3, r + 3);
                }
                a0 = _mm_add_epi32(a0, sa0);
                c0 = _mm_add_epi32(c0, sc0);
            }
            store(sa, a0, c0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn pairs_of_every_length_around_the_padding_edges() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for la in 0..200 {
            for lb in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 199] {
                let (a, b) = (&data[..la], &data[100 - lb / 2..][..lb]);
                assert_eq!(digest_pair(a, b), (sha(a), sha(b)), "{la} {lb}");
            }
        }
        // The standard's test vector.
        assert_eq!(
            hex::encode(digest_pair(b"abc", b"").0),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn pairs_are_plain_sha256(
            a in proptest::collection::vec(any::<u8>(), 0..5000),
            b in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            prop_assert_eq!(digest_pair(&a, &b), (sha(&a), sha(&b)));
        }
    }

    proptest::proptest! {
        #[test]
        fn streamed_pairs_are_plain_sha256(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            cuts in proptest::collection::vec(0usize..700, 0..6),
        ) {
            let (mut sa, mut sb) = (Sha::new(), Sha::new());
            let mut bounds: Vec<usize> = cuts.clone();
            bounds.push(700);
            bounds.sort_unstable();
            let mut at = 0;
            for (i, end) in bounds.into_iter().enumerate() {
                let (pa, pb) = (&a[at.min(a.len())..end.min(a.len())], &b[at.min(b.len())..end.min(b.len())]);
                // Some pieces alone, most together.
                if i % 3 == 2 {
                    sa.update(pa);
                    sb.update(pb);
                } else {
                    update_pair(&mut sa, pa, &mut sb, pb);
                }
                at = end;
            }
            proptest::prop_assert_eq!(sa.finish(), sha(&a));
            proptest::prop_assert_eq!(sb.finish(), sha(&b));
        }
    }
}
