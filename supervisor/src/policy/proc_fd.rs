//! The names kmirror gives the memfd copies of pod files (see handlers::pod_fds).

/// Every memfd kmirror makes is named `kmirror:<what>`; pod file copies `kmirror:pod:<id>`.
const MEMFD_PREFIX: &str = "kmirror:pod:";

/// The name (after `kmirror:`, which the memfd maker adds) of pod file copy `id`.
pub fn memfd_name(id: u64) -> String {
    format!("pod:{id}")
}

/// The copy id in a descriptor's link (`/memfd:kmirror:pod:<id> (deleted)`).
pub fn memfd_id(link: &[u8]) -> Option<u64> {
    let link = std::str::from_utf8(link).ok()?;
    let rest = link.strip_prefix("/memfd:")?.strip_prefix(MEMFD_PREFIX)?;
    rest.strip_suffix(" (deleted)").unwrap_or(rest).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
