//! What a service manager (systemd, `systemd-socket-activate`, s6, ...) handed to kmirror and
//! how it reaches the app: sockets passed by socket activation (`LISTEN_FDS`), the notification
//! socket (`NOTIFY_SOCKET`) and the watchdog (`WATCHDOG_PID`/`WATCHDOG_USEC`).
//!
//! Under `systemd-run kmirror run -- app`, kmirror is the unit's main process, so the manager
//! addressed these to kmirror's pid. The app is kmirror's child: its variables must name the
//! app's own pid (libsystemd, go-systemd and python-systemd ignore them otherwise), and its
//! notifications must reach the manager from kmirror's pid (the default `NotifyAccess=main`
//! drops the rest), which kmirror's relay does.

use std::collections::BTreeMap;

/// What the service manager handed to kmirror.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Handover {
    /// Descriptors 3..3+n passed by socket activation.
    pub listen_fds: u32,
    /// Where notifications go (`NOTIFY_SOCKET`).
    pub notify_socket: Option<Vec<u8>>,
    /// The watchdog is kmirror's (`WATCHDOG_PID` is kmirror's pid): it becomes the app's.
    pub watchdog: bool,
}

/// The most descriptors taken from socket activation: far more than any unit passes, and low
/// enough that a garbled `LISTEN_FDS` cannot make kmirror walk a million descriptors.
pub const MAX_LISTEN_FDS: u32 = 4096;

/// The first descriptor socket activation passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// A variable whose value the app's launcher replaces with the app's pid; as wide as any pid
/// (`pid_max` is at most 2^22, seven digits).
pub const PID_PLACEHOLDER: &[u8] = b"0000000000";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoverError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors (at most {MAX_LISTEN_FDS})")]
    ListenFds(String),
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

/// Reads the handover from kmirror's own environment (`own_pid` is kmirror's pid). Variables
/// addressed to another process (a `LISTEN_PID` that is not ours: inherited through a shell
/// that did not unset it) hand over nothing, as `sd_listen_fds` would say.
pub fn read(env: &BTreeMap<Vec<u8>, Vec<u8>>, own_pid: u32) -> Result<Handover, HandoverError> {
    let ours = |name: &[u8]| env.get(name).is_some_and(|v| text(v).trim().parse::<u32>() == Ok(own_pid));
    let mut handover = Handover::default();
    if ours(b"LISTEN_PID")
        && let Some(count) = env.get(b"LISTEN_FDS".as_slice())
    {
        handover.listen_fds = match text(count).trim().parse::<u32>() {
            Ok(n) if n <= MAX_LISTEN_FDS => n,
            _ => return Err(HandoverError::ListenFds(text(count))),
        };
    }
    handover.notify_socket = env.get(b"NOTIFY_SOCKET".as_slice()).filter(|v| !v.is_empty()).cloned();
    handover.watchdog = ours(b"WATCHDOG_PID");
    Ok(handover)
}

/// The variables of the service-manager contract in the app's environment. `env` holds the
/// app's environment with kmirror's own values of these (they are local-only, see
/// [`super::env`]); `relay` is the notification socket kmirror relays from, if any. Returns
/// the names whose value the launcher sets to the app's pid.
pub fn app_env(
    env: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    handover: &Handover,
    relay: Option<&[u8]>,
) -> Vec<Vec<u8>> {
    let mut own_pid = Vec::new();
    if handover.listen_fds > 0 {
        env.insert(b"LISTEN_PID".to_vec(), PID_PLACEHOLDER.to_vec());
        own_pid.push(b"LISTEN_PID".to_vec());
    } else if env.contains_key(b"LISTEN_PID".as_slice()) {
        // Addressed to some other process: no more the app's than kmirror's.
        for name in [&b"LISTEN_PID"[..], b"LISTEN_FDS", b"LISTEN_FDNAMES"] {
            env.remove(name);
        }
    }
    if handover.watchdog {
        env.insert(b"WATCHDOG_PID".to_vec(), PID_PLACEHOLDER.to_vec());
        own_pid.push(b"WATCHDOG_PID".to_vec());
    }
    if let Some(relay) = relay {
        env.insert(b"NOTIFY_SOCKET".to_vec(), relay.to_vec());
    }
    own_pid
}

/// Where a `NOTIFY_SOCKET` value points, as `sd_notify` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    /// A socket file.
    Path(Vec<u8>),
    /// `@name`: the abstract namespace (without the `@`).
    Abstract(Vec<u8>),
    /// Something kmirror does not relay (`vsock:...`, a relative path): the app gets it as it is.
    Other,
}

