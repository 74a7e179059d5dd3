//! Walking a path component by component, as the kernel does, through a view that mixes pod
//! and local directories.
//!
//! Most paths need no walk: an absolute path without `.`, `..`, `//` or a trailing slash is
//! routed by its text (`policy::files`), and whichever side serves it resolves it itself. A
//! path that steps back out of a directory (`a/b/..`), or names a directory with `.` or a
//! trailing slash, is different: the kernel checks at each such step that what it has reached
//! is a directory (`ENOTDIR` otherwise), follows a symlink before leaving it with `..`, and
//! checks search permission on the way. Text normalisation skips all of that, so
//! `/etc/hosts/../shadow` would become `/etc/shadow` where the kernel says ENOTDIR. This walk
//! asks what each component that is followed by `.`/`..` (or a trailing slash) really is, on
//! the side that serves it, and reports the path the kernel would reach.

use std::collections::VecDeque;

/// What a looked-up path is (its last component not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    NotDir,
    Symlink(Vec<u8>),
}

/// Where each path lives and what it is.
pub trait Lookup {
    /// Whether `path` (absolute, normalised) is served by the pod rather than the local machine.
    fn is_pod(&self, path: &[u8]) -> bool;
    /// What `path` is, on the side that serves it, as an lstat by the calling app would find it
    /// (an errno such as ENOENT, ENOTDIR or EACCES otherwise).
    fn lookup(&self, path: &[u8]) -> impl Future<Output = Result<Node, i32>> + Send;
    /// The device (file system) `path` is on, not following a last symlink, as the pod
    /// (`pod`) or the local machine sees it.
    fn device(&self, path: &[u8], pod: bool) -> impl Future<Output = Result<u64, i32>> + Send;
}

/// openat2's confinement of a walk to its starting directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Absolute paths start at `/`, `..` stops at `/`.
    Root,
    /// RESOLVE_BENEATH: leaving the start directory (absolute paths, `..` above it) is EXDEV.
    Beneath,
    /// RESOLVE_IN_ROOT: the start directory acts as `/`.
    InRoot,
}

pub struct Walk<'a> {
    /// The directory a relative path starts from (absolute, normalised).
    pub start: &'a [u8],
    /// The start directory is the pod's (a pod directory the app opened).
    pub start_in_pod: bool,
    pub path: &'a [u8],
    pub rules: Rules,
}

/// How a walk treats what it meets: openat2's `resolve` flags and the call's own following.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub scope: Scope,
    /// RESOLVE_NO_SYMLINKS: any symlink followed is ELOOP.
    pub no_symlinks: bool,
    /// RESOLVE_NO_XDEV: any component on another file system than the start is EXDEV.
    pub no_xdev: bool,
    /// Look up every component, not only those a step back depends on: the resolve flags
    /// constrain every symlink and mount on the way, which only a full walk sees. The path a
    /// strict walk reaches holds no symlink (but a last one the call does not follow).
    pub strict: bool,
    /// The call follows a symlink in the last component (no O_NOFOLLOW, AT_SYMLINK_NOFOLLOW).
    pub follow_last: bool,
}

impl Rules {
    /// No resolve flags: the kernel's plain rules.
    #[cfg(test)]
    pub const PLAIN: Rules =
        Rules { scope: Scope::Root, no_symlinks: false, no_xdev: false, strict: false, follow_last: true };

    /// The rules of openat2's `resolve` flags (0 for the other calls).
    pub fn of_resolve(resolve: u64, follow_last: bool) -> Rules {
        let scope = if resolve & libc::RESOLVE_IN_ROOT != 0 {
            Scope::InRoot
        } else if resolve & libc::RESOLVE_BENEATH != 0 {
            Scope::Beneath
        } else {
            Scope::Root
        };
        Rules {
            scope,
            no_symlinks: resolve & libc::RESOLVE_NO_SYMLINKS != 0,
            no_xdev: resolve & libc::RESOLVE_NO_XDEV != 0,
            strict: resolve & STRICT_RESOLVE != 0,
            follow_last,
        }
    }
}

