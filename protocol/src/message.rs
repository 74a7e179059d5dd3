//! Messages exchanged over the tunnel.
//!
//! Paths, names and environment entries are raw bytes: Linux paths need not be UTF-8 and the
//! supervisor hands them to the kernel unchanged. Errors from the pod side travel as raw Linux
//! errno values ([`Errno`]) so the app sees exactly what a local call would have returned.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Identifies one multiplexed byte stream. The supervisor allocates odd ids, the agent even ones,
/// so both sides can open streams without coordinating.
pub type StreamId = u32;

/// Environment entries as `(name, value)` byte strings.
pub type EnvVars = Vec<(Vec<u8>, Vec<u8>)>;

/// A Linux errno value produced on the far side of the tunnel.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// First frame of a session, sent by the side that opened the tunnel (the supervisor).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Session secret the agent was started with; compared in constant time.
    pub token: Vec<u8>,
    pub capabilities: Vec<String>,
}

/// A [`Hello`] capability: the user allows incoming traffic (steal, mirror) of a target that
/// shares the host's network namespace (`kmirror run --allow-host-network`).
pub const ALLOW_HOST_NETWORK: &str = "allow-host-network";

/// The agent's answer to [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HelloReply {
    Accepted {
        version: u16,
        capabilities: Vec<String>,
        /// The target process as the agent sees it, for messages to the user.
        target: String,
    },
    Rejected {
        reason: String,
    },
}

/// Control-plane request from the supervisor; each gets exactly one [`Response`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The target process's environment.
    Environ,
    /// Metadata of a path inside the target's root. `follow` selects stat (true) or lstat.
    Stat { path: Vec<u8>, follow: bool },
    /// Up to `len` bytes of a regular file inside the target's root, from `offset`.
    ReadFile { path: Vec<u8>, offset: u64, len: u32 },
    /// access(2)-style check of `mode` (R_OK/W_OK/X_OK/F_OK bits) inside the target's root.
    Access { path: Vec<u8>, mode: u32 },
    /// Target of a symbolic link inside the target's root.
    ReadLink { path: Vec<u8> },
    /// Entries of a directory inside the target's root.
    ListDir { path: Vec<u8> },
    /// One DNS message, answered by the pod's first nameserver (TCP when `tcp` is set).
    Dns { query: Vec<u8>, tcp: bool },
    /// Start delivering the pod's incoming connections to `port` (see [`IncomingMode`]).
    Subscribe { port: u16, mode: IncomingMode, filter: Option<HttpFilter> },
    // ---- protocol 3: handles, so that one fetch reads one open file description ----
    /// Opens a regular file inside the target's root once (`follow`: whether a final symlink is
    /// followed) and reads its first chunk; answered by [`Response::FileOpened`]. Anything but
    /// a regular file on a disk file system is refused (ENXIO; EISDIR for a directory).
    OpenFile { path: Vec<u8>, follow: bool },
    /// The next (at most `len`) bytes of a file opened by [`Request::OpenFile`]; answered by
    /// [`Response::FileChunk`]. The handle is closed once `eof` is reported.
    ReadHandle { handle: u64, len: u32 },
    /// Opens a directory inside the target's root and lists its first entries; answered by
    /// [`Response::DirEntries`].
    OpenDir { path: Vec<u8> },
    /// The next entries of a directory opened by [`Request::OpenDir`].
    ReadDir { handle: u64 },
    /// Closes a handle before its end was read; answered by [`Response::Closed`].
    CloseHandle { handle: u64 },
    // ---- protocol 5 ----
    /// `faccessat2`-style check of `mode` inside the target's root, of a final symlink itself
    /// unless `follow`; answered by [`Response::Access`]. Checked with the credentials the
    /// request is served with: sent as [`Control::RequestAs`] with the real ids for `access(2)`,
    /// the effective ones for AT_EACCESS.
    AccessAt { path: Vec<u8>, mode: u32, follow: bool },
    // ---- protocol 6: writes to pod files (docs/files.md, *Writes*) ----
    /// Opens a regular file inside the target's root for writing, as open(2) with `flags`
    /// (only [`WRITE_OPEN_FLAGS`] count; the others are ignored): created with `mode` under
    /// the app's `umask` for `O_CREAT` (`O_EXCL` honoured), truncated for `O_TRUNC`. Anything
    /// but a regular file on a disk file system is refused as for reads (ENXIO; EISDIR for a
    /// directory). Answered by [`Response::WriteOpened`]; the handle stays open until
    /// [`Request::CloseHandle`].
    OpenWrite { path: Vec<u8>, flags: u32, mode: u32, umask: u32 },
    /// Writes `bytes` at `offset` of a handle from [`Request::OpenWrite`] (at its end for an
    /// `O_APPEND` handle); answered by [`Response::Written`] with the bytes written.
    WriteHandle { handle: u64, offset: u64, bytes: Vec<u8> },
    /// Sets the length of a write handle's file; answered by [`Response::Done`].
    TruncateHandle { handle: u64, len: u64 },
    /// `fsync` (`fdatasync` with `data_only`) of a write handle's file; [`Response::Done`].
    SyncHandle { handle: u64, data_only: bool },
    /// `renameat2(from, to, flags)` inside the target's root (`RENAME_NOREPLACE`,
    /// `RENAME_EXCHANGE`); [`Response::Done`].
    Rename { from: Vec<u8>, to: Vec<u8>, flags: u32 },
    /// `unlink(path)`, or `rmdir(path)` with `dir`; [`Response::Done`].
    Unlink { path: Vec<u8>, dir: bool },
    /// `mkdir(path, mode)` under the app's `umask`; [`Response::Done`].
    MakeDir { path: Vec<u8>, mode: u32, umask: u32 },
    /// `symlink(target, path)`: `target` is the link's text, never resolved here;
    /// [`Response::Done`].
    Symlink { target: Vec<u8>, path: Vec<u8> },
    /// `truncate(path, len)` of a regular file; [`Response::Done`].
    Truncate { path: Vec<u8>, len: u64 },
}

