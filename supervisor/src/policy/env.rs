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

impl EnvPolicy {
    fn takes(&self, name: &[u8]) -> bool {
        if LOCAL_ONLY.iter().any(|p| matches(p, name)) || self.exclude.iter().any(|p| matches(p, name)) {
            return false;
        }
        self.include.is_empty() || self.include.iter().any(|p| matches(p, name))
    }

    /// The app's environment: local variables, overlaid with the pod's (pod values win) except
    /// for local-only and excluded names.
    pub fn merge(
        &self,
        local: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        pod: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut env: BTreeMap<_, _> = local.into_iter().collect();
        for (name, value) in pod {
            if self.takes(&name) {
                env.insert(name, value);
            }
        }
        env
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
        let env = EnvPolicy::default().merge(local, pod);
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
    fn include_and_exclude_patterns() {
        let pod = vec![kv("DB_URL", "a"), kv("DB_PASS", "b"), kv("OTHER", "c")];
        let only_db = EnvPolicy { include: vec!["DB_*".into()], exclude: vec!["*PASS".into()] };
        let env = only_db.merge(Vec::new(), pod);
        assert_eq!(env.keys().cloned().collect::<Vec<_>>(), vec![b"DB_URL".to_vec()]);
        assert!(matches("A?C", b"ABC"));
        assert!(!matches("A?C", b"AC"));
        assert!(matches("*", b""));
    }
}
