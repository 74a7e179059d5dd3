//! Resolving the settings of one `kmirror run`: CLI flags > `KMIRROR_*` environment >
//! configuration file > defaults, with the source of every value kept for
//! `kmirror verify-config`.

use super::diag::Diagnostic;
use super::file::*;
use super::{Found, Loaded};
use crate::cli::SettingsArgs;
use crate::policy::files::FsMode;
use crate::policy::filter::{AddressFilter, NameFilter, Side};
use crate::policy::incoming::IncomingSetting;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Default,
    Flag(String),
    Env(String),
    File {
        path: PathBuf,
        pos: Option<super::node::Pos>,
    },
    /// Made from another setting (named).
    Derived(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::File { path, pos: Some(pos) } => write!(f, "file {}:{pos}", path.display()),
            Source::File { path, pos: None } => write!(f, "file {}", path.display()),
            Source::Derived(from) => write!(f, "from {from}"),
        }
    }
}

/// One line of `verify-config`: a key (the file's name for it), its value, where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub key: String,
    pub value: String,
    pub source: Source,
}

/// Everything a session needs from the user, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Option<String>,
    pub fs_mode: FsMode,
    pub fs_read_write: Vec<String>,
    pub fs_read_only: Vec<String>,
    pub fs_local: Vec<String>,
    pub fs_not_found: Vec<String>,
    pub no_remote_dns: bool,
    pub dns_filter: Option<NameFilter>,
    pub no_env: bool,
    pub env_include: Vec<String>,
    pub env_exclude: Vec<String>,
    /// The env file's variables, read and parsed.
    pub env_file: Vec<(String, String)>,
    pub env_override: BTreeMap<String, String>,
    pub env_unset: Vec<String>,
    pub incoming: IncomingSetting,
    pub port_map: Vec<(u16, u16)>,
    pub steal_header: Option<String>,
    pub steal_path: Option<String>,
    pub http_filter_ports: Option<Vec<u16>>,
    pub ignore_ports: Vec<u16>,
    pub ports: Option<Vec<u16>>,
    pub allow_host_network: bool,
    pub remote_timeout: f64,
    pub remote_loopback: bool,
    pub outgoing_tcp: bool,
    pub outgoing_udp: bool,
    pub outgoing_filter: Option<AddressFilter>,
    pub exit_with_main: bool,
    pub interceptor: crate::intercept::InterceptorSetting,
    /// Every setting, for `verify-config`.
    pub shown: Vec<Shown>,
    /// Settings kept for Kubernetes targets, unused today.
    pub stored: Vec<Shown>,
    /// mirrord settings accepted because they are kmirror's behaviour already.
    pub accepted: Vec<Shown>,
}

/// What settings are resolved from.
pub struct Inputs<'a> {
    pub args: &'a SettingsArgs,
    /// Where a `run` argument (by clap id) came from; `None` when it was not given.
    pub origin: &'a dyn Fn(&str) -> Option<Source>,
    pub file: Option<&'a Loaded>,
}

/// Errors found while resolving: about values of the file (with positions) and about the rest.
#[derive(Debug, Default)]
pub struct Failure {
    pub file: Vec<Diagnostic>,
    pub other: Vec<Diagnostic>,
}

struct Resolver<'a> {
    inputs: &'a Inputs<'a>,
    shown: Vec<Shown>,
    failure: Failure,
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

fn ports(items: &[u16]) -> String {
    format!("[{}]", items.iter().map(u16::to_string).collect::<Vec<_>>().join(", "))
}

fn fs_mode_name(mode: FsMode) -> &'static str {
    match mode {
        FsMode::Local => "local",
        FsMode::LocalWithOverrides => "localwithoverrides",
        FsMode::Read => "read",
        FsMode::Write => "write",
    }
}

fn incoming_name(setting: IncomingSetting) -> &'static str {
    match setting {
        IncomingSetting::Mirror => "mirror",
        IncomingSetting::Steal => "steal",
        IncomingSetting::Off => "off",
    }
}

