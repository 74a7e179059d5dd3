//! Serving a pod-file request as the app that made it.
//!
//! The agent runs as root; opening, stat'ing, listing or checking a pod path with root's
//! credentials would let an app running as another user read what that user could not in the
//! pod (the pod's `/etc/shadow`, a key in a directory it may not search). A request that
//! arrives with the app's [`Identity`] is served on a short-lived thread that took the app's
//! file-system uid and gid, supplementary groups and file capabilities
//! ([`kmirror_protocol::creds`]), so the kernel makes every permission decision itself, search
//! permission along the path included. The agent's other threads keep full root.

use kmirror_protocol::{Errno, Identity, creds};

/// The capabilities file permission checks consult, which the agent grants an app that holds
/// them: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER. No other capability of the app
/// (nor of the agent) is in force while its request is served.
pub const FILE_CAPS: u64 = (1 << 1) | (1 << 2) | (1 << 3);

/// What the serving thread takes for `who`: its ids and groups, and its file capabilities.
fn thread_credentials(who: &Identity) -> creds::ThreadCredentials<'_> {
    creds::ThreadCredentials {
        fsuid: who.uid,
        fsgid: who.gid,
        groups: &who.groups,
        effective: who.caps & FILE_CAPS,
    }
}

/// Whether a thread with `own` credentials gets the answers `who` would from every file
/// permission check: same ids and groups, same file capabilities. (Then no thread of its own is
/// needed: a root app, the usual case when kmirror runs as root.)
fn checks_like(who: &Identity, own: &(u32, u32, Vec<u32>, u64)) -> bool {
    let sorted = |groups: &[u32]| {
        let mut groups = groups.to_vec();
        groups.sort_unstable();
        groups
    };
    let (uid, gid, groups, caps) = own;
    who.uid == *uid
        && who.gid == *gid
        && who.caps & FILE_CAPS == caps & FILE_CAPS
        && sorted(&who.groups) == sorted(groups)
}

/// The agent's own credentials, read once: nothing in the agent changes a long-lived thread's.
fn own() -> Result<&'static (u32, u32, Vec<u32>, u64), Errno> {
    static OWN: std::sync::OnceLock<(u32, u32, Vec<u32>, u64)> = std::sync::OnceLock::new();
    if let Some(own) = OWN.get() {
        return Ok(own);
    }
    let read = creds::current().map_err(Errno)?;
    Ok(OWN.get_or_init(|| read))
}

/// Runs `op` with `who`'s credentials in force for its permission checks. Fails with the errno
/// of a credential change the agent could not make (EINVAL for more groups than the kernel
/// allows), without running `op`: never with more rights than the app has.
pub fn run_as<R: Send>(who: &Identity, op: impl FnOnce() -> R + Send) -> Result<R, Errno> {
    if who.groups.len() > creds::MAX_GROUPS {
        return Err(Errno(libc::EINVAL));
    }
    if checks_like(who, own()?) {
        return Ok(op());
    }
    creds::on_own_thread(|| creds::take(&thread_credentials(who)), op).map_err(Errno)
}

