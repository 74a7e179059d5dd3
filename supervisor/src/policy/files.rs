//! File access: which paths the app sees from the pod.
//!
//! Modes follow mirrord's: `local` (nothing remote), `localwithoverrides` (default: only the
//! pod-specific paths below come from the pod), `read` (everything comes from the pod except
//! local-only paths: the kernel's pseudo file systems, temp dirs, the developer's home and the
//! local runtime's own installation), `write` (as `read`, and writes to those paths go to the
//! pod's files too). In the other modes writes stay local, except to paths of the user's
//! `read_write` list. Relative paths stay local unless they are relative to a pod directory the
//! app opened.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsMode {
    Local,
    #[value(name = "localwithoverrides")]
    LocalWithOverrides,
    Read,
    Write,
}

/// Files kmirror synthesises instead of reading them anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VirtualFile {
    /// The pod's resolv.conf pointed at kmirror's DNS forwarder.
    ResolvConf,
    /// The local nsswitch.conf with `hosts: files dns`, so glibc asks neither nscd, nor
    /// systemd-resolved, nor mDNS on the developer's machine.
    NsSwitch,
    /// `/proc/sys/kernel/hostname`: the host name the app sees (the pod's, or what the app set);
    /// writes set it for the app without touching the machine's.
    Hostname,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRoute {
    Local,
    Remote,
    Virtual(VirtualFile),
    /// The path does not exist for the app (`feature.fs.not_found`): ENOENT.
    NotFound,
}

/// The user's path lists (`feature.fs.read_write`, `read_only`, `local`, `not_found`):
/// case-insensitive regexes, searched anywhere in the absolute, normalised path (anchor them
/// with `^`/`$`), as in mirrord. They come before the mode's own rules: `not_found` first,
/// then `local`, then `read_write` (reads and writes in the pod), then `read_only` (reads in
/// the pod, writes local).
#[derive(Debug, Clone, Default)]
pub struct PathLists {
    pub read_write: Vec<regex::bytes::Regex>,
    pub read_only: Vec<regex::bytes::Regex>,
    pub local: Vec<regex::bytes::Regex>,
    pub not_found: Vec<regex::bytes::Regex>,
}

impl PathLists {
    pub fn compile(pattern: &str) -> Result<regex::bytes::Regex, regex::Error> {
        regex::bytes::RegexBuilder::new(pattern).case_insensitive(true).size_limit(1 << 20).build()
    }

    /// Compiles the four lists (each pattern was checked when the configuration was read).
    pub fn new(
        read_write: &[String],
        read_only: &[String],
        local: &[String],
        not_found: &[String],
    ) -> Result<PathLists, regex::Error> {
        let all = |list: &[String]| list.iter().map(|p| PathLists::compile(p)).collect::<Result<Vec<_>, _>>();
        Ok(PathLists {
            read_write: all(read_write)?,
            read_only: all(read_only)?,
            local: all(local)?,
            not_found: all(not_found)?,
        })
    }

    fn any(list: &[regex::bytes::Regex], path: &[u8]) -> bool {
        list.iter().any(|r| r.is_match(path))
    }
}

/// Paths that come from the pod even in `localwithoverrides` mode.
const POD_SPECIFIC: &[&str] =
    &["/etc/hostname", "/var/run/secrets/kubernetes.io", "/run/secrets/kubernetes.io"];

/// Code a runtime loads, which belongs to the local app even in `read` mode wherever it lives
/// (mirrord keeps the same kinds local): scripts, modules, class files, libraries.
const RUNTIME_FILE_SUFFIXES: &[&str] =
    &[".so", ".py", ".pyc", ".pth", ".js", ".mjs", ".cjs", ".jar", ".class", ".rb", ".sh"];
const RUNTIME_DIRS: &[&str] = &["/node_modules/", "/site-packages/", "/__pycache__/"];

fn is_runtime_file(path: &[u8]) -> bool {
    RUNTIME_FILE_SUFFIXES.iter().any(|s| path.ends_with(s.as_bytes()))
        || RUNTIME_DIRS.iter().any(|d| path.windows(d.len()).any(|w| w == d.as_bytes()))
}

