//! The fixed ustar headers of format v1: one regular file per member, fixed metadata.

use crate::Digest;

/// A tar block.
pub const BLOCK: usize = 512;

/// Largest size an 11-digit octal field holds; larger sizes use the base-256 form.
const OCTAL_MAX: u64 = 0o77_777_777_777;

/// Content length rounded up to whole blocks.
pub fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// The tar path of a blob.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn octal(field: &mut [u8], value: u64) {
    // field.len()-1 digits, then NUL.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// The header of a member: regular file, mode 0644, owner 0:0, mtime 0, no user names.
/// `path` must be at most 100 bytes (every v1 path is).
pub fn header(path: &str, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let p = path.as_bytes();
    h[..p.len().min(100)].copy_from_slice(&p[..p.len().min(100)]);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size <= OCTAL_MAX {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: high bit set, big-endian value in the rest of the field.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
    h
}

/// Checks that `found` is exactly the header v1 writes for `path` and `size`; the error
/// says which field differs, naming links and unsafe paths as such.
pub fn check_header(found: &[u8], path: &str, size: u64) -> Result<(), String> {
    let want = header(path, size);
    if found == want.as_slice() {
        return Ok(());
    }
    if found.len() < BLOCK {
        return Err("truncated header".into());
    }
    let name_end = found[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = String::from_utf8_lossy(&found[..name_end]);
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return Err(format!("unsafe path {name:?}"));
    }
    match found[156] {
        b'0' | 0 => {}
        b'1' | b'2' => {
            return Err(format!(
                "{name:?} is a link, only regular files are allowed"
            ));
        }
        t => {
            return Err(format!(
                "{name:?} has type {:?}, only regular files are allowed",
                t as char
            ));
        }
    }
    if name != path {
        return Err(format!("names {name:?}"));
    }
    if found[124..136] != want[124..136] {
        return Err(format!(
            "size field {:?} does not say {size}",
            String::from_utf8_lossy(&found[124..136])
        ));
    }
    Err("metadata differs from the fixed v1 header (mode, owner, mtime, magic or checksum)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksum_is_valid_ustar() {
        let h = header("index.json", 1234);
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        let field = std::str::from_utf8(&h[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(field, 8).unwrap(), sum);
        assert_eq!(&h[124..136], b"00000002322\0");
    }

    #[test]
    fn check_names_links_and_traversal() {
        let mut h = header("../etc/passwd", 5);
        assert!(
            check_header(&h, "index.json", 5)
                .unwrap_err()
                .contains("unsafe path")
        );
        h = header("index.json", 5);
        h[156] = b'2';
        assert!(
            check_header(&h, "index.json", 5)
                .unwrap_err()
                .contains("link")
        );
        h = header("/abs", 5);
        assert!(
            check_header(&h, "index.json", 5)
                .unwrap_err()
                .contains("unsafe path")
        );
        assert!(
            check_header(&header("index.json", 6), "index.json", 5)
                .unwrap_err()
                .contains("size")
        );
    }

    #[test]
    fn large_sizes_use_base256() {
        let h = header("x", 1 << 40);
        assert_eq!(h[124], 0x80);
        assert_eq!(&h[128..136], &(1u64 << 40).to_be_bytes());
    }
}
