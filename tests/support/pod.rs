//! A throw-away Kubernetes-like "pod" on this machine.
//!
//! kmirror runs a local program as if it were inside a pod, so its tests need
//! something pod-shaped to mirror: a process with its own network namespace,
//! DNS server, root filesystem and environment. [`LocalPod::start`] builds one
//! from plain Linux primitives (needs root):
//!
//! * network namespace `kmpod<N>` joined to the host by the veth pair
//!   `kmh<N>` (host, 10.214.N.1/30) ↔ `kmp<N>` (pod, 10.214.N.2/30);
//! * pod-only addresses 10.213.N.9 (services) and 10.213.N.10 (DNS), and
//!   fd00:213:N::9 (services over IPv6), on the pod's `lo`, with
//!   `unreachable 10.213.N.0/24` and `unreachable fd00:213:N::/64` routes on
//!   the host, so a connection that kmirror failed to intercept fails fast on
//!   the host instead of silently reaching something else. Outgoing tests use
//!   only these: the veth addresses (`pod_ip`, `pod_ip6`) are reachable from
//!   the host, so reaching them proves nothing. No traffic ever leaves the
//!   machine: the host does not forward packets coming from the pod;
//! * a root filesystem in a temp dir whose `/usr`, `/proc` and `/dev` are
//!   mounted only inside the pod's private mount namespace (never on the
//!   host), with pod-specific `/etc`, service-account files and `/data`;
//! * a long-running target process (`sleep infinity`, chrooted, with a pod
//!   environment) whose pid is what kmirror gets pointed at;
//! * `tests/pod/podsvc.py` serving DNS, HTTP and echo services in the netns.
//!
//! Everything is torn down again in [`Drop`]. The target and the services die
//! with the test process (`PR_SET_PDEATHSIG`), and leftovers of a crashed
//! earlier run with the same index are removed by `start`. An index belongs
//! to one live process at a time, across processes too: `start` takes an
//! exclusive lock on `/run/kmirror-pod-<N>.lock` (released by the kernel when
//! the owner dies) and waits while another test process holds it, so it never
//! tears down a live pod of another run.

use nix::fcntl::{Flock, FlockArg};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The fake in-pod services, located from the root package's manifest dir.
const PODSVC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pod/podsvc.py");

/// `PATH` inside the pod (what a Debian-based container image would have).
const POD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the target and the services get to come up (generous: a loaded machine, or a
/// kernel-matrix guest under emulation, takes many times the usual second).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `start` waits for another test process to release the pod index.
const INDEX_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// Inside the pod, host binaries handed to [`LocalPod::exec_in_pod`] are
/// copied here (see there for why).
const POD_BIN_DIR: &str = "kmirror-bin";

/// Runs in the pod's fresh mount + UTS namespaces (via `unshare`), then
/// `exec`s into the chroot so the spawned pid ends up being the target.
/// Arguments: rootfs, hostname, then the `env -i` arguments and command.
const SETUP_SCRIPT: &str = r#"set -eu
root="$1"; host="$2"; shift 2
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount --rbind /usr "$root/usr"
mount -o remount,bind,ro "$root/usr"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,size=1m,nosuid tmpfs "$root/dev"
for dev in null zero full random urandom tty; do
    : > "$root/dev/$dev"
    mount --bind "/dev/$dev" "$root/dev/$dev"
done
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mkdir -m 1777 "$root/dev/shm"
printf '%s' "$host" > /proc/sys/kernel/hostname
exec chroot "$root" /usr/bin/env -i "$@"
"#;

/// `ip netns add` may set up the shared `/run/netns` mount on first use;
/// doing that from two threads at once can stack mounts, so network setup
/// is serialised within the test process.
static NET_SETUP_LOCK: Mutex<()> = Mutex::new(());

/// Indices of live pods in this process: two pods with the same index
/// would tear down each other's network.
static ACTIVE_INDICES: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Makes temp names of copied binaries unique.
static COPY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running local pod; dropping it removes every trace of it.
pub struct LocalPod {
    /// 1..=200 for tests (each test a distinct one); 201..=254 are kept for
    /// the harness's own checks.
    pub index: u8,
    /// Network namespace name, `kmpod<index>`.
    pub netns: String,
    /// Host end of the veth, `10.214.<index>.1/30`.
    pub host_ip: Ipv4Addr,
    /// Pod end of the veth, `10.214.<index>.2/30`.
    pub pod_ip: Ipv4Addr,
    /// IPv6 address of the pod end of the veth, `fd00:214:<index>::2/64` (host end `::1`).
    pub pod_ip6: Ipv6Addr,
    /// Pod-only IPv6 service address on the pod's `lo`, `fd00:213:<index>::9` (TCP line
    /// echo on 7777, UDP echo on 7778, HTTP on 8080).
    pub service_ip6: Ipv6Addr,
    /// Pod-only service address on the pod's `lo`, `10.213.<index>.9`.
    pub service_ip: Ipv4Addr,
    /// Pod-only DNS server address on the pod's `lo`, `10.213.<index>.10`.
    pub dns_ip: Ipv4Addr,
    /// The long-running "pod" process (`sleep infinity`), as a host pid.
    pub target_pid: u32,
    /// The pod's root filesystem directory on the host.
    pub rootfs: PathBuf,
    /// Host end of the veth, `kmh<index>`.
    pub host_veth: String,
    /// Pod end of the veth, `kmp<index>`.
    pub pod_veth: String,
    /// A range tests may route as they like, on the host and in the pod, `10.212.<index>.0/24`
    /// (nothing uses it otherwise); host routes to it are removed with the pod.
    pub scratch_range: String,
    guard_route: String,
    guard_route6: String,
    /// Holds `/run/kmirror-pod-<index>.lock` while the pod lives (see the module docs).
    _index_lock: Option<Flock<File>>,
    tmp_dir: PathBuf,
    env: Vec<(String, String)>,
    target: Option<Child>,
    services: Option<Child>,
}

/// Panics unless the test runs as root (namespaces, veths and routes need it).
pub fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert!(euid == 0, "these tests build network/mount namespaces and must run as root (euid is {euid})");
}

