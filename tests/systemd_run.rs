//! kmirror under `systemd-run --wait` (the card's named use), with a real systemd service
//! manager: a contained `systemd --user` started by the harness (tests/support/systemd.rs).
//!
//! What holds: the unit's main process is kmirror, kmirror ends when the app's whole process
//! tree has ended, and so the unit ends then, with the main process's status; and when the
//! unit is stopped, or kmirror is killed, no process of the tree is left in the unit.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{ScratchDir, agent_of, kmirror_bin, output_within, spawn_tied};
use kmirror_suite::run::{alive, comm, pid_written_to, wait_until};
use kmirror_suite::systemd::UserManager;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The process waits in nanosleep (past its start-up, whose trapped calls need kmirror).
fn sleeping(pid: u32) -> bool {
    let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let nr = call.split_whitespace().next().unwrap_or("");
    nr == libc::SYS_clock_nanosleep.to_string() || nr == libc::SYS_nanosleep.to_string()
}

/// `systemd-run --user --wait --pipe --unit=<unit> <properties> -- kmirror run --target
/// pid/<target> <flags> -- sh -c <script>`.
fn systemd_run(
    manager: &UserManager,
    unit: &str,
    properties: &[&str],
    target: u32,
    flags: &[&str],
    script: &str,
) -> Command {
    let mut cmd = manager.systemd_run();
    cmd.args(["--wait", "--pipe", "--unit", unit])
        .args(properties.iter().flat_map(|p| ["-p", p]))
        .arg("--")
        .arg(kmirror_bin())
        .args(["run", "--target", &format!("pid/{target}")])
        .args(flags)
        .args(["--", "sh", "-c", script]);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Everything systemd-run, kmirror (its stderr is systemd-run's, through `--pipe`) and the
/// manager said, for assertion messages.
fn report(run: &Output, manager: &UserManager) -> String {
    format!(
        "systemd-run: {:?}\nstdout: {}\nstderr: {}\nmanager's log:\n{}",
        run.status,
        text(&run.stdout),
        text(&run.stderr),
        manager.log()
    )
}

/// The unit is gone: not active, and no process left in its cgroup.
fn assert_unit_gone(manager: &UserManager, unit: &str, run: &Output) {
    let state = manager.property(unit, "ActiveState");
    assert!(state == "inactive" || state == "failed", "the unit is {state}\n{}", report(run, manager));
    let left = manager.unit_processes(unit);
    assert!(left.is_empty(), "processes left in the unit: {:?}\n{}", named(&left), report(run, manager));
}

/// The card's use: a script that starts a background job and exits 7, under
/// `systemd-run --wait`. systemd-run returns only after the job reached the pod and wrote its
/// file, and reports the main process's status 7 (and exits with it). With the default
/// `KillMode=control-group`, had kmirror exited with the main process, systemd would have
/// killed the job as leftover of the unit.
#[test]
fn systemd_run_wait_returns_after_the_background_job_with_the_main_status() {
    let pod = LocalPod::start(223);
    let manager = UserManager::start("background");
    let dir = ScratchDir::new("systemd-background");
    let out = dir.join("out");
    let unit = "kmirror-background.service";
    let script = format!("(sleep 2; curl -s http://echo:8080/systemd-run > {}) & exit 7", out.display());
    let cmd = systemd_run(&manager, unit, &["KillMode=control-group"], pod.target_pid, &[], &script);
    let started = Instant::now();
    let run = output_within(cmd, Duration::from_secs(60));
    let took = started.elapsed();
    // Written completely before systemd-run returned: no waiting here.
    let body = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(body, "pod-echo 223 /systemd-run\n", "{}", report(&run, &manager));
    assert!(took >= Duration::from_secs(2), "systemd-run returned after {took:?}, before the job ended");
    assert_eq!(run.status.code(), Some(7), "{}", report(&run, &manager));
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("Finished with result: exit-code")
            && stderr.contains("Main processes terminated with: code=exited/status=7"),
        "{}",
        report(&run, &manager)
    );
    assert_unit_gone(&manager, unit, &run);
}

/// `--exit-with-main` under systemd-run: the unit ends right after the main process, with its
/// status, and the background job was ended before it could reach the pod. `KillMode=process`
/// leaves the job to kmirror: systemd would not end it.
#[test]
fn systemd_run_with_exit_with_main_ends_the_unit_with_the_main_process() {
    let pod = LocalPod::start(224);
    let manager = UserManager::start("exit-with-main");
    let dir = ScratchDir::new("systemd-exit-with-main");
    let (out, job_file) = (dir.join("out"), dir.join("job"));
    let unit = "kmirror-exit-with-main.service";
    let script = format!(
        "(sleep 10; curl -s http://echo:8080/late > {}) & echo $! > {}; exit 7",
        out.display(),
        job_file.display()
    );
    let cmd =
        systemd_run(&manager, unit, &["KillMode=process"], pod.target_pid, &["--exit-with-main"], &script);
    let started = Instant::now();
    let run = output_within(cmd, Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(run.status.code(), Some(7), "{}", report(&run, &manager));
    assert!(took < Duration::from_secs(10), "systemd-run returned after {took:?}, after the job's sleep");
    assert!(
        text(&run.stderr).contains("Main processes terminated with: code=exited/status=7"),
        "{}",
        report(&run, &manager)
    );
    // The job wrote its pid before the main process exited.
    let job = pid_written_to(&job_file, Duration::from_secs(30));
    assert!(!alive(job), "the background job outlived the unit");
    assert!(!out.exists(), "the background job wrote {}", out.display());
    assert_unit_gone(&manager, unit, &run);
}

/// A unit started with `systemd-run --wait` in the background, whose app has a grandchild and
/// a setsid'd orphan of a double fork; `on_stop`, if given, is a command its main process runs
/// when SIGTERM comes, before it exits 0. Returns systemd-run, kmirror's pid, and every
/// process in the unit once both are up (kmirror, its keeper and agent, the shells and the
/// sleeps).
fn start_tree(
    manager: &UserManager,
    unit: &str,
    properties: &[&str],
    target: u32,
    dir: &Path,
    on_stop: Option<&str>,
) -> (Child, u32, Vec<u32>) {
    let (grandchild_file, daemon_file) = (dir.join("grandchild"), dir.join("daemon"));
    let trap = on_stop.map(|command| format!("trap '{command}; exit 0' TERM; ")).unwrap_or_default();
    let script = format!(
        "{trap}sh -c 'sleep 300 & echo $! > {gc}; wait' & setsid sh -c 'sleep 300 & echo $! > {daemon}'; wait",
        gc = grandchild_file.display(),
        daemon = daemon_file.display()
    );
    let mut cmd = systemd_run(manager, unit, properties, target, &[], &script);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = spawn_tied(cmd).expect("cannot start systemd-run");
    let (grandchild, daemon) = (
        pid_written_to(&grandchild_file, Duration::from_secs(30)),
        pid_written_to(&daemon_file, Duration::from_secs(30)),
    );
    // Both past their start-up, which a dead listener would fail; the daemon's parent is gone.
    wait_until("both sleeps sleep", Duration::from_secs(20), || sleeping(grandchild) && sleeping(daemon));
    let kmirror: u32 = manager.property(unit, "MainPID").parse().expect("a MainPID");
    assert_eq!(comm(kmirror), "kmirror", "the unit's main process is kmirror");
    let agent = agent_of(kmirror);
    let in_unit = manager.unit_processes(unit);
    for pid in [kmirror, agent, grandchild, daemon] {
        assert!(in_unit.contains(&pid), "{pid} ({}) is not in the unit: {in_unit:?}", comm(pid));
    }
    (child, kmirror, in_unit)
}

fn named(pids: &[u32]) -> Vec<String> {
    pids.iter().map(|&p| format!("{p} {}", comm(p))).collect()
}

/// `systemctl stop` of the unit (default `KillMode=control-group`: SIGTERM to every process of
/// it, kmirror and its agent included) ends the whole tree at once, well before the stop
/// timeout; the main process's shutdown work still reaches the pod (the agent outlives the
/// SIGTERM, it ends with kmirror), and the unit ends with the main process's status, 0.
#[test]
fn systemctl_stop_ends_the_whole_tree_and_the_app_shuts_down_with_the_pod() {
    let pod = LocalPod::start(225);
    let manager = UserManager::start("stop");
    let dir = ScratchDir::new("systemd-stop");
    let out = dir.join("out");
    let unit = "kmirror-stop.service";
    let on_stop = format!("curl -sS http://echo:8080/stopping > {} 2>&1", out.display());
    let properties = ["KillMode=control-group"];
    let (child, _, pids) = start_tree(&manager, unit, &properties, pod.target_pid, &dir.0, Some(&on_stop));
    let started = Instant::now();
    let stop = manager.systemctl(&["stop", unit]);
    let took = started.elapsed();
    let run = kmirror_suite::run::wait_output_within(child, "systemd-run", Duration::from_secs(30));
    assert!(stop.status.success(), "systemctl stop: {}\n{}", text(&stop.stderr), report(&run, &manager));
    assert!(took < Duration::from_secs(10), "the stop took {took:?}\n{}", report(&run, &manager));
    let said = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(said, "pod-echo 225 /stopping\n", "{}", report(&run, &manager));
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "outlived the unit: {:?}\n{}", named(&left), report(&run, &manager));
    assert_eq!(run.status.code(), Some(0), "{}", report(&run, &manager));
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("Finished with result: success")
            && stderr.contains("Main processes terminated with: code=exited/status=0"),
        "{}",
        report(&run, &manager)
    );
    assert_unit_gone(&manager, unit, &run);
}

