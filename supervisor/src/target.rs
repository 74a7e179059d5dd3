//! What `--target` names, and the checks a local target needs before a session starts.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A process on this machine (the "local pod").
    Pid(u32),
    /// The main process of a systemd unit: of the system manager, or with `user` of the
    /// calling user's (`systemctl --user`).
    Unit { name: String, user: bool },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "unknown target `{0}`: use pid/<PID> (a process on this machine), unit/<NAME> or \
         user-unit/<NAME> (a systemd unit's main process)"
    )]
    Unknown(String),
    #[error("`{0}`: {1} targets are not supported yet; use pid/<PID> of a process on this machine")]
    Unsupported(String, &'static str),
    #[error("`{0}` is not a process id: use pid/<PID> with a number, e.g. pid/4242")]
    BadPid(String),
    #[error("process {0} does not exist (is it running? check with `ps -p {0}`)")]
    NoSuchProcess(u32),
    #[error("`{0}` names no unit: use unit/<NAME> or user-unit/<NAME>, e.g. unit/nginx.service")]
    BadUnit(String),
    #[error("cannot ask systemd about {0}: {1}")]
    Systemctl(String, String),
    #[error("{0} is not loaded in {1} (check the name with `systemctl{2} list-units`)")]
    NoSuchUnit(String, &'static str, &'static str),
    #[error("{0} has no main process (it is {1}); start it with `systemctl{2} start {0}`")]
    UnitNotRunning(String, String, &'static str),
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
            Target::Unit { name, user: false } => write!(f, "unit/{name}"),
            Target::Unit { name, user: true } => write!(f, "user-unit/{name}"),
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
        "unit" | "user-unit" => {
            let valid = !rest.is_empty() && !rest.starts_with('-') && !rest.contains(['/', ' ', '\t', '\n']);
            if !valid {
                return Err(TargetError::BadUnit(spec.into()));
            }
            Ok(Target::Unit { name: rest.into(), user: kind == "user-unit" })
        }
        _ => Err(TargetError::Unknown(spec.into())),
    }
}

/// What `systemctl show -p LoadState -p ActiveState -p MainPID` printed, judged: the unit's
/// main process, or why there is none.
pub fn unit_main_pid(shown: &str, name: &str, user: bool) -> Result<u32, TargetError> {
    let field = |key: &str| shown.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).unwrap_or("");
    let (manager, flag) =
        if user { ("your user's service manager", " --user") } else { ("the system's service manager", "") };
    if field("LoadState") != "loaded" {
        return Err(TargetError::NoSuchUnit(name.into(), manager, flag));
    }
    match field("MainPID").parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(TargetError::UnitNotRunning(name.into(), field("ActiveState").to_string(), flag)),
    }
}

/// Asks systemd for a unit's main process.
fn ask_systemd(name: &str, user: bool) -> Result<u32, TargetError> {
    let mut cmd = std::process::Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    cmd.args(["show", "-p", "LoadState", "-p", "ActiveState", "-p", "MainPID", "--", name]);
    let shown = |e: &dyn fmt::Display| TargetError::Systemctl(name.into(), e.to_string());
    let out =
        cmd.output().map_err(|e| shown(&format!("cannot run systemctl ({e}); is systemd installed?")))?;
    if !out.status.success() {
        return Err(shown(&String::from_utf8_lossy(&out.stderr).trim()));
    }
    unit_main_pid(&String::from_utf8_lossy(&out.stdout), name, user)
}

/// The process a local target names, checked to be one a local agent can serve.
pub fn resolve_local(target: &Target, euid: u32) -> Result<u32, TargetError> {
    let pid = match target {
        Target::Pid(pid) => *pid,
        Target::Unit { name, user } => ask_systemd(name, *user)?,
    };
    check_local(pid, euid)?;
    Ok(pid)
}

/// Checks that process `pid` can be served by a local agent.
fn check_local(pid: u32, euid: u32) -> Result<(), TargetError> {
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
        assert_eq!(
            parse("unit/nginx.service"),
            Ok(Target::Unit { name: "nginx.service".into(), user: false })
        );
        assert_eq!(parse("user-unit/db").unwrap().to_string(), "user-unit/db");
        for bad in ["unit/", "unit/a b", "unit/--user", "user-unit/a/b"] {
            assert_eq!(parse(bad), Err(TargetError::BadUnit(bad.into())), "{bad}");
        }
        assert_eq!(parse("foo/1"), Err(TargetError::Unknown("foo/1".into())));
        assert_eq!(Target::Pid(7).to_string(), "pid/7");
    }

    #[test]
    fn local_checks() {
        assert_eq!(
            resolve_local(&Target::Pid(u32::MAX - 1), 0),
            Err(TargetError::NoSuchProcess(u32::MAX - 1))
        );
        let me = std::process::id();
        assert_eq!(resolve_local(&Target::Pid(me), 1000), Err(TargetError::NeedsRoot(me)));
        assert_eq!(resolve_local(&Target::Pid(me), 0), Ok(me));
    }

    #[test]
    fn a_units_main_process_or_why_there_is_none() {
        let shown = "LoadState=loaded\nActiveState=active\nMainPID=4242\n";
        assert_eq!(unit_main_pid(shown, "db.service", false), Ok(4242));
        let stopped = "LoadState=loaded\nActiveState=inactive\nMainPID=0\n";
        let e = unit_main_pid(stopped, "db.service", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "db.service has no main process (it is inactive); start it with `systemctl --user start db.service`"
        );
        let missing = "LoadState=not-found\nActiveState=inactive\nMainPID=0\n";
        assert!(matches!(unit_main_pid(missing, "x", false), Err(TargetError::NoSuchUnit(..))));
    }
}
