//! Reading every format, mirrord configurations written from mirrord's key descriptions
//! (read-compatibility), errors with their positions, discovery and precedence.

use super::file::*;
use super::node::Pos;
use super::settings::{Inputs, Source, resolve};
use super::*;
use crate::cli::SettingsArgs;
use crate::policy::files::FsMode;
use crate::policy::filter::Side;
use crate::policy::incoming::IncomingSetting;
use std::collections::HashMap;

fn read_text(format: Format, text: &str) -> read::Read {
    read::read(&format.parse(text).unwrap_or_else(|e| panic!("syntax: {e:?}\n{text}")))
}

fn ok(format: Format, text: &str) -> FileConfig {
    let r = read_text(format, text);
    assert!(r.errors.is_empty(), "{:#?}\n{text}", r.errors);
    r.config
}

fn errors(format: Format, text: &str) -> Vec<Diagnostic> {
    let mut r = read_text(format, text);
    r.errors.sort_by_key(|e| e.pos);
    r.errors
}

fn at(line: usize, col: usize) -> Option<Pos> {
    Some(Pos { line, col })
}

/// A steal session of a Kubernetes workload as mirrord's docs describe one: filtered stealing,
/// local database, pod config files, selected environment, agent settings.
const MIRRORD_STEAL_JSON: &str = r#"{
  "target": { "path": "pod/web-7d9f/container/app", "namespace": "staging" },
  "kube_context": "dev-cluster",
  "telemetry": false,
  "agent": {
    "namespace": "mirrord",
    "ttl": 30,
    "startup_timeout": 360,
    "log_level": "info",
    "tolerations": [{ "operator": "Exists" }],
    "image": { "registry": "ghcr.io/acme/agent", "tag": "3.250.0" }
  },
  "feature": {
    "network": {
      "incoming": {
        "mode": "steal",
        "http_filter": { "header_filter": "x-session: alice", "ports": [8080] },
        "ignore_ports": [9090]
      },
      "outgoing": { "filter": { "local": ["tcp://:5432", "localhost", "10.0.0.0/8"] } },
      "dns": true
    },
    "fs": { "mode": "read", "read_only": ["^/app/config/.*"], "local": ["\\.log$"], "not_found": ["^/secrets/"] },
    "env": { "include": "DB_*;API_*", "override": { "LOG_LEVEL": "debug" } },
    "hostname": true
  }
}"#;

/// Mirroring with port mapping and an env file, in YAML.
const MIRRORD_MIRROR_YAML: &str = "\
target:
  path:
    deployment: api
    container: main
feature:
  network:
    incoming:
      mode: mirror
      port_mapping: [[9090, 80], [9443, 443]]
      ports: [80, 443]
    outgoing:
      tcp: true
      udp: false
    ipv6: true
  fs: localwithoverrides
  env:
    exclude: [AWS_*, GOOGLE_*]
    env_file: .env.dev
    unset: [HTTP_PROXY]
";

/// Short forms and a remote outgoing filter, in TOML.
const MIRRORD_TOML: &str = r#"
target = "pid/4242"

[feature]
fs = false
env = false

[feature.network]
incoming = "off"

[feature.network.outgoing]
ignore_localhost = false
filter.remote = ["udp://:53", "api.internal:443", "[fd00::/8]:443"]

[feature.network.dns]
filter.local = ["example.com"]
"#;

