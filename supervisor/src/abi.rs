//! x86_64 Linux structure layouts written into the app's memory for emulated calls.

use kmirror_protocol::FileStat;

/// Writes `value` into `out` where `field` of the C struct `ty` lies. `value` must have the
/// field's own type (checked at compile time), so it fills exactly the field's bytes; the
/// bytes no field covers (padding, spare fields) stay zero.
macro_rules! put {
    ($out:expr, $ty:ty, $field:ident $(. $sub:ident)?, $value:expr) => {{
        fn field_typed<F>(_: fn(&$ty) -> &F, value: F) -> F {
            value
        }
        let bytes = field_typed(|s: &$ty| &s.$field $(.$sub)?, $value).to_ne_bytes();
        let at = std::mem::offset_of!($ty, $field $(.$sub)?);
        $out[at..at + bytes.len()].copy_from_slice(&bytes);
    }};
}

/// `struct stat` as `stat`, `lstat` and `newfstatat` return it.
pub fn encode_stat(st: &FileStat) -> Vec<u8> {
    let mut out = vec![0u8; std::mem::size_of::<libc::stat>()];
    put!(out, libc::stat, st_dev, st.dev);
    put!(out, libc::stat, st_ino, st.ino);
    put!(out, libc::stat, st_nlink, st.nlink);
    put!(out, libc::stat, st_mode, st.mode);
    put!(out, libc::stat, st_uid, st.uid);
    put!(out, libc::stat, st_gid, st.gid);
    put!(out, libc::stat, st_rdev, st.rdev);
    put!(out, libc::stat, st_size, st.size);
    put!(out, libc::stat, st_blksize, st.blksize);
    put!(out, libc::stat, st_blocks, st.blocks);
    put!(out, libc::stat, st_atime, st.atime.sec);
    put!(out, libc::stat, st_atime_nsec, st.atime.nsec as i64);
    put!(out, libc::stat, st_mtime, st.mtime.sec);
    put!(out, libc::stat, st_mtime_nsec, st.mtime.nsec as i64);
    put!(out, libc::stat, st_ctime, st.ctime.sec);
    put!(out, libc::stat, st_ctime_nsec, st.ctime.nsec as i64);
    out
}

/// `struct statx` with the basic-stats mask (what the pod's `stat` can tell).
pub fn encode_statx(st: &FileStat) -> Vec<u8> {
    let mut out = vec![0u8; std::mem::size_of::<libc::statx>()];
    put!(out, libc::statx, stx_mask, libc::STATX_BASIC_STATS);
    put!(out, libc::statx, stx_blksize, st.blksize as u32);
    put!(out, libc::statx, stx_nlink, st.nlink as u32);
    put!(out, libc::statx, stx_uid, st.uid);
    put!(out, libc::statx, stx_gid, st.gid);
    put!(out, libc::statx, stx_mode, st.mode as u16);
    put!(out, libc::statx, stx_ino, st.ino);
    put!(out, libc::statx, stx_size, st.size as u64);
    put!(out, libc::statx, stx_blocks, st.blocks as u64);
    put!(out, libc::statx, stx_atime.tv_sec, st.atime.sec);
    put!(out, libc::statx, stx_atime.tv_nsec, st.atime.nsec);
    put!(out, libc::statx, stx_mtime.tv_sec, st.mtime.sec);
    put!(out, libc::statx, stx_mtime.tv_nsec, st.mtime.nsec);
    put!(out, libc::statx, stx_ctime.tv_sec, st.ctime.sec);
    put!(out, libc::statx, stx_ctime.tv_nsec, st.ctime.nsec);
    put!(out, libc::statx, stx_rdev_major, libc::major(st.rdev));
    put!(out, libc::statx, stx_rdev_minor, libc::minor(st.rdev));
    put!(out, libc::statx, stx_dev_major, libc::major(st.dev));
    put!(out, libc::statx, stx_dev_minor, libc::minor(st.dev));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmirror_protocol::Timestamp;

    #[test]
    fn layouts_match_the_kernel_abi() {
        let st = FileStat {
            dev: 0x803,
            ino: 42,
            mode: 0o100640,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            size: 20,
            blksize: 4096,
            blocks: 8,
            atime: Timestamp { sec: 1, nsec: 2 },
            mtime: Timestamp { sec: 3, nsec: 4 },
            ctime: Timestamp { sec: 5, nsec: 6 },
        };
        let raw = encode_stat(&st);
        assert_eq!(raw.len(), 144);
        assert_eq!(u64::from_ne_bytes(raw[8..16].try_into().unwrap()), 42);
        assert_eq!(u32::from_ne_bytes(raw[24..28].try_into().unwrap()), 0o100640);
        assert_eq!(i64::from_ne_bytes(raw[48..56].try_into().unwrap()), 20);
        assert_eq!(i64::from_ne_bytes(raw[88..96].try_into().unwrap()), 3);
        let x = encode_statx(&st);
        assert_eq!(x.len(), 256);
        assert_eq!(u16::from_ne_bytes(x[28..30].try_into().unwrap()), 0o100640);
        assert_eq!(u64::from_ne_bytes(x[40..48].try_into().unwrap()), 20);
        assert_eq!(i64::from_ne_bytes(x[112..120].try_into().unwrap()), 3);
    }
}
