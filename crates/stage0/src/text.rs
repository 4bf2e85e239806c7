//! Building the one line stage0 prints when it fails, and the fallback file's path, in fixed
//! buffers (there is no heap).

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8; 32]) -> [u8; 64] {
    let mut out = [0; 64];
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
        pair[1] = HEX_DIGITS[usize::from(byte & 15)];
    }
    out
}

/// What an errno means, in the words stage0 prints, for the ones it can meet.
pub fn errno_text(errno: i32) -> Option<&'static str> {
    Some(match errno {
        1 => "operation not permitted",
        2 => "no such file",
        4 => "interrupted",
        5 => "i/o error",
        7 => "argument list too long",
        8 => "exec format error",
        9 => "bad file descriptor",
        12 => "out of memory",
        13 => "permission denied",
        14 => "bad address",
        17 => "file exists",
        20 => "not a directory",
        21 => "is a directory",
        22 => "invalid argument",
        23 | 24 => "too many open files",
        26 => "text file busy",
        27 => "file too large",
        28 => "no space left on device",
        30 => "read-only file system",
        36 => "file name too long",
        38 => "function not implemented",
        40 => "too many levels of symbolic links",
        122 => "disk quota exceeded",
        _ => return None,
    })
}

/// Bytes appended into a fixed array. What does not fit is dropped and remembered, so that a
/// message can end in `...` and a path can be refused.
pub struct Buf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    overflowed: bool,
}

impl<const N: usize> Default for Buf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Buf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// Appends `b`, or as much of it as fits.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let room = N - self.len;
        let take = b.len().min(room);
        if take < b.len() {
            self.overflowed = true;
        }
        if let (Some(dst), Some(src)) =
            (self.bytes.get_mut(self.len..self.len + take), b.get(..take))
        {
            dst.copy_from_slice(src);
        }
        self.len += take;
        self
    }

    /// Forgets what was appended.
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflowed = false;
    }

    /// Appends `b` in lowercase hex.
    pub fn hex(&mut self, b: &[u8]) -> &mut Self {
        for byte in b {
            let pair = [
                HEX_DIGITS[usize::from(byte >> 4)],
                HEX_DIGITS[usize::from(byte & 15)],
            ];
            self.bytes(&pair);
        }
        self
    }

    /// Appends `s`.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends `n` in decimal.
    pub fn num(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.bytes(&digits[i..])
    }

    /// Appends `errno N (meaning)`, or `errno N` for one without a text here.
    pub fn errno(&mut self, errno: i32) -> &mut Self {
        self.str("errno ").num(u64::from(errno.unsigned_abs()));
        if let Some(text) = errno_text(errno) {
            self.str(" (").str(text).str(")");
        }
        self
    }

    /// Whether something did not fit.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// What was appended.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    /// The contents as one line: a newline at the end, replacing the tail with `...` when it
    /// did not all fit. Newlines inside (from a path, say) become spaces, so that the
    /// message stays one line.
    pub fn line(&mut self) -> &[u8] {
        for b in self.bytes.iter_mut().take(self.len) {
            if *b == b'\n' {
                *b = b' ';
            }
        }
        if self.overflowed || self.len == N {
            self.len = N.saturating_sub(4);
            self.overflowed = false;
            self.str("...");
        }
        self.str("\n");
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let mut b = Buf::<64>::new();
        b.str("stage0: part ")
            .bytes(b"/x/a\nb")
            .str(": open failed: ")
            .errno(2);
        assert_eq!(
            b.line(),
            b"stage0: part /x/a b: open failed: errno 2 (no such file)\n"
        );
        let mut b = Buf::<64>::new();
        b.errno(9999)
            .str(" ")
            .num(0)
            .str(" ")
            .num(u64::MAX)
            .str(" ")
            .hex(&[0, 0xa5]);
        assert_eq!(b.line(), b"errno 9999 0 18446744073709551615 00a5\n");
        b.clear();
        assert_eq!(b.line(), b"\n");
    }

    #[test]
    fn too_long_lines_end_in_dots() {
        let mut b = Buf::<16>::new();
        b.str("0123456789abcdefghij");
        assert!(b.overflowed());
        assert_eq!(b.line(), b"0123456789ab...\n");
        let mut b = Buf::<16>::new();
        b.str("0123456789abcdef");
        assert_eq!(b.line(), b"0123456789ab...\n");
    }

    #[test]
    fn hex_digits() {
        let mut d = [0u8; 32];
        d[0] = 0xab;
        d[31] = 0x0f;
        let h = hex(&d);
        assert_eq!(&h[..4], b"ab00");
        assert_eq!(&h[60..], b"000f");
    }
}
