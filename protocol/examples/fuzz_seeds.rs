//! Writes the committed seed corpus of the fuzz targets (protocol/fuzz/corpus/<target>/):
//! `cargo run -p kmirror-protocol --example fuzz_seeds`. Seeds are valid encodings of each
//! message kind, so the fuzzers start from the real grammar.

use kmirror_protocol::codec::{self, Frame, encode_message};
use kmirror_protocol::*;
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let hello =
        Hello { min_version: 1, max_version: 2, token: b"token".to_vec(), capabilities: vec!["dns".into()] };
    let replies = [
        HelloReply::Accepted { version: 1, capabilities: vec!["files".into()], target: "pid/1".into() },
        HelloReply::Rejected { reason: "wrong session token".into() },
    ];
    let requests = [
        Request::Environ,
        Request::Stat { path: b"/etc/hosts".to_vec(), follow: true },
        Request::ReadFile { path: b"/data/x".to_vec(), offset: 4096, len: 512 },
        Request::Access { path: b"/".to_vec(), mode: 4 },
        Request::ReadLink { path: b"/l".to_vec() },
        Request::ListDir { path: b"/data".to_vec() },
        Request::Dns { query: vec![0x12, 0x34, 1, 0, 0, 1], tcp: false },
        Request::Subscribe {
            port: 8080,
            mode: IncomingMode::Steal,
            filter: Some(HttpFilter { header: Some("^X-Dev: a$".into()), path: None }),
        },
        Request::OpenFile { path: b"/data/x".to_vec(), follow: false },
        Request::ReadHandle { handle: 3, len: 512 * 1024 },
        Request::OpenDir { path: b"/data".to_vec() },
        Request::ReadDir { handle: 4 },
        Request::CloseHandle { handle: 3 },
        Request::AccessAt { path: b"/data/l".to_vec(), mode: 4, follow: false },
        Request::OpenWrite { path: b"/data/new".to_vec(), flags: 0o1101, mode: 0o644, umask: 0o022 },
        Request::WriteHandle { handle: 5, offset: 4096, bytes: b"written".to_vec() },
        Request::TruncateHandle { handle: 5, len: 7 },
        Request::SyncHandle { handle: 5, data_only: true },
        Request::Rename { from: b"/data/a".to_vec(), to: b"/data/b".to_vec(), flags: 1 },
        Request::Unlink { path: b"/data/d".to_vec(), dir: true },
        Request::MakeDir { path: b"/data/d".to_vec(), mode: 0o755, umask: 0o077 },
        Request::Symlink { target: b"../etc/hosts".to_vec(), path: b"/data/l".to_vec() },
        Request::Truncate { path: b"/data/a".to_vec(), len: 0 },
    ];
    let responses = [
        Response::Environ(vec![(b"A".to_vec(), b"1".to_vec())]),
        Response::Stat(FileStat { size: 10, mode: 0o100644, ..Default::default() }),
        Response::FileChunk { bytes: b"abc".to_vec(), eof: true },
        Response::Access,
        Response::ReadLink(b"target".to_vec()),
        Response::ListDir(vec![DirEntry { name: b"a".to_vec(), kind: 8, ino: 7 }]),
        Response::Dns(vec![1, 2, 3]),
        Response::Subscribed,
        Response::Error(Errno(2)),
        Response::FileOpened {
            handle: Some(3),
            stat: FileStat { size: 1 << 20, mode: 0o100644, ..Default::default() },
            bytes: b"head".to_vec(),
        },
        Response::DirEntries {
            entries: vec![DirEntry { name: b"b".to_vec(), kind: 4, ino: 9 }],
            more: Some(4),
        },
        Response::Closed,
        Response::WriteOpened {
            handle: 5,
            stat: FileStat { size: 3, mode: 0o100600, ..Default::default() },
            bytes: b"old".to_vec(),
            more: false,
        },
        Response::Written(7),
        Response::Done,
    ];
    let controls = [
        Control::Open { stream: 1, target: OpenTarget::Tcp("10.0.0.1:80".parse().unwrap()) },
        Control::Open {
            stream: 2,
            target: OpenTarget::Incoming {
                server: "10.0.0.2:80".parse().unwrap(),
                client: "[::1]:5".parse().unwrap(),
                mode: IncomingMode::Mirror,
            },
        },
        Control::Opened { stream: 1, result: Err(Errno(111)), local: None },
        Control::Opened { stream: 3, result: Ok(()), local: Some("10.0.0.2:40000".parse().unwrap()) },
        Control::Credit { stream: 1, bytes: 65536 },
        Control::Shutdown { stream: 3 },
        Control::Reset { stream: 3 },
        Control::Goodbye { reason: "bye".into() },
        Control::Request { id: 9, body: Request::Environ },
        Control::Request {
            id: 10,
            body: Request::OpenFile { path: b"/etc/hostname".to_vec(), follow: true },
        },
        Control::Response { id: 10, body: Response::DirEntries { entries: Vec::new(), more: None } },
        Control::RequestAs {
            id: 11,
            caller: Identity { uid: 65534, gid: 65534, groups: vec![4242, 4243], caps: 1 << 2 },
            body: Request::OpenFile { path: b"/etc/shadow".to_vec(), follow: true },
        },
        Control::RequestAs {
            id: 12,
            caller: Identity { uid: 1000, gid: 1000, groups: vec![], caps: 0 },
            body: Request::Rename { from: b"/data/a.tmp".to_vec(), to: b"/data/a".to_vec(), flags: 0 },
        },
    ];
    write("handshake", "hello", &encode_message(&hello).unwrap());
    for (i, r) in replies.iter().enumerate() {
        write("handshake", &format!("reply-{i}"), &encode_message(r).unwrap());
    }
    for (i, r) in requests.iter().enumerate() {
        write("request", &format!("request-{i}"), &encode_message(r).unwrap());
    }
    for (i, r) in responses.iter().enumerate() {
        write("response", &format!("response-{i}"), &encode_message(r).unwrap());
    }
    let mut stream = Vec::new();
    for (i, c) in controls.iter().enumerate() {
        write("control", &format!("control-{i}"), &encode_message(c).unwrap());
        let mut framed = Vec::new();
        codec::encode(&Frame::Control(c.clone()), &mut framed).unwrap();
        write("frame", &format!("control-{i}"), &framed[4..]);
        stream.extend_from_slice(&framed);
    }
    let mut data = Vec::new();
    codec::encode(&Frame::Data { stream: 5, bytes: b"payload".to_vec() }, &mut data).unwrap();
    write("frame", "data", &data[4..]);
    stream.extend_from_slice(&data);
    // The stream target's first byte sets how the rest is split across reads.
    write("stream", "session", &[&[1u8][..], &stream].concat());
    write("stream", "session-big-reads", &[&[255u8][..], &stream].concat());
}
