//! What `--target` names, and the checks a local target needs before a session starts.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A process on this machine (the "local pod").
    Pid(u32),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target `{0}`: use pid/<PID> (a process on this machine)")]
    Unknown(String),
    #[error("`{0}`: {1} targets are not supported yet; use pid/<PID> of a process on this machine")]
    Unsupported(String, &'static str),
    #[error("`{0}` is not a process id: use pid/<PID> with a number, e.g. pid/4242")]
    BadPid(String),
    #[error("process {0} does not exist (is it running? check with `ps -p {0}`)")]
    NoSuchProcess(u32),
    #[error(
        "a local target needs root: the agent enters the network namespace of process {0} and \
         reads its files. Run `sudo kmirror run ...`"
    )]
    NeedsRoot(u32),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid/{pid}"),
        }
    }
}

pub fn parse(spec: &str) -> Result<Target, TargetError> {
    let (kind, rest) = spec.split_once('/').ok_or_else(|| TargetError::Unknown(spec.into()))?;
    match kind {
        "pid" => rest.parse().map(Target::Pid).map_err(|_| TargetError::BadPid(spec.into())),
        "pod" | "deployment" | "statefulset" | "job" => {
            Err(TargetError::Unsupported(spec.into(), "Kubernetes"))
        }
        "unit" => Err(TargetError::Unsupported(spec.into(), "systemd unit")),
        _ => Err(TargetError::Unknown(spec.into())),
    }
}

/// Checks that a local target can be served by a local agent.
pub fn check_local(target: &Target, euid: u32) -> Result<(), TargetError> {
    let Target::Pid(pid) = *target;
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(TargetError::NoSuchProcess(pid));
    }
    if euid != 0 {
        return Err(TargetError::NeedsRoot(pid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_with_clear_errors() {
        assert_eq!(parse("pid/42"), Ok(Target::Pid(42)));
        assert_eq!(parse("pid/x"), Err(TargetError::BadPid("pid/x".into())));
        assert_eq!(parse("42"), Err(TargetError::Unknown("42".into())));
        assert!(matches!(parse("pod/web"), Err(TargetError::Unsupported(_, "Kubernetes"))));
        assert_eq!(parse("foo/1"), Err(TargetError::Unknown("foo/1".into())));
        assert_eq!(Target::Pid(7).to_string(), "pid/7");
    }

    #[test]
    fn local_checks() {
        assert_eq!(check_local(&Target::Pid(u32::MAX - 1), 0), Err(TargetError::NoSuchProcess(u32::MAX - 1)));
        let me = std::process::id();
        assert_eq!(check_local(&Target::Pid(me), 1000), Err(TargetError::NeedsRoot(me)));
        assert_eq!(check_local(&Target::Pid(me), 0), Ok(()));
    }
}
