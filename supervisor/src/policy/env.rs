//! Merging the pod's environment into the app's.

use std::collections::BTreeMap;

/// Variables that describe the developer's machine rather than the workload; they keep their
/// local value even when the pod defines them.
const LOCAL_ONLY: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "COLORTERM",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "TMPDIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_*",
    "SSH_*",
    "DBUS_SESSION_BUS_ADDRESS",
    "LD_*",
    "JAVA_HOME",
    "CLASSPATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "GOROOT",
    "GOPATH",
    "_",
    "KMIRROR_*",
    "LANG",
    "LANGUAGE",
    "LC_*",
    // What a service manager hands to kmirror (see service_manager): about this machine's
    // processes and sockets, never the pod's.
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "SYSTEMD_EXEC_PID",
    "MANAGERPID",
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CACHE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
];

/// Variables that make a runtime load or run code (a module, an agent, a startup script, a
/// charset converter). A pod's environment is the cluster's, written by whoever deploys the
/// workload; taken by default it would run code of the pod's choosing on the developer's
/// machine, and its paths name files of the pod's image anyway. They stay local unless
/// `--env-include` names them (a bare `*` does not count), and kmirror says once which it kept.
const CODE_LOADING: &[&str] = &[
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "_JAVA_OPTIONS",
    "PYTHONSTARTUP",
    "PYTHONWARNINGS",
    "PYTHONBREAKPOINT",
    "PYTHONUSERBASE",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PERL5DB",
    "RUBYOPT",
    "RUBYLIB",
    "BASH_ENV",
    "ENV",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "LOCPATH",
    "NLSPATH",
    "LUA_INIT",
    "LUA_INIT_*",
    "DYLD_*",
];

/// Shell-style pattern match with a trailing or embedded `*` (any run) and `?` (one byte).
pub fn matches(pattern: &str, name: &[u8]) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name)
}

#[derive(Debug, Clone, Default)]
pub struct EnvPolicy {
    /// If non-empty, only pod variables matching one of these are taken.
    pub include: Vec<String>,
    /// Pod variables matching one of these are ignored.
    pub exclude: Vec<String>,
}

/// The app's environment, and the pod's code-loading variables that were left out of it.
#[derive(Debug)]
pub struct Merged {
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    pub kept_local: Vec<Vec<u8>>,
}

enum Verdict {
    Take,
    Skip,
    /// A code-loading variable nobody asked for by name.
    KeepLocal,
}

impl EnvPolicy {
    fn verdict(&self, name: &[u8]) -> Verdict {
        if LOCAL_ONLY.iter().any(|p| matches(p, name)) || self.exclude.iter().any(|p| matches(p, name)) {
            return Verdict::Skip;
        }
        if CODE_LOADING.iter().any(|p| matches(p, name)) {
            let named = self.include.iter().any(|p| p != "*" && matches(p, name));
            return if named { Verdict::Take } else { Verdict::KeepLocal };
        }
        if self.include.is_empty() || self.include.iter().any(|p| matches(p, name)) {
            Verdict::Take
        } else {
            Verdict::Skip
        }
    }