impl LocalPod {
    /// Builds and starts pod number `index`; panics with the failing
    /// command and its stderr on any failure (after cleaning up).
    pub fn start(index: u8) -> LocalPod {
        require_root();
        assert!((1..=254).contains(&index), "LocalPod index must be in 1..=254, got {index}");
        {
            let mut active = lock(&ACTIVE_INDICES);
            assert!(
                !active.contains(&index),
                "LocalPod index {index} is already in use in this process; \
                 every test must use a distinct index"
            );
            active.push(index);
        }
        let index_lock = match lock_index(index) {
            Ok(lock) => lock,
            Err(e) => {
                lock(&ACTIVE_INDICES).retain(|i| *i != index);
                panic!("{e}");
            }
        };
        let tmp_dir = std::env::temp_dir().join(format!("kmirror-pod-{}-{index}", std::process::id()));
        // From here on a panic drops `pod`, which undoes whatever was done.
        let mut pod = LocalPod {
            index,
            netns: format!("kmpod{index}"),
            host_ip: Ipv4Addr::new(10, 214, index, 1),
            pod_ip: Ipv4Addr::new(10, 214, index, 2),
            pod_ip6: Ipv6Addr::new(0xfd00, 0x214, index as u16, 0, 0, 0, 0, 2),
            service_ip6: Ipv6Addr::new(0xfd00, 0x213, index as u16, 0, 0, 0, 0, 9),
            service_ip: Ipv4Addr::new(10, 213, index, 9),
            dns_ip: Ipv4Addr::new(10, 213, index, 10),
            target_pid: 0,
            rootfs: tmp_dir.join("rootfs"),
            host_veth: format!("kmh{index}"),
            pod_veth: format!("kmp{index}"),
            scratch_range: format!("10.212.{index}.0/24"),
            guard_route: format!("10.213.{index}.0/24"),
            guard_route6: format!("fd00:213:{index:x}::/64"),
            _index_lock: Some(index_lock),
            tmp_dir,
            env: pod_env(index),
            target: None,
            services: None,
        };
        pod.remove_leftovers();
        pod.setup_network();
        pod.build_rootfs();
        pod.start_target();
        pod.start_services();
        pod
    }

    /// The host file the pod's symlink `/data/escape` names (`/etc/kmirror-host-only-<index>`,
    /// an absolute target). The pod never creates it; a test that does must remove it.
    pub fn escape_target(&self) -> PathBuf {
        PathBuf::from(format!("/etc/kmirror-host-only-{}", self.index))
    }

    /// The pod's hostname (also set in its UTS namespace): `kmirror-pod-<index>`.
    pub fn pod_hostname(&self) -> String {
        format!("kmirror-pod-{}", self.index)
    }