/// The open(2) flags [`Request::OpenWrite`] takes into account (`O_WRONLY`/`O_RDWR`,
/// `O_CREAT`, `O_EXCL`, `O_TRUNC`, `O_APPEND`, `O_NOFOLLOW`, `O_DIRECTORY`).
pub const WRITE_OPEN_FLAGS: u32 = (libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NOFOLLOW
    | libc::O_DIRECTORY) as u32;

impl Request {
    /// Whether the request names a path in the target's root: only such a request can be
    /// made as the app ([`Control::RequestAs`]); the others touch no pod file, or one already
    /// opened (a handle), whose permissions were checked when it was opened.
    pub fn names_pod_path(&self) -> bool {
        match self {
            Request::Stat { .. }
            | Request::ReadFile { .. }
            | Request::Access { .. }
            | Request::ReadLink { .. }
            | Request::ListDir { .. }
            | Request::OpenFile { .. }
            | Request::OpenDir { .. }
            | Request::AccessAt { .. }
            | Request::OpenWrite { .. }
            | Request::Rename { .. }
            | Request::Unlink { .. }
            | Request::MakeDir { .. }
            | Request::Symlink { .. }
            | Request::Truncate { .. } => true,
            Request::Environ
            | Request::Dns { .. }
            | Request::Subscribe { .. }
            | Request::ReadHandle { .. }
            | Request::ReadDir { .. }
            | Request::CloseHandle { .. }
            | Request::WriteHandle { .. }
            | Request::TruncateHandle { .. }
            | Request::SyncHandle { .. } => false,
        }
    }
}

/// Whose permissions a pod-file request is checked with (protocol 5, [`Control::RequestAs`]):
/// what the kernel consults for file access, as the app's calling thread holds it. Ids are
/// numbers as the app has them: uid 1000 on this side is uid 1000 in the pod (a pod in a
/// user namespace of its own is not mapped).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The uid and gid permission checks use: the file-system ones, or for an `access(2)`
    /// without AT_EACCESS the real ones.
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the kernel allows at most 65536; the agent refuses more).
    pub groups: Vec<u32>,
    /// Effective capabilities, bit n for capability n (for `access(2)` without AT_EACCESS,
    /// what the kernel grants the real uid). The agent honours only those that file permission
    /// checks consult.
    pub caps: u64,
}

/// How the pod's incoming connections reach the local app.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingMode {
    /// A copy of each new connection's client bytes; the pod's app still answers.
    Mirror,
    /// New connections are answered by the local app instead of the pod's.
    Steal,
}

/// Steals only HTTP requests that match; the others go to the pod's own app.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpFilter {
    /// Regular expression matched against each header line (`Name: value`).
    pub header: Option<String>,
    /// Regular expression matched against the request path.
    pub path: Option<String>,
}