    /// The app's environment: local variables, overlaid with the pod's (pod values win) except
    /// for local-only, excluded and code-loading names.
    pub fn merge(
        &self,
        local: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        pod: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Merged {
        let mut env: BTreeMap<_, _> = local.into_iter().collect();
        let mut kept_local = Vec::new();
        for (name, value) in pod {
            match self.verdict(&name) {
                Verdict::Take => {
                    env.insert(name, value);
                }
                Verdict::Skip => {}
                Verdict::KeepLocal => kept_local.push(name),
            }
        }
        Merged { env, kept_local }
    }
}

/// What the user sets on top of the merge: the env file's values beat the pod's and the local
/// ones, `override` beats the env file, and `unset` removes names (case-insensitively) last.
/// These are the user's own choices, so machine-local and code-loading names are not guarded.
#[derive(Debug, Clone, Default)]
pub struct UserEnv {
    pub env_file: Vec<(String, String)>,
    pub overrides: BTreeMap<String, String>,
    pub unset: Vec<String>,
}

impl UserEnv {
    pub fn apply(&self, env: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
        for (name, value) in self.env_file.iter().map(|(k, v)| (k, v)).chain(&self.overrides) {
            env.insert(name.as_bytes().to_vec(), value.as_bytes().to_vec());
        }
        if !self.unset.is_empty() {
            env.retain(|name, _| !self.unset.iter().any(|u| u.as_bytes().eq_ignore_ascii_case(name)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn pod_wins_except_local_only() {
        let local = vec![
            kv("PATH", "/local/bin"),
            kv("HOME", "/home/dev"),
            kv("SHARED", "local"),
            kv("ONLY_LOCAL", "1"),
        ];
        let pod = vec![
            kv("PATH", "/pod/bin"),
            kv("HOME", "/root"),
            kv("SHARED", "pod"),
            kv("POD_ONLY", "x"),
            kv("XDG_RUNTIME_DIR", "/p"),
            kv("LD_PRELOAD", "evil.so"),
        ];
        let env = EnvPolicy::default().merge(local, pod).env;
        let get = |k: &str| env.get(k.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(get("PATH").as_deref(), Some("/local/bin"));
        assert_eq!(get("HOME").as_deref(), Some("/home/dev"));
        assert_eq!(get("SHARED").as_deref(), Some("pod"));
        assert_eq!(get("POD_ONLY").as_deref(), Some("x"));
        assert_eq!(get("ONLY_LOCAL").as_deref(), Some("1"));
        assert_eq!(get("XDG_RUNTIME_DIR"), None);
        assert_eq!(get("LD_PRELOAD"), None);
    }

    #[test]
    fn env_file_then_override_then_unset() {
        let mut env: BTreeMap<_, _> =
            [kv("PATH", "/bin"), kv("A", "pod"), kv("B", "pod"), kv("Gone", "x")].into();
        let user = UserEnv {
            env_file: vec![
                ("A".into(), "file".into()),
                ("B".into(), "file".into()),
                ("PATH".into(), "/opt".into()),
            ],
            overrides: [("B".to_string(), "override".to_string())].into(),
            unset: vec!["GONE".into()],
        };
        user.apply(&mut env);
        let get = |k: &str| env.get(k.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(get("A").as_deref(), Some("file"));
        assert_eq!(get("B").as_deref(), Some("override"));
        assert_eq!(get("PATH").as_deref(), Some("/opt"), "the user's own choice");
        assert_eq!(get("Gone"), None);
    }

    #[test]
    fn include_and_exclude_patterns() {
        let pod = vec![kv("DB_URL", "a"), kv("DB_PASS", "b"), kv("OTHER", "c")];
        let only_db = EnvPolicy { include: vec!["DB_*".into()], exclude: vec!["*PASS".into()] };
        let env = only_db.merge(Vec::new(), pod).env;
        assert_eq!(env.keys().cloned().collect::<Vec<_>>(), vec![b"DB_URL".to_vec()]);
        assert!(matches("A?C", b"ABC"));
        assert!(!matches("A?C", b"AC"));
        assert!(matches("*", b""));
    }

    #[test]
    fn code_loading_variables_stay_local_unless_named() {
        let local = vec![kv("NODE_OPTIONS", "--max-old-space-size=512")];
        let pod = vec![
            kv("NODE_OPTIONS", "--require /app/agent.js"),
            kv("JAVA_TOOL_OPTIONS", "-javaagent:/otel.jar"),
            kv("BASH_ENV", "/etc/profile.d/x.sh"),
            kv("APP_MODE", "prod"),
        ];
        let merged = EnvPolicy::default().merge(local.clone(), pod.clone());
        let get =
            |m: &Merged, k: &str| m.env.get(k.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(get(&merged, "NODE_OPTIONS").as_deref(), Some("--max-old-space-size=512"));
        assert_eq!(get(&merged, "JAVA_TOOL_OPTIONS"), None);
        assert_eq!(get(&merged, "APP_MODE").as_deref(), Some("prod"));
        assert_eq!(
            merged.kept_local,
            vec![b"NODE_OPTIONS".to_vec(), b"JAVA_TOOL_OPTIONS".to_vec(), b"BASH_ENV".to_vec()]
        );
        // A bare `*` does not name them; a pattern that does brings the pod's value.
        let everything = EnvPolicy { include: vec!["*".into()], exclude: vec![] };
        assert_eq!(get(&everything.merge(local.clone(), pod.clone()), "JAVA_TOOL_OPTIONS"), None);
        let named = EnvPolicy { include: vec!["*".into(), "JAVA_*".into()], exclude: vec![] };
        let merged = named.merge(local, pod);
        assert_eq!(get(&merged, "JAVA_TOOL_OPTIONS").as_deref(), Some("-javaagent:/otel.jar"));
        assert_eq!(merged.kept_local, vec![b"NODE_OPTIONS".to_vec(), b"BASH_ENV".to_vec()]);
    }
}