/// Paths that stay local even in `read` mode.
const LOCAL_ONLY: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/tmp",
    "/var/tmp",
    "/run/user",
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/opt",
    "/nix",
    "/snap",
    "/home",
    "/root",
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/java-17-openjdk",
    "/etc/java-21-openjdk",
    "/etc/ssl/openssl.cnf",
];

#[derive(Debug, Clone)]
pub struct FilePolicy {
    pub mode: FsMode,
    /// Resolver configuration comes from the pod (DNS feature on).
    pub remote_dns: bool,
    /// Extra local-only prefixes found at start: the app's own directory, the working
    /// directory, runtime homes (JAVA_HOME, GOROOT).
    pub extra_local: Vec<Vec<u8>>,
    /// Directories whose listing kmirror materialised; paths below it map back to the pod.
    pub materialized_root: Vec<u8>,
    /// Stand-ins of pod files the app holds O_PATH descriptors of; paths below it map back to
    /// the pod, as for `materialized_root`.
    pub standin_root: Vec<u8>,
    /// Stand-ins of pod symlinks themselves (O_PATH | O_NOFOLLOW); only their descriptors map
    /// back to the pod (no lookup goes through a symlink itself).
    pub link_root: Vec<u8>,
    /// The user's path lists.
    pub lists: PathLists,
}

/// The pod file a descriptor of the app stands for.
#[derive(Debug, PartialEq, Eq)]
pub struct PodFile {
    pub path: Vec<u8>,
    /// The descriptor is what the path leads to (false: the symlink itself).
    pub follow: bool,
}

/// True when `path` is `prefix` or lies below it.
fn under(path: &[u8], prefix: &[u8]) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len() || path[prefix.len()] == b'/' || prefix.ends_with(b"/"))
}

impl FilePolicy {
    /// Decides for an absolute, normalised path. `write` is set for opens that may modify.
    pub fn route(&self, path: &[u8], write: bool) -> FileRoute {
        if path == b"/proc/sys/kernel/hostname" {
            return FileRoute::Virtual(VirtualFile::Hostname);
        }
        if self.remote_dns {
            match path {
                b"/etc/resolv.conf" if !write => return FileRoute::Virtual(VirtualFile::ResolvConf),
                b"/etc/nsswitch.conf" if !write => return FileRoute::Virtual(VirtualFile::NsSwitch),
                b"/etc/hosts" if !write => return FileRoute::Remote,
                _ => {}
            }
        }
        if PathLists::any(&self.lists.not_found, path) {
            return FileRoute::NotFound;
        }
        if PathLists::any(&self.lists.local, path) {
            return FileRoute::Local;
        }
        if PathLists::any(&self.lists.read_write, path) {
            return FileRoute::Remote;
        }
        if write {
            // Only `write` mode writes the pod's files, and only those reads would take there.
            return match self.mode {
                FsMode::Write => self.mode_route(path),
                _ => FileRoute::Local,
            };
        }
        if PathLists::any(&self.lists.read_only, path) {
            return FileRoute::Remote;
        }
        self.mode_route(path)
    }

    /// Whether any write may reach the pod (`write` mode or a `read_write` list): the write
    /// family of calls is trapped only then.
    pub fn writes_remote(&self) -> bool {
        self.mode == FsMode::Write || !self.lists.read_write.is_empty()
    }

    /// The mode's own rule for a path no list names.
    fn mode_route(&self, path: &[u8]) -> FileRoute {
        match self.mode {
            FsMode::Local => FileRoute::Local,
            FsMode::LocalWithOverrides => {
                if POD_SPECIFIC.iter().any(|p| under(path, p.as_bytes())) {
                    FileRoute::Remote
                } else {
                    FileRoute::Local
                }
            }
            FsMode::Read | FsMode::Write => {
                // Ancestors of the app's own directories stay local too: runtimes resolve their
                // script's real path component by component (lstat of /home, /home/dev, ...).
                let local = path == b"/"
                    || LOCAL_ONLY.iter().any(|p| under(path, p.as_bytes()))
                    || self.extra_local.iter().any(|p| under(path, p) || under(p, path))
                    || is_runtime_file(path);
                if local && !POD_SPECIFIC.iter().any(|p| under(path, p.as_bytes())) {
                    FileRoute::Local
                } else {
                    FileRoute::Remote
                }
            }
        }
    }