impl Resolver<'_> {
    fn file_source(&self, key: &str) -> Source {
        let file = self.inputs.file.expect("a file value comes from a file");
        Source::File { path: file.path.clone(), pos: file.read.positions.get(key).copied() }
    }

    fn file_pos(&self, key: &str) -> Option<super::node::Pos> {
        self.inputs.file.and_then(|f| f.read.positions.get(key).copied())
    }

    /// Takes the flag's (or its variable's) value if given, else the file's, else the default,
    /// and notes which.
    fn pick<T>(
        &mut self,
        key: &str,
        arg: Option<(&str, T)>,
        file: Option<(T, &str)>,
        default: T,
        show: impl Fn(&T) -> String,
    ) -> T {
        let (value, source) = match (arg.and_then(|(id, v)| (self.inputs.origin)(id).map(|s| (v, s))), file) {
            (Some((v, source)), _) => (v, source),
            (None, Some((v, at))) => {
                let source = self.file_source(at);
                (v, source)
            }
            (None, None) => (default, Source::Default),
        };
        self.shown.push(Shown { key: key.to_string(), value: show(&value), source });
        value
    }
}

pub fn resolve(inputs: &Inputs<'_>) -> Result<Settings, Failure> {
    let mut r = Resolver { inputs, shown: Vec::new(), failure: Failure::default() };
    let args = inputs.args;
    let c: FileConfig = inputs.file.map(|f| f.read.config.clone()).unwrap_or_default();
    let feature = c.feature.clone().unwrap_or_default();
    let network = feature.network.clone().unwrap_or_default();

    // ---- target ----
    let file_target = c.target.as_ref().and_then(|t| match t {
        TargetField::Path(p) => Some((p.clone(), "target")),
        TargetField::Full(full) => match &full.path {
            Some(TargetPath::Path(p)) => Some((p.clone(), "target.path")),
            Some(TargetPath::Kind(k)) => Some((kind_path(k), "target.path")),
            None => None,
        },
    });
    let target = r.pick(
        "target",
        args.target.clone().map(|t| ("target", Some(t))),
        file_target.map(|(t, at)| (Some(t), at)),
        None,
        |t| t.clone().unwrap_or_else(|| "(none)".into()),
    );
    if let Some(t) = &target
        && let Err(e) = crate::target::parse(t)
    {
        let at = r.shown.last().map(|s| s.source.clone());
        match at {
            Some(Source::File { pos: Some(pos), .. }) => {
                r.failure.file.push(Diagnostic::at(pos, format!("`target`: {e}")))
            }
            Some(source) => r.failure.other.push(Diagnostic {
                pos: None,
                message: format!("{e} (target from {source})"),
                help: None,
            }),
            None => {}
        }
    }

    // ---- files ----
    let (file_fs_mode, fs_config) = match &feature.fs {
        Some(FsField::Enabled(true)) => (Some((FsMode::Read, "feature.fs")), FsConfig::default()),
        Some(FsField::Enabled(false)) => (Some((FsMode::Local, "feature.fs")), FsConfig::default()),
        Some(FsField::Mode(m)) => (Some((fs_mode(*m), "feature.fs")), FsConfig::default()),
        Some(FsField::Config(cfg)) => (cfg.mode.map(|m| (fs_mode(m), "feature.fs.mode")), cfg.clone()),
        None => (None, FsConfig::default()),
    };
    let fs_mode = r.pick(
        "feature.fs.mode",
        args.fs_mode.map(|m| ("fs_mode", m)),
        file_fs_mode,
        FsMode::LocalWithOverrides,
        |m| fs_mode_name(*m).to_string(),
    );
    let file_list = |r: &mut Resolver, key: &str, value: &Option<Vec<String>>| {
        r.pick(key, None, value.clone().map(|v| (v, key)), Vec::new(), |v| list(v))
    };
    let fs_read_write = file_list(&mut r, "feature.fs.read_write", &fs_config.read_write);
    let fs_read_only = file_list(&mut r, "feature.fs.read_only", &fs_config.read_only);
    let fs_local = file_list(&mut r, "feature.fs.local", &fs_config.local);
    let fs_not_found = file_list(&mut r, "feature.fs.not_found", &fs_config.not_found);

    // ---- environment ----
    let env_config = match &feature.env {
        Some(Toggle::Config(e)) => Some(e.clone()),
        _ => None,
    };
    let file_env_on = match &feature.env {
        Some(Toggle::Enabled(b)) => Some((*b, "feature.env")),
        Some(Toggle::Config(_)) => Some((true, "feature.env")),
        None => None,
    };
    let env_on = r.pick("feature.env", Some(("no_env", !args.no_env)), file_env_on, true, |b| b.to_string());
    let env = env_config.unwrap_or_default();
    let env_include = r.pick(
        "feature.env.include",
        Some(("env_include", args.env_include.clone())),
        env.include.as_ref().map(|p| (p.to_vec(), "feature.env.include")),
        Vec::new(),
        |v| list(v),
    );
    let env_exclude = r.pick(
        "feature.env.exclude",
        Some(("env_exclude", args.env_exclude.clone())),
        env.exclude.as_ref().map(|p| (p.to_vec(), "feature.env.exclude")),
        Vec::new(),
        |v| list(v),
    );
    // A relative env file in the configuration file is relative to that file's directory.
    let file_env_file = env.env_file.as_ref().map(|p| {
        let dir = inputs.file.and_then(|f| f.path.parent()).unwrap_or(Path::new("."));
        (Some(dir.join(p)), "feature.env.env_file")
    });
    let env_file_path = r.pick(
        "feature.env.env_file",
        args.env_file.clone().map(|p| ("env_file", Some(p))),
        file_env_file,
        None,
        |p| p.as_ref().map_or_else(|| "(none)".into(), |p| p.display().to_string()),
    );
    let env_file = match &env_file_path {
        None => Vec::new(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| crate::policy::dotenv::parse(&text))
        {
            Ok(vars) => vars,
            Err(e) => {
                let message = format!("env file {}: {e}", path.display());
                match r.file_pos("feature.env.env_file").filter(|_| args.env_file.is_none()) {
                    Some(pos) => r.failure.file.push(Diagnostic::at(pos, message)),
                    None => r.failure.other.push(Diagnostic { pos: None, message, help: None }),
                }
                Vec::new()
            }
        },
    };
    let env_override = r.pick(
        "feature.env.override",
        None,
        env.overrides.clone().map(|o| (o, "feature.env.override")),
        BTreeMap::new(),
        |o| format!("{{{}}}", o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")),
    );
    let env_unset = r.pick(
        "feature.env.unset",
        None,
        env.unset.clone().map(|u| (u, "feature.env.unset")),
        Vec::new(),
        |v| list(v),
    );

    // ---- incoming ----
    let (file_mode, incoming_config) = match &network.incoming {
        Some(IncomingField::Enabled(true)) => {
            (Some((IncomingSetting::Mirror, "feature.network.incoming")), None)
        }
        Some(IncomingField::Enabled(false)) => {
            (Some((IncomingSetting::Off, "feature.network.incoming")), None)
        }
        Some(IncomingField::Mode(m)) => (Some((incoming_setting(*m), "feature.network.incoming")), None),
        Some(IncomingField::Config(cfg)) => {
            (cfg.mode.map(|m| (incoming_setting(m), "feature.network.incoming.mode")), Some(cfg.clone()))
        }
        None => (None, None),
    };
    let inc = incoming_config.unwrap_or_default();
    let incoming = r.pick(
        "feature.network.incoming.mode",
        args.incoming.map(|m| ("incoming", m)),
        file_mode,
        IncomingSetting::Mirror,
        |m| incoming_name(*m).to_string(),
    );
    let port_map = r.pick(
        "feature.network.incoming.port_mapping",
        Some(("port_map", args.port_map.clone())),
        inc.port_mapping.clone().map(|p| (p, "feature.network.incoming.port_mapping")),
        Vec::new(),
        |m| format!("[{}]", m.iter().map(|(l, p)| format!("[{l}, {p}]")).collect::<Vec<_>>().join(", ")),
    );
    let http = inc.http_filter.clone().unwrap_or_default();
    let steal_header = r.pick(
        "feature.network.incoming.http_filter.header_filter",
        args.steal_header.clone().map(|h| ("steal_header", Some(h))),
        http.header_filter.clone().map(|h| {
            (Some(super::read::header_regex(&h)), "feature.network.incoming.http_filter.header_filter")
        }),
        None,
        |h| h.clone().unwrap_or_else(|| "(none)".into()),
    );
    let steal_path = r.pick(
        "feature.network.incoming.http_filter.path_filter",
        args.steal_path.clone().map(|p| ("steal_path", Some(p))),
        http.path_filter.clone().map(|p| (Some(p), "feature.network.incoming.http_filter.path_filter")),
        None,
        |p| p.clone().unwrap_or_else(|| "(none)".into()),
    );
    let http_filter_ports = r.pick(
        "feature.network.incoming.http_filter.ports",
        None,
        http.ports.clone().map(|p| (Some(p), "feature.network.incoming.http_filter.ports")),
        None,
        |p| p.as_ref().map_or_else(|| "(all)".into(), |p| ports(p)),
    );
    if (steal_header.is_some() || steal_path.is_some()) && incoming != IncomingSetting::Steal {
        let message = format!(
            "an HTTP filter (--steal-header, --steal-path, http_filter) applies to steal mode only, and the \
             incoming mode is `{}`",
            incoming_name(incoming)
        );
        let help = "set --incoming steal (or `feature.network.incoming.mode: steal`), or remove the filter";
        match r
            .file_pos("feature.network.incoming.http_filter.header_filter")
            .or(r.file_pos("feature.network.incoming.http_filter.path_filter"))
            .filter(|_| args.steal_header.is_none() && args.steal_path.is_none())
        {
            Some(pos) => r.failure.file.push(Diagnostic::at(pos, message).with_help(help)),
            None => r.failure.other.push(Diagnostic { pos: None, message, help: Some(help.into()) }),
        }
    }
    let ignore_ports = r.pick(
        "feature.network.incoming.ignore_ports",
        None,
        inc.ignore_ports.clone().map(|p| (p, "feature.network.incoming.ignore_ports")),
        Vec::new(),
        |p| ports(p),
    );
    let only_ports = r.pick(
        "feature.network.incoming.ports",
        None,
        inc.ports.clone().map(|p| (Some(p), "feature.network.incoming.ports")),
        None,
        |p| p.as_ref().map_or_else(|| "(all)".into(), |p| ports(p)),
    );
    let allow_host_network = r.pick(
        "feature.network.incoming.allow_host_network",
        Some(("allow_host_network", args.allow_host_network)),
        inc.allow_host_network.map(|b| (b, "feature.network.incoming.allow_host_network")),
        false,
        |b| b.to_string(),
    );

    // ---- outgoing ----
    let (outgoing_on, outgoing) = match &network.outgoing {
        Some(Toggle::Enabled(b)) => (Some(*b), OutgoingConfig::default()),
        Some(Toggle::Config(o)) => (None, o.clone()),
        None => (None, OutgoingConfig::default()),
    };
    let proto_switch = |value: Option<bool>, key: &'static str| match (outgoing_on, value) {
        (Some(b), _) => Some((b, "feature.network.outgoing")),
        (None, Some(b)) => Some((b, key)),
        (None, None) => None,
    };
    let outgoing_tcp = r.pick(
        "feature.network.outgoing.tcp",
        None,
        proto_switch(outgoing.tcp, "feature.network.outgoing.tcp"),
        true,
        |b| b.to_string(),
    );
    let outgoing_udp = r.pick(
        "feature.network.outgoing.udp",
        None,
        proto_switch(outgoing.udp, "feature.network.outgoing.udp"),
        true,
        |b| b.to_string(),
    );
    let ignore_localhost = r.pick(
        "feature.network.outgoing.ignore_localhost",
        Some(("remote_loopback", !args.remote_loopback)),
        outgoing.ignore_localhost.map(|b| (b, "feature.network.outgoing.ignore_localhost")),
        true,
        |b| b.to_string(),
    );
    let filter_spec = outgoing.filter.clone().and_then(|f| match (f.remote, f.local) {
        (Some(rules), _) => Some((Side::Remote, rules, "feature.network.outgoing.filter.remote")),
        (None, Some(rules)) => Some((Side::Local, rules, "feature.network.outgoing.filter.local")),
        (None, None) => None,
    });
    let outgoing_filter = filter_spec
        .as_ref()
        .map(|(side, rules, _)| AddressFilter::parse(*side, rules).expect("checked when the file was read"));
    r.pick(
        "feature.network.outgoing.filter",
        None,
        filter_spec.as_ref().map(|(side, rules, at)| ((*side, rules.clone()), *at)),
        (Side::Remote, Vec::new()),
        |(side, rules)| match (side, rules.is_empty()) {
            (_, true) => "(none: everything through the pod)".into(),
            (Side::Remote, false) => format!("remote {}", list(rules)),
            (Side::Local, false) => format!("local {}", list(rules)),
        },
    );

    // ---- DNS ----
    let (file_dns_on, dns) = match &network.dns {
        Some(Toggle::Enabled(b)) => (Some((*b, "feature.network.dns")), DnsConfig::default()),
        Some(Toggle::Config(d)) => (d.enabled.map(|b| (b, "feature.network.dns.enabled")), d.clone()),
        None => (None, DnsConfig::default()),
    };
    let dns_on = r.pick(
        "feature.network.dns.enabled",
        Some(("no_remote_dns", !args.no_remote_dns)),
        file_dns_on,
        true,
        |b| b.to_string(),
    );
    let dns_spec = dns.filter.clone().and_then(|f| match (f.remote, f.local) {
        (Some(names), _) => Some((Side::Remote, names, "feature.network.dns.filter.remote")),
        (None, Some(names)) => Some((Side::Local, names, "feature.network.dns.filter.local")),
        (None, None) => None,
    });
    // As in mirrord, host names of the outgoing filter are resolved on the side their
    // connections go to, unless the DNS filter says otherwise.
    let dns_filter = match (&dns_spec, &outgoing_filter) {
        (Some((side, names, at)), _) => {
            let source = r.file_source(at);
            r.shown.push(Shown {
                key: "feature.network.dns.filter".into(),
                value: format!("{} {}", side_name(*side), list(names)),
                source,
            });
            Some(NameFilter::parse(*side, names).expect("checked when the file was read"))
        }
        (None, Some(filter)) if filter.has_names() => {
            let names = filter.names();
            r.shown.push(Shown {
                key: "feature.network.dns.filter".into(),
                value: format!("{} {}", side_name(filter.side), list(&names)),
                source: Source::Derived("feature.network.outgoing.filter".into()),
            });
            Some(NameFilter { side: filter.side, names })
        }
        _ => {
            r.shown.push(Shown {
                key: "feature.network.dns.filter".into(),
                value: "(none: every name through the pod)".into(),
                source: Source::Default,
            });
            None
        }
    };

    // ---- the rest ----
    let remote_timeout = r.pick(
        "remote_timeout",
        args.remote_timeout.map(|t| ("remote_timeout", t)),
        c.remote_timeout.map(|t| (t, "remote_timeout")),
        30.0,
        |t| format!("{t}"),
    );
    if !(remote_timeout > 0.0 && remote_timeout <= 86_400.0) && args.remote_timeout.is_some() {
        r.failure.other.push(Diagnostic {
            pos: None,
            message: format!(
                "--remote-timeout {remote_timeout}: give a number of seconds above 0 (at most 86400)"
            ),
            help: None,
        });
    }
    let exit_with_main = r.pick(
        "exit_with_main",
        Some(("exit_with_main", args.exit_with_main)),
        c.exit_with_main.map(|b| (b, "exit_with_main")),
        false,
        |b| b.to_string(),
    );
    let interceptor = r.pick(
        "interceptor",
        args.interceptor.map(|i| ("interceptor", i)),
        c.interceptor.map(|i| (interceptor_setting(i), "interceptor")),
        crate::intercept::InterceptorSetting::Auto,
        |i| i.name().to_string(),
    );

    let mut stored = Vec::new();
    let mut accepted = Vec::new();
    if let Some(file) = inputs.file {
        let positions = &file.read.positions;
        for (key, pos) in positions {
            let source = Source::File { path: file.path.clone(), pos: Some(*pos) };
            let value = || value_text(&c, key);
            if key == "kube_context"
                || key == "kubeconfig"
                || key == "accept_invalid_certificates"
                || key == "target.namespace"
                || (key.starts_with("agent.") && !key[6..].contains('.'))
            {
                stored.push(Shown { key: key.clone(), value: value(), source });
            } else if matches!(
                key.as_str(),
                "$schema"
                    | "telemetry"
                    | "operator"
                    | "feature.hostname"
                    | "feature.copy_target"
                    | "feature.network.ipv6"
            ) {
                accepted.push(Shown { key: key.clone(), value: value(), source });
            }
        }
    }

    let failed = !r.failure.file.is_empty() || !r.failure.other.is_empty();
    if failed {
        return Err(r.failure);
    }
    Ok(Settings {
        target,
        fs_mode,
        fs_read_write,
        fs_read_only,
        fs_local,
        fs_not_found,
        no_remote_dns: !dns_on,
        dns_filter,
        no_env: !env_on,
        env_include,
        env_exclude,
        env_file,
        env_override,
        env_unset,
        incoming,
        port_map,
        steal_header,
        steal_path,
        http_filter_ports,
        ignore_ports,
        ports: only_ports,
        allow_host_network,
        remote_timeout,
        remote_loopback: !ignore_localhost,
        outgoing_tcp,
        outgoing_udp,
        outgoing_filter,
        exit_with_main,
        interceptor,
        shown: r.shown,
        stored,
        accepted,
    })
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Remote => "remote",
        Side::Local => "local",
    }
}