#[test]
fn mirrord_configurations_read_as_mirrord_means_them() {
    let c = ok(Format::Json, MIRRORD_STEAL_JSON);
    assert_eq!(
        c.target,
        Some(TargetField::Full(Box::new(TargetObject {
            path: Some(TargetPath::Path("pod/web-7d9f/container/app".into())),
            namespace: Some("staging".into())
        })))
    );
    assert_eq!(c.kube_context.as_deref(), Some("dev-cluster"));
    let agent = c.agent.unwrap();
    assert_eq!((agent.ttl, agent.startup_timeout), (Some(30), Some(360)));
    assert_eq!(agent.tolerations.unwrap()[0]["operator"], "Exists");
    let feature = c.feature.unwrap();
    let Some(IncomingField::Config(inc)) = feature.network.as_ref().unwrap().incoming.clone() else {
        panic!()
    };
    assert_eq!(inc.mode, Some(IncomingModeName::Steal));
    assert_eq!(inc.http_filter.unwrap().ports, Some(vec![8080]));
    let Some(FsField::Config(fs)) = feature.fs else { panic!() };
    assert_eq!(fs.not_found, Some(vec!["^/secrets/".to_string()]));
    let Some(Toggle::Config(env)) = feature.env else { panic!() };
    assert_eq!(env.include.unwrap().to_vec(), vec!["DB_*", "API_*"]);

    let c = ok(Format::Yaml, MIRRORD_MIRROR_YAML);
    let Some(TargetField::Full(full)) = c.target else { panic!() };
    let Some(TargetPath::Kind(kind)) = full.path else { panic!() };
    assert_eq!((kind.deployment.as_deref(), kind.container.as_deref()), (Some("api"), Some("main")));
    let network = c.feature.as_ref().unwrap().network.clone().unwrap();
    let Some(IncomingField::Config(inc)) = network.incoming else { panic!() };
    assert_eq!(inc.port_mapping, Some(vec![(9090, 80), (9443, 443)]));
    assert_eq!(c.feature.unwrap().fs, Some(FsField::Mode(FsModeName::LocalWithOverrides)));

    let c = ok(Format::Toml, MIRRORD_TOML);
    let feature = c.feature.unwrap();
    assert_eq!(feature.fs, Some(FsField::Enabled(false)));
    assert_eq!(feature.env, Some(Toggle::Enabled(false)));
    let network = feature.network.unwrap();
    assert_eq!(network.incoming, Some(IncomingField::Mode(IncomingModeName::Off)));
    let Some(Toggle::Config(out)) = network.outgoing else { panic!() };
    assert_eq!(out.filter.unwrap().remote.unwrap().len(), 3);
}

#[test]
fn the_same_settings_read_alike_in_every_format() {
    let json = r#"{"target": "pid/7", "feature": {"network": {"incoming": {"mode": "steal", "ports": [80]}}, "env": {"override": {"A": "1"}}}}"#;
    let toml = "target = \"pid/7\"\n[feature.network.incoming]\nmode = \"steal\"\nports = [80]\n[feature.env.override]\nA = \"1\"\n";
    let yaml = "target: pid/7\nfeature:\n  network:\n    incoming: {mode: steal, ports: [80]}\n  env:\n    override:\n      A: \"1\"\n";
    let c = ok(Format::Json, json);
    assert_eq!(ok(Format::Toml, toml), c);
    assert_eq!(ok(Format::Yaml, yaml), c);
    assert_eq!(ok(Format::Json, "{}"), FileConfig::default());
    assert_eq!(ok(Format::Yaml, ""), FileConfig::default());
}

