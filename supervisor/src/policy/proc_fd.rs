//! Names of descriptors: the `/proc/.../fd/N` paths an app reads links of, and the names kmirror
//! gives the memfd copies of pod files (see handlers::pod_fds).

/// Whose descriptor table a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// `/proc/self`, `/proc/thread-self`, `/dev/fd`: the calling thread's.
    Caller,
    Pid(u32),
}

/// `/proc/self/fd/N`, `/proc/thread-self/fd/N`, `/proc/<pid>/fd/N`, `/proc/<pid>/task/<tid>/fd/N`
/// or `/dev/fd/N` (absolute, normal paths only; anything else is the kernel's to answer).
pub fn parse(path: &[u8]) -> Option<(Who, i32)> {
    let path = std::str::from_utf8(path).ok()?;
    let number =
        |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten();
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let (who, fd) = match parts.as_slice() {
        ["dev", "fd", fd] => (Who::Caller, fd),
        ["proc", "self" | "thread-self", "fd", fd] => (Who::Caller, fd),
        ["proc", pid, "fd", fd] | ["proc", _, "task", pid, "fd", fd] => (Who::Pid(number(pid)?), fd),
        _ => return None,
    };
    Some((who, i32::try_from(number(fd)?).ok()?))
}

/// Every memfd kmirror makes is named `kmirror:<what>`; pod file copies `kmirror:pod:<id>`.
const MEMFD_PREFIX: &str = "kmirror:pod:";

/// The name (after `kmirror:`, which the memfd maker adds) of pod file copy `id`.
pub fn memfd_name(id: u64) -> String {
    format!("pod:{id}")
}

/// The copy id in a descriptor's link (`/memfd:kmirror-pod:<id> (deleted)`).
pub fn memfd_id(link: &[u8]) -> Option<u64> {
    let link = std::str::from_utf8(link).ok()?;
    let rest = link.strip_prefix("/memfd:")?.strip_prefix(MEMFD_PREFIX)?;
    rest.strip_suffix(" (deleted)").unwrap_or(rest).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths() {
        assert_eq!(parse(b"/proc/self/fd/3"), Some((Who::Caller, 3)));
        assert_eq!(parse(b"/proc/thread-self/fd/12"), Some((Who::Caller, 12)));
        assert_eq!(parse(b"/dev/fd/0"), Some((Who::Caller, 0)));
        assert_eq!(parse(b"/proc/4242/fd/7"), Some((Who::Pid(4242), 7)));
        assert_eq!(parse(b"/proc/4242/task/4243/fd/7"), Some((Who::Pid(4243), 7)));
        for other in [
            &b"/proc/self/fd"[..],
            b"/proc/self/fd/x",
            b"proc/self/fd/3",
            b"/proc/self/fd/3/",
            b"/proc/self/fdinfo/3",
            b"/proc/+1/fd/3",
            b"/proc/self/fd/-1",
        ] {
            assert_eq!(parse(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn copy_names_round_trip() {
        let name = memfd_name(17);
        assert_eq!(memfd_id(format!("/memfd:kmirror:{name} (deleted)").as_bytes()), Some(17));
        assert_eq!(memfd_id(format!("/memfd:kmirror:{name}").as_bytes()), Some(17));
        assert_eq!(memfd_id(b"/memfd:kmirror:resolv.conf (deleted)"), None);
        assert_eq!(memfd_id(b"/memfd:kmirror:pod:x (deleted)"), None);
        assert_eq!(memfd_id(b"/tmp/kmirror:pod:1"), None);
    }
}
