//! Reading a positioned tree into [`FileConfig`], collecting every error with its position:
//! unknown keys (with the closest valid one), mirrord settings kmirror does not have, features
//! not supported yet, wrong types, invalid regexes, ports and filter rules.

use super::diag::{Diagnostic, closest};
use super::file::*;
use super::node::{Node, Pos, Value};
use crate::policy::filter::{AddressFilter, NameFilter, Side};
use std::collections::BTreeMap;

/// What a file holds, where each value was written, and what is wrong with it.
#[derive(Debug, Default)]
pub struct Read {
    pub config: FileConfig,
    /// Dotted key → position of its value.
    pub positions: BTreeMap<String, Pos>,
    pub errors: Vec<Diagnostic>,
}

/// mirrord settings kmirror does not have, with why (or what to use instead).
const MIRRORD_ONLY: &[(&str, &str)] = &[
    ("skip_processes", "kmirror serves every process the app starts"),
    ("skip_build_tools", "kmirror serves every process the app starts"),
    ("skip_extra_build_tools", "kmirror serves every process the app starts"),
    ("multi_cluster", "a mirrord for Teams feature"),
    ("api", "kmirror has no session-monitor API"),
    ("profile", "a mirrord for Teams feature"),
    ("sip_binaries", "macOS only"),
    ("skip_sip", "macOS only"),
    ("internal_proxy", "kmirror has no internal proxy process"),
    ("external_proxy", "kmirror has no external proxy"),
    ("container", "kmirror has no container mode"),
    ("experimental", "mirrord's experimental switches are about its LD_PRELOAD layer"),
    ("startup_retry", "mirrord's operator connection retries"),
    ("ci", "a mirrord for Teams feature"),
    ("use_proxy", "kmirror makes no HTTP requests of its own"),
    ("key", "session keys belong to mirrord for Teams"),
    ("traceparent", "a mirrord for Teams feature"),
    ("baggage", "a mirrord for Teams feature"),
    ("agent.ephemeral", "kmirror's Kubernetes agent is not built yet; ephemeral agents are not planned"),
    ("agent.communication_timeout", "kmirror's agent ends with its session"),
    ("agent.flush_connections", "kmirror steals new connections only and flushes nothing"),
    ("agent.disabled_capabilities", "kmirror's agent needs its capabilities"),
    ("agent.check_out_of_pods", "not part of kmirror's agent design"),
    ("agent.privileged", "kmirror's agent never runs privileged"),
    ("agent.external_ip_fix", "kmirror steers traffic with eBPF, not iptables"),
    ("agent.nftables", "kmirror steers traffic with eBPF, not iptables"),
    ("agent.clean_iptables_on_start", "kmirror steers traffic with eBPF, not iptables"),
    ("agent.network_interface", "kmirror attaches to every interface of the target"),
    ("agent.dns", "kmirror's agent asks the pod's own nameserver"),
    ("agent.metrics", "kmirror's agent has no metrics endpoint"),
    ("agent.exclude_from_mesh", "not part of kmirror's agent design"),
    ("agent.disable_mesh_sidecar_injection", "not part of kmirror's agent design"),
    ("agent.inject_headers", "kmirror never changes HTTP responses"),
    ("agent.override_cache_control", "kmirror never changes HTTP responses"),
    ("agent.max_body_buffer_size", "kmirror's HTTP filter does not read bodies"),
    ("agent.max_body_buffer_timeout", "kmirror's HTTP filter does not read bodies"),
    ("agent.http_detection_timeout", "kmirror's HTTP filter does not read bodies"),
    ("agent.jaq_time_limit", "kmirror's HTTP filter has no jq filters"),
    ("agent.security_context", "not part of kmirror's agent design"),
    ("target.path.labels", "label targets belong to mirrord for Teams"),
    ("feature.magic", "kmirror changes nothing of the app's environment or files by itself"),
    ("feature.split_queues", "a mirrord for Teams feature"),
    ("feature.db_branches", "a mirrord for Teams feature"),
    ("feature.preview", "a mirrord for Teams feature"),
    ("feature.env.mapping", "use `override`"),
    ("feature.env.load_from_process", "kmirror reads the pod's environment before the app starts"),
    ("feature.fs.mapping", "kmirror does not rename paths"),
    ("feature.fs.readonly_file_buffer", "kmirror fetches a pod file whole when it is opened"),
    ("feature.network.outgoing.unix_streams", "unix sockets stay local"),
    ("feature.network.incoming.listen_ports", "the app listens on the port it binds; use `port_mapping`"),
    ("feature.network.incoming.ignore_localhost", "use `ignore_ports` or `ports`"),
    ("feature.network.incoming.on_concurrent_steal", "a mirrord for Teams feature"),
    ("feature.network.incoming.tls_delivery", "kmirror delivers stolen traffic as it arrived"),
    ("feature.network.incoming.https_delivery", "kmirror delivers stolen traffic as it arrived"),
    (
        "feature.network.incoming.http_filter.method_filter",
        "kmirror's HTTP filter matches header lines and paths (not supported yet)",
    ),
    (
        "feature.network.incoming.http_filter.body_filter",
        "kmirror's HTTP filter matches header lines and paths (not supported yet)",
    ),
    (
        "feature.network.incoming.http_filter.header_filter_jq",
        "kmirror's HTTP filter matches header lines and paths (not supported yet)",
    ),
    (
        "feature.network.incoming.http_filter.all_of",
        "kmirror's HTTP filter matches header lines and paths (not supported yet)",
    ),
    (
        "feature.network.incoming.http_filter.any_of",
        "kmirror's HTTP filter matches header lines and paths (not supported yet)",
    ),
];

