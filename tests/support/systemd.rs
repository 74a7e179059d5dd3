//! A real systemd service manager for tests, contained so that it touches nothing of the host's.
//!
//! kmirror's card names `systemd-run --wait -- kmirror run ...` as a use, but the machines the
//! suite runs on need not boot with systemd (this VM's PID 1 is not systemd). [`UserManager`]
//! starts Debian's own `systemd --user` for root instead, which runs transient units exactly as
//! a system manager does (same executor, same cgroup tracking, same `KillMode`s and exit-status
//! handling) and which `systemd-run --user` and `systemctl --user` drive:
//!
//! * **its own cgroups**: `kmirror-test-systemd-<test pid>-<tag>` created by the harness in the
//!   cgroup2 hierarchy (`/sys/fs/cgroup/unified` on this hybrid host, `/sys/fs/cgroup` on a
//!   unified one) and, on a hybrid host, in the v1 `name=systemd` hierarchy, which a manager
//!   there keeps in step. Only the manager's own process is moved into them (it moves itself
//!   before exec); everything it starts lands below, in `app.slice/<unit>`.
//! * **its own mount namespace** (`unshare -m`, private propagation), because `systemd --user`
//!   refuses to start unless `/run/systemd/system` exists ("booted with systemd"): there, and
//!   only there, a small tmpfs is mounted on `/run/systemd` holding that directory, and a pty
//!   of the harness is bind-mounted on `/dev/console` so the manager's log comes to the test
//!   (it logs to a console only if that is a terminal). The host's `/run/systemd` and
//!   `/dev/console` are not written.
//! * **its own files** in a temp dir: `$XDG_RUNTIME_DIR` (private socket, notify socket, the
//!   D-Bus socket), `$HOME`, and the only unit directory it reads (`SYSTEMD_UNIT_PATH`):
//!   `kmirror-test.target` and a `dbus.socket`/`dbus.service` pair. Generators are switched off
//!   (`SYSTEMD_GENERATOR_PATH`, `SYSTEMD_ENVIRONMENT_GENERATOR_PATH` point at an empty
//!   directory), so no desktop autostart or environment generator runs.
//! * **its own session bus**: `systemd-run --wait` and `--pipe` need a real D-Bus bus, not the
//!   manager's private socket, so the manager runs `dbus-daemon` as its `dbus.service`, with a
//!   configuration in the temp dir that activates no services.
//!
//! Everything the manager starts dies with the test: a watchdog (`sh`, outside the cgroups)
//! blocks reading a pipe whose only writer is the test process; when the test drops the
//! manager, or the test process dies however it dies, the pipe reaches end-of-file and the
//! watchdog writes `cgroup.kill` of the harness's cgroup2 directory (every process in it:
//! the manager, dbus, every unit and whatever they forked), waits until it is empty and
//! removes the directories the harness and the manager created, deepest first. The manager's
//! own process also gets `PR_SET_PDEATHSIG`.

use crate::run::{output_within, spawn_tied};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SYSTEMD: &str = "/lib/systemd/systemd";
const SYSTEMD_RUN: &str = "/usr/bin/systemd-run";
const SYSTEMCTL: &str = "/usr/bin/systemctl";
const DBUS_DAEMON: &str = "/usr/bin/dbus-daemon";

/// Names of the harness's cgroups start with this, then `<test pid>-<tag>`.
const CGROUP_PREFIX: &str = "kmirror-test-systemd-";

/// The manager's default target: it starts the bus socket and the bus, nothing else.
const TARGET: &str = "kmirror-test.target";

/// How long the manager gets to come up (a busy 2-core machine takes well under a second).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs in the manager's new mount namespace: joins the harness's cgroups, gives the manager
/// the `/run/systemd/system` it insists on and a terminal as console, and becomes the manager.
/// Arguments: the cgroup directories to join.
const MANAGER_SCRIPT: &str = r#"set -eu
for cg in "$@"; do echo 0 > "$cg/cgroup.procs"; done
# The copies of the host's namespace mounts (`ip netns`, container runtimes) would keep those
# namespaces alive for as long as the manager lives, after their owners deleted them.
findmnt -rn -t nsfs -o TARGET | while read -r target; do umount -l "$target" || true; done
if [ ! -d /run/systemd/system ]; then
    mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev kmirror-test-systemd /run/systemd
    mkdir /run/systemd/system
fi
mount --bind "$(tty)" /dev/console
exec "$SYSTEMD_BIN" --user --unit="$TARGET" --log-target=console --log-level=info \
    --default-standard-output=inherit --default-standard-error=inherit
"#;

