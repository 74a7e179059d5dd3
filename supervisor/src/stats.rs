//! Counters of trapped calls, written at exit when `KMIRROR_STATS_FILE` names a file. Tests use
//! them to prove, for example, that each connect is notified exactly once under Go's signal
//! storms; they cost one relaxed atomic increment per notification.

use std::sync::atomic::{AtomicU64, Ordering};

const SLOTS: usize = 512;
static BY_SYSCALL: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

pub fn count(nr: i64) {
    if let Some(slot) = usize::try_from(nr).ok().and_then(|i| BY_SYSCALL.get(i)) {
        slot.fetch_add(1, Ordering::Relaxed);
    }
}

/// `name count` lines for every trapped call seen at least once.
pub fn report(names: &[&str]) -> String {
    let mut out = String::new();
    for name in names {
        if let Ok(sys) = libseccomp::ScmpSyscall::from_name(name) {
            let nr = i32::from(sys) as usize;
            let n = BY_SYSCALL.get(nr).map_or(0, |c| c.load(Ordering::Relaxed));
            out.push_str(&format!("{name} {n}\n"));
        }
    }
    out
}

pub fn write_if_requested(names: &[&str]) {
    if let Some(path) = std::env::var_os("KMIRROR_STATS_FILE")
        && let Err(e) = std::fs::write(&path, report(names))
    {
        eprintln!("kmirror: cannot write stats to {}: {e}", path.to_string_lossy());
    }
}
