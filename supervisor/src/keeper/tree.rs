//! Finding and signalling every descendant of a process through `/proc`.
//!
//! `/proc/<pid>/task/<tid>/children` lists the children each thread forked; walking it from
//! a root finds the whole tree. The walk is not atomic: a process may fork after its line was
//! read. Callers that must end a tree therefore walk again until the root has no child left
//! (a SIGKILLed process forks no more, and the kernel aborts a fork that a fatal signal
//! interrupts, so each round leaves fewer to find).
//!
//! A pid read from `/proc` may name another process by the time it is signalled (the process
//! exited, was reaped and its number reused). So each process is signalled through a pidfd
//! opened first and then checked: its parent must still be the process it was found under.
//! If the check reads a newer process than the pidfd names, the pidfd names a process that is
//! gone and the signal goes nowhere.

use std::collections::VecDeque;
use std::os::fd::AsFd;

/// One process found under the root, and the process it was found under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub pid: u32,
    pub parent: u32,
}

/// The pids in a `children` file.
pub fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Parent pid and process group from a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<(u32, i32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// Children of every thread of `pid` (none if it is gone).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|text| parse_children(&text))
        .collect()
}

/// Every process under `root` at the time of the walk, parents before their children.
/// The subtrees of `skip` (processes directly under `root`) are left out.
pub fn descendants(root: u32, skip: &[u32]) -> Vec<Member> {
    let mut found = Vec::new();
    let mut queue: VecDeque<u32> = VecDeque::from([root]);
    while let Some(parent) = queue.pop_front() {
        for pid in children_of(parent) {
            if parent == root && skip.contains(&pid) {
                continue;
            }
            // A cycle is impossible in a process tree, but a bound on a walk driven by files
            // is cheap: pid numbers are bounded by pid_max.
            if found.len() > 4 << 20 {
                return found;
            }
            found.push(Member { pid, parent });
            queue.push_back(pid);
        }
    }
    found
}

/// Sends `sig` to `member` if it is still the process that was found (see the module docs).
/// With `unless_group`, a process in that process group is left alone. True if sent.
pub fn signal_member(member: Member, sig: i32, unless_group: Option<i32>) -> bool {
    let Ok(pidfd) = crate::sys::pidfd_open(member.pid, 0) else { return false };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", member.pid)) else { return false };
    let Some((ppid, pgrp)) = parse_stat(&stat) else { return false };
    if ppid != member.parent || unless_group == Some(pgrp) {
        return false;
    }
    crate::sys::pidfd_send_signal(pidfd.as_fd(), sig).is_ok()
}

/// Sends `sig` to every process under `root` (see [`descendants`] for `skip`). Returns how
/// many were found.
pub fn signal_all(root: u32, skip: &[u32], sig: i32, unless_group: Option<i32>) -> usize {
    let members = descendants(root, skip);
    // Deepest first (the walk lists parents before children): a child is signalled while the
    // parent it was found under still lives, before the parent's death reparents it and its
    // parent check would skip it.
    for &member in members.iter().rev() {
        signal_member(member, sig, unless_group);
    }
    members.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_any_command_name() {
        assert_eq!(parse_stat("42 (sleep) S 7 42 42 0 -1 4194304"), Some((7, 42)));
        assert_eq!(parse_stat("43 (a) b) (c) R 1 5 5 0"), Some((1, 5)));
        assert_eq!(parse_stat("44 (x"), None);
        assert_eq!(parse_children("12 345 \n"), vec![12, 345]);
        assert!(parse_children("").is_empty());
    }

    #[test]
    fn a_tree_is_found_and_signalled_only_where_it_was_found() {
        // A shell that starts a child shell that starts a sleep: three levels under us. The
        // sleeps print their pids so the test knows them without trusting the walk.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 30 & echo $!; wait' & sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(shell.stdout.take().unwrap()).lines();
        let pids: Vec<u32> = (0..2).map(|_| lines.next().unwrap().unwrap().parse().unwrap()).collect();
        let me = std::process::id();
        let found = descendants(me, &[]);
        assert_eq!(descendants(shell.id(), &[]).len(), 3, "two sleeps and a shell under the shell");
        for pid in &pids {
            assert!(found.iter().any(|m| m.pid == *pid), "{pid} not in {found:?}");
        }
        assert!(found.iter().any(|m| m.pid == shell.id() && m.parent == me));
        // Skipping the shell skips everything under it.
        assert!(descendants(me, &[shell.id()]).iter().all(|m| m.pid != pids[0] && m.pid != pids[1]));
        // A member whose recorded parent is wrong is not signalled.
        assert!(!signal_member(Member { pid: pids[0], parent: 1 }, 0, None));
        assert!(signal_member(Member { pid: shell.id(), parent: me }, 0, None));
        // Nor one in the excluded process group (the shell shares ours).
        let group = nix::unistd::getpgrp().as_raw();
        assert!(!signal_member(Member { pid: shell.id(), parent: me }, 0, Some(group)));

        // Ended from the shell down (other tests of this process have children of their own,
        // so the walk starts below us): the sleeps first, then the shell.
        assert_eq!(signal_all(shell.id(), &[], libc::SIGKILL, None), 3);
        shell.kill().unwrap();
        shell.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for pid in pids {
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(std::time::Instant::now() < deadline, "{pid} survived SIGKILL");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(stat.is_empty() || stat.contains(") Z "), "{pid} still runs: {stat}");
        }
    }
}