/// The watchdog: waits for end-of-file on stdin, then ends every process in the cgroup2
/// directory `$2`, removes `$2` and the other cgroup directories given, deepest first, and
/// the temp dir `$1`.
const WATCHDOG_SCRIPT: &str = r#"
while read -r _; do :; done
tmp=$1
shift
kill_dir=$1
tries=0
while [ -d "$kill_dir" ] && ! grep -qx 'populated 0' "$kill_dir/cgroup.events" 2>/dev/null; do
    if [ -e "$kill_dir/cgroup.kill" ]; then
        echo 1 > "$kill_dir/cgroup.kill"
    else
        find "$kill_dir" -name cgroup.procs -exec cat {} + | while read -r pid; do kill -9 "$pid"; done
    fi
    tries=$((tries + 1))
    [ "$tries" -lt 1000 ] || break
    sleep 0.01
done
for dir in "$@"; do
    tries=0
    while [ -d "$dir" ] && [ "$tries" -lt 500 ]; do
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.01
        tries=$((tries + 1))
    done
done
rm -rf -- "$tmp"
"#;

/// A contained `systemd --user` manager (see the module docs); dropping it ends every process
/// it started and removes its cgroups and files.
pub struct UserManager {
    /// The temp dir: `run/` (`$XDG_RUNTIME_DIR`), `home/`, `units/`, `manager.log`.
    pub dir: PathBuf,
    /// The cgroup2 directory of the manager (its units are in `app.slice/<unit>` below).
    pub cgroup: PathBuf,
    /// Every cgroup directory the harness created (the cgroup2 one first).
    cgroups: Vec<PathBuf>,
    watchdog: Option<(Child, ChildStdin)>,
    manager: Option<Child>,
}

/// The cgroup hierarchies to create the manager's cgroups in: the cgroup2 one first (its
/// `cgroup.kill` ends the tree), then, on a hybrid host, the v1 `name=systemd` one.
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let unified = root.join("unified");
    assert!(
        unified.join("cgroup.controllers").exists(),
        "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: the systemd tests need one"
    );
    let mut found = vec![unified];
    let named = root.join("systemd");
    if named.join("cgroup.procs").exists() {
        found.push(named);
    }
    found
}

fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts the watchdog for `cgroups` (cgroup2 first) and the temp dir `tmp`. It is not tied
/// to the test's life by a signal: it must outlive a killed test to clean up after it.
fn start_watchdog(tmp: &Path, cgroups: &[PathBuf]) -> (Child, ChildStdin) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("kmirror-test-systemd-watchdog")
        .arg(tmp)
        .args(cgroups)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start the watchdog (sh)");
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// Removes what a killed earlier run left, should its watchdog have been killed too: only
/// cgroups named by this harness for a test process that no longer exists.
fn remove_leftovers(hierarchies: &[PathBuf]) {
    let Ok(entries) = fs::read_dir(&hierarchies[0]) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(CGROUP_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if is_alive(pid) {
            continue;
        }
        let dirs: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(&name)).collect();
        let tmp = std::env::temp_dir().join(&name);
        let (mut watchdog, stdin) = start_watchdog(&tmp, &dirs);
        drop(stdin);
        let _ = watchdog.wait();
    }
}

fn open_pty() -> (fs::File, fs::File) {
    let pty = nix::pty::openpty(None, None).unwrap_or_else(|e| panic!("openpty: {e}"));
    (fs::File::from(pty.master), fs::File::from(pty.slave))
}

