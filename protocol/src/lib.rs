//! Wire protocol between the kmirror supervisor and its agent.
//!
//! * [`message`]: the serde types that travel the tunnel (handshake, requests, stream control).
//! * [`codec`]: length-delimited frames with a hard size limit; control frames are bincode,
//!   data frames carry raw bytes behind a fixed header so the hot path never goes through serde.
//! * [`link`]: the tunnel's Unix socket as a reader and a writer that wake only when needed.
//! * [`tunnel`]: one connection multiplexed into request/response exchanges and byte streams,
//!   each stream with its own credit-based flow control.
//! * [`creds`]: a thread taking an app's credentials for file permission checks (mechanism
//!   shared by the supervisor's local calls made as the app and the agent's pod-file requests).

pub mod codec;
pub mod creds;
pub mod link;
pub mod message;
pub mod splice;
pub mod tunnel;

pub use message::*;

/// The protocol version this build speaks natively. New message kinds are appended to their
/// enums (so older kinds keep their encoding) and a side sends them only to a peer that
/// negotiated a version which has them ([`tunnel::Tunnel::version`]):
///
/// * 2: `Opened::local`;
/// * 3: file and directory handles (`OpenFile`, `ReadHandle`, `OpenDir`, `ReadDir`,
///   `CloseHandle`), so a fetched file is read through one open file description and a large
///   directory is listed in several frames;
/// * 4: `OpenTarget::TcpWith` (the app socket's options go with its connect) and
///   `OpenTarget::UdpUnconnected` (one unconnected pod-side socket per app socket, its
///   datagrams addressed), so replies from any address reach the app as in the pod;
/// * 5: `Control::RequestAs`: a pod-file request carries the app's [`Identity`], and the agent
///   serves it with the app's credentials, so the pod's permissions apply as in the pod;
/// * 6: writes to pod files: `OpenWrite` and its write handles (`WriteHandle`,
///   `TruncateHandle`, `SyncHandle`), `Rename`, `Unlink`, `MakeDir`, `Symlink`, `Truncate`.
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The first version with file and directory handles.
pub const HANDLES_VERSION: u16 = 3;
/// The first version with `OpenTarget::TcpWith` and `OpenTarget::UdpUnconnected`.
pub const SOCKETS_VERSION: u16 = 4;
/// The first version with `Control::RequestAs`.
pub const CREDENTIALS_VERSION: u16 = 5;
/// The first version with writes to pod files.
pub const WRITES_VERSION: u16 = 6;

/// Negotiates the version both sides use: the highest one both support.
pub fn negotiate_version(peer_min: u16, peer_max: u16) -> Option<u16> {
    let version = PROTOCOL_VERSION.min(peer_max);
    (version >= MIN_PROTOCOL_VERSION && version >= peer_min).then_some(version)
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_highest_common() {
        assert_eq!(negotiate_version(1, 1), None);
        assert_eq!(negotiate_version(2, 2), Some(2));
        assert_eq!(negotiate_version(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate_version(0, 0), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(constant_time_eq(b"", b""));
    }
}