/// openat2's scoping flags: the walk starts from, and stays below, its directory.
pub const SCOPES: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_IN_ROOT;

/// Resolve flags that constrain every component of a path (RESOLVE_NO_MAGICLINKS does too,
/// but a pod path holds no magic link: the agent refuses them, and `/proc` is local).
pub const STRICT_RESOLVE: u64 =
    libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV | libc::RESOLVE_BENEATH | libc::RESOLVE_IN_ROOT;

#[derive(Debug, PartialEq, Eq)]
pub struct Walked {
    /// The absolute, normalised path the walk reached.
    pub path: Vec<u8>,
    /// Some directory on the way was the pod's: the local kernel could not walk the raw path.
    pub through_pod: bool,
}

/// The kernel's limit on symlinks followed in one lookup.
const MAX_SYMLINKS: usize = 40;

fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|part| !part.is_empty())
}

fn joined(stack: &[Vec<u8>]) -> Vec<u8> {
    if stack.is_empty() {
        return b"/".to_vec();
    }
    let mut out = Vec::new();
    for part in stack {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    out
}

/// Walks `walk.path` and returns where it leads. The last component is not checked (the call
/// itself does that, with its own flags) unless a trailing slash demands a directory, or the
/// walk is strict.
pub async fn walk(lookup: &impl Lookup, walk: Walk<'_>) -> Result<Walked, i32> {
    let rules = walk.rules;
    let mut stack: Vec<Vec<u8>> = components(walk.start).map(<[u8]>::to_vec).collect();
    let floor = if rules.scope == Scope::Root { 0 } else { stack.len() };
    let mut through_pod = walk.start_in_pod && walk.path.first() != Some(&b'/');
    let restart_at_root = |stack: &mut Vec<Vec<u8>>| match rules.scope {
        Scope::Beneath => Err(libc::EXDEV),
        _ => {
            stack.truncate(floor);
            Ok(())
        }
    };
    if walk.path.first() == Some(&b'/') {
        restart_at_root(&mut stack)?;
    }
    let mut devices = Devices { start: joined(&stack), pod: None, local: None };
    let mut queue: VecDeque<Vec<u8>> = components(walk.path).map(<[u8]>::to_vec).collect();
    // A trailing slash (or `.`/`..` last) makes the last component a directory that is followed.
    let mut last_must_be_dir = walk.path.ends_with(b"/");
    let mut symlinks = 0;
    while let Some(part) = queue.pop_front() {
        match part.as_slice() {
            b"." => continue,
            b".." => {
                if stack.len() > floor {
                    stack.pop();
                    if rules.no_xdev {
                        devices.check(lookup, &joined(&stack)).await?;
                    }
                } else if rules.scope == Scope::Beneath {
                    return Err(libc::EXDEV);
                }
                continue;
            }
            _ => {}
        }
        stack.push(part);
        let here = joined(&stack);
        through_pod |= lookup.is_pod(&here);
        let last = queue.is_empty();
        let next_steps_back = matches!(queue.front().map(Vec::as_slice), Some(b"." | b".."));
        let followed = !last || last_must_be_dir || rules.follow_last;
        if !(rules.strict || next_steps_back || (last && last_must_be_dir)) {
            // Nothing here needs more than the text: the side that serves the final path
            // resolves this component itself when it opens it.
            continue;
        }
        let node = match lookup.lookup(&here).await {
            // A missing last component is the call's to report (or to create).
            Err(libc::ENOENT) if last && !last_must_be_dir => break,
            found => found?,
        };
        if rules.no_xdev {
            devices.check(lookup, &here).await?;
        }
        match node {
            Node::Dir => {}
            Node::NotDir if last && !last_must_be_dir => {}
            Node::NotDir => return Err(libc::ENOTDIR),
            Node::Symlink(_) if !followed => {}
            Node::Symlink(target) => {
                if rules.no_symlinks {
                    return Err(libc::ELOOP);
                }
                symlinks += 1;
                if symlinks > MAX_SYMLINKS {
                    return Err(libc::ELOOP);
                }
                stack.pop();
                if target.first() == Some(&b'/') {
                    restart_at_root(&mut stack)?;
                }
                if last && target.ends_with(b"/") {
                    last_must_be_dir = true;
                }
                for part in components(&target).rev() {
                    queue.push_front(part.to_vec());
                }
            }
        }
    }
    Ok(Walked { path: joined(&stack), through_pod })
}

/// RESOLVE_NO_XDEV's reference: the file system of the walk's start, on each side (the pod's
/// view and the local one have their own mounts).
struct Devices {
    start: Vec<u8>,
    pod: Option<u64>,
    local: Option<u64>,
}

impl Devices {
    async fn check(&mut self, lookup: &impl Lookup, path: &[u8]) -> Result<(), i32> {
        let pod = lookup.is_pod(path);
        let start = match if pod { self.pod } else { self.local } {
            Some(dev) => dev,
            None => {
                let dev = lookup.device(&self.start, pod).await?;
                *if pod { &mut self.pod } else { &mut self.local } = Some(dev);
                dev
            }
        };
        if lookup.device(path, pod).await? != start {
            return Err(libc::EXDEV);
        }
        Ok(())
    }
}

/// Whether a path names a step back (`.`, `..`) or ends in a slash: only such a path can
/// resolve differently from its text.
pub fn steps_back(path: &[u8]) -> bool {
    path.ends_with(b"/") || components(path).any(|part| part == b"." || part == b"..")
}

/// Whether a walk could change anything for this path: it names a step back (`.`, `..`), or a
/// trailing slash (or the walk is `strict`), and some directory it passes through lexically is
/// the pod's. Paths that never touch the pod are the local kernel's to resolve, as made.
pub fn needs_walk(path: &[u8], strict: bool, is_pod: impl Fn(&[u8]) -> bool) -> bool {
    if !strict && !steps_back(path) {
        return false;
    }
    let mut stack: Vec<Vec<u8>> = Vec::new();
    for part in components(path) {
        match part {
            b"." => {}
            b".." => {
                stack.pop();
            }
            name => {
                stack.push(name.to_vec());
                if is_pod(&joined(&stack)) {
                    return true;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A view where `/data` and everything below it is the pod's.
    struct View(HashMap<&'static [u8], Node>);

    impl Lookup for View {
        fn is_pod(&self, path: &[u8]) -> bool {
            path.starts_with(b"/data")
        }
        async fn lookup(&self, path: &[u8]) -> Result<Node, i32> {
            self.0.get(path).cloned().ok_or(libc::ENOENT)
        }
        /// `/data/mnt` is a mount in the pod; the local side has another root file system.
        async fn device(&self, path: &[u8], pod: bool) -> Result<u64, i32> {
            match (pod, path.starts_with(b"/data/mnt")) {
                (true, true) => Ok(3),
                (true, false) => Ok(2),
                (false, _) => Ok(1),
            }
        }
    }

    fn view() -> View {
        View(HashMap::from([
            (&b"/data"[..], Node::Dir),
            (b"/data/dir", Node::Dir),
            (b"/data/dir/sub", Node::Dir),
            (b"/data/file", Node::NotDir),
            (b"/data/link-to-dir", Node::Symlink(b"dir/sub".to_vec())),
            (b"/data/abs-link", Node::Symlink(b"/usr/lib".to_vec())),
            (b"/data/loop", Node::Symlink(b"loop".to_vec())),
            (b"/usr", Node::Dir),
            (b"/usr/lib", Node::Dir),
            (b"/etc", Node::Dir),
            (b"/etc/hosts", Node::NotDir),
            (b"/data/dir/abs", Node::Symlink(b"/sub".to_vec())),
            (b"/data/dir/up", Node::Symlink(b"../file".to_vec())),
            (b"/data/mnt", Node::Dir),
            (b"/data/mnt/x", Node::NotDir),
            (b"/data/to-mnt", Node::Symlink(b"mnt/x".to_vec())),
        ]))
    }

    async fn go(path: &str) -> Result<Walked, i32> {
        go_from("/", path, Scope::Root).await
    }

    async fn go_from(start: &str, path: &str, scope: Scope) -> Result<Walked, i32> {
        go_with(start, path, Rules { scope, ..Rules::PLAIN }).await
    }

    async fn go_with(start: &str, path: &str, rules: Rules) -> Result<Walked, i32> {
        let start_in_pod = start.starts_with("/data");
        let walk = Walk { start: start.as_bytes(), start_in_pod, path: path.as_bytes(), rules };
        walk_in(&view(), walk).await
    }

    async fn walk_in(view: &View, w: Walk<'_>) -> Result<Walked, i32> {
        walk(view, w).await
    }

    fn reached(path: &str, through_pod: bool) -> Result<Walked, i32> {
        Ok(Walked { path: path.as_bytes().to_vec(), through_pod })
    }

    #[tokio::test]
    async fn a_file_cannot_be_left_with_dot_dot() {
        assert_eq!(go("/data/file/../dir").await, Err(libc::ENOTDIR));
        assert_eq!(go("/data/file/.").await, Err(libc::ENOTDIR));
        assert_eq!(go("/data/file/").await, Err(libc::ENOTDIR));
        assert_eq!(go("/etc/hosts/../shadow").await, Err(libc::ENOTDIR));
        assert_eq!(go("/data/missing/../file").await, Err(libc::ENOENT));
    }

    #[tokio::test]
    async fn directories_are_left_for_their_parent() {
        assert_eq!(go("/data/../usr/lib").await, reached("/usr/lib", true));
        assert_eq!(go("/data/dir/../../usr").await, reached("/usr", true));
        assert_eq!(go("/usr/../data/dir/").await, reached("/data/dir", true));
        assert_eq!(go("/usr/lib/../lib").await, reached("/usr/lib", false));
        assert_eq!(go("/../../data/./file").await, reached("/data/file", true));
    }

    #[tokio::test]
    async fn symlinks_are_followed_before_they_are_left() {
        // link-to-dir → dir/sub, so `..` leads to /data/dir, not /data.
        assert_eq!(go("/data/link-to-dir/../file").await, reached("/data/dir/file", true));
        assert_eq!(go("/data/abs-link/../x").await, reached("/usr/x", true));
        assert_eq!(go("/data/loop/..").await, Err(libc::ELOOP));
        // A symlink that is not left is the call's business, as is any last component.
        assert_eq!(go("/data/link-to-dir").await, reached("/data/link-to-dir", true));
        assert_eq!(go("/data/link-to-dir/").await, reached("/data/dir/sub", true));
        let no_symlinks = Rules { no_symlinks: true, ..Rules::PLAIN };
        assert_eq!(go_with("/", "/data/link-to-dir/..", no_symlinks).await, Err(libc::ELOOP));
    }

    /// openat2's resolve flags constrain every component, so those walks look at each one
    /// (strict) and resolve every symlink themselves.
    #[tokio::test]
    async fn resolve_flags_see_every_component() {
        let resolve = |flags: u64, follow_last: bool| Rules::of_resolve(flags, follow_last);
        let no_symlinks = resolve(libc::RESOLVE_NO_SYMLINKS, true);
        assert_eq!(go_with("/", "/data/link-to-dir/x", no_symlinks).await, Err(libc::ELOOP));
        assert_eq!(go_with("/", "/data/link-to-dir", no_symlinks).await, Err(libc::ELOOP));
        let not_followed = resolve(libc::RESOLVE_NO_SYMLINKS, false);
        assert_eq!(go_with("/", "/data/link-to-dir", not_followed).await, reached("/data/link-to-dir", true));
        assert_eq!(go_with("/", "/data/dir/sub", no_symlinks).await, reached("/data/dir/sub", true));
        assert_eq!(go_with("/", "/data/missing", no_symlinks).await, reached("/data/missing", true));
        assert_eq!(go_with("/", "/data/missing/x", no_symlinks).await, Err(libc::ENOENT));
        assert_eq!(go_with("/", "/data/file/x", no_symlinks).await, Err(libc::ENOTDIR));
        // Scopes: an absolute symlink leaves a BENEATH walk, and starts an IN_ROOT one over at
        // its root; a relative one may not climb above either.
        let beneath = resolve(libc::RESOLVE_BENEATH, true);
        let in_root = resolve(libc::RESOLVE_IN_ROOT, true);
        assert_eq!(go_with("/data/dir", "abs", beneath).await, Err(libc::EXDEV));
        assert_eq!(go_with("/data/dir", "abs", in_root).await, reached("/data/dir/sub", true));
        assert_eq!(go_with("/data/dir", "up", beneath).await, Err(libc::EXDEV));
        assert_eq!(go_with("/data/dir", "up", in_root).await, reached("/data/dir/file", true));
        assert_eq!(go_with("/data", "link-to-dir", beneath).await, reached("/data/dir/sub", true));
        assert_eq!(
            go_with("/data", "abs-link", resolve(libc::RESOLVE_BENEATH, false)).await,
            reached("/data/abs-link", true)
        );
        // NO_XDEV: entering the pod's mount at /data/mnt, directly or through a symlink.
        let no_xdev = resolve(libc::RESOLVE_NO_XDEV, true);
        assert_eq!(go_with("/", "/data/mnt/x", no_xdev).await, Err(libc::EXDEV));
        assert_eq!(go_with("/", "/data/to-mnt", no_xdev).await, Err(libc::EXDEV));
        assert_eq!(go_with("/", "/data/dir/sub", no_xdev).await, reached("/data/dir/sub", true));
        assert_eq!(go_with("/data/mnt", "x", no_xdev).await, reached("/data/mnt/x", true));
        assert_eq!(go_with("/data/mnt", "../file", no_xdev).await, Err(libc::EXDEV));
    }

    #[tokio::test]
    async fn relative_walks_start_at_their_directory_and_respect_openat2_scopes() {
        assert_eq!(go_from("/data/dir", "../file", Scope::Root).await, reached("/data/file", true));
        assert_eq!(go_from("/data/dir", "../../usr", Scope::Root).await, reached("/usr", true));
        assert_eq!(go_from("/data/dir", "../file", Scope::Beneath).await, Err(libc::EXDEV));
        assert_eq!(go_from("/data/dir", "/etc", Scope::Beneath).await, Err(libc::EXDEV));
        assert_eq!(go_from("/data/dir", "../../sub", Scope::InRoot).await, reached("/data/dir/sub", true));
        assert_eq!(go_from("/data/dir", "/sub/", Scope::InRoot).await, reached("/data/dir/sub", true));
    }

    #[test]
    fn only_paths_that_step_back_through_the_pod_need_a_walk() {
        let is_pod = |p: &[u8]| p.starts_with(b"/data");
        assert!(needs_walk(b"/data/file/../x", false, is_pod));
        assert!(needs_walk(b"/data/file/", false, is_pod));
        assert!(needs_walk(b"/usr/../data/x/.", false, is_pod));
        assert!(!needs_walk(b"/data/file", false, is_pod), "a plain path is routed by its text");
        assert!(!needs_walk(b"/usr/lib/../bin", false, is_pod), "the kernel's own business");
        assert!(!needs_walk(b"/usr/", false, is_pod));
        assert!(needs_walk(b"/data/file", true, is_pod), "resolve flags constrain every component");
        assert!(!needs_walk(b"/usr/lib/x", true, is_pod), "but only the pod's are kmirror's to check");
    }
}
