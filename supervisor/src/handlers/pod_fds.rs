//! The memfd copies of pod files kmirror hands to the app. Each is named `kmirror:pod:<id>`,
//! and `<id>` leads here to the pod path, so that calls about the descriptor (`fstat`,
//! `statx`/`fstatat` with `AT_EMPTY_PATH`, `readlink("/proc/self/fd/N")`, reopening it through
//! `/proc/self/fd/N`) are answered about the pod's file, as for O_PATH stand-ins and mirrored
//! directories (see `files::pod_file_of_fd`).

use crate::policy::proc_fd;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Copies remembered at most; the oldest go first (a descriptor of a forgotten one is then
/// its copy to fstat, dressed with the pod file's mode, owner and times).
const MAX_ENTRIES: usize = 16384;

#[derive(Default)]
pub struct PodFds {
    paths: Mutex<BTreeMap<u64, Vec<u8>>>,
    next: AtomicU64,
}

impl PodFds {
    /// A fresh id, and the memfd name for the copy of a pod file it stands for.
    pub fn next_name(&self) -> (u64, String) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        (id, proc_fd::memfd_name(id))
    }

    /// Records that copy `id` holds pod file `path`.
    pub fn insert(&self, id: u64, path: &[u8]) {
        let mut paths = super::lock(&self.paths);
        paths.insert(id, path.to_vec());
        while paths.len() > MAX_ENTRIES {
            paths.pop_first();
        }
    }

    /// The pod path of the copy a descriptor link (`/proc/<tid>/fd/N`) leads to.
    pub fn path_of_link(&self, link: &[u8]) -> Option<Vec<u8>> {
        let id = proc_fd::memfd_id(link)?;
        super::lock(&self.paths).get(&id).cloned()
    }
}
