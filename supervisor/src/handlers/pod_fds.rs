//! Descriptors of pod files. The app reads a pod file from a sealed memfd copy; the copy is
//! named `kmirror:pod:<id>`, and `<id>` leads here to the pod path and the pod's metadata, so
//! that `fstat`/`statx` on the descriptor describe the pod's file as `stat` of its path does
//! (mode, owner, size, times, and the pod's device and inode: stable across opens), and
//! `readlink("/proc/self/fd/N")` names the pod path instead of `/memfd:...`.

use super::Context;
use crate::policy::proc_fd;
use crate::seccomp::Notification;
use kmirror_protocol::FileStat;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Pod files remembered at most; the oldest go first (a descriptor of an evicted one then
/// shows its copy's own metadata, as before this registry existed).
const MAX_ENTRIES: usize = 16384;

#[derive(Clone)]
pub struct PodFile {
    pub path: Vec<u8>,
    pub stat: FileStat,
}

#[derive(Default)]
pub struct PodFds {
    entries: Mutex<BTreeMap<u64, PodFile>>,
    next: AtomicU64,
    /// Whether any pod file was opened yet: until then the hooks cost nothing.
    any: AtomicBool,
}

impl PodFds {
    /// A fresh id, and the memfd name for the copy of a pod file it stands for.
    pub fn next_name(&self) -> (u64, String) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        (id, proc_fd::memfd_name(id))
    }

    /// Records that copy `id` holds pod file `path`, described by `stat`.
    pub fn insert(&self, id: u64, path: &[u8], stat: &FileStat) {
        let mut entries = super::lock(&self.entries);
        entries.insert(id, PodFile { path: path.to_vec(), stat: *stat });
        while entries.len() > MAX_ENTRIES {
            entries.pop_first();
        }
        self.any.store(true, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Relaxed)
    }

    /// The pod file behind descriptor `fd` of process (or thread) `pid`, if it is a copy.
    pub fn of_fd(&self, pid: u32, fd: i32) -> Option<PodFile> {
        if self.is_empty() || fd < 0 {
            return None;
        }
        let link = crate::tracee::proc_link(pid, &format!("fd/{fd}")).ok()?;
        let id = proc_fd::memfd_id(&link)?;
        super::lock(&self.entries).get(&id).cloned()
    }
}

/// `fstat(fd)` and `newfstatat`/`statx(fd, "", AT_EMPTY_PATH)` of a pod file's copy: answered
/// with the pod's metadata. Returns false (nothing answered) for any other descriptor.
pub fn answer_fstat(ctx: &Context, n: &Notification, fd: i32, buf: u64, statx: bool) -> bool {
    let Some(file) = ctx.pod_fds.of_fd(n.tid, fd) else { return false };
    let bytes =
        if statx { crate::abi::encode_statx(&file.stat) } else { crate::abi::encode_stat(&file.stat) };
    let result = super::output_memory(ctx, n)
        .ok_or(libc::EINTR)
        .and_then(|memory| memory.write(buf, &bytes).map_err(|_| libc::EFAULT));
    super::answer(ctx, n, result.map(|()| 0));
    true
}

/// `readlink` of `/proc/<self|thread-self|pid>/fd/N` or `/dev/fd/N` naming a pod file's copy:
/// answered with the pod path. Returns false (nothing answered) for any other path.
pub fn answer_readlink(ctx: &Context, n: &Notification, raw: &[u8], buf: u64, size: i64) -> bool {
    let Some((who, fd)) = proc_fd::parse(raw) else { return false };
    let pid = match who {
        proc_fd::Who::Caller => n.tid,
        proc_fd::Who::Pid(pid) => pid,
    };
    let Some(file) = ctx.pod_fds.of_fd(pid, fd) else { return false };
    let result = if size <= 0 {
        Err(libc::EINVAL)
    } else {
        let copy = file.path.len().min(size as usize);
        super::output_memory(ctx, n)
            .ok_or(libc::EINTR)
            .and_then(|memory| memory.write(buf, &file.path[..copy]).map_err(|_| libc::EFAULT))
            .map(|()| copy as i64)
    };
    super::answer(ctx, n, result);
    true
}