fn fs_mode(m: FsModeName) -> FsMode {
    match m {
        FsModeName::Local => FsMode::Local,
        FsModeName::LocalWithOverrides => FsMode::LocalWithOverrides,
        FsModeName::Read => FsMode::Read,
        FsModeName::Write => FsMode::Write,
    }
}

fn interceptor_setting(i: InterceptorName) -> crate::intercept::InterceptorSetting {
    use crate::intercept::InterceptorSetting;
    match i {
        InterceptorName::Auto => InterceptorSetting::Auto,
        InterceptorName::Seccomp => InterceptorSetting::Seccomp,
        InterceptorName::Ptrace => InterceptorSetting::Ptrace,
    }
}

fn incoming_setting(m: IncomingModeName) -> IncomingSetting {
    match m {
        IncomingModeName::Mirror => IncomingSetting::Mirror,
        IncomingModeName::Steal => IncomingSetting::Steal,
        IncomingModeName::Off => IncomingSetting::Off,
    }
}

/// mirrord's object form of a target path as kmirror's text form: `pod/web/container/app`.
fn kind_path(k: &TargetKind) -> String {
    let (kind, name) = [
        ("pod", &k.pod),
        ("deployment", &k.deployment),
        ("rollout", &k.rollout),
        ("job", &k.job),
        ("cronjob", &k.cron_job),
        ("statefulset", &k.stateful_set),
        ("service", &k.service),
        ("replicaset", &k.replica_set),
    ]
    .into_iter()
    .find_map(|(kind, name)| name.as_ref().map(|n| (kind, n.clone())))
    .unwrap_or_else(|| ("pid", k.pid.map(|p| p.to_string()).unwrap_or_default()));
    match &k.container {
        Some(c) => format!("{kind}/{name}/container/{c}"),
        None => format!("{kind}/{name}"),
    }
}

