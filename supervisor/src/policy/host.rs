//! The host name the app sees: the pod's, as `/etc/hostname` in the pod says (in Kubernetes
//! the pod's name, which apps use as an instance id), in `uname` and in
//! `/proc/sys/kernel/hostname`.

/// Size of one `struct utsname` field on Linux, and the field count.
const UTS_FIELD: usize = 65;
pub const UTSNAME_SIZE: usize = UTS_FIELD * 6;
/// `nodename` is the second field.
const NODENAME_AT: usize = UTS_FIELD;

/// The host name in a pod's `/etc/hostname`, if it holds a usable one: the first line,
/// trimmed, non-empty, short enough for `utsname`, without spaces or NULs.
pub fn pod_hostname(etc_hostname: &[u8]) -> Option<String> {
    let first = etc_hostname.split(|&b| b == b'\n').next()?;
    let name = std::str::from_utf8(first).ok()?.trim();
    let usable = !name.is_empty()
        && name.len() < UTS_FIELD
        && !name.bytes().any(|b| b == 0 || b.is_ascii_whitespace());
    usable.then(|| name.to_string())
}

/// A `struct utsname` (as raw bytes) with `nodename` replaced by `hostname`; the other fields
/// (kernel, machine) stay the local ones, which the pod shares.
pub fn with_nodename(utsname: &[u8; UTSNAME_SIZE], hostname: &str) -> [u8; UTSNAME_SIZE] {
    let mut out = *utsname;
    let field = &mut out[NODENAME_AT..NODENAME_AT + UTS_FIELD];
    field.fill(0);
    let name = &hostname.as_bytes()[..hostname.len().min(UTS_FIELD - 1)];
    field[..name.len()].copy_from_slice(name);
    out
}

/// The longest host name Linux keeps (`HOST_NAME_MAX`).
pub const HOST_NAME_MAX: usize = UTS_FIELD - 1;

/// The node name in a raw `struct utsname`.
pub fn nodename(utsname: &[u8; UTSNAME_SIZE]) -> String {
    let field = &utsname[NODENAME_AT..NODENAME_AT + UTS_FIELD];
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The host name a write to `/proc/sys/kernel/hostname` sets: the bytes written, without one
/// trailing newline; `None` for an empty or over-long write (the kernel refuses those).
pub fn name_written(bytes: &[u8]) -> Option<String> {
    let name = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    (!name.is_empty() && name.len() <= HOST_NAME_MAX).then(|| String::from_utf8_lossy(name).into_owned())
}

/// What `/proc/sys/kernel/hostname` reads.
pub fn proc_hostname_file(hostname: &str) -> String {
    format!("{hostname}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_of_etc_hostname_is_the_name() {
        assert_eq!(pod_hostname(b"web-7d9f8-abcde\n"), Some("web-7d9f8-abcde".into()));
        assert_eq!(pod_hostname(b"  spaced  \nsecond\n"), Some("spaced".into()));
        assert_eq!(pod_hostname(b""), None);
        assert_eq!(pod_hostname(b"\n"), None);
        assert_eq!(pod_hostname(b"two words\n"), None);
        assert_eq!(pod_hostname(&[b'a'; 65]), None);
        assert_eq!(pod_hostname(&[b'a'; 64]), Some("a".repeat(64)));
        assert_eq!(pod_hostname(b"\xff\xfe"), None);
    }

    #[test]
    fn only_the_nodename_field_changes() {
        let mut local = [0u8; UTSNAME_SIZE];
        for (i, name) in [&b"Linux"[..], b"laptop-of-someone", b"6.18.0", b"#1 SMP", b"x86_64", b"(none)"]
            .iter()
            .enumerate()
        {
            local[i * UTS_FIELD..i * UTS_FIELD + name.len()].copy_from_slice(name);
        }
        let pod = with_nodename(&local, "web-1");
        assert_eq!(&pod[..UTS_FIELD], &local[..UTS_FIELD]);
        assert_eq!(&pod[UTS_FIELD..UTS_FIELD + 6], b"web-1\0");
        assert!(pod[UTS_FIELD + 5..2 * UTS_FIELD].iter().all(|&b| b == 0));
        assert_eq!(&pod[2 * UTS_FIELD..], &local[2 * UTS_FIELD..]);
    }

    #[test]
    fn names_written_to_the_proc_file() {
        assert_eq!(name_written(b"renamed\n"), Some("renamed".into()));
        assert_eq!(name_written(b"renamed"), Some("renamed".into()));
        assert_eq!(name_written(b"\n"), None);
        assert_eq!(name_written(&[b'a'; 65]), None);
        let uts = with_nodename(&[0; UTSNAME_SIZE], "node-1");
        assert_eq!(nodename(&uts), "node-1");
    }
}
