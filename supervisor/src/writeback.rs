//! Pod files the app has open for writing (`--fs-mode write`, `feature.fs.read_write`).
//!
//! `write(2)` and its kin are not trapped (every app would pay for them), so the app writes to
//! a local **copy**: a regular file in the session's private tree (`<scratch>/write/<id>`,
//! mode 0700 directory), which starts as the pod file's content (nothing after `O_TRUNC`, a
//! sparse file of the pod file's size for a write-only append) and which the app's descriptor
//! is an ordinary open file description of: `write`, `pwrite`, `lseek`, `ftruncate`, `mmap`,
//! reads through `O_RDWR` all behave as on any file. The agent holds the pod file open for
//! writing (opened, created, truncated when the app opened it, with its credentials), and the
//! copy is **written back** through that handle:
//!
//! - when the last descriptor of an open of it closes (inotify `IN_CLOSE_WRITE`: the kernel
//!   reports the close of an open file description, whoever held it, forks and `dup`s
//!   included), before the next call that names a pod path is served (close-to-open
//!   consistency, as NFS gives: `close` then `open`, `stat` or a `rename` sees the data), and
//!   when the session ends;
//! - on `fsync`/`fdatasync` of the descriptor (trapped in sessions that write pod files only),
//!   before the call returns, followed by the pod file's own `fsync`.
//!
//! A write-back sends the whole copy (an appending open: what was appended since the last
//! one), then sets the pod file's length, unless nothing changed since the last one. Once no
//! open file description of the copy is left (a lease probe, see `inotify::alone`), the agent's
//! handle is closed and the copy removed.

use crate::inotify;
use kmirror_protocol::tunnel::Tunnel;
use kmirror_protocol::{FileStat, Request, Response};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// Bytes per write-back request (the frame limit is 1 MiB).
const CHUNK: usize = 512 * 1024;

/// One pod file open for writing, and the app's copy of it.
struct Entry {
    pod_path: Vec<u8>,
    copy: PathBuf,
    wd: i32,
    /// kmirror's own read-only description of the copy (for write-backs and the lease probe).
    reader: std::fs::File,
    /// The agent's write handle.
    handle: u64,
    append: bool,
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// For an appending open: how much of the copy the pod has.
    sent: u64,
    /// The copy's size, modification and change times at the last write-back.
    last: Option<(u64, i64, i64, i64)>,
    /// Closed and removed: nothing more to do.
    done: bool,
}

pub struct WriteBacks {
    dir: PathBuf,
    inotify: AsyncFd<OwnedFd>,
    by_wd: Mutex<HashMap<i32, Arc<Entry>>>,
    by_copy: Mutex<HashMap<PathBuf, Arc<Entry>>>,
    active: AtomicUsize,
    next: AtomicU64,
    /// One drain of the event queue at a time; a settle waits for the one running.
    draining: tokio::sync::Mutex<()>,
    tunnel: Tunnel,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A new, empty copy; fill it, then [`WriteBacks::register`] it.
pub struct NewCopy {
    pub path: PathBuf,
    pub file: std::fs::File,
}

/// How the app opened the pod file, for [`WriteBacks::register`].
pub struct Opened {
    pub handle: u64,
    pub stat: FileStat,
    pub append: bool,
    /// For an appending open: how much of the copy the pod has already.
    pub sent: u64,
    /// The app's open(2) flags (access mode, `O_APPEND`, `O_NONBLOCK`, `O_SYNC`, ...).
    pub flags: i32,
}

impl WriteBacks {
    /// Creates `<scratch>/write` (0700) and the inotify instance. Must run on the runtime.
    pub fn create(scratch: &Path, tunnel: Tunnel, timeout: Duration) -> std::io::Result<WriteBacks> {
        let dir = scratch.join("write");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let inotify = crate::sys::register_readable(inotify::init()?)?;
        Ok(WriteBacks {
            dir,
            inotify,
            by_wd: Mutex::default(),
            by_copy: Mutex::default(),
            active: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            draining: tokio::sync::Mutex::const_new(()),
            tunnel,
            timeout,
        })
    }

