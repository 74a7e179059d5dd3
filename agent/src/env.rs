//! The target's environment, as the kernel recorded it at exec (`/proc/<pid>/environ`).

use crate::target::Target;
use kmirror_protocol::{EnvVars, Errno};
use std::io::Read;

pub fn read_environ(target: &Target) -> Result<EnvVars, Errno> {
    let errno = |e: std::io::Error| Errno(e.raw_os_error().unwrap_or(libc::EIO));
    // Through the held /proc/<pid> directory, which names the target whatever its pid comes
    // to mean; the liveness check after reading makes sure it was the target that answered.
    let mut raw = Vec::new();
    std::fs::File::from(target.open_proc_file("environ").map_err(errno)?)
        .read_to_end(&mut raw)
        .map_err(errno)?;
    target.ensure_alive().map_err(errno)?;
    Ok(parse_environ(&raw))
}

/// Splits NUL-separated `NAME=value` entries; entries without `=` are skipped.
pub fn parse_environ(raw: &[u8]) -> EnvVars {
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|&b| b == b'=')?;
            (eq > 0).then(|| (entry[..eq].to_vec(), entry[eq + 1..].to_vec()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_environ_block() {
        let raw = b"A=1\0B=x=y\0NOEQ\0=bad\0EMPTY=\0";
        assert_eq!(
            parse_environ(raw),
            vec![
                (b"A".to_vec(), b"1".to_vec()),
                (b"B".to_vec(), b"x=y".to_vec()),
                (b"EMPTY".to_vec(), b"".to_vec()),
            ]
        );
    }

    /// A target whose process is gone while its pid names another (this test's) process:
    /// its environment is not answered with the other process's.
    #[test]
    fn the_environment_of_a_reused_pid_is_refused() {
        let me = Target::open(std::process::id()).unwrap();
        assert!(!read_environ(&me).unwrap().is_empty());
        let gone = Target { pidfd: crate::target::tests::reaped_pidfd(), ..me };
        assert_eq!(read_environ(&gone), Err(Errno(libc::ESRCH)));
    }
}