    /// Runs `program` inside the pod and waits for it (stdin is empty,
    /// stdout/stderr are captured). See [`LocalPod::command_in_pod`].
    pub fn exec_in_pod(&self, program: &str, args: &[&str]) -> Output {
        self.command_in_pod(program, args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter for `{program}` in pod: {e}"))
    }

    /// A [`Command`] that runs `program` inside the pod: `nsenter` joins the
    /// target's network, mount and UTS namespaces, chroots to its root and
    /// cwd, and the environment is exactly the target's. Useful when a test
    /// needs stdin or a long-running process in the pod.
    ///
    /// `program` without a `/` is looked up in the pod's `PATH`. A path is a
    /// HOST path: under `/usr` (or the merged-usr `/bin`, `/sbin`, `/lib`,
    /// `/lib64`) it is the same file inside the pod, since the pod's `/usr` is
    /// the host's; anything else (e.g. `target/fixtures/go-app-static`) is
    /// copied into the rootfs as `/kmirror-bin/<file name>` first. Copying
    /// rather than bind-mounting keeps every mount inside the pod's private
    /// namespace and needs no cleanup; the copy is refreshed on every call.
    pub fn command_in_pod(&self, program: &str, args: &[&str]) -> Command {
        let inside = self.pod_program_path(program);
        let mut cmd = Command::new(host_tool("nsenter"));
        cmd.arg(format!("--target={}", self.target_pid))
            .args(["--net", "--mount", "--uts", "--root", "--wd", "--"])
            .arg(inside)
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Everything `podsvc.py` logged so far (DNS queries, HTTP requests with
    /// client address, echo connections).
    pub fn service_log(&self) -> String {
        fs::read_to_string(self.tmp_dir.join("podsvc.log")).unwrap_or_default()
    }

    /// Maps a program argument of [`LocalPod::command_in_pod`] to its path
    /// inside the pod, copying host binaries into the rootfs when needed.
    fn pod_program_path(&self, program: &str) -> String {
        if !program.contains('/') {
            return program.to_string();
        }
        const SHARED_PREFIXES: [&str; 5] = ["/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/"];
        if SHARED_PREFIXES.iter().any(|p| program.starts_with(p)) {
            return program.to_string();
        }
        let source = Path::new(program);
        let name = source
            .file_name()
            .unwrap_or_else(|| panic!("exec_in_pod: `{program}` has no file name"))
            .to_string_lossy()
            .into_owned();
        let bin_dir = self.rootfs.join(POD_BIN_DIR);
        let tmp = bin_dir.join(format!(".{name}.{}.tmp", COPY_COUNTER.fetch_add(1, Ordering::Relaxed)));
        fs::copy(source, &tmp)
            .unwrap_or_else(|e| panic!("exec_in_pod: cannot copy `{program}` into the pod rootfs: {e}"));
        // Rename, so a copy never clobbers a binary that is being executed.
        fs::rename(&tmp, bin_dir.join(&name))
            .unwrap_or_else(|e| panic!("exec_in_pod: cannot install `{name}` in the pod: {e}"));
        format!("/{POD_BIN_DIR}/{name}")
    }

    /// Removes what a crashed earlier run with this index may have left. Only called with the
    /// index's lock held, so no live pod of another process owns any of it.
    fn remove_leftovers(&self) {
        kill_netns_processes(&self.netns);
        self.remove_network();
        let suffix = format!("-{}", self.index);
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("kmirror-pod-")
                .and_then(|rest| rest.strip_suffix(&suffix))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let stale = pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists();
            if stale {
                remove_tree_guarded(&entry.path());
            }
        }
    }

    fn setup_network(&self) {
        let _guard = lock(&NET_SETUP_LOCK);
        let ns = self.netns.as_str();
        let (kmh, kmp) = (self.host_veth.as_str(), self.pod_veth.as_str());
        let host_cidr = format!("{}/30", self.host_ip);
        let pod_cidr = format!("{}/30", self.pod_ip);
        let service = format!("{}/32", self.service_ip);
        let dns = format!("{}/32", self.dns_ip);
        let gateway = self.host_ip.to_string();
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "link", "add", kmh, "type", "veth", "peer", "name", kmp, "netns", ns]);
        // Belt and braces: even if someone enables global forwarding, the
        // host must not route anything arriving from the pod elsewhere.
        let forwarding = format!("/proc/sys/net/ipv4/conf/{kmh}/forwarding");
        fs::write(&forwarding, "0").unwrap_or_else(|e| panic!("cannot write {forwarding}: {e}"));
        run(&["ip", "addr", "add", &host_cidr, "dev", kmh]);
        run(&["ip", "link", "set", kmh, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        run(&["ip", "-n", ns, "addr", "add", &pod_cidr, "dev", kmp]);
        run(&["ip", "-n", ns, "link", "set", kmp, "up"]);
        // IPv6 on the veth too (no duplicate address detection, so it is usable at once).
        let host6 = format!("fd00:214:{:x}::1/64", self.index);
        let pod6 = format!("{}/64", self.pod_ip6);
        run(&["ip", "addr", "add", &host6, "dev", kmh, "nodad"]);
        run(&["ip", "-n", ns, "addr", "add", &pod6, "dev", kmp, "nodad"]);
        run(&["ip", "-n", ns, "addr", "add", &service, "dev", "lo"]);
        run(&["ip", "-n", ns, "addr", "add", &dns, "dev", "lo"]);
        run(&["ip", "-n", ns, "route", "add", "default", "via", &gateway]);
        let service6 = format!("{}/128", self.service_ip6);
        run(&["ip", "-n", ns, "addr", "add", &service6, "dev", "lo", "nodad"]);
        run(&["ip", "route", "add", "unreachable", &self.guard_route]);
        run(&["ip", "-6", "route", "add", "unreachable", &self.guard_route6]);
        // The guards must be what the host uses for pod-only addresses.
        for address in [self.service_ip.to_string(), self.service_ip6.to_string()] {
            let probe = Command::new("ip")
                .args(["route", "get", &address])
                .output()
                .unwrap_or_else(|e| panic!("cannot run `ip route get`: {e}"));
            assert!(
                !probe.status.success(),
                "host still routes pod-only address {address}: {}",
                String::from_utf8_lossy(&probe.stdout).trim()
            );
        }
    }

    /// Deletes the pod's network: veth, namespace, guard routes and whatever a test routed
    /// to the scratch range on the host.
    fn remove_network(&self) {
        quiet(&["ip", "link", "del", &self.host_veth]);
        quiet(&["ip", "netns", "del", &self.netns]);
        quiet(&["ip", "route", "del", "unreachable", &self.guard_route]);
        quiet(&["ip", "-6", "route", "del", "unreachable", &self.guard_route6]);
        quiet(&["ip", "route", "flush", "exact", &self.scratch_range]);
    }

    fn build_rootfs(&self) {
        let index = self.index;
        fs::create_dir(&self.tmp_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.tmp_dir.display()));
        let root = self.rootfs.as_path();
        for dir in [
            "",
            "usr",
            "proc",
            "dev",
            "tmp",
            "etc",
            "root",
            "data/dir/sub",
            "var/run/secrets/kubernetes.io/serviceaccount",
            POD_BIN_DIR,
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        }
        set_mode(&root.join("tmp"), 0o1777);
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("data/link-to-a", "dir/a.txt"),
        ] {
            make_symlink(target, &root.join(link));
        }
        make_symlink(&format!("/etc/kmirror-host-only-{index}"), &root.join("data/escape"));
        let hostname = self.pod_hostname();
        let files = [
            (
                "etc/resolv.conf",
                format!(
                    "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                     nameserver {}\noptions ndots:5\n",
                    self.dns_ip
                ),
            ),
            (
                "etc/hosts",
                format!(
                    "127.0.0.1\tlocalhost\n{}\t{hostname}\n{}\tpod-hosts-only.internal\n",
                    self.pod_ip, self.service_ip
                ),
            ),
            ("etc/hostname", format!("{hostname}\n")),
            ("etc/nsswitch.conf", "hosts: files dns\n".to_string()),
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                    .to_string(),
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n".to_string()),
            ("var/run/secrets/kubernetes.io/serviceaccount/token", format!("pod-token-{index}")),
            ("var/run/secrets/kubernetes.io/serviceaccount/namespace", "default".to_string()),
            ("data/pod-only.txt", format!("pod-only file {index}\n")),
            ("data/dir/a.txt", "a\n".to_string()),
            ("data/dir/b.txt", "bb\n".to_string()),
        ];
        for (path, content) in files {
            let path = root.join(path);
            fs::write(&path, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        set_mode(&root.join("data/pod-only.txt"), 0o640);
    }

    /// Starts the target and waits until the spawned pid really is the
    /// chrooted `sleep` in the pod's namespaces. Every step of the chain
    /// (`ip netns exec`, `unshare` without `--fork`, `sh -c '… exec'`,
    /// `chroot`, `env`) execs, so the pid never changes.
    fn start_target(&mut self) {
        let log_path = self.tmp_dir.join("target.log");
        let log =
            File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns])
            .args(["unshare", "--mount", "--uts", "--propagation=private", "--"])
            .args(["/bin/sh", "-c", SETUP_SCRIPT, "kmpod-setup"])
            .arg(&self.rootfs)
            .arg(self.pod_hostname())
            .args(self.env.iter().map(|(k, v)| format!("{k}={v}")))
            .args(["/bin/sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = crate::run::spawn_tied(command)
            .unwrap_or_else(|e| panic!("cannot spawn the pod target via `ip netns exec`: {e}"));
        let pid = child.id();
        self.target_pid = pid;
        self.target = Some(child);

        let marker = format!("POD_ONLY_VAR=pod-value-{}", self.index);
        let root_meta = fs::metadata(&self.rootfs)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", self.rootfs.display()));
        let netns_ino = fs::metadata(format!("/run/netns/{}", self.netns))
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("cannot stat /run/netns/{}: {e}", self.netns));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.target.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "pod {} target setup exited ({status}): {}",
                    self.index,
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let has_env = environ.split(|b| *b == 0).any(|v| v == marker.as_bytes());
            let in_root = fs::metadata(format!("/proc/{pid}/root"))
                .is_ok_and(|m| m.dev() == root_meta.dev() && m.ino() == root_meta.ino());
            let in_netns = fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == netns_ino);
            if has_env && in_root && in_netns {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pod {} target (pid {pid}) not ready after {STARTUP_TIMEOUT:?} \
                 (env: {has_env}, root: {in_root}, netns: {in_netns}): {}",
                self.index,
                fs::read_to_string(&log_path).unwrap_or_default().trim()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `podsvc.py` in the netns and waits for its `ready` line. Its
    /// stderr goes to a log file so it can never block on a full pipe.
    fn start_services(&mut self) {
        assert!(Path::new(PODSVC).is_file(), "pod services script not found at {PODSVC}");
        let log_path = self.tmp_dir.join("podsvc.log");
        let log =
            File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, &host_tool("python3"), PODSVC])
            .args(["--index", &self.index.to_string()])
            .args(["--service-ip", &self.service_ip.to_string()])
            .args(["--service-ip6", &self.service_ip6.to_string()])
            .args(["--dns-ip", &self.dns_ip.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = crate::run::spawn_tied(command)
            .unwrap_or_else(|e| panic!("cannot spawn podsvc.py via `ip netns exec`: {e}"));
        let stdout = child.stdout.take();
        self.services = Some(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining until the service exits.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
        if line.trim_end() != "ready" {
            // Give a crashing interpreter a moment to finish its traceback.
            thread::sleep(Duration::from_millis(200));
            panic!(
                "pod {} services did not print `ready` within {STARTUP_TIMEOUT:?} \
                 (got {line:?}); podsvc.py stderr:\n{}",
                self.index,
                self.service_log()
            );
        }
    }
}

impl Drop for LocalPod {
    /// Best-effort teardown: never panics, ignores every error.
    fn drop(&mut self) {
        if let Some(child) = self.services.take() {
            stop_child(child, libc::SIGTERM, Duration::from_secs(2));
        }
        if let Some(child) = self.target.take() {
            stop_child(child, libc::SIGKILL, Duration::from_secs(2));
        }
        // Anything else a test started in the pod (e.g. via command_in_pod).
        kill_netns_processes(&self.netns);
        self.remove_network();
        remove_tree_guarded(&self.tmp_dir);
        if let Ok(mut active) = ACTIVE_INDICES.lock() {
            active.retain(|i| *i != self.index);
        }
        // Last: only now may another process take the index.
        self._index_lock.take();
    }
}

/// Takes the exclusive lock of pod index `index` across processes, waiting while another live
/// test process holds it. The kernel drops the lock when its owner dies, however it dies, so a
/// lock that can be taken means every trace of the index left on this machine is stale.
fn lock_index(index: u8) -> Result<Flock<File>, String> {
    let path = format!("/run/kmirror-pod-{index}.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let deadline = Instant::now() + INDEX_LOCK_TIMEOUT;
    let mut told = false;
    let mut file = loop {
        file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => break locked,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, error)) => return Err(format!("cannot lock {path}: {}", std::io::Error::from(error))),
        };
        let owner = fs::read_to_string(&path).unwrap_or_default();
        if Instant::now() > deadline {
            return Err(format!(
                "pod index {index} is still in use by test process {} after {INDEX_LOCK_TIMEOUT:?} \
                 ({path}); is another run of the same tests going on?",
                owner.trim()
            ));
        }
        if !told {
            eprintln!("LocalPod: waiting for pod index {index}, in use by test process {}", owner.trim());
            told = true;
        }
        thread::sleep(Duration::from_millis(100));
    };
    file.set_len(0).map_err(|e| format!("cannot truncate {path}: {e}"))?;
    writeln!(file, "{}", std::process::id()).map_err(|e| format!("cannot write {path}: {e}"))?;
    Ok(file)
}

/// The target's environment (also used for [`LocalPod::command_in_pod`]).
fn pod_env(index: u8) -> Vec<(String, String)> {
    [
        ("PATH", POD_PATH.to_string()),
        ("HOME", "/root".to_string()),
        ("POD_ONLY_VAR", format!("pod-value-{index}")),
        ("KUBERNETES_SERVICE_HOST", format!("10.213.{index}.9")),
        ("KUBERNETES_SERVICE_PORT", "443".to_string()),
        ("HOSTNAME", format!("kmirror-pod-{index}")),
        ("SHARED_VAR", "from-pod".to_string()),
        // Code-loading: kmirror keeps it out of the app's environment unless asked.
        ("NODE_OPTIONS", "--no-warnings".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Locks a mutex even if a panicking test poisoned it (the data is simple).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Absolute path of a host tool in /usr/bin (immune to PATH shims such as
/// pyenv and to `env_clear`), else the bare name.
fn host_tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    if Path::new(&path).exists() { path } else { name.to_string() }
}

/// Runs `argv`, panicking with the command line and its stderr on failure.
fn run(argv: &[&str]) -> Output {
    let line = argv.join(" ");
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    assert!(
        output.status.success(),
        "`{line}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

/// Runs `argv`, ignoring failure; for cleanup.
fn quiet(argv: &[&str]) {
    let _ = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn make_symlink(target: &str, link: &Path) {
    symlink(target, link).unwrap_or_else(|e| panic!("cannot symlink {} -> {target}: {e}", link.display()));
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

/// Signals our child `child`, waits up to `grace`, then SIGKILLs and reaps it.
fn stop_child(mut child: Child, signal: libc::c_int, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // Our own unreaped child (try_wait just saw it running): its pid cannot have been reused.
    let _ = crate::run::signal(child.id(), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILLs every process in network namespace `netns` (never ourselves).
fn kill_netns_processes(netns: &str) {
    let Ok(output) =
        Command::new("ip").args(["netns", "pids", netns]).stdin(Stdio::null()).stderr(Stdio::null()).output()
    else {
        return;
    };
    let own = std::process::id();
    for pid in String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| *p != own && *p > 1)
    {
        // Just listed as living in our own pod netns.
        let _ = crate::run::signal(pid, libc::SIGKILL);
    }
}

/// Mount points of the host mount namespace at or below `dir`.
fn host_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut text = String::new();
    if File::open("/proc/self/mountinfo").and_then(|mut f| f.read_to_string(&mut text)).is_err() {
        return Vec::new();
    }
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // Deepest first, so nested mounts are detached before their parents.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Decodes the `\ooo` octal escapes mountinfo uses for spaces and the like.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok().and_then(|d| u8::from_str_radix(d, 8).ok()));
        match (bytes[i], octal) {
            (b'\\', Some(value)) => {
                out.push(value);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deletes `dir` recursively, but never through a mount point: the pod's
/// mounts live only in its private namespace, yet if one ever showed up on
/// the host, a plain `remove_dir_all` would delete the host's `/usr` or
/// `/dev` through it. Leaked mounts are detached first; if any remain the
/// directory is left in place.
fn remove_tree_guarded(dir: &Path) {
    if !dir.exists() {
        return;
    }
    for mount in host_mounts_under(dir) {
        quiet(&["umount", "--lazy", &mount.to_string_lossy()]);
    }
    let remaining = host_mounts_under(dir);
    if !remaining.is_empty() {
        eprintln!("LocalPod: not removing {}: mount points remain below it: {remaining:?}", dir.display());
        return;
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    remove_same_device(dir, meta.dev());
}

/// Recursive delete that does not follow symlinks or cross filesystems.
fn remove_same_device(path: &Path, dev: u64) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.dev() != dev {
        return;
    }
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                remove_same_device(&entry.path(), dev);
            }
        }
        let _ = fs::remove_dir(path);
    } else {
        let _ = fs::remove_file(path);
    }
}