    /// Writes back copies whose app descriptors closed, for as long as the session runs.
    pub fn watch(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = this.inotify.readable().await else { return };
                ready.clear_ready();
                this.drain().await;
            }
        });
    }

    pub fn new_copy(&self) -> Result<NewCopy, i32> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(id.to_string());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| errno_of(&e))?;
        Ok(NewCopy { path, file })
    }

    /// Starts writing back a filled copy and returns the app's descriptor of it. On failure
    /// the copy is removed (the caller closes the handle).
    pub fn register(&self, pod_path: &[u8], copy: NewCopy, opened: Opened) -> Result<OwnedFd, i32> {
        let path = copy.path.clone();
        let result = self.register_copy(pod_path, copy, &opened);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn register_copy(&self, pod_path: &[u8], copy: NewCopy, opened: &Opened) -> Result<OwnedFd, i32> {
        let keep = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DSYNC | libc::O_SYNC;
        let app: OwnedFd = std::fs::OpenOptions::new()
            .read(opened.flags & libc::O_ACCMODE != libc::O_WRONLY)
            .write(true)
            .custom_flags((opened.flags & keep) | libc::O_CLOEXEC)
            .open(&copy.path)
            .map_err(|e| errno_of(&e))?
            .into();
        let reader = std::fs::File::open(&copy.path).map_err(|e| errno_of(&e))?;
        dress_as(&copy.file, &opened.stat);
        // Closed before the watch starts: only the app's closes are reported.
        drop(copy.file);
        let wd = inotify::watch_closes(self.inotify.get_ref(), &copy.path).map_err(|e| errno_of(&e))?;
        let last = reader.metadata().ok().map(|m| signature(&m));
        let entry = Arc::new(Entry {
            pod_path: pod_path.to_vec(),
            copy: copy.path.clone(),
            wd,
            reader,
            handle: opened.handle,
            append: opened.append,
            state: tokio::sync::Mutex::new(State { sent: opened.sent, last, done: false }),
        });
        lock(&self.by_wd).insert(wd, entry.clone());
        lock(&self.by_copy).insert(copy.path, entry);
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(app)
    }

    /// Whether any copy is being written back (else nothing needs settling).
    pub fn any(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// Writes back every copy whose descriptors closed before this call: a call that names a
    /// pod path after a `close` sees what was written (close-to-open consistency).
    pub async fn settle(&self) {
        if self.any() {
            self.drain().await;
        }
    }

    async fn drain(&self) {
        let _draining = self.draining.lock().await;
        let events = match inotify::read_events(self.inotify.get_ref()) {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!("cannot read the write-back events: {e}");
                return;
            }
        };
        let mut closed: Vec<i32> = events
            .iter()
            .filter(|e| e.mask & (libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE) != 0)
            .map(|e| e.wd)
            .collect();
        closed.sort_unstable();
        closed.dedup();
        for wd in closed {
            let entry = lock(&self.by_wd).get(&wd).cloned();
            let Some(entry) = entry else { continue };
            if let Err(errno) = self.write_back(&entry, true).await {
                report(&entry, errno);
            }
        }
    }

    /// The copy a descriptor link (`/proc/<tid>/fd/N`) names, if it is one.
    fn entry_of_link(&self, link: &[u8]) -> Option<Arc<Entry>> {
        let link = link.strip_suffix(b" (deleted)").unwrap_or(link);
        lock(&self.by_copy).get(Path::new(std::ffi::OsStr::from_bytes(link))).cloned()
    }

    /// The pod path a descriptor link names, when it is a copy's.
    pub fn pod_path_of_link(&self, link: &[u8]) -> Option<Vec<u8>> {
        self.entry_of_link(link).map(|e| e.pod_path.clone())
    }

    /// `fsync`/`fdatasync` of a descriptor whose link is `link`: `None` when it is no copy
    /// (the kernel's call then); otherwise the result of writing it back and syncing the pod
    /// file.
    pub async fn sync(&self, link: &[u8], data_only: bool) -> Option<Result<(), i32>> {
        let entry = self.entry_of_link(link)?;
        let result = async {
            self.write_back(&entry, false).await?;
            self.request(Request::SyncHandle { handle: entry.handle, data_only }).await.map(drop)
        }
        .await;
        Some(result)
    }

    async fn request(&self, request: Request) -> Result<Response, i32> {
        match self.tunnel.request(request, self.timeout).await {
            Ok(Response::Error(errno)) => Err(errno.0),
            Ok(response) => Ok(response),
            Err(e) => Err(crate::handlers::tunnel_errno(&e)),
        }
    }

    /// Sends what changed in the copy to the pod file; after a close, also ends the entry once
    /// no open of the copy is left.
    async fn write_back(&self, entry: &Arc<Entry>, closed: bool) -> Result<(), i32> {
        let mut state = entry.state.lock().await;
        if state.done {
            return Ok(());
        }
        let meta = entry.reader.metadata().map_err(|e| errno_of(&e))?;
        let now = signature(&meta);
        let mut result = Ok(());
        if state.last != Some(now) {
            result = self.send(entry, &mut state, meta.size()).await;
            if result.is_ok() {
                state.last = Some(now);
            }
        }
        if closed && inotify::alone(&entry.reader).unwrap_or(false) {
            self.finish(entry, &mut state).await;
        }
        result
    }

    async fn send(&self, entry: &Entry, state: &mut State, size: u64) -> Result<(), i32> {
        let from = if entry.append { state.sent.min(size) } else { 0 };
        let mut offset = from;
        while offset < size {
            let len = (size - offset).min(CHUNK as u64) as usize;
            let mut bytes = vec![0u8; len];
            entry.reader.read_exact_at(&mut bytes, offset).map_err(|e| errno_of(&e))?;
            self.request(Request::WriteHandle { handle: entry.handle, offset, bytes }).await?;
            offset += len as u64;
        }
        if entry.append {
            state.sent = size;
        } else {
            self.request(Request::TruncateHandle { handle: entry.handle, len: size }).await?;
        }
        Ok(())
    }

    async fn finish(&self, entry: &Entry, state: &mut State) {
        state.done = true;
        let _ = self.request(Request::CloseHandle { handle: entry.handle }).await;
        inotify::unwatch(self.inotify.get_ref(), entry.wd);
        lock(&self.by_wd).remove(&entry.wd);
        lock(&self.by_copy).remove(&entry.copy);
        let _ = std::fs::remove_file(&entry.copy);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// At the end of the session (every process of the app has exited): writes back every
    /// copy left and closes its handle.
    pub async fn finish_all(&self) {
        self.settle().await;
        let entries: Vec<Arc<Entry>> = lock(&self.by_wd).values().cloned().collect();
        for entry in entries {
            if let Err(errno) = self.write_back(&entry, false).await {
                report(&entry, errno);
            }
            let mut state = entry.state.lock().await;
            if !state.done {
                self.finish(&entry, &mut state).await;
            }
        }
    }
}

/// A write-back after the app's `close` has no caller to fail: the user is told.
fn report(entry: &Entry, errno: i32) {
    eprintln!(
        "kmirror: writing {} back to the pod failed: {}; the pod file may lack what the app wrote",
        String::from_utf8_lossy(&entry.pod_path),
        std::io::Error::from_raw_os_error(errno)
    );
}

/// What tells a changed copy from an unchanged one.
fn signature(meta: &std::fs::Metadata) -> (u64, i64, i64, i64) {
    (meta.size(), meta.mtime(), meta.mtime_nsec(), meta.ctime_nsec())
}

/// Gives the copy the pod file's mode (without set-user-ID and set-group-ID bits), owner
/// and times, so `fstat` of the app's descriptor and reopening it through `/proc/self/fd`
/// are judged as for the pod file. Best effort: without root the owner stays kmirror's.
fn dress_as(file: &std::fs::File, st: &FileStat) {
    let _ = file.set_permissions(std::fs::Permissions::from_mode(st.mode & 0o1777));
    let _ = std::os::unix::fs::fchown(file, Some(st.uid), Some(st.gid));
    let time =
        |t: &kmirror_protocol::Timestamp| std::time::UNIX_EPOCH + Duration::new(t.sec.max(0) as u64, t.nsec);
    let _ =
        file.set_times(std::fs::FileTimes::new().set_accessed(time(&st.atime)).set_modified(time(&st.mtime)));
}