    /// Maps a path inside the local directory tree that mirrors pod directories back to the pod
    /// path, e.g. `<root>/etc/x` → `/etc/x`.
    pub fn pod_path_of_materialized(&self, local: &[u8]) -> Option<Vec<u8>> {
        let root = [&self.materialized_root, &self.standin_root]
            .into_iter()
            .find(|root| !root.is_empty() && under(local, root))?;
        let rest = &local[root.len()..];
        Some(if rest.is_empty() { b"/".to_vec() } else { rest.to_vec() })
    }

    /// The pod path a descriptor of the app stands for, from its `/proc/<tid>/fd/N` link: a
    /// mirrored directory or an O_PATH stand-in, also one replaced since (the kernel then
    /// appends ` (deleted)` to the link).
    pub fn pod_path_of_fd_link(&self, link: &[u8]) -> Option<Vec<u8>> {
        self.pod_path_of_materialized(link.strip_suffix(b" (deleted)").unwrap_or(link))
    }

    /// The pod file a descriptor of the app stands for, from its `/proc/<tid>/fd/N` link: as
    /// [`FilePolicy::pod_path_of_fd_link`], or a stand-in of a pod symlink itself.
    pub fn pod_file_of_fd_link(&self, link: &[u8]) -> Option<PodFile> {
        if let Some(path) = self.pod_path_of_fd_link(link) {
            return Some(PodFile { path, follow: true });
        }
        let link = link.strip_suffix(b" (deleted)").unwrap_or(link);
        let rest = link.strip_prefix(&self.link_root[..]).filter(|_| !self.link_root.is_empty())?;
        (rest.first() == Some(&b'/')).then(|| PodFile { path: rest.to_vec(), follow: false })
    }
}

/// Whose descriptor table a `/proc` path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdOwner {
    /// `/proc/self`, `/dev/fd`: the calling process.
    Process,
    /// `/proc/thread-self`: the calling thread.
    Thread,
    /// `/proc/<pid>`: the caller's only if `pid` is its process or thread id.
    Pid(u32),
    /// `/proc/<pid>/task/<tid>`: the caller's only if `tid` is its thread id.
    Task(u32),
}

/// A path through a descriptor's magic link: `/proc/self/fd/3/etc` is `fd` 3, `rest` `/etc`.
#[derive(Debug, PartialEq, Eq)]
pub struct FdLink<'a> {
    pub owner: FdOwner,
    pub fd: i32,
    pub rest: &'a [u8],
}

/// Recognises the spellings of a process's own descriptor links: `/proc/self/fd/N`,
/// `/proc/thread-self/fd/N`, `/proc/<pid>/fd/N`, `/proc/<pid>/task/<tid>/fd/N`, `/dev/fd/N`,
/// each maybe followed by more components. Other spellings (a symlink of one's own, a working
/// directory in `/proc/self/fd`) are left to the kernel.
pub fn fd_link(path: &[u8]) -> Option<FdLink<'_>> {
    fn number(part: &[u8]) -> Option<u32> {
        if part.is_empty() || part.len() > 10 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    }
    fn split(path: &[u8]) -> (&[u8], &[u8]) {
        match path.iter().position(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i..]),
            None => (path, b""),
        }
    }
    let (owner, rest) = if let Some(rest) = path.strip_prefix(b"/dev/fd/") {
        (FdOwner::Process, rest)
    } else {
        let (who, rest) = split(path.strip_prefix(b"/proc/")?);
        let owner = match who {
            b"self" => FdOwner::Process,
            b"thread-self" => FdOwner::Thread,
            pid => FdOwner::Pid(number(pid)?),
        };
        let (owner, rest) = match (owner, rest.strip_prefix(b"/task/")) {
            (FdOwner::Pid(_), Some(task)) => {
                let (tid, rest) = split(task);
                (FdOwner::Task(number(tid)?), rest)
            }
            _ => (owner, rest),
        };
        (owner, rest.strip_prefix(b"/fd/")?)
    };
    let (fd, rest) = split(rest);
    Some(FdLink { owner, fd: i32::try_from(number(fd)?).ok()?, rest })
}