#[test]
fn unknown_keys_name_the_closest_with_their_position_in_every_format() {
    for (format, text, pos) in [
        (Format::Json, "{\n  \"feature\": {\n    \"network\": {\"incomming\": \"steal\"}\n  }\n}", at(3, 17)),
        (Format::Toml, "[feature.network]\nincomming = \"steal\"\n", at(2, 1)),
        (Format::Yaml, "feature:\n  network:\n    incomming: steal\n", at(3, 5)),
    ] {
        let e = errors(format, text);
        assert_eq!(e.len(), 1, "{format:?}: {e:#?}");
        assert_eq!(e[0].pos, pos, "{format:?}");
        assert_eq!(e[0].message, "unknown key `incomming` in `feature.network`");
        assert_eq!(e[0].help.as_deref(), Some("did you mean `incoming`?"));
    }
    let e = errors(Format::Yaml, "targett: pid/1\nbanana: 1\n");
    assert_eq!(e[0].help.as_deref(), Some("did you mean `target`?"));
    assert!(e[1].help.as_deref().unwrap().starts_with("valid keys here: $schema, target,"), "{e:?}");
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = "\
feature:
  fs: {mode: write, read_write: [\"^/data\"], not_found: [\"(\"]}
  network:
    incoming: {mode: steel, port_mapping: [[1, 2], [1, 3]], ports: [70000], ignore_ports: [1]}
    outgoing: {filter: {local: [\"tcp://:0\", \"ftp://x\"], remote: []}, unix_streams: [x]}
    dns: {filter: {remote: [\"10.0.0.0/8\"]}}
  env: {override: {A: [1]}, mapping: {}}
experimental: {}
telemetry: true
";
    let e = errors(Format::Yaml, text);
    let messages: Vec<String> = e.iter().map(|d| format!("{}: {}", d.pos.unwrap(), d.message)).collect();
    let expect = [
        "2:57: `feature.fs.not_found`: invalid regex `(`",
        "4:22: `feature.network.incoming.mode`: unknown mode `steel`",
        "4:52: `feature.network.incoming.port_mapping`: port 1 or 3 is mapped twice",
        "4:68: `feature.network.incoming`: give `ports` or `ignore_ports`, not both",
        "4:69: `feature.network.incoming.ports`: 70000 is not a port",
        "5:24: `feature.network.outgoing.filter`: give `remote` or `local`, not both",
        "5:33: `feature.network.outgoing.filter.local`: `tcp://:0`: `0` is not a port",
        "5:45: `feature.network.outgoing.filter.local`: `ftp://x`: unknown protocol `ftp`",
        "5:70: `feature.network.outgoing.unix_streams` is a mirrord setting that kmirror does not support",
        "6:29: `feature.network.dns.filter.remote`: `10.0.0.0/8`: kmirror's DNS filter matches host names only",
        "7:23: `feature.env.override.A` must be a string, not a list",
        "7:29: `feature.env.mapping` is a mirrord setting that kmirror does not support: use `override`",
        "8:1: `experimental` is a mirrord setting that kmirror does not support",
        "9:12: `telemetry: true` is a mirrord setting that kmirror does not support: kmirror sends no telemetry",
    ];
    assert_eq!(messages.len(), expect.len(), "{messages:#?}");
    for (got, want) in messages.iter().zip(expect) {
        assert!(got.starts_with(want), "got  {got}\nwant {want}…");
    }
    let steel = e.iter().find(|d| d.message.contains("steel")).unwrap();
    assert_eq!(steel.help.as_deref(), Some("did you mean `steal`?"));
}

#[test]
fn types_templates_duplicates_and_targetless() {
    let e = errors(Format::Json, r#"{"target": "targetless", "remote_timeout": "30", "exit_with_main": 1}"#);
    assert!(e[0].message.contains("targetless sessions"), "{e:?}");
    assert_eq!(e[1].message, "`remote_timeout` must be a number of seconds above 0 (at most 86400)");
    assert_eq!(e[2].message, "`exit_with_main` must be true or false, not an integer");
    let e = errors(
        Format::Json,
        r#"{"feature": {"network": {"incoming": {"http_filter": {"header_filter": "x: {{ key }}"}}}}}"#,
    );
    assert!(e[0].message.contains("uses a template"), "{e:?}");
    let e = errors(Format::Yaml, "target: pid/1\ntarget: pid/2\n");
    assert_eq!((e[0].pos, e[0].message.as_str()), (at(2, 1), "duplicate key `target`"));
    let e = errors(Format::Json, r#"{"target": {"path": {"pod": "a", "deployment": "b"}}}"#);
    assert!(e[0].message.contains("exactly one kind"), "{e:?}");
    let e = errors(Format::Json, r#"{"target": {"path": {"labels": {"app": "x"}}}}"#);
    assert!(e[1].message.contains("`target.path.labels` is a mirrord setting"), "{e:?}");
    let e = errors(Format::Json, r#"{"agent": {"nftables": true, "ttl": -1}}"#);
    assert!(e[0].message.contains("kmirror steers traffic with eBPF"), "{e:?}");
    assert!(e[1].message.contains("is not a number of seconds"), "{e:?}");
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kmirror-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn discovery_walks_up_like_git_and_prefers_the_nearest() {
    let root = scratch("discover");
    let deep = root.join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    assert_eq!(discover(&deep).unwrap().map(|(p, _)| p).filter(|p| p.starts_with(&root)), None);
    std::fs::create_dir_all(root.join(".kmirror")).unwrap();
    std::fs::write(root.join(".kmirror/kmirror.toml"), "target = \"pid/1\"\n").unwrap();
    assert_eq!(discover(&deep).unwrap().unwrap().0, root.join(".kmirror/kmirror.toml"));
    std::fs::create_dir_all(root.join("a/.mirrord")).unwrap();
    std::fs::write(root.join("a/.mirrord/mirrord.json"), "{}").unwrap();
    assert_eq!(discover(&deep).unwrap().unwrap().0, root.join("a/.mirrord/mirrord.json"), "the nearest wins");
    std::fs::create_dir_all(root.join("a/.kmirror")).unwrap();
    std::fs::write(root.join("a/.kmirror/kmirror.yaml"), "{}").unwrap();
    let (chosen, passed_over) = discover(&deep).unwrap().unwrap();
    assert_eq!(chosen, root.join("a/.kmirror/kmirror.yaml"), "kmirror's own before mirrord's");
    assert_eq!(passed_over, vec![root.join("a/.mirrord/mirrord.json")]);
    std::fs::write(root.join("a/.kmirror/kmirror.json"), "{}").unwrap();
    let err = discover(&deep).unwrap_err();
    assert!(err.errors[0].message.starts_with("several configuration files"), "{err:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn load_reports_syntax_errors_and_unknown_formats_with_the_file() {
    let dir = scratch("load");
    let bad = dir.join("k.json");
    std::fs::write(&bad, "{\n  \"target\": \"pid/1\",\n}\n").unwrap();
    let err = load_file(&bad, Found::Given("-f".into()), Vec::new()).unwrap_err();
    assert_eq!(err.errors[0].pos, at(3, 1));
    assert!(err.render().contains(&format!("--> {}:3:1", bad.display())), "{}", err.render());
    let odd = dir.join("k.ini");
    std::fs::write(&odd, "").unwrap();
    let err = load_file(&odd, Found::Given("-f".into()), Vec::new()).unwrap_err();
    assert_eq!(err.errors[0].help.as_deref(), Some("name it *.json, *.toml or *.yaml"));
    let missing =
        load_file(&dir.join("none.yaml"), Found::Given("KMIRROR_CONFIG".into()), Vec::new()).unwrap_err();
    assert!(missing.errors[0].message.contains("(given by KMIRROR_CONFIG)"), "{missing:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn loaded(format: Format, text: &str, path: &str) -> Loaded {
    let read = read_text(format, text);
    assert!(read.errors.is_empty(), "{:?}", read.errors);
    Loaded { path: path.into(), found: Found::Given("-f".into()), read, passed_over: Vec::new() }
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
    let file = loaded(
        Format::Yaml,
        "target: pid/1\nremote_timeout: 5\nfeature:\n  fs: read\n  network:\n    incoming: steal\n    dns: false\n",
        "/cfg/k.yaml",
    );
    let args = SettingsArgs {
        target: Some("pid/2".into()),
        fs_mode: Some(FsMode::Local),
        incoming: Some(IncomingSetting::Off),
        ..Default::default()
    };
    // `target` given as a flag, `incoming` through its variable; `fs_mode` has a value but no
    // origin (as clap reports an unset argument): the file's value wins.
    let origins: HashMap<&str, Source> =
        [("target", Source::Flag("--target".into())), ("incoming", Source::Env("KMIRROR_INCOMING".into()))]
            .into();
    let origin = |id: &str| origins.get(id).cloned();
    let s = resolve(&Inputs { args: &args, origin: &origin, file: Some(&file) }).unwrap();
    assert_eq!(s.target.as_deref(), Some("pid/2"));
    assert_eq!(s.incoming, IncomingSetting::Off);
    assert_eq!(s.fs_mode, FsMode::Read);
    assert!(s.no_remote_dns);
    assert_eq!(s.remote_timeout, 5.0);
    assert!(!s.exit_with_main);
    let source = |key: &str| s.shown.iter().find(|x| x.key == key).unwrap().source.to_string();
    assert_eq!(source("target"), "flag --target");
    assert_eq!(source("feature.network.incoming.mode"), "env KMIRROR_INCOMING");
    assert_eq!(source("feature.fs.mode"), "file /cfg/k.yaml:4:7");
    assert_eq!(source("feature.network.dns.enabled"), "file /cfg/k.yaml:7:10");
    assert_eq!(source("remote_timeout"), "file /cfg/k.yaml:2:17");
    assert_eq!(source("exit_with_main"), "default");

    // Without a file, defaults.
    let none = |_: &str| None;
    let s = resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: None }).unwrap();
    assert_eq!(
        (s.target, s.fs_mode, s.incoming),
        (None, FsMode::LocalWithOverrides, IncomingSetting::Mirror)
    );
    assert!(!s.no_remote_dns && !s.no_env && s.outgoing_tcp && s.outgoing_udp && !s.remote_loopback);
    assert!(s.shown.iter().all(|x| x.source == Source::Default), "{:#?}", s.shown);
}

#[test]
fn file_settings_reach_the_policies() {
    let file = loaded(Format::Toml, MIRRORD_TOML, "/cfg/k.toml");
    let none = |_: &str| None;
    let s = resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: Some(&file) }).unwrap();
    assert_eq!(s.fs_mode, FsMode::Local);
    assert!(s.no_env);
    assert_eq!(s.incoming, IncomingSetting::Off);
    assert!(s.remote_loopback, "ignore_localhost = false sends loopback to the pod");
    let filter = s.outgoing_filter.unwrap();
    assert_eq!(filter.side, Side::Remote);
    assert_eq!(s.dns_filter.unwrap().names, vec!["example.com"], "the DNS filter given wins");

    let file = loaded(
        Format::Json,
        MIRRORD_STEAL_JSON.replace("pod/web-7d9f/container/app", "pid/1").as_str(),
        "/c/m.json",
    );
    let s = resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: Some(&file) }).unwrap();
    assert_eq!(s.steal_header.as_deref(), Some("(?i-u)x-session: alice"), "case-insensitive, as in mirrord");
    assert_eq!(s.http_filter_ports, Some(vec![8080]));
    assert_eq!(s.ignore_ports, vec![9090]);
    assert_eq!(s.env_include, vec!["DB_*", "API_*"]);
    assert_eq!(s.env_override.get("LOG_LEVEL").map(String::as_str), Some("debug"));
    let dns = s.dns_filter.unwrap();
    assert_eq!(
        (dns.side, dns.names),
        (Side::Local, vec!["localhost".to_string()]),
        "reflected from outgoing"
    );
    let stored: Vec<&str> = s.stored.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(
        stored,
        [
            "agent.image",
            "agent.log_level",
            "agent.namespace",
            "agent.startup_timeout",
            "agent.tolerations",
            "agent.ttl",
            "kube_context",
            "target.namespace"
        ]
    );
    let accepted: Vec<&str> = s.accepted.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(accepted, ["feature.hostname", "telemetry"]);
}

#[test]
fn resolution_errors_point_at_the_file_or_name_the_source() {
    let file = loaded(
        Format::Yaml,
        "target: deployment/api\nfeature:\n  network:\n    incoming:\n      http_filter: {path_filter: ^/api}\n  env: {env_file: /nonexistent/.env}\n",
        "/c/k.yaml",
    );
    let none = |_: &str| None;
    let failure =
        resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: Some(&file) }).unwrap_err();
    let messages: Vec<String> =
        failure.file.iter().map(|d| format!("{}: {}", d.pos.unwrap(), d.message)).collect();
    assert!(
        messages[0].starts_with("1:9: `target`: `deployment/api`: Kubernetes targets are not supported yet"),
        "{messages:?}"
    );
    assert!(messages[1].starts_with("6:19: env file /nonexistent/.env:"), "{messages:?}");
    assert!(messages[2].starts_with("5:34: an HTTP filter"), "{messages:?}");
    let args = SettingsArgs { target: Some("pod/x".into()), ..Default::default() };
    let flag = |id: &str| (id == "target").then(|| Source::Env("KMIRROR_TARGET".into()));
    let failure = resolve(&Inputs { args: &args, origin: &flag, file: None }).unwrap_err();
    assert!(failure.other[0].message.ends_with("(target from env KMIRROR_TARGET)"), "{:?}", failure.other);
}

#[test]
fn write_mode_and_read_write_lists_are_taken_from_the_file() {
    let file = loaded(
        Format::Yaml,
        "feature:\n  fs:\n    mode: write\n    read_write: [\"^/data/out/\"]\n",
        "/cfg/k.yaml",
    );
    let none = |_: &str| None;
    let args = SettingsArgs::default();
    let s = resolve(&Inputs { args: &args, origin: &none, file: Some(&file) }).unwrap();
    assert_eq!(s.fs_mode, FsMode::Write);
    assert_eq!(s.fs_read_write, ["^/data/out/"]);
    let shown = |key: &str| s.shown.iter().find(|x| x.key == key).unwrap().clone();
    assert_eq!(shown("feature.fs.mode").value, "write");
    assert_eq!(shown("feature.fs.read_write").source.to_string(), "file /cfg/k.yaml:4:17");
    let toml = loaded(Format::Toml, "[feature]\nfs = \"write\"\n", "/cfg/k.toml");
    let s = resolve(&Inputs { args: &args, origin: &none, file: Some(&toml) }).unwrap();
    assert_eq!(s.fs_mode, FsMode::Write);
}

#[test]
fn the_interceptor_comes_from_its_flag_variable_or_file_and_defaults_to_auto() {
    use crate::intercept::InterceptorSetting;
    let none = |_: &str| None;
    let s = resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: None }).unwrap();
    assert_eq!(s.interceptor, InterceptorSetting::Auto);

    let file = loaded(Format::Toml, "interceptor = \"ptrace\"\n", "/cfg/k.toml");
    let s = resolve(&Inputs { args: &SettingsArgs::default(), origin: &none, file: Some(&file) }).unwrap();
    assert_eq!(s.interceptor, InterceptorSetting::Ptrace);
    let shown = s.shown.iter().find(|x| x.key == "interceptor").unwrap();
    assert_eq!((shown.value.as_str(), shown.source.to_string()), ("ptrace", "file /cfg/k.toml:1:15".into()));

    let args = SettingsArgs { interceptor: Some(InterceptorSetting::Seccomp), ..Default::default() };
    let origin = |id: &str| (id == "interceptor").then(|| Source::Env("KMIRROR_INTERCEPTOR".into()));
    let s = resolve(&Inputs { args: &args, origin: &origin, file: Some(&file) }).unwrap();
    assert_eq!(s.interceptor, InterceptorSetting::Seccomp, "the variable beats the file");

    let e = errors(Format::Yaml, "interceptor: ptrac\n");
    assert_eq!(e[0].message, "`interceptor`: unknown interceptor `ptrac`");
    assert_eq!(e[0].help.as_deref(), Some("did you mean `ptrace`?"));
    assert_eq!(
        errors(Format::Json, "{\"interceptor\": true}")[0].message,
        "`interceptor` must be a string, not a boolean"
    );
}
