//! kmirror as a process wrapper: exit status, signals, stdio, and clear errors for bad input.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{
    LineReader, expect_status, go_fixtures, kmirror, kmirror_bin, kmirror_cmd, output_within,
    wait_output_within, wait_within,
};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn exit_status_and_stdio_are_the_apps() {
    let pod = LocalPod::start(31);
    let go = go_fixtures()[0].to_str().unwrap().to_owned();
    expect_status(&kmirror(pod.target_pid, &[], &[&go, "exit", "42"]), 42);
    let mut child = kmirror_cmd(pod.target_pid, &[], &[&go, "stdin-echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let payload = payload.clone();
        std::thread::spawn(move || stdin.write_all(&payload).unwrap())
    };
    let out = wait_output_within(child, "stdin-echo", Duration::from_secs(60));
    writer.join().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == payload, "stdin must reach the app and its stdout come back unchanged");
    // Killed by a signal: kmirror ends the same way.
    let out = kmirror(pod.target_pid, &[], &["sh", "-c", "kill -USR2 $$"]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGUSR2));
}

#[test]
fn termination_signals_reach_the_app() {
    let pod = LocalPod::start(32);
    let go = go_fixtures()[0].to_str().unwrap().to_owned();
    for (signal, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT"), (libc::SIGHUP, "HUP")] {
        let mut child = kmirror_cmd(pod.target_pid, &[], &[&go, "wait-signal"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = LineReader::new(child.stdout.take().unwrap());
        assert_eq!(stdout.line_within(Duration::from_secs(30)), "ready");
        let _ = kmirror_suite::run::signal(child.id(), signal);
        assert_eq!(stdout.line_within(Duration::from_secs(30)), format!("signal={name}"));
        assert!(wait_within(&mut child, "kmirror", Duration::from_secs(30)).success());
    }
}

#[test]
fn bad_input_gets_clear_errors_and_shell_exit_codes() {
    let pod = LocalPod::start(33);
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = kmirror(pod.target_pid, &[], &["kmirror-no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(stderr(&out).contains("kmirror-no-such-command: command not found"), "{}", stderr(&out));

    let out = output_within(
        {
            let mut c = Command::new(kmirror_bin());
            c.args(["run", "--target", "pid/4000000000", "--", "true"]);
            c
        },
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("process 4000000000 does not exist"), "{}", stderr(&out));

    for (target, expected) in
        [("banana", "unknown target"), ("pid/abc", "not a process id"), ("pod/web", "not supported yet")]
    {
        let mut c = Command::new(kmirror_bin());
        c.args(["run", "--target", target, "--", "true"]);
        let out = output_within(c, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(2), "{target}");
        assert!(stderr(&out).contains(expected), "{target}: {}", stderr(&out));
    }

    // A 32-bit program is refused before anything starts.
    let dir = kmirror_suite::run::ScratchDir::new("e2e-32");
    let elf32 = dir.join("prog32");
    std::fs::write(&elf32, b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&elf32, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = kmirror(pod.target_pid, &[], &[elf32.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126));
    assert!(stderr(&out).contains("32-bit"), "{}", stderr(&out));

    // Without root a local target cannot be entered: say so.
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(kmirror_bin()).args([
        "run",
        "--target",
        &format!("pid/{}", pod.target_pid),
        "--",
        "true",
    ]);
    let out = output_within(c, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
}