/// Runs `op`, which creates files, with `who`'s credentials and `umask` in force: always on a
/// thread of its own, whose umask is the app's (the agent's own umask never applies to what
/// the app creates in the pod, and a default ACL of the parent directory takes precedence over
/// the umask there as it would for the app).
pub fn run_creating<R: Send>(who: &Identity, umask: u32, op: impl FnOnce() -> R + Send) -> Result<R, Errno> {
    if who.groups.len() > creds::MAX_GROUPS {
        return Err(Errno(libc::EINVAL));
    }
    let same = checks_like(who, own()?);
    let prepare = || {
        if !same {
            creds::take(&thread_credentials(who))?;
        }
        creds::take_umask(umask)
    };
    creds::on_own_thread(prepare, op).map_err(Errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, groups: &[u32], caps: u64) -> Identity {
        Identity { uid, gid: uid, groups: groups.to_vec(), caps }
    }

    #[test]
    fn only_file_capabilities_are_granted() {
        const CAP_SYS_ADMIN: u64 = 1 << 21;
        let creds = who(0, &[], u64::MAX);
        assert_eq!(thread_credentials(&creds).effective, FILE_CAPS);
        assert_eq!(thread_credentials(&who(0, &[], CAP_SYS_ADMIN | (1 << 1))).effective, 1 << 1);
    }

    #[test]
    fn a_thread_is_needed_only_when_a_check_could_differ() {
        let root = (0, 0, vec![0, 1], u64::MAX >> 23);
        assert!(
            checks_like(&who(0, &[1, 0], FILE_CAPS | (1 << 21)), &root),
            "order and other caps do not matter"
        );
        assert!(!checks_like(&who(0, &[0, 1], 1 << 2), &root), "a root app without CAP_DAC_OVERRIDE");
        assert!(!checks_like(&who(0, &[0], FILE_CAPS), &root), "other groups");
        assert!(!checks_like(&who(65534, &[0, 1], FILE_CAPS), &root));
    }

    /// Pod-file operations made as an app get the kernel's answers for that app: read and
    /// search permission, groups, capabilities; the agent's own thread stays root.
    #[test]
    fn pod_file_operations_are_checked_as_the_app() {
        use crate::files;

        use std::os::unix::fs::{PermissionsExt, chown};
        let dir = std::env::temp_dir().join(format!("kmirror-agent-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("locked")).unwrap();
        let mode = |path: &str, mode: u32| {
            std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(mode)).unwrap()
        };
        for (path, content) in [("secret", "s"), ("locked/inner", "i"), ("group", "g")] {
            std::fs::write(dir.join(path), content).unwrap();
        }
        mode("secret", 0o600);
        mode("locked", 0o700);
        mode("group", 0o640);
        chown(dir.join("group"), Some(0), Some(4242)).unwrap();
        use nix::fcntl::OFlag;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let root = nix::fcntl::open(dir.as_path(), flags, nix::sys::stat::Mode::empty()).unwrap();
        let handles = files::SharedHandles::default();
        let read = |who: &Identity, path: &[u8]| {
            run_as(who, || files::open_file(&handles, &root, path, true).map(|(_, _, bytes)| bytes)).unwrap()
        };
        let eacces = Err(Errno(libc::EACCES));
        let denied = Err(Errno(libc::EACCES));
        let nobody = who(65534, &[], 0);
        assert_eq!(read(&nobody, b"/secret"), eacces);
        assert_eq!(
            run_as(&nobody, || files::stat(&root, b"/locked/inner", true).map(|_| ())).unwrap(),
            denied
        );
        assert_eq!(run_as(&nobody, || files::stat(&root, b"/secret", true).map(|_| ())).unwrap(), Ok(()));
        let access =
            |who: &Identity| run_as(who, || files::access(&root, b"/secret", libc::R_OK as u32, true));
        assert_eq!(access(&nobody).unwrap(), denied);
        assert_eq!(access(&who(65534, &[], 1 << 2)).unwrap(), Ok(()), "CAP_DAC_READ_SEARCH reads anything");
        assert_eq!(read(&nobody, b"/group"), eacces);
        assert_eq!(read(&who(65534, &[4242], 0), b"/group"), Ok(b"g".to_vec()), "a supplementary group");
        assert_eq!(read(&who(0, &[], 0), b"/locked/inner"), Ok(b"i".to_vec()), "root owns the directory");
        assert_eq!(read(&who(1000, &[], 1 << 1), b"/locked/inner"), Ok(b"i".to_vec()), "CAP_DAC_OVERRIDE");
        assert_eq!(read(&who(1000, &[], 1 << 21), b"/locked/inner"), eacces, "CAP_SYS_ADMIN is not granted");
        assert_eq!(creds::current().unwrap().0, 0, "the agent's own thread stays root");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes made as an app: a file it may not write is EACCES; what it creates is its own,
    /// with its umask (not the agent's).
    #[test]
    fn pod_writes_are_made_as_the_app() {
        use crate::{files, writes};

        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("kmirror-agent-identity-w-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("open")).unwrap();
        std::fs::set_permissions(dir.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(dir.join("open/roots"), "r").unwrap();
        std::fs::set_permissions(dir.join("open/roots"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let root = nix::fcntl::open(
            dir.as_path(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let handles = files::SharedHandles::default();
        let nobody = who(65534, &[], 0);
        let write = (libc::O_WRONLY | libc::O_TRUNC) as u32;
        let denied = run_as(&nobody, || writes::open_write(&handles, &root, b"/open/roots", write, 0).err());
        assert_eq!(denied.unwrap(), Some(Errno(libc::EACCES)));
        assert_eq!(std::fs::read(dir.join("open/roots")).unwrap(), b"r", "not truncated");
        let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
        let opened = run_creating(&nobody, 0o077, || {
            writes::open_write(&handles, &root, b"/open/mine", create, 0o666)
        });
        let handle = opened.unwrap().unwrap().handle;
        files::Handles::close(&handles, handle).unwrap();
        let meta = std::fs::metadata(dir.join("open/mine")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
        let made = run_creating(&nobody, 0o027, || writes::make_dir(&root, b"/open/d", 0o777)).unwrap();
        assert_eq!(made, Ok(()));
        assert_eq!(std::fs::metadata(dir.join("open/d")).unwrap().mode() & 0o777, 0o750);
        assert_eq!(
            run_as(&nobody, || writes::unlink(&root, b"/open/roots", false)).unwrap(),
            Ok(()),
            "sticky-less dir"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_many_groups_are_refused() {
        let many = who(1, &vec![1; creds::MAX_GROUPS + 1], 0);
        assert_eq!(run_as(&many, || ()).err(), Some(Errno(libc::EINVAL)));
    }
}