/// kmirror SIGKILLed in a unit whose `KillMode=process` leaves every other process to it: the
/// keeper ends the grandchild and the setsid'd orphan within a second, the unit ends, and the
/// waiting systemd-run returns with the failure.
#[test]
fn killing_kmirror_in_a_unit_ends_the_tree_and_the_unit() {
    let pod = LocalPod::start(226);
    let manager = UserManager::start("sigkill");
    let dir = ScratchDir::new("systemd-sigkill");
    let unit = "kmirror-sigkill.service";
    let (child, kmirror, pids) =
        start_tree(&manager, unit, &["KillMode=process"], pod.target_pid, &dir.0, None);
    // SIGKILL to the kmirror this test started (the unit's main process).
    kmirror_suite::run::signal(kmirror, libc::SIGKILL).unwrap();
    let killed = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "alive a second after kmirror was killed: {:?}",
            named(&left)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("the tree ended {:?} after kmirror was killed", killed.elapsed());
    let run = kmirror_suite::run::wait_output_within(child, "systemd-run", Duration::from_secs(30));
    assert!(!run.status.success(), "{}", report(&run, &manager));
    assert!(
        text(&run.stderr).contains("Main processes terminated with: code=killed/status=KILL"),
        "{}",
        report(&run, &manager)
    );
    assert_unit_gone(&manager, unit, &run);
}

