//! The ptrace interceptor (issue 15; docs/ptrace.md) against local pods (indices 249-254).

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{kmirror_bin, kmirror_cmd, output_within};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Until the ptrace interceptor serves calls, asking for it (or needing it under `auto`, as a
/// kmirror under kmirror does) stops kmirror with exit status 2 and says why, before anything
/// starts.
#[test]
fn the_ptrace_interceptor_refuses_clearly_until_it_can_serve() {
    let pod = LocalPod::start(249);
    let out = output_within(kmirror_cmd(pod.target_pid, &["--interceptor", "ptrace"], &["true"]), LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("the ptrace interceptor is not implemented yet"), "{}", stderr(&out));

    // The inner kmirror runs under the outer one's listener: `auto` cannot have one.
    let target = format!("pid/{}", pod.target_pid);
    let inner = kmirror_bin();
    let nested = ["run", "--target", &target, "--", "true"];
    let mut command = vec![inner.to_str().unwrap()];
    command.extend_from_slice(&nested);
    let out = output_within(kmirror_cmd(pod.target_pid, &[], &command), LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("already runs under a seccomp listener"), "{err}");
    assert!(err.contains("the ptrace interceptor is not implemented yet"), "{err}");
}