/// Answer to a [`Request`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Environ(EnvVars),
    Stat(FileStat),
    FileChunk {
        bytes: Vec<u8>,
        eof: bool,
    },
    Access,
    ReadLink(Vec<u8>),
    ListDir(Vec<DirEntry>),
    Dns(Vec<u8>),
    Subscribed,
    Error(Errno),
    // ---- protocol 3 ----
    /// A regular file was opened: its metadata (of the opened file itself) and its first
    /// bytes. `handle` is `None` when `bytes` is the whole file (the agent closed it already);
    /// otherwise read on with [`Request::ReadHandle`].
    FileOpened {
        handle: Option<u64>,
        stat: FileStat,
        bytes: Vec<u8>,
    },
    /// Some entries of a directory; `more` is the handle to ask for the next ones with
    /// [`Request::ReadDir`], `None` once the listing is complete (and the handle closed).
    DirEntries {
        entries: Vec<DirEntry>,
        more: Option<u64>,
    },
    Closed,
    // ---- protocol 6 ----
    /// A file was opened for writing ([`Request::OpenWrite`]): its metadata once opened (and
    /// truncated or created), and, when the handle may read and the content still counts (no
    /// `O_TRUNC`, not a write-only append), its first bytes; with `more`, read on with
    /// [`Request::ReadHandle`] on the same handle.
    WriteOpened {
        handle: u64,
        stat: FileStat,
        bytes: Vec<u8>,
        more: bool,
    },
    /// Bytes written by [`Request::WriteHandle`].
    Written(u64),
    /// A write-family request succeeded.
    Done,
}

/// What `stat(2)` reports, in the kernel's own units.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: i64,
    pub blksize: i64,
    pub blocks: i64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl From<&libc::stat> for FileStat {
    fn from(st: &libc::stat) -> FileStat {
        let ts = |sec: i64, nsec: i64| Timestamp { sec, nsec: nsec as u32 };
        FileStat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size,
            blksize: st.st_blksize,
            blocks: st.st_blocks,
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One directory entry; `kind` is the `d_type` value of getdents64.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub kind: u8,
    pub ino: u64,
}

/// Where a new stream leads.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenTarget {
    /// A TCP connection made from the pod's network namespace.
    Tcp(SocketAddr),
    /// A connected UDP socket in the pod's network namespace; each data frame is one datagram.
    Udp(SocketAddr),
    /// (agent → supervisor) A connection a pod client opened to `server` (the pod's address
    /// and port it reached), for the local app.
    Incoming { server: SocketAddr, client: SocketAddr, mode: IncomingMode },
    // ---- protocol 4 ----
    /// A TCP connection made from the pod by a socket given the app socket's options first.
    TcpWith { addr: SocketAddr, options: SocketOptions },
    /// An unconnected UDP socket in the pod, as the app's own: IPv6 if `v6` (dual-stack unless
    /// `v6_only`), IPv4 otherwise. Each data frame is one datagram with its peer's address in
    /// front (see [`encode_addressed`]): where it goes, or where it came from.
    UdpUnconnected { v6: bool, v6_only: bool },
}

/// Socket options of the app's TCP socket that change what its connection does in the pod,
/// carried with [`OpenTarget::TcpWith`]. `None`: the pod's default.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketOptions {
    /// SO_KEEPALIVE.
    pub keepalive: bool,
    /// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds), TCP_KEEPCNT.
    pub keep_idle: Option<u32>,
    pub keep_interval: Option<u32>,
    pub keep_count: Option<u32>,
    /// TCP_USER_TIMEOUT (milliseconds).
    pub user_timeout: Option<u32>,
}

impl SocketOptions {
    /// Whether any option differs from the defaults (plain [`OpenTarget::Tcp`] does then).
    pub fn any(&self) -> bool {
        *self != SocketOptions::default()
    }
}