/// `systemctl stop` of a unit with `KillMode=mixed`: systemd sends SIGTERM to kmirror alone,
/// kmirror passes it to the main process, and when that exits, to the rest of the tree, which
/// ends at once. Without that, systemd would wait out the stop timeout for processes nobody
/// asked to stop (with the plain script and no kmirror, it SIGKILLs them as soon as the main
/// process has exited).
#[test]
fn systemctl_stop_with_kill_mode_mixed_ends_the_tree_without_waiting_for_the_timeout() {
    let pod = LocalPod::start(227);
    let manager = UserManager::start("stop-mixed");
    let dir = ScratchDir::new("systemd-stop-mixed");
    let unit = "kmirror-stop-mixed.service";
    let properties = ["KillMode=mixed", "TimeoutStopSec=30"];
    let (child, _, pids) = start_tree(&manager, unit, &properties, pod.target_pid, &dir.0, None);
    let started = Instant::now();
    let stop = manager.systemctl(&["stop", unit]);
    let took = started.elapsed();
    let run = kmirror_suite::run::wait_output_within(child, "systemd-run", Duration::from_secs(60));
    assert!(stop.status.success(), "systemctl stop: {}\n{}", text(&stop.stderr), report(&run, &manager));
    assert!(took < Duration::from_secs(10), "the stop took {took:?}\n{}", report(&run, &manager));
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "outlived the unit: {:?}\n{}", named(&left), report(&run, &manager));
    assert!(text(&run.stderr).contains("Finished with result: success"), "{}", report(&run, &manager));
    assert_unit_gone(&manager, unit, &run);
}