/// Keys each table accepts, by dotted path (`""` is the top level). `read_all_tables_match_the
/// schema` checks these against the schema generated from the types.
pub const KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "$schema",
            "target",
            "kube_context",
            "kubeconfig",
            "accept_invalid_certificates",
            "agent",
            "feature",
            "remote_timeout",
            "exit_with_main",
            "interceptor",
            "telemetry",
            "operator",
        ],
    ),
    ("target", &["path", "namespace"]),
    (
        "target.path",
        &[
            "pid",
            "pod",
            "deployment",
            "rollout",
            "job",
            "cron_job",
            "stateful_set",
            "service",
            "replica_set",
            "container",
        ],
    ),
    (
        "agent",
        &[
            "image",
            "namespace",
            "ttl",
            "startup_timeout",
            "log_level",
            "json_log",
            "tolerations",
            "image_pull_policy",
            "image_pull_secrets",
            "labels",
            "annotations",
            "node_selector",
            "service_account",
            "priority_class",
            "resources",
        ],
    ),
    ("agent.image", &["registry", "tag"]),
    ("feature", &["env", "fs", "network", "hostname", "copy_target"]),
    ("feature.env", &["include", "exclude", "override", "env_file", "unset"]),
    ("feature.fs", &["mode", "read_write", "read_only", "local", "not_found"]),
    ("feature.network", &["incoming", "outgoing", "dns", "ipv6"]),
    (
        "feature.network.incoming",
        &["mode", "http_filter", "port_mapping", "ignore_ports", "ports", "allow_host_network"],
    ),
    ("feature.network.incoming.http_filter", &["header_filter", "path_filter", "ports"]),
    ("feature.network.outgoing", &["tcp", "udp", "ignore_localhost", "filter"]),
    ("feature.network.outgoing.filter", &["remote", "local"]),
    ("feature.network.dns", &["enabled", "filter"]),
    ("feature.network.dns.filter", &["remote", "local"]),
];