/// Whether `normalize` would return `path` unchanged: absolute, no empty, `.` or `..` part
/// and no trailing slash. Most paths apps open are; they skip the rebuild.
pub fn is_normal(path: &[u8]) -> bool {
    path == b"/"
        || (path.first() == Some(&b'/')
            && path[1..].split(|&b| b == b'/').all(|part| !matches!(part, b"" | b"." | b"..")))
}

/// Lexically normalises an absolute path: collapses `//`, removes `.`, resolves `..` (never
/// above `/`). Symlinks are left to whoever opens the path.
pub fn normalize(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for part in &parts {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Joins a relative path onto a directory path and normalises the result.
pub fn join(dir: &[u8], rel: &[u8]) -> Vec<u8> {
    let mut joined = dir.to_vec();
    joined.push(b'/');
    joined.extend_from_slice(rel);
    normalize(&joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: FsMode) -> FilePolicy {
        FilePolicy {
            mode,
            remote_dns: true,
            extra_local: vec![b"/work/app".to_vec()],
            materialized_root: b"/tmp/kmirror-1/pod".to_vec(),
            standin_root: b"/tmp/kmirror-1/path".to_vec(),
            link_root: b"/tmp/kmirror-1/link".to_vec(),
            lists: PathLists::default(),
        }
    }

    #[test]
    fn user_lists_come_before_the_mode() {
        let mut p = policy(FsMode::LocalWithOverrides);
        p.lists = PathLists::new(
            &[],
            &["^/data/".into(), "^/usr/share/pod-data$".into()],
            &["^/data/local".into(), r"\.CACHE$".into()],
            &["secret".into(), "^/etc/hostname$".into()],
        )
        .unwrap();
        assert_eq!(p.route(b"/data/x", false), FileRoute::Remote, "read_only");
        assert_eq!(p.route(b"/data/x", true), FileRoute::Local, "writes stay local");
        assert_eq!(p.route(b"/usr/share/pod-data", false), FileRoute::Remote, "even a local-only path");
        assert_eq!(p.route(b"/data/local/y", false), FileRoute::Local, "local beats read_only");
        assert_eq!(p.route(b"/data/z.cache", false), FileRoute::Local, "case-insensitive");
        assert_eq!(p.route(b"/data/Secret.txt", false), FileRoute::NotFound, "not_found beats all");
        assert_eq!(p.route(b"/home/dev/secret", true), FileRoute::NotFound, "for writes too");
        assert_eq!(p.route(b"/etc/hostname", false), FileRoute::NotFound, "even a pod-specific path");
        assert_eq!(p.route(b"/etc/resolv.conf", false), FileRoute::Virtual(VirtualFile::ResolvConf));
        assert_eq!(p.route(b"/etc/passwd", false), FileRoute::Local, "the mode decides the rest");
        assert!(PathLists::compile("(").is_err());
    }

    #[test]
    fn write_mode_and_read_write_lists_send_writes_to_the_pod() {
        let p = policy(FsMode::Write);
        assert!(p.writes_remote());
        assert_eq!(p.route(b"/data/x", true), FileRoute::Remote);
        assert_eq!(p.route(b"/data/x", false), FileRoute::Remote);
        assert_eq!(p.route(b"/tmp/x", true), FileRoute::Local, "local-only paths stay local for writes");
        assert_eq!(p.route(b"/work/app/out.log", true), FileRoute::Local);
        assert_eq!(p.route(b"/srv/run.sh", true), FileRoute::Local, "so does a runtime's code");
        assert_eq!(p.route(b"/proc/sys/kernel/hostname", true), FileRoute::Virtual(VirtualFile::Hostname));
        assert_eq!(p.route(b"/etc/hosts", true), FileRoute::Remote, "the pod's hosts file, for writes too");
        assert!(!policy(FsMode::Read).writes_remote());
        let mut p = policy(FsMode::LocalWithOverrides);
        p.lists =
            PathLists::new(&["^/data/rw/".into()], &["^/data/".into()], &["^/data/rw/local".into()], &[])
                .unwrap();
        assert!(p.writes_remote());
        assert_eq!(p.route(b"/data/rw/a", true), FileRoute::Remote, "read_write: writes in the pod");
        assert_eq!(p.route(b"/data/rw/a", false), FileRoute::Remote, "and reads");
        assert_eq!(p.route(b"/data/ro", true), FileRoute::Local, "read_only: writes stay local");
        assert_eq!(p.route(b"/data/rw/local", true), FileRoute::Local, "local beats read_write");
        assert_eq!(p.route(b"/etc/hostname", true), FileRoute::Local, "the mode keeps writes local");
    }

    #[test]
    fn overrides_mode_reads_only_pod_specific_paths_remotely() {
        let p = policy(FsMode::LocalWithOverrides);
        assert_eq!(p.route(b"/etc/resolv.conf", false), FileRoute::Virtual(VirtualFile::ResolvConf));
        assert_eq!(p.route(b"/etc/nsswitch.conf", false), FileRoute::Virtual(VirtualFile::NsSwitch));
        assert_eq!(p.route(b"/etc/hosts", false), FileRoute::Remote);
        assert_eq!(p.route(b"/etc/hostname", false), FileRoute::Remote);
        assert_eq!(p.route(b"/var/run/secrets/kubernetes.io/serviceaccount/token", false), FileRoute::Remote);
        assert_eq!(p.route(b"/var/run/secrets/kubernetes.iox", false), FileRoute::Local);
        assert_eq!(p.route(b"/etc/passwd", false), FileRoute::Local);
        assert_eq!(p.route(b"/etc/hosts", true), FileRoute::Local, "writes stay local");
    }

    #[test]
    fn read_mode_keeps_local_only_paths_local() {
        let p = policy(FsMode::Read);
        assert_eq!(p.route(b"/etc/passwd", false), FileRoute::Remote);
        assert_eq!(p.route(b"/data/pod-only.txt", false), FileRoute::Remote);
        for local in [
            &b"/proc/self/maps"[..],
            b"/usr/lib/x.so",
            b"/lib64/ld-linux-x86-64.so.2",
            b"/tmp/x",
            b"/dev/null",
            b"/work/app/main",
            b"/",
            b"/etc/ld.so.cache",
        ] {
            assert_eq!(p.route(local, false), FileRoute::Local, "{}", String::from_utf8_lossy(local));
        }
        assert_eq!(p.route(b"/work/application", false), FileRoute::Remote, "prefix match is per component");
        assert_eq!(p.route(b"/work", false), FileRoute::Local, "ancestors of the app's directories");
        assert_eq!(p.route(b"/etc", false), FileRoute::Remote, "but not of built-in local-only files");
        assert_eq!(p.route(b"/srv/app/server.js", false), FileRoute::Local, "a runtime's code stays local");
        assert_eq!(p.route(b"/srv/app/node_modules/x/index", false), FileRoute::Local);
        assert_eq!(p.route(b"/srv/app/data.txt", false), FileRoute::Remote);
        assert_eq!(p.route(b"/data/x", true), FileRoute::Local);
    }

    #[test]
    fn local_mode_and_dns_off() {
        let mut p = policy(FsMode::Local);
        assert_eq!(p.route(b"/etc/hostname", false), FileRoute::Local);
        assert_eq!(p.route(b"/etc/resolv.conf", false), FileRoute::Virtual(VirtualFile::ResolvConf));
        p.remote_dns = false;
        assert_eq!(p.route(b"/etc/resolv.conf", false), FileRoute::Local);
    }

    #[test]
    fn the_kernel_hostname_file_is_virtual_in_every_mode() {
        for mode in [FsMode::Local, FsMode::LocalWithOverrides, FsMode::Read] {
            let p = policy(mode);
            let hostname = b"/proc/sys/kernel/hostname";
            assert_eq!(p.route(hostname, false), FileRoute::Virtual(VirtualFile::Hostname));
            assert_eq!(
                p.route(hostname, true),
                FileRoute::Virtual(VirtualFile::Hostname),
                "writes never reach the machine"
            );
            assert_eq!(p.route(b"/proc/sys/kernel/domainname", false), FileRoute::Local);
        }
    }

    #[test]
    fn normalisation_and_materialized_mapping() {
        assert_eq!(normalize(b"//etc/./x/../hosts"), b"/etc/hosts");
        assert_eq!(normalize(b"/../.."), b"/");
    }

    #[test]
    fn normal_paths_are_exactly_those_normalize_leaves_alone() {
        let samples: [&[u8]; 14] = [
            b"/",
            b"/etc/hosts",
            b"/a",
            b"//",
            b"/a//b",
            b"/a/./b",
            b"/a/../b",
            b"/a/",
            b"/.",
            b"/..",
            b"/a/.hidden",
            b"/a/..b",
            b"/a/b.",
            b"",
        ];
        for path in samples {
            let unchanged = path.first() == Some(&b'/') && normalize(path) == path;
            assert_eq!(is_normal(path), unchanged, "{}", String::from_utf8_lossy(path));
        }
        assert_eq!(join(b"/etc", b"../data/./a"), b"/data/a");
        let p = policy(FsMode::Read);
        assert_eq!(p.pod_path_of_materialized(b"/tmp/kmirror-1/pod/etc/x"), Some(b"/etc/x".to_vec()));
        assert_eq!(p.pod_path_of_materialized(b"/tmp/kmirror-1/pod"), Some(b"/".to_vec()));
        assert_eq!(p.pod_path_of_materialized(b"/tmp/kmirror-1/podx"), None);
        assert_eq!(p.pod_path_of_materialized(b"/tmp/kmirror-1/path/data/big"), Some(b"/data/big".to_vec()));
        assert_eq!(p.pod_path_of_fd_link(b"/tmp/kmirror-1/path/data/x (deleted)"), Some(b"/data/x".to_vec()));
        assert_eq!(p.pod_path_of_fd_link(b"/tmp/kmirror-1/pathx"), None);
        assert_eq!(p.pod_path_of_fd_link(b"/tmp/kmirror-1/link/data/l"), None, "no lookup through a symlink");
        assert_eq!(p.pod_path_of_materialized(b"/tmp/kmirror-1/link/data/l"), None);
        let file = |path: &[u8], follow| Some(PodFile { path: path.to_vec(), follow });
        assert_eq!(p.pod_file_of_fd_link(b"/tmp/kmirror-1/link/data/l (deleted)"), file(b"/data/l", false));
        assert_eq!(p.pod_file_of_fd_link(b"/tmp/kmirror-1/path/data/l"), file(b"/data/l", true));
        assert_eq!(p.pod_file_of_fd_link(b"/tmp/kmirror-1/pod/data"), file(b"/data", true));
        assert_eq!(p.pod_file_of_fd_link(b"/tmp/kmirror-1/linkx/a"), None);
        assert_eq!(p.pod_file_of_fd_link(b"/memfd:kmirror:hosts (deleted)"), None);
    }

    #[test]
    fn descriptor_links_are_recognised_in_their_usual_spellings() {
        let link = |owner, fd, rest: &'static [u8]| Some(FdLink { owner, fd, rest });
        assert_eq!(fd_link(b"/proc/self/fd/3"), link(FdOwner::Process, 3, b""));
        assert_eq!(fd_link(b"/proc/self/fd/12/a/b"), link(FdOwner::Process, 12, b"/a/b"));
        assert_eq!(fd_link(b"/dev/fd/7"), link(FdOwner::Process, 7, b""));
        assert_eq!(fd_link(b"/proc/thread-self/fd/4/"), link(FdOwner::Thread, 4, b"/"));
        assert_eq!(fd_link(b"/proc/4242/fd/5"), link(FdOwner::Pid(4242), 5, b""));
        assert_eq!(fd_link(b"/proc/4242/task/4243/fd/5/x"), link(FdOwner::Task(4243), 5, b"/x"));
        for other in [
            &b"/proc/self/fdinfo/3"[..],
            b"/proc/self/fd",
            b"/proc/self/fd/",
            b"/proc/self/fd/x",
            b"/proc/self/fd/99999999999",
            b"/proc/self/fd//3",
            b"/proc/self/status",
            b"/proc/4242/task/fd/3",
            b"/proc/sys/fd/3",
            b"/dev/fd",
            b"fd/3",
            b"/data/proc/self/fd/3",
        ] {
            assert_eq!(fd_link(other), None, "{}", String::from_utf8_lossy(other));
        }
    }
}