impl UserManager {
    /// Starts a manager for one test; `tag` makes its names unique within the test process.
    /// Panics (after cleaning up) if it does not come up.
    pub fn start(tag: &str) -> UserManager {
        crate::pod::require_root();
        for tool in [SYSTEMD, SYSTEMD_RUN, SYSTEMCTL, DBUS_DAEMON] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: install systemd and dbus (scripts/setup.sh)"
            );
        }
        assert!(
            Path::new("/run/systemd/system").is_dir() || Path::new("/run/systemd").is_dir(),
            "/run/systemd is missing: the contained manager mounts its tmpfs there (in its own namespace)"
        );
        let hierarchies = hierarchies();
        remove_leftovers(&hierarchies);
        let name = format!("{CGROUP_PREFIX}{}-{tag}", std::process::id());
        let cgroups: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(&name)).collect();
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        // From here on a panic drops `manager`, which undoes whatever was done.
        let mut manager = UserManager {
            dir: dir.clone(),
            cgroup: cgroups[0].clone(),
            cgroups: Vec::new(),
            watchdog: None,
            manager: None,
        };
        // First, so that whatever follows is undone even if the test process dies.
        manager.watchdog = Some(start_watchdog(&dir, &cgroups));
        for cgroup in &cgroups {
            fs::create_dir(cgroup).unwrap_or_else(|e| panic!("cannot create {}: {e}", cgroup.display()));
            manager.cgroups.push(cgroup.clone());
        }
        manager.write_files();
        manager.start_manager();
        manager.wait_ready();
        manager
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn write_files(&self) {
        let units = self.dir.join("units");
        for sub in ["run", "home", "units", "no-generators"] {
            fs::create_dir_all(self.dir.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.runtime_dir(), fs::Permissions::from_mode(0o700)).unwrap();
        // Every service depends on these by default; they do nothing here.
        for target in ["basic", "sockets", "paths", "timers", "shutdown"] {
            fs::write(units.join(format!("{target}.target")), "[Unit]\nDefaultDependencies=no\n").unwrap();
        }
        fs::write(
            units.join(TARGET),
            "[Unit]\nDescription=kmirror test manager\nWants=dbus.socket dbus.service\nAfter=dbus.service\n",
        )
        .unwrap();
        fs::write(units.join("dbus.socket"), "[Socket]\nListenStream=%t/bus\n").unwrap();
        let config = self.dir.join("dbus.conf");
        fs::write(
            units.join("dbus.service"),
            format!(
                "[Unit]\nRequires=dbus.socket\n[Service]\nType=notify\nNotifyAccess=main\n\
                 ExecStart={DBUS_DAEMON} --config-file={} --nofork --nopidfile --systemd-activation\n",
                config.display()
            ),
        )
        .unwrap();
        // A session bus that listens on the socket the manager passes and activates nothing.
        fs::write(
            &config,
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>systemd:</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        )
        .unwrap();
    }

    fn start_manager(&mut self) {
        let (master, slave) = open_pty();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", MANAGER_SCRIPT, "kmirror-test-systemd"])
            .args(&self.cgroups)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.dir.join("home"))
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("SYSTEMD_UNIT_PATH", self.dir.join("units"))
            .env("SYSTEMD_GENERATOR_PATH", self.dir.join("no-generators"))
            .env("SYSTEMD_ENVIRONMENT_GENERATOR_PATH", self.dir.join("no-generators"))
            .env("SYSTEMD_BIN", SYSTEMD)
            .env("TARGET", TARGET)
            .current_dir(&self.dir)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // `unshare` and `sh` exec in place: the child is the manager itself.
        self.manager = Some(spawn_tied(cmd).expect("cannot start unshare"));
        let log_path = self.dir.join("manager.log");
        std::thread::spawn(move || {
            let mut master = master;
            let mut log = fs::File::create(log_path).unwrap();
            let mut buf = [0u8; 16384];
            // Ends with EIO once the manager (the last holder of the terminal) is gone.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = std::io::Write::write_all(&mut log, &buf[..n]);
            }
        });
    }

    /// Waits until the default target (and so the bus) is active.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.manager.as_mut().unwrap().try_wait().unwrap() {
                panic!("the systemd user manager exited ({status}):\n{}", self.log());
            }
            if self.runtime_dir().join("systemd/private").exists() {
                let out = self.systemctl(&["is-active", TARGET]);
                if String::from_utf8_lossy(&out.stdout).trim() == "active" {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the systemd user manager did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The manager's process id.
    pub fn pid(&self) -> u32 {
        self.manager.as_ref().unwrap().id()
    }

    /// What the manager logged (info level).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("manager.log")).unwrap_or_default()
    }

    /// The environment through which `systemctl --user` (also one kmirror runs) reaches this
    /// manager.
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("XDG_RUNTIME_DIR", self.runtime_dir().display().to_string()),
            ("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={}", self.runtime_dir().join("bus").display())),
        ]
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("--user").envs(self.client_env());
        cmd
    }

    /// `systemd-run --user` talking to this manager; add the rest of the arguments.
    pub fn systemd_run(&self) -> Command {
        self.client(SYSTEMD_RUN)
    }

    /// Runs `systemctl --user <args>` against this manager (30 s limit).
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.client(SYSTEMCTL);
        cmd.arg("--no-pager").args(args);
        output_within(cmd, Duration::from_secs(30))
    }

    /// One property of a unit, as `systemctl show -p <name> --value` prints it.
    pub fn property(&self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", "-p", name, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The cgroup2 directory of a unit the manager started (`app.slice/<unit>`).
    pub fn unit_cgroup(&self, unit: &str) -> PathBuf {
        self.cgroup.join("app.slice").join(unit)
    }

    /// Every process in the unit's cgroup and below it (empty once the cgroup is gone).
    pub fn unit_processes(&self, unit: &str) -> Vec<u32> {
        let mut found = Vec::new();
        let mut dirs = vec![self.unit_cgroup(unit)];
        while let Some(dir) = dirs.pop() {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            found.extend(procs.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
        }
        found
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        // End-of-file for the watchdog: it kills everything in the cgroup and removes it.
        let watchdog = self.watchdog.take().map(|(child, stdin)| {
            drop(stdin);
            child
        });
        // The manager is the test's child: reap it, so that its cgroup can go.
        if let Some(mut manager) = self.manager.take() {
            if watchdog.is_none() {
                let _ = manager.kill();
            }
            reap_within(&mut manager, Duration::from_secs(20));
        }
        if let Some(mut watchdog) = watchdog {
            reap_within(&mut watchdog, Duration::from_secs(30));
        }
        for cgroup in &self.cgroups {
            if cgroup.exists() {
                eprintln!("warning: {} could not be removed", cgroup.display());
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits for a child without panicking (a drop may run while a test panics); SIGKILLs it if it
/// takes longer than `limit`.
fn reap_within(child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
