//! Acting on the app's behalf with the app's own credentials.
//!
//! Some calls kmirror must carry out itself on the local side: a path whose raw form the local
//! kernel would resolve differently (it leaves a pod directory with `..`), a datagram sent with
//! control messages. kmirror usually runs as root; doing such a call with kmirror's credentials
//! would let an unprivileged app read or create any file (a confused deputy). So the call runs
//! on a short-lived thread that first takes the calling thread's file-system uid and gid,
//! supplementary groups and effective capabilities ([`kmirror_protocol::creds`], the mechanism
//! the agent uses for pod files too); the thread ends after the call, so nothing leaks back.
//! Pod-file requests carry the same credentials to the agent ([`Credentials::identity`]).

use kmirror_protocol::{Identity, creds};
use std::io;

/// What the kernel checks a thread's file and socket operations against, read from
/// `/proc/<tid>/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Real, effective, saved and file-system uid.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    /// Applied to the mode of files the thread creates (shared by threads that share their
    /// file-system context).
    pub umask: u32,
}

/// The calling thread of a trapped call: who it is and which process it belongs to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tid: u32,
    pub tgid: u32,
    pub credentials: Credentials,
}

const REAL: usize = 0;
const FS: usize = 3;

impl Caller {
    pub fn of_thread(tid: u32) -> io::Result<Caller> {
        let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
        let (tgid, credentials) = parse_status(&status)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc status"))?;
        Ok(Caller { tid, tgid, credentials })
    }
}

impl Credentials {
    fn of_current_thread() -> io::Result<Credentials> {
        let status = std::fs::read_to_string("/proc/thread-self/status")?;
        parse_status(&status)
            .map(|(_, creds)| creds)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc status"))
    }

    /// The credentials `access(2)` checks against: the real uid and gid stand in for the
    /// file-system ones, and a non-root real uid has no effective capabilities (a root one has
    /// its permitted set), as the kernel's `do_faccessat` arranges.
    pub fn for_real_id_check(&self) -> Credentials {
        let mut creds = self.clone();
        creds.uids[FS] = self.uids[REAL];
        creds.gids[FS] = self.gids[REAL];
        creds.cap_effective = if self.uids[REAL] == 0 { self.cap_permitted } else { 0 };
        creds
    }

    /// What the agent checks a pod-file request with: these credentials' file-system ids,
    /// groups and effective capabilities (see [`Credentials::for_real_id_check`] for
    /// `access(2)`).
    pub fn identity(&self) -> Identity {
        Identity {
            uid: self.uids[FS],
            gid: self.gids[FS],
            groups: self.groups.clone(),
            caps: self.cap_effective,
        }
    }

    /// Whether a thread with `self` and one with `other` get the same answers from file and
    /// socket permission checks.
    fn checks_like(&self, other: &Credentials) -> bool {
        self.uids[FS] == other.uids[FS]
            && self.gids[FS] == other.gids[FS]
            && self.cap_effective == other.cap_effective
            && sorted(&self.groups) == sorted(&other.groups)
    }
}

fn sorted(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups
}

/// The thread group id and credentials in a `/proc/<tid>/status` text.
fn parse_status(status: &str) -> Option<(u32, Credentials)> {
    let field = |key: &str| crate::tracee::status_field(status, key);
    let ids = |key: &str| -> Option<[u32; 4]> {
        let parsed: Vec<u32> =
            field(key)?.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
        parsed.try_into().ok()
    };
    let caps = |key: &str| field(key).and_then(|hex| u64::from_str_radix(hex, 16).ok());
    let groups = field("Groups:")?.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
    Some((
        field("Tgid:")?.parse().ok()?,
        Credentials {
            uids: ids("Uid:")?,
            gids: ids("Gid:")?,
            groups,
            cap_effective: caps("CapEff:")?,
            cap_permitted: caps("CapPrm:")?,
            umask: u32::from_str_radix(field("Umask:")?, 8).ok()?,
        },
    ))
}

/// Whether an operation run by [`run_as`] may create files (then the app's umask applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creates {
    Nothing,
    Files,
}