/// A stored or accepted value as the file gave it, in JSON.
fn value_text(c: &FileConfig, key: &str) -> String {
    let mut value = serde_json::to_value(c).unwrap_or_default();
    for part in key.split('.') {
        value = value.get(part).cloned().unwrap_or_default();
    }
    match value {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// The message when no target was given anywhere (exit status 2, nothing started).
pub fn no_target_message(file: Option<&Loaded>) -> String {
    let file_line = match file {
        Some(f) => format!("  - `target` in {} (it has none)", f.path.display()),
        None => "  - `target` in a configuration file: -f FILE, KMIRROR_CONFIG, or .kmirror/kmirror.{json,toml,yaml} \
                 (or .mirrord/mirrord.json) in this directory or a parent"
            .to_string(),
    };
    let kube = match std::env::var_os("KUBECONFIG").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")).filter(|p| p.exists())
    }) {
        Some(k) => format!(
            "\n(a kubeconfig is present at {}, but Kubernetes targets and targetless sessions are not supported yet)",
            k.display()
        ),
        None => String::new(),
    };
    format!(
        "no target: kmirror needs to know which process's pod to run in. Give one with\n  \
         - --target pid/<PID>, unit/<NAME> or user-unit/<NAME> (or -t)\n  \
         - the KMIRROR_TARGET environment variable\n{file_line}{kube}"
    )
}