fn keys_of(path: &str) -> &'static [&'static str] {
    KEYS.iter().find(|(p, _)| *p == path).map_or(&[], |(_, k)| k)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Reads the whole tree; never stops at the first error.
pub fn read(root: &Node) -> Read {
    let mut r = Reader::default();
    let config = match root.value {
        // An empty file (or YAML's empty document) is an empty configuration.
        Value::Null => FileConfig::default(),
        _ => r.root(root),
    };
    Read { config, positions: r.positions, errors: r.errors }
}

/// A table's entries with known keys, after its unknown and mirrord-only keys were reported.
struct Table<'n> {
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Table<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[derive(Default)]
struct Reader {
    errors: Vec<Diagnostic>,
    positions: BTreeMap<String, Pos>,
}

impl Reader {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(Diagnostic::at(pos, message));
    }

    fn error_help(&mut self, pos: Pos, message: impl Into<String>, help: impl Into<String>) {
        self.errors.push(Diagnostic::at(pos, message).with_help(help));
    }

    fn expected(&mut self, path: &str, node: &Node, what: &str) {
        self.error(node.pos, format!("`{path}` must be {what}, not {}", node.kind()));
    }

    fn table<'n>(&mut self, path: &str, node: &'n Node, what: &str) -> Option<Table<'n>> {
        let Value::Map(entries) = &node.value else {
            self.expected(path, node, what);
            return None;
        };
        let known = keys_of(path);
        let mut kept: Vec<(&'n str, &'n Node)> = Vec::new();
        for (key, value) in entries {
            let full = join(path, &key.name);
            if kept.iter().any(|(k, _)| *k == key.name) {
                self.error(key.pos, format!("duplicate key `{full}`"));
                continue;
            }
            if known.contains(&key.name.as_str()) {
                kept.push((&key.name, value));
            } else if let Some((_, why)) = MIRRORD_ONLY.iter().find(|(p, _)| *p == full) {
                self.error_help(
                    key.pos,
                    format!("`{full}` is a mirrord setting that kmirror does not support: {why}"),
                    "remove it (docs/config.md lists what kmirror reads)",
                );
            } else {
                let help = match closest(&key.name, known.iter().copied()) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("valid keys here: {}", known.join(", ")),
                };
                let within =
                    if path.is_empty() { "at the top level".to_string() } else { format!("in `{path}`") };
                self.error_help(key.pos, format!("unknown key `{}` {within}", key.name), help);
            }
        }
        Some(Table { entries: kept })
    }

    fn string(&mut self, path: &str, node: &Node) -> Option<String> {
        let Value::Str(s) = &node.value else {
            self.expected(path, node, "a string");
            return None;
        };
        if s.contains("{{") || s.contains("{%") {
            self.error_help(
                node.pos,
                format!("`{path}` uses a template: kmirror does not render templates (mirrord's Tera) yet"),
                "write the value out",
            );
            return None;
        }
        self.positions.insert(path.to_string(), node.pos);
        Some(s.clone())
    }

    fn bool(&mut self, path: &str, node: &Node) -> Option<bool> {
        let Value::Bool(b) = node.value else {
            self.expected(path, node, "true or false");
            return None;
        };
        self.positions.insert(path.to_string(), node.pos);
        Some(b)
    }

    fn int(&mut self, path: &str, node: &Node, min: i128, max: i128, what: &str) -> Option<i128> {
        match node.value {
            Value::Int(n) if (min..=max).contains(&n) => {
                self.positions.insert(path.to_string(), node.pos);
                Some(n)
            }
            Value::Int(n) => {
                self.error(node.pos, format!("`{path}`: {n} is not {what} ({min}-{max})"));
                None
            }
            _ => {
                self.expected(path, node, what);
                None
            }
        }
    }

    fn port(&mut self, path: &str, node: &Node) -> Option<u16> {
        self.int(path, node, 1, 65535, "a port").map(|n| n as u16)
    }

    fn seconds(&mut self, path: &str, node: &Node) -> Option<u64> {
        self.int(path, node, 0, u32::MAX as i128, "a number of seconds").map(|n| n as u64)
    }

    fn list<'n>(&mut self, path: &str, node: &'n Node) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => {
                self.positions.insert(path.to_string(), node.pos);
                Some(items)
            }
            _ => {
                self.expected(path, node, "a list");
                None
            }
        }
    }

    fn strings(&mut self, path: &str, node: &Node) -> Option<Vec<String>> {
        let items = self.list(path, node)?;
        let pos = node.pos;
        let out: Vec<Option<String>> =
            items.iter().map(|item| self.string(&format!("{path}[]"), item)).collect();
        self.positions.remove(&format!("{path}[]"));
        self.positions.insert(path.to_string(), pos);
        out.into_iter().collect()
    }

    fn ports(&mut self, path: &str, node: &Node) -> Option<Vec<u16>> {
        let items = self.list(path, node)?;
        let out: Vec<Option<u16>> = items.iter().map(|item| self.port(path, item)).collect();
        self.positions.insert(path.to_string(), node.pos);
        out.into_iter().collect()
    }

    /// A table of strings; numbers and booleans are taken as their text (YAML's `PORT: 80`).
    fn string_map(&mut self, path: &str, node: &Node) -> Option<BTreeMap<String, String>> {
        let Value::Map(entries) = &node.value else {
            self.expected(path, node, "a table of strings");
            return None;
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in entries {
            let text = match &value.value {
                Value::Str(s) => s.clone(),
                Value::Int(n) => n.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    self.expected(&join(path, &key.name), value, "a string");
                    ok = false;
                    continue;
                }
            };
            if out.insert(key.name.clone(), text).is_some() {
                self.error(key.pos, format!("duplicate key `{}`", join(path, &key.name)));
                ok = false;
            }
        }
        self.positions.insert(path.to_string(), node.pos);
        ok.then_some(out)
    }

    /// Case-insensitive path regexes, each checked where it is written.
    fn regexes(&mut self, path: &str, node: &Node) -> Option<Vec<String>> {
        let list = self.strings(path, node)?;
        let Value::Seq(items) = &node.value else { return None };
        let mut ok = true;
        for (pattern, item) in list.iter().zip(items) {
            if let Err(e) = crate::policy::files::PathLists::compile(pattern) {
                self.error(item.pos, format!("`{path}`: invalid regex `{pattern}`: {}", regex_error(&e)));
                ok = false;
            }
        }
        ok.then_some(list)
    }

    fn root(&mut self, node: &Node) -> FileConfig {
        let mut c = FileConfig::default();
        let Some(t) = self.table("", node, "a table of settings") else { return c };
        if let Some(n) = t.get("$schema") {
            c.schema = self.string("$schema", n);
        }
        if let Some(n) = t.get("target") {
            c.target = self.target(n);
        }
        if let Some(n) = t.get("kube_context") {
            c.kube_context = self.string("kube_context", n);
        }
        if let Some(n) = t.get("kubeconfig") {
            c.kubeconfig = self.string("kubeconfig", n);
        }
        if let Some(n) = t.get("accept_invalid_certificates") {
            c.accept_invalid_certificates = self.bool("accept_invalid_certificates", n);
        }
        if let Some(n) = t.get("agent") {
            c.agent = self.agent(n);
        }
        if let Some(n) = t.get("feature") {
            c.feature = self.feature(n);
        }
        if let Some(n) = t.get("remote_timeout") {
            c.remote_timeout = match n.value {
                Value::Int(i) if i > 0 && i <= 86_400 => Some(i as f64),
                Value::Float(f) if f > 0.0 && f <= 86_400.0 => Some(f),
                _ => {
                    self.error(n.pos, "`remote_timeout` must be a number of seconds above 0 (at most 86400)");
                    None
                }
            };
            if c.remote_timeout.is_some() {
                self.positions.insert("remote_timeout".into(), n.pos);
            }
        }
        if let Some(n) = t.get("exit_with_main") {
            c.exit_with_main = self.bool("exit_with_main", n);
        }
        if let Some(n) = t.get("interceptor") {
            c.interceptor = self.interceptor(n);
        }
        if let Some(n) = t.get("telemetry") {
            c.telemetry = self.only("telemetry", n, false, "kmirror sends no telemetry");
        }
        if let Some(n) = t.get("operator") {
            c.operator = self.only("operator", n, false, "kmirror has no operator (mirrord for Teams)");
        }
        c
    }

    /// A mirrord switch kmirror accepts only at the value that is already its behaviour.
    fn only(&mut self, path: &str, node: &Node, value: bool, why: &str) -> Option<bool> {
        let b = self.bool(path, node)?;
        if b != value {
            self.error_help(
                node.pos,
                format!("`{path}: {b}` is a mirrord setting that kmirror does not support: {why}"),
                format!("remove it, or write `{value}`"),
            );
            return None;
        }
        Some(b)
    }

    fn target(&mut self, node: &Node) -> Option<TargetField> {
        if let Value::Str(_) = node.value {
            let path = self.string("target", node)?;
            return self.target_path_text("target", node, path).map(TargetField::Path);
        }
        let t =
            self.table("target", node, "a string like pid/4242, or a table with `path` and `namespace`")?;
        let mut out = TargetObject::default();
        if let Some(n) = t.get("namespace") {
            out.namespace = self.string("target.namespace", n);
        }
        if let Some(n) = t.get("path") {
            out.path = if let Value::Str(_) = n.value {
                let text = self.string("target.path", n)?;
                self.target_path_text("target.path", n, text).map(TargetPath::Path)
            } else {
                let kind = self.target_kind(n).map(TargetPath::Kind);
                self.positions.insert("target.path".into(), n.pos);
                kind
            };
        }
        Some(TargetField::Full(Box::new(out)))
    }

    fn target_path_text(&mut self, path: &str, node: &Node, text: String) -> Option<String> {
        if text == "targetless" {
            self.error_help(
                node.pos,
                format!("`{path}: targetless`: targetless sessions (an agent without a target) are not supported yet"),
                "give a target such as pid/4242",
            );
            return None;
        }
        Some(text)
    }

    fn target_kind(&mut self, node: &Node) -> Option<TargetKind> {
        let t = self.table("target.path", node, "a string like pid/4242, or a table like {pod: NAME}")?;
        let mut k = TargetKind::default();
        let mut kinds = 0;
        for (key, value) in &t.entries {
            let path = format!("target.path.{key}");
            match *key {
                "container" => k.container = self.string(&path, value),
                "pid" => {
                    kinds += 1;
                    k.pid = self.int(&path, value, 1, u32::MAX as i128, "a process id").map(|n| n as u32);
                }
                kind => {
                    kinds += 1;
                    let name = self.string(&path, value);
                    match kind {
                        "pod" => k.pod = name,
                        "deployment" => k.deployment = name,
                        "rollout" => k.rollout = name,
                        "job" => k.job = name,
                        "cron_job" => k.cron_job = name,
                        "stateful_set" => k.stateful_set = name,
                        "service" => k.service = name,
                        _ => k.replica_set = name,
                    }
                }
            }
        }
        if kinds != 1 {
            self.error(node.pos, "`target.path` must name exactly one kind (pid, pod, deployment, ...)");
            return None;
        }
        Some(k)
    }

    fn agent(&mut self, node: &Node) -> Option<AgentConfig> {
        let t = self.table("agent", node, "a table")?;
        let mut a = AgentConfig::default();
        for (key, value) in &t.entries {
            let path = format!("agent.{key}");
            match *key {
                "image" => {
                    a.image = if let Value::Str(_) = value.value {
                        self.string(&path, value).map(AgentImage::Name)
                    } else {
                        self.positions.insert(path.clone(), value.pos);
                        self.table("agent.image", value, "a string or a table with `registry` and `tag`").map(
                            |t| {
                                let registry =
                                    t.get("registry").and_then(|n| self.string("agent.image.registry", n));
                                let tag = t.get("tag").and_then(|n| self.string("agent.image.tag", n));
                                AgentImage::Parts { registry, tag }
                            },
                        )
                    }
                }
                "namespace" => a.namespace = self.string(&path, value),
                "ttl" => a.ttl = self.seconds(&path, value),
                "startup_timeout" => a.startup_timeout = self.seconds(&path, value),
                "log_level" => a.log_level = self.string(&path, value),
                "json_log" => a.json_log = self.bool(&path, value),
                "tolerations" => {
                    a.tolerations = self.list(&path, value).map(|items| items.iter().map(to_json).collect())
                }
                "image_pull_policy" => a.image_pull_policy = self.string(&path, value),
                "image_pull_secrets" => {
                    a.image_pull_secrets =
                        self.list(&path, value).map(|items| items.to_vec()).and_then(|items| {
                            items.iter().map(|item| self.string_map(&path, item)).collect::<Option<Vec<_>>>()
                        })
                }
                "labels" => a.labels = self.string_map(&path, value),
                "annotations" => a.annotations = self.string_map(&path, value),
                "node_selector" => a.node_selector = self.string_map(&path, value),
                "service_account" => a.service_account = self.string(&path, value),
                "priority_class" => a.priority_class = self.string(&path, value),
                _ => {
                    self.positions.insert(path, value.pos);
                    a.resources = Some(to_json(value));
                }
            }
        }
        Some(a)
    }

    fn feature(&mut self, node: &Node) -> Option<FeatureConfig> {
        let t = self.table("feature", node, "a table")?;
        let mut f = FeatureConfig::default();
        if let Some(n) = t.get("env") {
            f.env = self.toggle("feature.env", n, |r, n| r.env(n));
        }
        if let Some(n) = t.get("fs") {
            f.fs = self.fs(n);
        }
        if let Some(n) = t.get("network") {
            f.network = self.network(n);
        }
        if let Some(n) = t.get("hostname") {
            f.hostname = self.only("feature.hostname", n, true, "the app always sees the pod's host name");
        }
        if let Some(n) = t.get("copy_target") {
            f.copy_target = match n.value {
                Value::Bool(_) => self.only(
                    "feature.copy_target",
                    n,
                    false,
                    "copying the target is a mirrord for Teams feature",
                ),
                _ => {
                    self.error(n.pos, "`feature.copy_target` is a mirrord setting that kmirror does not support: copying the target is a mirrord for Teams feature");
                    None
                }
            };
        }
        Some(f)
    }

    fn toggle<T>(
        &mut self,
        path: &str,
        node: &Node,
        read: impl FnOnce(&mut Self, &Node) -> Option<T>,
    ) -> Option<Toggle<T>> {
        match node.value {
            Value::Bool(_) => self.bool(path, node).map(Toggle::Enabled),
            _ => {
                self.positions.insert(path.to_string(), node.pos);
                read(self, node).map(Toggle::Config)
            }
        }
    }

    fn patterns(&mut self, path: &str, node: &Node) -> Option<Patterns> {
        match node.value {
            Value::Str(_) => self.string(path, node).map(Patterns::Joined),
            _ => self.strings(path, node).map(Patterns::List),
        }
    }

    fn env(&mut self, node: &Node) -> Option<EnvConfig> {
        let t = self.table("feature.env", node, "true, false or a table")?;
        let mut e = EnvConfig::default();
        if let Some(n) = t.get("include") {
            e.include = self.patterns("feature.env.include", n);
        }
        if let Some(n) = t.get("exclude") {
            e.exclude = self.patterns("feature.env.exclude", n);
        }
        if let Some(n) = t.get("override") {
            e.overrides = self.string_map("feature.env.override", n);
        }
        if let Some(n) = t.get("env_file") {
            e.env_file = self.string("feature.env.env_file", n);
        }
        if let Some(n) = t.get("unset") {
            e.unset = self.strings("feature.env.unset", n);
        }
        Some(e)
    }

    fn fs_mode(&mut self, path: &str, node: &Node) -> Option<FsModeName> {
        let text = self.string(path, node)?;
        let mode = match text.to_ascii_lowercase().as_str() {
            "local" => FsModeName::Local,
            "localwithoverrides" => FsModeName::LocalWithOverrides,
            "read" => FsModeName::Read,
            "write" => FsModeName::Write,
            _ => {
                let modes = ["local", "localwithoverrides", "read", "write"];
                let help = closest(&text, modes).map_or_else(
                    || format!("one of {}", modes.join(", ")),
                    |m| format!("did you mean `{m}`?"),
                );
                self.error_help(node.pos, format!("`{path}`: unknown mode `{text}`"), help);
                return None;
            }
        };
        Some(mode)
    }

    fn fs(&mut self, node: &Node) -> Option<FsField> {
        match node.value {
            Value::Bool(_) => return self.bool("feature.fs", node).map(FsField::Enabled),
            Value::Str(_) => return self.fs_mode("feature.fs", node).map(FsField::Mode),
            _ => {}
        }
        let t = self.table("feature.fs", node, "true, false, a mode or a table")?;
        let mut f = FsConfig::default();
        if let Some(n) = t.get("mode") {
            f.mode = self.fs_mode("feature.fs.mode", n);
        }
        if let Some(n) = t.get("read_write") {
            f.read_write = self.regexes("feature.fs.read_write", n);
        }
        if let Some(n) = t.get("read_only") {
            f.read_only = self.regexes("feature.fs.read_only", n);
        }
        if let Some(n) = t.get("local") {
            f.local = self.regexes("feature.fs.local", n);
        }
        if let Some(n) = t.get("not_found") {
            f.not_found = self.regexes("feature.fs.not_found", n);
        }
        Some(FsField::Config(f))
    }

    fn network(&mut self, node: &Node) -> Option<NetworkConfig> {
        let t = self.table("feature.network", node, "a table")?;
        let mut net = NetworkConfig::default();
        if let Some(n) = t.get("incoming") {
            net.incoming = self.incoming(n);
        }
        if let Some(n) = t.get("outgoing") {
            net.outgoing = self.toggle("feature.network.outgoing", n, |r, n| r.outgoing(n));
        }
        if let Some(n) = t.get("dns") {
            net.dns = self.toggle("feature.network.dns", n, |r, n| r.dns(n));
        }
        if let Some(n) = t.get("ipv6") {
            net.ipv6 =
                self.only("feature.network.ipv6", n, true, "kmirror always carries IPv6 through the pod");
        }
        Some(net)
    }

    fn interceptor(&mut self, node: &Node) -> Option<InterceptorName> {
        const PATH: &str = "interceptor";
        let text = self.string(PATH, node)?;
        match text.to_ascii_lowercase().as_str() {
            "auto" => Some(InterceptorName::Auto),
            "seccomp" => Some(InterceptorName::Seccomp),
            "ptrace" => Some(InterceptorName::Ptrace),
            _ => {
                let names = ["auto", "seccomp", "ptrace"];
                let help = closest(&text, names).map_or_else(
                    || format!("one of {}", names.join(", ")),
                    |m| format!("did you mean `{m}`?"),
                );
                self.error_help(node.pos, format!("`{PATH}`: unknown interceptor `{text}`"), help);
                None
            }
        }
    }

    fn incoming_mode(&mut self, path: &str, node: &Node) -> Option<IncomingModeName> {
        let text = self.string(path, node)?;
        match text.to_ascii_lowercase().as_str() {
            "mirror" => Some(IncomingModeName::Mirror),
            "steal" => Some(IncomingModeName::Steal),
            "off" => Some(IncomingModeName::Off),
            _ => {
                let modes = ["mirror", "steal", "off"];
                let help = closest(&text, modes).map_or_else(
                    || format!("one of {}", modes.join(", ")),
                    |m| format!("did you mean `{m}`?"),
                );
                self.error_help(node.pos, format!("`{path}`: unknown mode `{text}`"), help);
                None
            }
        }
    }

    fn incoming(&mut self, node: &Node) -> Option<IncomingField> {
        const PATH: &str = "feature.network.incoming";
        match node.value {
            Value::Bool(_) => return self.bool(PATH, node).map(IncomingField::Enabled),
            Value::Str(_) => return self.incoming_mode(PATH, node).map(IncomingField::Mode),
            _ => {}
        }
        let t = self.table(PATH, node, "true, false, a mode or a table")?;
        let mut inc = IncomingConfig::default();
        if let Some(n) = t.get("mode") {
            inc.mode = self.incoming_mode("feature.network.incoming.mode", n);
        }
        if let Some(n) = t.get("http_filter") {
            inc.http_filter = self.http_filter(n);
        }
        if let Some(n) = t.get("port_mapping") {
            inc.port_mapping = self.port_mapping(n);
        }
        if let Some(n) = t.get("ignore_ports") {
            inc.ignore_ports = self.ports("feature.network.incoming.ignore_ports", n);
        }
        if let Some(n) = t.get("ports") {
            inc.ports = self.ports("feature.network.incoming.ports", n);
            if t.get("ignore_ports").is_some() {
                self.error(n.pos, "`feature.network.incoming`: give `ports` or `ignore_ports`, not both");
            }
        }
        if let Some(n) = t.get("allow_host_network") {
            inc.allow_host_network = self.bool("feature.network.incoming.allow_host_network", n);
        }
        Some(IncomingField::Config(inc))
    }

    fn http_filter(&mut self, node: &Node) -> Option<HttpFilterConfig> {
        const PATH: &str = "feature.network.incoming.http_filter";
        let t = self.table(PATH, node, "a table")?;
        let mut f = HttpFilterConfig::default();
        for (key, target) in [("header_filter", &mut f.header_filter), ("path_filter", &mut f.path_filter)] {
            if let Some(n) = t.get(key) {
                let path = format!("{PATH}.{key}");
                *target = self.string(&path, n);
                let compiled = target.as_deref().map(|p| match key {
                    "header_filter" => regex::bytes::Regex::new(&header_regex(p)),
                    _ => regex::bytes::Regex::new(p),
                });
                if let Some(Err(e)) = compiled {
                    self.error(n.pos, format!("`{path}`: invalid regex: {}", regex_error(&e)));
                    *target = None;
                }
            }
        }
        if let Some(n) = t.get("ports") {
            f.ports = self.ports("feature.network.incoming.http_filter.ports", n);
        }
        Some(f)
    }

    fn port_mapping(&mut self, node: &Node) -> Option<Vec<(u16, u16)>> {
        const PATH: &str = "feature.network.incoming.port_mapping";
        let items = self.list(PATH, node)?;
        let mut out: Vec<(u16, u16)> = Vec::new();
        let mut ok = true;
        for item in items {
            let pair = match &item.value {
                Value::Seq(pair) if pair.len() == 2 => {
                    self.port(PATH, &pair[0]).zip(self.port(PATH, &pair[1]))
                }
                _ => {
                    self.expected(PATH, item, "a list of [LOCAL, POD] port pairs");
                    None
                }
            };
            let Some((local, pod)) = pair else {
                ok = false;
                continue;
            };
            if out.iter().any(|&(l, p)| l == local || p == pod) {
                self.error(item.pos, format!("`{PATH}`: port {local} or {pod} is mapped twice"));
                ok = false;
                continue;
            }
            out.push((local, pod));
        }
        self.positions.insert(PATH.into(), node.pos);
        ok.then_some(out)
    }

    fn address_filter(&mut self, path: &str, node: &Node, names_only: bool) -> Option<AddressFilterConfig> {
        let t = self.table(path, node, "a table with `remote` or `local`")?;
        let mut f = AddressFilterConfig::default();
        for (side, key) in [(Side::Remote, "remote"), (Side::Local, "local")] {
            let Some(n) = t.get(key) else { continue };
            let list_path = format!("{path}.{key}");
            let Some(list) = self.strings(&list_path, n) else { continue };
            let Value::Seq(items) = &n.value else { continue };
            let mut ok = true;
            for (rule, item) in list.iter().zip(items) {
                let checked = if names_only {
                    NameFilter::parse(side, std::slice::from_ref(rule)).map(|_| ())
                } else {
                    AddressFilter::parse(side, std::slice::from_ref(rule)).map(|_| ())
                };
                if let Err(e) = checked {
                    self.error(item.pos, format!("`{list_path}`: {e}"));
                    ok = false;
                }
            }
            if ok {
                match side {
                    Side::Remote => f.remote = Some(list),
                    Side::Local => f.local = Some(list),
                }
            }
        }
        if t.get("remote").is_some() && t.get("local").is_some() {
            self.error(node.pos, format!("`{path}`: give `remote` or `local`, not both"));
            return None;
        }
        Some(f)
    }

    fn outgoing(&mut self, node: &Node) -> Option<OutgoingConfig> {
        const PATH: &str = "feature.network.outgoing";
        let t = self.table(PATH, node, "true, false or a table")?;
        let mut o = OutgoingConfig::default();
        if let Some(n) = t.get("tcp") {
            o.tcp = self.bool("feature.network.outgoing.tcp", n);
        }
        if let Some(n) = t.get("udp") {
            o.udp = self.bool("feature.network.outgoing.udp", n);
        }
        if let Some(n) = t.get("ignore_localhost") {
            o.ignore_localhost = self.bool("feature.network.outgoing.ignore_localhost", n);
        }
        if let Some(n) = t.get("filter") {
            o.filter = self.address_filter("feature.network.outgoing.filter", n, false);
        }
        Some(o)
    }

    fn dns(&mut self, node: &Node) -> Option<DnsConfig> {
        let t = self.table("feature.network.dns", node, "true, false or a table")?;
        let mut d = DnsConfig::default();
        if let Some(n) = t.get("enabled") {
            d.enabled = self.bool("feature.network.dns.enabled", n);
        }
        if let Some(n) = t.get("filter") {
            d.filter = self.address_filter("feature.network.dns.filter", n, true);
        }
        Some(d)
    }
}

/// The last line of a regex error (the first ones repeat the pattern with a caret, which the
/// report does itself).
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines().last().unwrap_or(&text).trim_start_matches("error: ").to_string()
}

/// mirrord matches `header_filter` case-insensitively; kmirror's agent matches header lines
/// with the regex as given, so the file's pattern is made case-insensitive (ASCII, which header
/// names are) by a `(?i-u)` prefix.
pub fn header_regex(pattern: &str) -> String {
    format!("(?i-u){pattern}")
}

fn to_json(node: &Node) -> serde_json::Value {
    match &node.value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(n) => i64::try_from(*n).map_or_else(|_| n.to_string().into(), Into::into),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, serde_json::Value::Number)
        }
        Value::Str(s) => s.clone().into(),
        Value::Seq(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => entries.iter().map(|(k, v)| (k.name.clone(), to_json(v))).collect(),
    }
}