/// Runs `op` with `creds` in force for its file and socket permission checks (and, if it
/// creates files, the app's umask). Without a difference that matters (the usual case: the app
/// runs as kmirror's own user) it runs right here; otherwise on a thread of its own that takes
/// the credentials first. Fails with the errno of a credential change kmirror is not allowed to
/// make: then it does nothing, rather than act with more rights than the app has.
pub fn run_as<R: Send>(
    creds: &Credentials,
    creates: Creates,
    op: impl FnOnce() -> R + Send,
) -> Result<R, i32> {
    let mine = own_credentials()?;
    let umask_differs = creates == Creates::Files && creds.umask != mine.umask;
    if creds.checks_like(mine) && !umask_differs {
        return Ok(op());
    }
    creds::on_own_thread(|| take(creds, umask_differs), op)
}

/// kmirror's own credentials, read once: nothing in kmirror changes them (only the short-lived
/// threads of [`run_as`] take others, and they end with their operation).
fn own_credentials() -> Result<&'static Credentials, i32> {
    static OWN: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();
    if let Some(own) = OWN.get() {
        return Ok(own);
    }
    let read = Credentials::of_current_thread().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    Ok(OWN.get_or_init(|| read))
}

/// Gives the calling thread `creds` for permission checks. Only this thread changes.
fn take(creds: &Credentials, umask: bool) -> Result<(), i32> {
    if umask {
        // The umask lives in the file-system context that kmirror's threads share: this thread
        // gets a copy of its own first.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(|e| e as i32)?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_retain(creds.umask));
    }
    creds::take(&creds::ThreadCredentials {
        fsuid: creds.uids[FS],
        fsgid: creds.gids[FS],
        groups: &creds.groups,
        effective: creds.cap_effective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\n\
        Pid:\t4243\nPPid:\t1\nUid:\t65534\t65534\t65534\t65534\nGid:\t65533\t65533\t65533\t65532\n\
        FDSize:\t64\nGroups:\t10 20 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000400\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn status_gives_ids_groups_and_capabilities() {
        let (tgid, creds) = parse_status(STATUS).unwrap();
        assert_eq!(tgid, 4242);
        assert_eq!(creds.uids, [65534; 4]);
        assert_eq!(creds.gids, [65533, 65533, 65533, 65532]);
        assert_eq!(creds.groups, vec![10, 20]);
        assert_eq!(creds.cap_effective, 0x400);
        assert_eq!(creds.umask, 0o022);
        assert!(parse_status("Tgid:\t1\n").is_none());
    }

    #[test]
    fn access_checks_use_the_real_ids() {
        let (_, mut creds) = parse_status(STATUS).unwrap();
        creds.uids = [1000, 0, 0, 0];
        creds.cap_effective = u64::MAX;
        let real = creds.for_real_id_check();
        assert_eq!(real.uids[FS], 1000);
        assert_eq!(real.cap_effective, 0, "a non-root real uid has no capabilities for access(2)");
        creds.uids = [0, 1000, 1000, 1000];
        creds.cap_permitted = 0xff;
        assert_eq!(creds.for_real_id_check().cap_effective, 0xff);
    }

    #[test]
    fn an_operation_runs_with_the_given_credentials_and_leaves_ours_alone() {
        let mine = Credentials::of_current_thread().unwrap();
        // Our own credentials: no thread needed, the operation sees what we are.
        let same = run_as(&mine, Creates::Nothing, || Credentials::of_current_thread().unwrap()).unwrap();
        assert!(same.checks_like(&mine));
        assert_eq!(mine.uids[FS], 0, "changing to another user needs root: run the tests as root");
        let nobody = Credentials {
            uids: [65534; 4],
            gids: [65534; 4],
            groups: vec![],
            cap_effective: 0,
            cap_permitted: 0,
            umask: 0o077,
        };
        let dir = std::env::temp_dir().join(format!("kmirror-caller-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        let created = dir.join("made-as-nobody");
        let seen = run_as(&nobody, Creates::Files, || {
            std::fs::write(&created, b"x").unwrap();
            let creds = Credentials::of_current_thread().unwrap();
            let shadow = std::fs::File::open("/etc/shadow").map_err(|e| e.raw_os_error());
            (creds, shadow.err())
        })
        .unwrap();
        assert_eq!(seen.0.uids[FS], 65534);
        assert_eq!(seen.0.gids[FS], 65534);
        assert_eq!(seen.0.cap_effective, 0);
        assert_eq!(seen.1, Some(Some(libc::EACCES)), "nobody may not read /etc/shadow");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&created).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600), "owned by nobody, with its umask");
        std::fs::remove_dir_all(&dir).unwrap();
        let after = Credentials::of_current_thread().unwrap();
        assert_eq!(after, mine, "the calling thread keeps its credentials");
    }
}