/// One datagram of an [`OpenTarget::UdpUnconnected`] stream: the peer's address (a family
/// byte, 4 or 6, the address, the port in network order) and the payload.
pub fn encode_addressed(peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + payload.len());
    match peer {
        SocketAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out.extend_from_slice(&peer.port().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The peer and payload of a datagram encoded by [`encode_addressed`]; `None` if malformed.
pub fn decode_addressed(frame: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let (ip, rest): (std::net::IpAddr, &[u8]) = match frame.first()? {
        4 => (<[u8; 4]>::try_from(frame.get(1..5)?).ok()?.into(), frame.get(5..)?),
        6 => (<[u8; 16]>::try_from(frame.get(1..17)?).ok()?.into(), frame.get(17..)?),
        _ => return None,
    };
    let port = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressed_datagrams_round_trip_and_malformed_ones_are_refused() {
        for peer in ["10.0.0.1:53", "[fd00::1]:3478"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let frame = encode_addressed(peer, b"payload");
            assert_eq!(decode_addressed(&frame), Some((peer, &b"payload"[..])));
            assert_eq!(decode_addressed(&encode_addressed(peer, b"")), Some((peer, &b""[..])));
        }
        assert_eq!(decode_addressed(&[]), None);
        assert_eq!(decode_addressed(&[4, 10, 0, 0, 1, 0]), None);
        assert_eq!(decode_addressed(&[5, 10, 0, 0, 1, 0, 53]), None);
    }

    /// Write requests name pod paths (made as the app) except those on a handle, whose
    /// permissions were checked when it was opened; each round-trips through the codec, and a
    /// write chunk of the size the supervisor sends fits one frame.
    #[test]
    fn write_requests_round_trip_and_fit_a_frame() {
        use crate::codec::{MAX_FRAME, decode_message, encode_message};
        let chunk = vec![7u8; 512 * 1024];
        let requests = [
            (Request::OpenWrite { path: b"/a".to_vec(), flags: 0o101, mode: 0o644, umask: 0o22 }, true),
            (Request::Rename { from: b"/a".to_vec(), to: b"/b".to_vec(), flags: 0 }, true),
            (Request::Unlink { path: b"/a".to_vec(), dir: false }, true),
            (Request::MakeDir { path: b"/d".to_vec(), mode: 0o755, umask: 0 }, true),
            (Request::Symlink { target: b"/x".to_vec(), path: b"/l".to_vec() }, true),
            (Request::Truncate { path: b"/a".to_vec(), len: 1 }, true),
            (Request::WriteHandle { handle: 1, offset: 0, bytes: chunk }, false),
            (Request::TruncateHandle { handle: 1, len: 0 }, false),
            (Request::SyncHandle { handle: 1, data_only: false }, false),
        ];
        for (request, as_app) in requests {
            assert_eq!(request.names_pod_path(), as_app, "{request:?}");
            let bytes = encode_message(&request).unwrap();
            assert!(bytes.len() < MAX_FRAME);
            assert_eq!(decode_message::<Request>(&bytes).unwrap(), request);
        }
        // A length prefix claiming more bytes than the frame holds is refused, not allocated.
        let mut huge =
            encode_message(&Request::WriteHandle { handle: 1, offset: 0, bytes: vec![1] }).unwrap();
        huge.truncate(huge.len() - 2);
        huge.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode_message::<Request>(&huge).is_err());
    }
}

/// Control frames. Stream payload bytes do not appear here: they travel in data frames
/// (see [`crate::codec`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Hello(Hello),
    HelloReply(HelloReply),
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
    /// Asks the peer to open a stream; answered by `Opened`.
    Open {
        stream: StreamId,
        target: OpenTarget,
    },
    Opened {
        stream: StreamId,
        result: Result<(), Errno>,
        /// On success, the address of the opener's socket at its own end (the pod-side
        /// connection's local address, say), when there is one: what `getsockname` shows.
        local: Option<std::net::SocketAddr>,
    },
    /// The receiver may send `bytes` more payload bytes on the stream.
    Credit {
        stream: StreamId,
        bytes: u32,
    },
    /// The sender will write no more on the stream (half close).
    Shutdown {
        stream: StreamId,
    },
    /// The stream is aborted in both directions.
    Reset {
        stream: StreamId,
    },
    /// The agent's session is over (target exited, shutdown); `reason` is for the user.
    Goodbye {
        reason: String,
    },
    // ---- protocol 5 ----
    /// A request whose pod-file work the agent does with `caller`'s credentials (permission
    /// checks, directory search along the path included, as the pod's kernel makes them for
    /// the app); answered by a [`Control::Response`] with the same `id`. Only requests that
    /// name a pod path ([`Request::names_pod_path`]) may be sent so; the agent answers the
    /// others EINVAL.
    RequestAs {
        id: u64,
        caller: Identity,
        body: Request,
    },
}
