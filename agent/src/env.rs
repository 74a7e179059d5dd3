//! The target's environment, as the kernel recorded it at exec (`/proc/<pid>/environ`).

use kmirror_protocol::{EnvVars, Errno};

pub fn read_environ(pid: u32) -> Result<EnvVars, Errno> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
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
}
