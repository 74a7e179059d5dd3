//! Working directories in the pod: `chdir` into a pod directory (`read` and `write` modes).
//!
//! No system call changes another process's working directory, and the emulate-never-rewrite
//! rule (and the length of any local stand-in path) forbids rewriting the app's path argument,
//! so the kernel cannot be made to `chdir` into a pod directory for the app. kmirror keeps it
//! instead: a `chdir` to a pod directory (checked in the pod as the app: it must be a directory
//! the app may search) is answered 0 and recorded for the calling process; the kernel's own
//! working directory stays where it was. Relative paths of the calls kmirror traps (`open`,
//! the `stat` family, `access`, `readlink`, and the write family) then resolve from the pod
//! directory and `getcwd` names it. Calls kmirror does not trap (`execve`, `chmod`, ...) still
//! resolve a relative path from the kernel's directory. A `chdir` to a local directory goes to
//! the kernel and ends the record.
//!
//! Children inherit the working directory at `fork`: a process without a record of its own
//! takes its nearest recorded ancestor's, if that record is older than the process (its
//! start time), so a job started before the `cd` keeps the kernel's directory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A process's working directory as kmirror knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// The pod directory, or `None` after a `chdir` to a local one (the kernel's, then).
    pod_dir: Option<Vec<u8>>,
    /// When it was set, in the clock ticks of `/proc/<pid>/stat`'s start times.
    since: u64,
    /// The start time of the process it belongs to (a reused pid is another process).
    owner_start: u64,
}

/// What `/proc/<pid>/stat` tells about a process: its parent and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    pub start: u64,
}

/// Parses `/proc/<pid>/stat` (the command name, in parentheses, may hold anything).
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the name: state (3), ppid (4), ..., starttime (22).
    Some(ProcStat { ppid: fields.get(1)?.parse().ok()?, start: fields.get(19)?.parse().ok()? })
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks since boot, in the unit of `/proc/<pid>/stat` start times.
fn now_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hz = *TICKS.get_or_init(|| {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten();
        ticks.and_then(|t| u64::try_from(t).ok()).unwrap_or(100)
    });
    let Ok(ts) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) else { return 0 };
    ts.tv_sec() as u64 * hz + ts.tv_nsec() as u64 * hz / 1_000_000_000
}

#[derive(Default)]
pub struct Cwds {
    records: Mutex<HashMap<u32, Record>>,
    any: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many ancestors are looked at for an inherited working directory.
const MAX_DEPTH: usize = 64;

impl Cwds {
    /// Whether any process ever entered a pod directory (until then nothing is looked up).
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Records that process `tgid` changed its working directory to `pod_dir` (`None`: a
    /// local one, the kernel's).
    pub fn set(&self, tgid: u32, pod_dir: Option<Vec<u8>>) {
        let Some(own) = proc_stat(tgid) else { return };
        if pod_dir.is_some() {
            self.any.store(true, Ordering::Relaxed);
        } else if !self.any() {
            return;
        }
        let record = Record { pod_dir, since: now_ticks(), owner_start: own.start };
        lock(&self.records).insert(tgid, record);
    }

    /// The pod directory process `tgid` works in, if any (its own or inherited).
    pub fn pod_dir(&self, tgid: u32) -> Option<Vec<u8>> {
        if !self.any() {
            return None;
        }
        let own = proc_stat(tgid)?;
        let records = lock(&self.records);
        if let Some(r) = records.get(&tgid).filter(|r| r.owner_start == own.start) {
            return r.pod_dir.clone();
        }
        let mut pid = own.ppid;
        for _ in 0..MAX_DEPTH {
            let ancestor = proc_stat(pid)?;
            if let Some(r) = records.get(&pid).filter(|r| r.owner_start == ancestor.start) {
                return inherited(r, own.start);
            }
            if ancestor.ppid <= 1 {
                return None;
            }
            pid = ancestor.ppid;
        }
        None
    }
}

/// What a process that started at `start` inherited from an ancestor's record: the record's
/// directory if it was set before the process started; otherwise the kernel's.
fn inherited(record: &Record, start: u64) -> Option<Vec<u8>> {
    (record.since <= start).then(|| record.pod_dir.clone()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_are_parsed_whatever_the_name() {
        let line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 \
                    200 18446744073709551615";
        assert_eq!(parse_stat(line), Some(ProcStat { ppid: 17, start: 98765 }));
        assert_eq!(parse_stat("garbage"), None);
        let own = proc_stat(std::process::id()).unwrap();
        assert!(own.start <= now_ticks(), "start times and now share a clock");
    }

    #[test]
    fn children_inherit_only_what_was_set_before_they_started() {
        let at = |since| Record { pod_dir: Some(b"/data".to_vec()), since, owner_start: 1 };
        assert_eq!(inherited(&at(10), 10), Some(b"/data".to_vec()));
        assert_eq!(inherited(&at(11), 10), None, "a job started before the cd");
        let local = Record { pod_dir: None, since: 5, owner_start: 1 };
        assert_eq!(inherited(&local, 10), None);
    }

    #[test]
    fn a_recorded_process_and_its_children_resolve_in_the_pod_directory() {
        let cwds = Cwds::default();
        let me = std::process::id();
        assert_eq!(cwds.pod_dir(me), None);
        cwds.set(me, Some(b"/data".to_vec()));
        assert_eq!(cwds.pod_dir(me), Some(b"/data".to_vec()));
        // A child started after the record inherits it (start times tick at 100 Hz).
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let inherited = cwds.pod_dir(child.id());
        cwds.set(child.id(), None);
        let after_local_cd = cwds.pod_dir(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(inherited, Some(b"/data".to_vec()));
        assert_eq!(after_local_cd, None);
        cwds.set(me, None);
        assert_eq!(cwds.pod_dir(me), None);
    }
}
