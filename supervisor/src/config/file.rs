//! The configuration file's shape, as Rust types: the reader (`read.rs`) fills them, and the
//! JSON schema (`docs/kmirror.schema.json`, `kmirror schema`) is generated from them. Keys and
//! their meanings follow mirrord's where the feature is the same, so a `.mirrord/mirrord.json`
//! reads as it does there; docs/config.md lists every key.

use schemars::JsonSchema;
use serde::Serialize;
use std::collections::BTreeMap;

/// kmirror's configuration file (JSON, TOML or YAML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "kmirror configuration")]
pub struct FileConfig {
    /// The schema this file follows (for editors; kmirror does not read it).
    #[serde(rename = "$schema", skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// What to mirror: `pid/<PID>` (a process on this machine), `unit/<NAME>` or
    /// `user-unit/<NAME>` (a systemd unit's main process), or mirrord's
    /// `{ "path": ..., "namespace": ... }`. Kubernetes targets are not supported yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetField>,
    /// Kubernetes context (stored for Kubernetes targets; unused today).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_context: Option<String>,
    /// Path of the kubeconfig (stored for Kubernetes targets; unused today).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// Accept the API server's certificate without checking it (stored for Kubernetes
    /// targets; unused today).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_invalid_certificates: Option<bool>,
    /// The agent pod of Kubernetes targets (stored; unused today: local targets run a local
    /// agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<FeatureConfig>,
    /// Longest a single pod operation (file, DNS, connect set-up) may take, in seconds
    /// (kmirror's own; `--remote-timeout`). Default 30.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_timeout: Option<f64>,
    /// End the app's other processes when its main process exits (kmirror's own;
    /// `--exit-with-main`). Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_with_main: Option<bool>,
    /// How the app's calls are intercepted: `seccomp` (a user-notification listener),
    /// `ptrace` (works under another seccomp listener), or `auto` (seccomp where a listener
    /// can be installed). kmirror's own; `--interceptor`. Default `auto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interceptor: Option<InterceptorName>,
    /// mirrord's telemetry switch: kmirror sends none, so only `false` is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_false")]
    pub telemetry: Option<bool>,
    /// mirrord's operator switch: kmirror has no operator, so only `false` is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_false")]
    pub operator: Option<bool>,
}

fn only_false(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "const": false })
}

fn only_true(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "const": true })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InterceptorName {
    Auto,
    Seccomp,
    Ptrace,
}

/// `"pid/4242"` (or mirrord's `"pod/<name>[/container/<c>]"`, ...), or an object.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum TargetField {
    Path(String),
    Full(Box<TargetObject>),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetObject {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<TargetPath>,
    /// Kubernetes namespace of the target (stored for Kubernetes targets; unused today).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum TargetPath {
    Path(String),
    Kind(TargetKind),
}

/// mirrord's object form of a target path: one kind with its name, and optionally a container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetKind {
    /// A process on this machine (kmirror's own kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron_job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stateful_set: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_set: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The agent pod of Kubernetes targets; stored for that work, unused today.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<AgentImage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Seconds the finished agent pod is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Seconds to wait for the agent pod to start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<u64>,
    /// A `KMIRROR_LOG`/`RUST_LOG`-style filter for the agent's logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_log: Option<bool>,
    /// Kubernetes tolerations of the agent pod, as in a pod spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<BTreeMap<String, String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
    /// Kubernetes resource requests and limits of the agent pod, as in a pod spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<serde_json::Value>,
}

/// `"registry/name:tag"`, or `{ "registry": ..., "tag": ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum AgentImage {
    Name(String),
    Parts {
        #[serde(skip_serializing_if = "Option::is_none")]
        registry: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Toggle<EnvConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// The app sees the pod's host name (always, in kmirror: only `true` is accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_true")]
    pub hostname: Option<bool>,
    /// mirrord for Teams' pod copy: kmirror has none, so only `false` is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_false")]
    pub copy_target: Option<bool>,
}

/// A section given as `true`/`false` (on with its defaults, or off) or as its settings.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Toggle<T> {
    Enabled(bool),
    Config(T),
}

/// A `;`-separated string, or a list.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Patterns {
    Joined(String),
    List(Vec<String>),
}

impl Patterns {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Patterns::Joined(s) => {
                s.split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
            }
            Patterns::List(v) => v.clone(),
        }
    }
}

/// The pod's environment in the app's (`feature.env`; `false` is `--no-env`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Take only pod variables matching these patterns (`*` and `?` wildcards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include: Option<Patterns>,
    /// Leave out pod variables matching these patterns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Patterns>,
    /// Variables set for the app whatever the pod and the local environment say (beat
    /// `env_file`).
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub overrides: Option<BTreeMap<String, String>>,
    /// A dotenv file (`NAME=value` lines) whose values beat the pod's. A relative path is
    /// relative to the configuration file's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_file: Option<String>,
    /// Variables removed from the app's environment (names, case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unset: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsModeName {
    Local,
    #[serde(rename = "localwithoverrides")]
    LocalWithOverrides,
    Read,
    /// As `read`, and writes to the paths read from the pod go to the pod's files.
    Write,
}

/// Which files come from the pod: `true` (read), `false` (local), a mode, or settings.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum FsField {
    Enabled(bool),
    Mode(FsModeName),
    Config(FsConfig),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<FsModeName>,
    /// Regexes (case-insensitive) of paths read and written in the pod, whatever the mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_write: Option<Vec<String>>,
    /// Regexes (case-insensitive) of paths read from the pod; writes stay local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<Vec<String>>,
    /// Regexes (case-insensitive) of paths that stay local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<Vec<String>>,
    /// Regexes (case-insensitive) of paths that do not exist for the app (ENOENT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_found: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<Toggle<OutgoingConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Toggle<DnsConfig>>,
    /// IPv6 works through the pod (only `true` is accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_true")]
    pub ipv6: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IncomingModeName {
    Mirror,
    Steal,
    Off,
}

/// The pod's incoming traffic: `true` (mirror), `false` (off), a mode, or settings.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum IncomingField {
    Enabled(bool),
    Mode(IncomingModeName),
    Config(IncomingConfig),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<IncomingModeName>,
    /// Steal only the HTTP requests that match (steal mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_filter: Option<HttpFilterConfig>,
    /// `[[LOCAL, POD], ...]`: the app's listener on LOCAL serves the pod's port POD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<Vec<(u16, u16)>>,
    /// Pod ports never mirrored or stolen (local listeners on them stay local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_ports: Option<Vec<u16>>,
    /// Only these pod ports are mirrored or stolen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// Allow incoming traffic of a target that shares the host's network namespace (kmirror's
    /// own; `--allow-host-network`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_host_network: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpFilterConfig {
    /// Regex matched against each request header line, `Name: value`, case-insensitive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_filter: Option<String>,
    /// Regex matched against the request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_filter: Option<String>,
    /// Filter only on these pod ports; other stolen ports are stolen whole. Default: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingConfig {
    /// TCP connections go through the pod (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    /// UDP goes through the pod (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<bool>,
    /// Loopback destinations stay local (kmirror's default: true; `false` is
    /// `--remote-loopback`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_localhost: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<AddressFilterConfig>,
}

/// Exactly one of `remote` (only these go through the pod) or `local` (these stay local), each
/// a list of `[proto://][name|ip|cidr][:port]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressFilterConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Names are resolved by the pod's resolver (default true; `false` is `--no-remote-dns`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Exactly one of `remote` or `local`: lists of names (a name also matches the names the
    /// pod's search list makes of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<AddressFilterConfig>,
}