/// `kmirror verify-config`'s report of resolved settings.
pub fn render(settings: &Settings, file: Option<&Loaded>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match file {
        Some(f) => {
            let how = match &f.found {
                Found::Given(by) => format!("given by {by}"),
                Found::Discovered { from } => format!("found from {}", from.display()),
            };
            let _ = writeln!(out, "configuration file: {} ({how})", f.path.display());
            for other in &f.passed_over {
                let _ = writeln!(out, "  not read: {} (the file above comes first)", other.display());
            }
        }
        None => {
            let _ = writeln!(
                out,
                "configuration file: none (no -f, no KMIRROR_CONFIG, none found from the working directory)"
            );
        }
    }
    let table = |out: &mut String, rows: &[Shown]| {
        let width = rows.iter().map(|s| s.key.len()).max().unwrap_or(0);
        let vwidth = rows.iter().map(|s| s.value.chars().count()).max().unwrap_or(0).min(40);
        for s in rows {
            let _ = writeln!(out, "  {:width$}  {:vwidth$}  {}", s.key, s.value, s.source);
        }
    };
    let _ = writeln!(out, "\nsettings (value, then where it came from):");
    table(&mut out, &settings.shown);
    if settings.target.is_none() {
        let _ =
            writeln!(out, "  (kmirror run needs a target: --target, KMIRROR_TARGET or `target` in the file)");
    }
    if !settings.stored.is_empty() {
        let _ = writeln!(
            out,
            "\nstored for Kubernetes targets, unused today (kmirror supports pid/ targets only):"
        );
        table(&mut out, &settings.stored);
    }
    if !settings.accepted.is_empty() {
        let _ = writeln!(out, "\nmirrord settings that are kmirror's behaviour already:");
        table(&mut out, &settings.accepted);
    }
    out
}
