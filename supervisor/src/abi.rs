//! x86_64 Linux structure layouts written into the app's memory for emulated calls.

use kmirror_protocol::FileStat;

/// `struct stat` as `stat`, `lstat` and `newfstatat` return it.
pub fn encode_stat(st: &FileStat) -> Vec<u8> {
    // SAFETY: `libc::stat` is plain old data; all-zero is a valid value.
    let mut out: libc::stat = unsafe { std::mem::zeroed() };
    out.st_dev = st.dev;
    out.st_ino = st.ino;
    out.st_nlink = st.nlink;
    out.st_mode = st.mode;
    out.st_uid = st.uid;
    out.st_gid = st.gid;
    out.st_rdev = st.rdev;
    out.st_size = st.size;
    out.st_blksize = st.blksize;
    out.st_blocks = st.blocks;
    out.st_atime = st.atime.sec;
    out.st_atime_nsec = st.atime.nsec as i64;
    out.st_mtime = st.mtime.sec;
    out.st_mtime_nsec = st.mtime.nsec as i64;
    out.st_ctime = st.ctime.sec;
    out.st_ctime_nsec = st.ctime.nsec as i64;
    as_bytes(&out)
}

/// `struct statx` with the basic-stats mask (what the pod's `stat` can tell).
pub fn encode_statx(st: &FileStat) -> Vec<u8> {
    // SAFETY: `libc::statx` is plain old data; all-zero is a valid value.
    let mut out: libc::statx = unsafe { std::mem::zeroed() };
    out.stx_mask = libc::STATX_BASIC_STATS;
    out.stx_blksize = st.blksize as u32;
    out.stx_nlink = st.nlink as u32;
    out.stx_uid = st.uid;
    out.stx_gid = st.gid;
    out.stx_mode = st.mode as u16;
    out.stx_ino = st.ino;
    out.stx_size = st.size as u64;
    out.stx_blocks = st.blocks as u64;
    let ts = |t: kmirror_protocol::Timestamp| {
        // SAFETY: plain old data; all-zero is valid (the padding stays zero).
        let mut out: libc::statx_timestamp = unsafe { std::mem::zeroed() };
        out.tv_sec = t.sec;
        out.tv_nsec = t.nsec;
        out
    };
    out.stx_atime = ts(st.atime);
    out.stx_mtime = ts(st.mtime);
    out.stx_ctime = ts(st.ctime);
    out.stx_rdev_major = libc::major(st.rdev);
    out.stx_rdev_minor = libc::minor(st.rdev);
    out.stx_dev_major = libc::major(st.dev);
    out.stx_dev_minor = libc::minor(st.dev);
    as_bytes(&out)
}

fn as_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is a plain C struct; reading its bytes (padding included, zeroed above) is fine.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
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
