//! Pod files are checked with the app's credentials: what an app running as some user may read,
//! stat, list or `access()` under kmirror is what the same program as that user may inside the
//! pod. Each test runs one probe program twice, inside the pod (nsenter, then setpriv drops to
//! the user) and under `kmirror run --fs-mode read` (setpriv as the app), and compares, then
//! checks the kernel's expected answers so that two identical wrong answers cannot pass.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::kmirror;
use std::os::unix::fs::{PermissionsExt, chown, symlink};

/// Runs each argument `op:path` and prints `op:path answer` (the result, or the errno name):
/// `read` (the content), `stat` (the mode), `list` (sorted names), `access`/`eaccess` (R_OK
/// with the real or the effective ids), `laccess` (effective, of a symlink itself), `xaccess`
/// (X_OK, effective). `setresuid=r,e,s` changes the process's ids.
const PROBE: &str = r#"
import errno, os, sys
ops = {
    'read': lambda p: open(p, 'rb').read().decode().strip(),
    'stat': lambda p: oct(os.stat(p).st_mode),
    'list': lambda p: sorted(os.listdir(p)),
    'access': lambda p: os.access(p, os.R_OK),
    'eaccess': lambda p: os.access(p, os.R_OK, effective_ids=True),
    'laccess': lambda p: os.access(p, os.R_OK, effective_ids=True, follow_symlinks=False),
    'xaccess': lambda p: os.access(p, os.X_OK, effective_ids=True),
}
for arg in sys.argv[1:]:
    if arg.startswith('setresuid='):
        os.setresuid(*map(int, arg.split('=')[1].split(',')))
        print(arg, os.getresuid())
        continue
    op, path = arg.split(':', 1)
    try:
        result = ops[op](path)
    except OSError as e:
        result = errno.errorcode.get(e.errno, e.errno)
    print(arg, result)
"#;