pub fn notify_address(value: &[u8]) -> NotifyAddress {
    match value.first() {
        Some(b'/') => NotifyAddress::Path(value.to_vec()),
        Some(b'@') if value.len() > 1 => NotifyAddress::Abstract(value[1..].to_vec()),
        _ => NotifyAddress::Other,
    }
}

/// Writes `pid` in decimal over the start of `slot` (a [`PID_PLACEHOLDER`] value inside a
/// C string), ending it with a NUL. Returns false, changing nothing, if it does not fit.
/// Allocation-free: it runs between fork and exec.
pub fn write_pid(slot: &mut [u8], pid: u32) -> bool {
    let mut digits = [0u8; 10];
    let mut n = pid;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if len + 1 > slot.len() {
        return false;
    }
    for i in 0..len {
        slot[i] = digits[len - 1 - i];
    }
    slot[len] = 0;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        vars.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn socket_activation_for_us_is_taken_and_rewritten_for_the_app() {
        let ours = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "http:admin")]);
        let handover = read(&ours, 42).unwrap();
        assert_eq!(handover.listen_fds, 2);
        let mut app = ours.clone();
        let own = app_env(&mut app, &handover, None);
        assert_eq!(own, vec![b"LISTEN_PID".to_vec()]);
        assert_eq!(app[b"LISTEN_PID".as_slice()], PID_PLACEHOLDER);
        assert_eq!(app[b"LISTEN_FDS".as_slice()], b"2");
        assert_eq!(app[b"LISTEN_FDNAMES".as_slice()], b"http:admin");
    }

    #[test]
    fn socket_activation_for_another_process_reaches_nobody() {
        let theirs = env(&[("LISTEN_PID", "41"), ("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "x")]);
        let handover = read(&theirs, 42).unwrap();
        assert_eq!(handover.listen_fds, 0);
        let mut app = theirs.clone();
        assert!(app_env(&mut app, &handover, None).is_empty());
        assert!(app.is_empty(), "{app:?}");
    }

    #[test]
    fn a_garbled_count_is_an_error_not_a_walk_over_every_descriptor() {
        for bad in ["-1", "lots", "4097", ""] {
            let vars = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", bad)]);
            assert!(read(&vars, 42).is_err(), "{bad:?}");
        }
        assert_eq!(read(&env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "0")]), 42).unwrap().listen_fds, 0);
    }

    #[test]
    fn watchdog_and_notify_socket() {
        let vars = env(&[("WATCHDOG_PID", "42"), ("WATCHDOG_USEC", "5000000"), ("NOTIFY_SOCKET", "/run/n")]);
        let handover = read(&vars, 42).unwrap();
        assert!(handover.watchdog);
        assert_eq!(handover.notify_socket.as_deref(), Some(&b"/run/n"[..]));
        let mut app = vars.clone();
        let own = app_env(&mut app, &handover, Some(b"/tmp/k/notify"));
        assert_eq!(own, vec![b"WATCHDOG_PID".to_vec()]);
        assert_eq!(app[b"NOTIFY_SOCKET".as_slice()], b"/tmp/k/notify");
        assert_eq!(app[b"WATCHDOG_USEC".as_slice()], b"5000000");
        // Another process's watchdog stays as it is: the app's pid never matches it.
        assert!(!read(&env(&[("WATCHDOG_PID", "7")]), 42).unwrap().watchdog);
    }

    #[test]
    fn notify_addresses() {
        assert_eq!(
            notify_address(b"/run/systemd/notify"),
            NotifyAddress::Path(b"/run/systemd/notify".to_vec())
        );
        assert_eq!(notify_address(b"@sd-notify"), NotifyAddress::Abstract(b"sd-notify".to_vec()));
        assert_eq!(notify_address(b"vsock:2:1234"), NotifyAddress::Other);
        assert_eq!(notify_address(b"@"), NotifyAddress::Other);
    }

    #[test]
    fn pids_are_written_over_the_placeholder() {
        let mut slot = PID_PLACEHOLDER.to_vec();
        assert!(write_pid(&mut slot, 4194304));
        assert_eq!(&slot[..8], b"4194304\0");
        let mut slot = PID_PLACEHOLDER.to_vec();
        assert!(write_pid(&mut slot, 7));
        assert_eq!(&slot[..2], b"7\0");
        assert!(write_pid(&mut slot, 999_999_999));
        assert!(!write_pid(&mut [0u8; 3], 1234));
    }
}
