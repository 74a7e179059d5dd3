//! Taking another identity on one thread, for the kernel's file permission checks.
//!
//! Mechanism shared by the supervisor (local calls it makes as the app, `supervisor/src/caller.rs`)
//! and the agent (pod-file requests it serves as the app, `agent/src/identity.rs`). Both run as
//! root; acting for an app with root's credentials would let the app read what it could not (a
//! confused deputy). So such work runs on a short-lived thread that first takes the app's
//! file-system uid and gid, supplementary groups and effective capabilities. Linux keeps
//! credentials per thread and the raw system calls below change only the calling thread
//! (glibc's `setgroups` wrapper would change every thread of the process); the thread ends
//! after the work, so nothing leaks back to the process's other threads, which keep root.

// Per-thread setgroups, capget and capset have no wrapper in nix (its setgroups is glibc's,
// which changes every thread).
#![allow(unsafe_code)]

use std::io;

/// What one thread takes for its file permission checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCredentials<'a> {
    pub fsuid: u32,
    pub fsgid: u32,
    pub groups: &'a [u32],
    /// Effective capabilities, bit n for capability n; limited to what the thread has permitted.
    pub effective: u64,
}

/// The most supplementary groups a thread can have (the kernel's NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EPERM)
}

/// Runs `prepare` and then `op` on a thread of their own, which ends with them: whatever
/// `prepare` changed about that thread (its credentials) never reaches another. `op` does not
/// run if `prepare` fails; its errno is returned instead.
pub fn on_own_thread<R: Send>(
    prepare: impl FnOnce() -> Result<(), i32> + Send,
    op: impl FnOnce() -> R + Send,
) -> Result<R, i32> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                prepare()?;
                Ok(op())
            })
            .join()
            .unwrap_or(Err(libc::EIO))
    })
}

/// Gives the calling thread `creds` for permission checks; only this thread changes. Fails
/// with the errno of a change the thread is not allowed to make (then call no file operation
/// on it: its credentials are half changed).
pub fn take(creds: &ThreadCredentials) -> Result<(), i32> {
    if creds.groups.len() > MAX_GROUPS {
        return Err(libc::EINVAL);
    }
    // SAFETY: raw setgroups reads `len` gids from a live slice and changes this thread only.
    if unsafe { libc::syscall(libc::SYS_setgroups, creds.groups.len(), creds.groups.as_ptr()) } != 0 {
        return Err(last_errno());
    }
    // setfsuid/setfsgid report the previous value, never an error: read the new one back.
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(creds.fsgid));
    if fs_gid() != creds.fsgid {
        return Err(libc::EPERM);
    }
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(creds.fsuid));
    if fs_uid() != creds.fsuid {
        return Err(libc::EPERM);
    }
    // Leaving root's fs uid dropped the file capabilities; now set exactly the wanted effective
    // set, within the permitted one (a thread can never gain more).
    let (_, permitted) = capabilities()?;
    set_capabilities(creds.effective & permitted, permitted)
}

/// Gives the calling thread a file-system context of its own (`unshare(CLONE_FS)`: working
/// directory, root, umask) and sets its umask, so files it creates get `mode & !umask` as the
/// app's own creation would, without touching the umask of the process's other threads. Only
/// for a thread that ends after its work ([`on_own_thread`]).
pub fn take_umask(umask: u32) -> Result<(), i32> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(|e| e as i32)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask & 0o777));
    Ok(())
}

/// The calling thread's fs uid: -1 is never a valid id, so asking for it changes nothing and
/// returns the current one.
fn fs_uid() -> u32 {
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX)).as_raw()
}

fn fs_gid() -> u32 {
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(u32::MAX)).as_raw()
}

/// The calling thread's fs uid, fs gid, supplementary groups and effective capabilities.
pub fn current() -> Result<(u32, u32, Vec<u32>, u64), i32> {
    let groups = nix::unistd::getgroups().map_err(|e| e as i32)?;
    let groups = groups.into_iter().map(|g| g.as_raw()).collect();
    let (effective, _) = capabilities()?;
    Ok((fs_uid(), fs_gid(), groups, effective))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's effective and permitted capability sets.
fn capabilities() -> Result<(u64, u64), i32> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes a v3 header's two data entries into a live array; pid 0 is this
    // thread.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(last_errno());
    }
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok((join(data[0].effective, data[1].effective), join(data[0].permitted, data[1].permitted)))
}

fn set_capabilities(effective: u64, permitted: u64) -> Result<(), i32> {
    let header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let half = |set: u64, high: bool| (if high { set >> 32 } else { set }) as u32;
    let data = [false, true].map(|high| CapData {
        effective: half(effective, high),
        permitted: half(permitted, high),
        inheritable: 0,
    });
    // SAFETY: capset reads a v3 header and two data entries, both live; pid 0 is this thread.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(last_errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_takes_the_credentials_and_the_others_keep_theirs() {
        let mine = current().unwrap();
        assert_eq!(mine.0, 0, "changing to another user needs root: run the tests as root");
        let groups = [4242, 4243];
        let creds = ThreadCredentials { fsuid: 65534, fsgid: 65533, groups: &groups, effective: 1 << 2 };
        let seen = on_own_thread(
            || take(&creds),
            || {
                let shadow = std::fs::File::open("/etc/shadow").map_err(|e| e.raw_os_error());
                (current().unwrap(), shadow.err())
            },
        )
        .unwrap();
        assert_eq!(seen.0, (65534, 65533, groups.to_vec(), 1 << 2));
        // CAP_DAC_READ_SEARCH alone lets it read anything: the capability took effect.
        assert_eq!(seen.1, None);
        let without = ThreadCredentials { effective: 0, ..creds };
        let denied = on_own_thread(|| take(&without), || std::fs::File::open("/etc/shadow").is_ok()).unwrap();
        assert!(!denied, "nobody without capabilities read /etc/shadow");
        assert_eq!(current().unwrap(), mine, "the calling thread keeps its credentials");
    }

    #[test]
    fn a_thread_takes_a_umask_of_its_own() {
        let dir = std::env::temp_dir().join(format!("kmirror-creds-umask-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        let (seen, mode) = on_own_thread(
            || take_umask(0o027),
            || {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o666).open(&file).unwrap();
                // SAFETY: reads and restores this thread's own umask.
                let seen = unsafe { libc::umask(0o027) };
                (seen, std::fs::metadata(&file).unwrap().permissions().mode() & 0o777)
            },
        )
        .unwrap();
        assert_eq!((seen, mode), (0o027, 0o640));
        // SAFETY: reads and restores the process's umask.
        let ours = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(ours) };
        assert_ne!(ours, 0o027, "the other threads keep the process's umask");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_preparation_skips_the_operation() {
        let ran = std::sync::atomic::AtomicBool::new(false);
        let result =
            on_own_thread(|| Err(libc::EPERM), || ran.store(true, std::sync::atomic::Ordering::SeqCst));
        assert_eq!(result, Err(libc::EPERM));
        assert!(!ran.into_inner());
        let too_many = vec![1; MAX_GROUPS + 1];
        let creds = ThreadCredentials { fsuid: 1, fsgid: 1, groups: &too_many, effective: 0 };
        assert_eq!(on_own_thread(|| take(&creds), || ()), Err(libc::EINVAL));
    }
}