/// The pod's `/data/creds`: files and directories whose permissions differ per user.
fn make_pod_files(pod: &LocalPod) {
    let base = pod.rootfs.join("data/creds");
    std::fs::create_dir_all(&base).unwrap();
    let file = |name: &str, mode: u32, owner: (u32, u32)| {
        let path = base.join(name);
        std::fs::write(&path, format!("{name} content\n")).unwrap();
        chown(&path, Some(owner.0), Some(owner.1)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let dir = |name: &str, mode: u32, owner: (u32, u32)| {
        let path = base.join(name);
        std::fs::create_dir(&path).unwrap();
        chown(&path, Some(owner.0), Some(owner.1)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    file("public", 0o644, (0, 0));
    file("secret", 0o600, (0, 0));
    file("group-only", 0o640, (0, 4242));
    file("users-own", 0o600, (1000, 1000));
    file("no-exec", 0o644, (0, 0));
    symlink("secret", base.join("link-to-secret")).unwrap();
    dir("locked", 0o700, (0, 0));
    dir("search-only", 0o711, (0, 0));
    dir("users-dir", 0o700, (1000, 1000));
    for inner in ["locked/inner", "search-only/inner", "users-dir/inner"] {
        file(inner, 0o644, (0, 0));
    }
}

/// Runs the probe with `setpriv <user...>` inside the pod and under kmirror; asserts both agree
/// and returns the answers.
fn compare(pod: &LocalPod, user: &[&str], ops: &[&str]) -> String {
    let args: Vec<&str> = [user, &["/usr/bin/python3", "-c", PROBE], ops].concat();
    let inside = pod.exec_in_pod("setpriv", &args);
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&["setpriv"][..], &args].concat());
    let text = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (inside, under) = (text(&inside), text(&under));
    assert_eq!(under, inside, "as {user:?}: under kmirror (left) and in the pod (right)");
    under
}

/// The answer line of `op` in the probe's output.
fn answer<'a>(out: &'a str, op: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(op).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no answer to {op} in {out}"))
}

const NOBODY: &[&str] = &["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];

#[test]
fn nobody_cannot_read_a_root_only_pod_file() {
    let pod = LocalPod::start(218);
    make_pod_files(&pod);
    let ops = [
        "read:/data/creds/secret",
        "stat:/data/creds/secret",
        "access:/data/creds/secret",
        "read:/data/creds/link-to-secret",
        "read:/data/creds/public",
    ];
    let out = compare(&pod, NOBODY, &ops);
    assert_eq!(answer(&out, "read:/data/creds/secret"), "EACCES");
    assert_eq!(answer(&out, "stat:/data/creds/secret"), "0o100600", "stat needs no read permission");
    assert_eq!(answer(&out, "access:/data/creds/secret"), "False");
    assert_eq!(answer(&out, "read:/data/creds/link-to-secret"), "EACCES");
    assert_eq!(answer(&out, "read:/data/creds/public"), "public content");
}

#[test]
fn a_pod_directory_without_search_permission_hides_its_files() {
    let pod = LocalPod::start(219);
    make_pod_files(&pod);
    let ops = [
        "read:/data/creds/locked/inner",
        "stat:/data/creds/locked/inner",
        "access:/data/creds/locked/inner",
        "list:/data/creds/locked",
        "stat:/data/creds/locked",
        "read:/data/creds/search-only/inner",
        "list:/data/creds/search-only",
    ];
    let out = compare(&pod, NOBODY, &ops);
    assert_eq!(answer(&out, "read:/data/creds/locked/inner"), "EACCES");
    assert_eq!(answer(&out, "stat:/data/creds/locked/inner"), "EACCES");
    assert_eq!(answer(&out, "access:/data/creds/locked/inner"), "False");
    assert_eq!(answer(&out, "list:/data/creds/locked"), "EACCES");
    assert_eq!(answer(&out, "stat:/data/creds/locked"), "0o40700");
    assert_eq!(answer(&out, "read:/data/creds/search-only/inner"), "search-only/inner content");
    assert_eq!(answer(&out, "list:/data/creds/search-only"), "EACCES", "search without read permission");
}

#[test]
fn a_supplementary_group_grants_group_access() {
    let pod = LocalPod::start(220);
    make_pod_files(&pod);
    let ops = ["read:/data/creds/group-only", "access:/data/creds/group-only"];
    let with_group = ["--reuid=65534", "--regid=65534", "--groups=4242", "--inh-caps=-all"];
    let out = compare(&pod, &with_group, &ops);
    assert_eq!(answer(&out, "read:/data/creds/group-only"), "group-only content");
    assert_eq!(answer(&out, "access:/data/creds/group-only"), "True");
    let out = compare(&pod, NOBODY, &ops);
    assert_eq!(answer(&out, "read:/data/creds/group-only"), "EACCES");
    assert_eq!(answer(&out, "access:/data/creds/group-only"), "False");
}

/// `access(2)` checks with the real ids, `faccessat2(AT_EACCESS)` with the effective ones, and
/// `AT_SYMLINK_NOFOLLOW` checks a symlink itself: a root program that made its real and
/// effective uids differ (as a setuid program runs) gets the kernel's answers for each.
#[test]
fn access_checks_the_real_or_the_effective_ids_as_asked() {
    let pod = LocalPod::start(221);
    make_pod_files(&pod);
    let secret = "/data/creds/secret";
    let link = "/data/creds/link-to-secret";
    let ops = [
        "setresuid=65534,0,0".to_string(),
        format!("access:{secret}"),
        format!("eaccess:{secret}"),
        "setresuid=0,0,0".to_string(),
        "setresuid=0,65534,0".to_string(),
        format!("access:{secret}"),
        format!("eaccess:{secret}"),
        format!("laccess:{link}"),
        "xaccess:/data/creds/no-exec".to_string(),
    ];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let out = compare(&pod, &[], &ops);
    let answers: Vec<&str> = out.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(
        answers,
        ["0)", "False", "True", "0)", "0)", "True", "False", "True", "False"],
        "real uid nobody: access denied, effective root: allowed; then the other way round; a \
         symlink itself is readable; root cannot execute a file without x bits:\n{out}"
    );
}

/// A root app still reads everything; a root app without CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH is held to the permission bits, as in the pod.
#[test]
fn root_reads_everything_unless_it_dropped_the_file_capabilities() {
    let pod = LocalPod::start(222);
    make_pod_files(&pod);
    let ops = [
        "read:/data/creds/secret",
        "read:/data/creds/users-own",
        "read:/data/creds/users-dir/inner",
        "list:/data/creds/users-dir",
        "access:/data/creds/users-own",
    ];
    let out = compare(&pod, &[], &ops);
    assert_eq!(answer(&out, "read:/data/creds/users-own"), "users-own content");
    assert_eq!(answer(&out, "read:/data/creds/users-dir/inner"), "users-dir/inner content");
    assert_eq!(answer(&out, "list:/data/creds/users-dir"), "['inner']");
    assert_eq!(answer(&out, "access:/data/creds/users-own"), "True");
    let out = compare(&pod, &["--bounding-set=-dac_override,-dac_read_search"], &ops);
    assert_eq!(answer(&out, "read:/data/creds/secret"), "secret content", "root owns it");
    assert_eq!(answer(&out, "read:/data/creds/users-own"), "EACCES");
    assert_eq!(answer(&out, "read:/data/creds/users-dir/inner"), "EACCES");
    assert_eq!(answer(&out, "list:/data/creds/users-dir"), "EACCES");
    // access(2) of a root process: the permitted set, which the bounding set cut too.
    assert_eq!(answer(&out, "access:/data/creds/users-own"), "False");
}
