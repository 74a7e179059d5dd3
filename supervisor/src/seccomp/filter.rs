//! Building the seccomp program with libseccomp.
//!
//! The program is built in the parent and only *installed* in the child after fork, with a raw
//! `seccomp(2)` call: between fork and exec only async-signal-safe calls are allowed, and
//! Debian's libseccomp 2.5 cannot request `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` itself.

use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
use std::io::{Read, Seek};

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("libseccomp: {0}")]
    Seccomp(#[from] libseccomp::error::SeccompError),
    #[error("cannot export the seccomp program: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot export the seccomp program: {0}")]
    Memfd(#[from] memfd::Error),
}

/// A classic BPF program ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub struct Program {
    pub instructions: Vec<libc::sock_filter>,
}

/// Builds a program that notifies the listener on `notify`, fails `enosys` with ENOSYS without
/// a notification, allows everything else, and fails every call from a non-native ABI (i386,
/// x32) with ENOSYS rather than letting it slip past the trap list.
/// `notify_if_arg_set` lists calls trapped only when the given argument is non-zero (e.g.
/// `sendto` only with a destination address), `notify_if_args_equal` calls trapped only when
/// the given 32-bit arguments have the given values (`getsockopt` of one option), so the common
/// case costs no notification.
///
/// `trace` makes the trapped calls `SECCOMP_RET_TRACE` instead of `SECCOMP_RET_USER_NOTIF`: the
/// same program for the ptrace interceptor, installed without a listener (docs/ptrace.md).
pub fn build(
    notify: &[&str],
    notify_if_arg_set: &[(&str, u32)],
    notify_if_args_equal: &[(&str, &[(u32, u64)])],
    enosys: &[&str],
    trace: bool,
) -> Result<Program, FilterError> {
    let trap = if trace { ScmpAction::Trace(0) } else { ScmpAction::Notify };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    ctx.set_act_badarch(ScmpAction::Errno(libc::ENOSYS))?;
    for name in notify {
        ctx.add_rule(trap, ScmpSyscall::from_name(name)?)?;
    }
    for &(name, arg) in notify_if_arg_set {
        let set = libseccomp::ScmpArgCompare::new(arg, libseccomp::ScmpCompareOp::NotEqual, 0);
        ctx.add_rule_conditional(trap, ScmpSyscall::from_name(name)?, &[set])?;
    }
    for &(name, args) in notify_if_args_equal {
        // Only the low 32 bits: the kernel reads these arguments as ints.
        let equal: Vec<_> = args
            .iter()
            .map(|&(arg, value)| {
                libseccomp::ScmpArgCompare::new(
                    arg,
                    libseccomp::ScmpCompareOp::MaskedEqual(0xffff_ffff),
                    value,
                )
            })
            .collect();
        ctx.add_rule_conditional(trap, ScmpSyscall::from_name(name)?, &equal)?;
    }
    for name in enosys {
        ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), ScmpSyscall::from_name(name)?)?;
    }
    let mut file = memfd::MemfdOptions::default().create("kmirror-seccomp-bpf")?.into_file();
    ctx.export_bpf(&file)?;
    file.rewind()?;
    let mut raw = Vec::new();
    file.read_to_end(&mut raw)?;
    Ok(Program { instructions: parse(&raw) })
}

/// Splits libseccomp's export (native-endian `struct sock_filter` records) into instructions.
fn parse(raw: &[u8]) -> Vec<libc::sock_filter> {
    raw.chunks_exact(8)
        .map(|r| libc::sock_filter {
            code: u16::from_ne_bytes([r[0], r[1]]),
            jt: r[2],
            jf: r[3],
            k: u32::from_ne_bytes([r[4], r[5], r[6], r[7]]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_program_for_the_trap_list() {
        let program = build(
            &["connect", "openat"],
            &[("sendto", 4)],
            &[("getsockopt", &[(1, 1), (2, 4)])],
            &["io_uring_setup"],
            false,
        )
        .unwrap();
        assert!(program.instructions.len() > 6);
        // Return instructions carry the actions; USER_NOTIF and ERRNO|ENOSYS must both appear.
        let returns: Vec<u32> = program
            .instructions
            .iter()
            .filter(|i| i.code == (libc::BPF_RET | libc::BPF_K) as u16)
            .map(|i| i.k)
            .collect();
        assert!(returns.contains(&libc::SECCOMP_RET_USER_NOTIF));
        assert!(returns.contains(&(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32)));
        assert!(returns.contains(&libc::SECCOMP_RET_ALLOW));
    }

    #[test]
    fn the_ptrace_program_traces_what_the_listener_program_notifies() {
        let returns = |trace: bool| -> Vec<u32> {
            build(&["connect", "openat"], &[("sendto", 4)], &[], &["io_uring_setup"], trace)
                .unwrap()
                .instructions
                .iter()
                .filter(|i| i.code == (libc::BPF_RET | libc::BPF_K) as u16)
                .map(|i| i.k)
                .collect()
        };
        let (notify, trace) = (returns(false), returns(true));
        assert!(trace.contains(&libc::SECCOMP_RET_TRACE) && !trace.contains(&libc::SECCOMP_RET_USER_NOTIF));
        // The same program otherwise: every notification became a trace, nothing else moved.
        let as_trace: Vec<u32> = notify
            .iter()
            .map(|&k| if k == libc::SECCOMP_RET_USER_NOTIF { libc::SECCOMP_RET_TRACE } else { k })
            .collect();
        assert_eq!(as_trace, trace);
    }

    #[test]
    fn unknown_syscall_names_are_errors() {
        assert!(build(&["no_such_call"], &[], &[], &[], false).is_err());
    }
}
