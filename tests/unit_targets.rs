//! `--target unit/<NAME>` and `user-unit/<NAME>`: a systemd unit's main process is the target.
//! Proven with a contained `systemd --user` manager (tests/support/systemd.rs) running a unit
//! whose main process lives in a local pod's namespaces; the system manager is not systemd on
//! this machine, which gives the user-facing error for `unit/`.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{kmirror_bin, output_within};
use kmirror_suite::systemd::UserManager;
use std::process::Command;
use std::time::{Duration, Instant};

fn kmirror_with(manager: &UserManager, target: &str, command: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(kmirror_bin());
    cmd.args(["run", "--target", target, "--"]).args(command).envs(manager.client_env());
    output_within(cmd, Duration::from_secs(60))
}

#[test]
fn a_user_units_main_process_is_the_target() {
    let pod = LocalPod::start(248);
    let manager = UserManager::start("unit-target");
    let unit = "kmirror-pod248.service";
    // The unit's main process runs in the pod's network and mount namespaces, as a
    // container's process does.
    let started = manager
        .systemd_run()
        .args([
            "--unit",
            unit,
            "--",
            "nsenter",
            "-t",
            &pod.target_pid.to_string(),
            "-n",
            "-m",
            "sleep",
            "infinity",
        ])
        .output()
        .expect("systemd-run");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.property(unit, "ActiveState") != "active" {
        assert!(Instant::now() < deadline, "{unit} never became active:\n{}", manager.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The pod-only service address answers only from inside the pod.
    let url = format!("http://{}:8080/via-unit", pod.service_ip);
    let out = kmirror_with(&manager, &format!("user-unit/{unit}"), &["curl", "-s", "--max-time", "10", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("pod-echo {} /via-unit\n", pod.index));

    // A unit whose main process has ended (kept loaded by RemainAfterExit) and an unknown
    // one: exit 2, saying why, nothing started.
    let done = "kmirror-done248.service";
    let ran =
        manager.systemd_run().args(["--unit", done, "--remain-after-exit", "--", "true"]).output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.property(done, "MainPID") != "0" {
        assert!(Instant::now() < deadline, "{done} kept a main process:\n{}", manager.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = kmirror_with(&manager, &format!("user-unit/{done}"), &["true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{done} has no main process (it is active)")), "{stderr}");
    let out = kmirror_with(&manager, "user-unit/kmirror-nosuch.service", &["true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("kmirror-nosuch.service is not loaded in your user's service manager"),
        "{stderr}"
    );
}

#[test]
fn a_system_unit_without_a_system_manager_is_a_clear_error() {
    // This machine's PID 1 is not systemd: systemctl says so, and kmirror passes it on.
    let mut cmd = Command::new(kmirror_bin());
    cmd.args(["run", "--target", "unit/ssh.service", "--", "true"]);
    let out = output_within(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot ask systemd about ssh.service"), "{stderr}");
}
