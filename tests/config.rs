//! The configuration file, its precedence, `verify-config`, completions, the man page, the
//! schema and log formats (issue 14, part 1); and configuration keys end to end against local
//! pods (indices 228-235): outgoing filters (by port, and by the name the app asked for),
//! `not_found` paths, environment overrides and env files, and incoming settings.

use kmirror_suite::app::{BackgroundApp, HttpConn};
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{ScratchDir, die_with_parent, go_fixtures, kmirror_bin, ok, output_within, root};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// `kmirror ARGS` with none of the caller's KMIRROR_* variables (they would change what is
/// resolved), in `dir`.
fn kmirror_in(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(kmirror_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KMIRROR_") && name != "KMIRROR_BIN_DIR" {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    die_with_parent(&mut cmd);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn config_dir() -> PathBuf {
    root().join("tests/config")
}

/// Compares `actual` with the checked-in snapshot; KMIRROR_UPDATE_SNAPSHOTS=1 rewrites it.
fn snapshot(name: &str, actual: &str) {
    let path = config_dir().join("snapshots").join(name);
    if std::env::var_os("KMIRROR_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs (KMIRROR_UPDATE_SNAPSHOTS=1 rewrites it):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn verify_config_shows_every_value_with_its_source() {
    for (file, snap) in [("mirrord-steal.json", "mirrord-steal.txt"), ("kmirror.toml", "kmirror-toml.txt")] {
        let out = output_within(kmirror_in(&config_dir(), &["verify-config", "-f", file]), LIMIT);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        snapshot(snap, &text(&out.stdout));
    }
}

#[test]
fn verify_config_reports_every_error_with_its_location() {
    let out = output_within(kmirror_in(&config_dir(), &["verify-config", "-f", "errors.yaml"]), LIMIT);
    assert_eq!(out.status.code(), Some(2));
    snapshot("errors.txt", &text(&out.stdout));
}

#[test]
fn flags_beat_variables_which_beat_the_file_which_beats_defaults() {
    let dir = ScratchDir::new("config-precedence");
    std::fs::write(
        dir.join("k.yaml"),
        "target: pid/1\nremote_timeout: 7\nfeature:\n  fs: read\n  network:\n    incoming: steal\n",
    )
    .unwrap();
    let mut cmd = kmirror_in(&dir.0, &["verify-config", "-f", "k.yaml", "--fs-mode", "local"]);
    cmd.env("KMIRROR_FS_MODE", "read").env("KMIRROR_INCOMING", "off").env("KMIRROR_TARGET", "pid/2");
    cmd.env("KMIRROR_INTERCEPTOR", "ptrace");
    let out = ok(&output_within(cmd, LIMIT));
    let line = |key: &str| -> Vec<String> {
        let l = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key}:\n{out}"));
        l.split_whitespace().skip(1).map(String::from).collect()
    };
    assert_eq!(line("feature.fs.mode"), ["local", "flag", "--fs-mode"], "flag over variable and file");
    assert_eq!(
        line("feature.network.incoming.mode"),
        ["off", "env", "KMIRROR_INCOMING"],
        "variable over file"
    );
    assert_eq!(line("target"), ["pid/2", "env", "KMIRROR_TARGET"]);
    assert_eq!(line("remote_timeout"), ["7", "file", "k.yaml:2:17"], "file over default");
    assert_eq!(line("exit_with_main"), ["false", "default"]);
    assert_eq!(line("interceptor"), ["ptrace", "env", "KMIRROR_INTERCEPTOR"]);

    // The file itself through KMIRROR_CONFIG, and found by discovery from a subdirectory.
    let mut cmd = kmirror_in(&dir.0, &["verify-config"]);
    cmd.env("KMIRROR_CONFIG", "k.yaml");
    let out = ok(&output_within(cmd, LIMIT));
    assert!(out.starts_with("configuration file: k.yaml (given by KMIRROR_CONFIG)"), "{out}");
    std::fs::create_dir_all(dir.join(".mirrord")).unwrap();
    std::fs::write(dir.join(".mirrord/mirrord.json"), "{\"feature\": {\"fs\": \"read\"}}").unwrap();
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    let out = ok(&output_within(kmirror_in(&dir.join("src/deep"), &["verify-config"]), LIMIT));
    let found = format!("configuration file: {} (found from", dir.join(".mirrord/mirrord.json").display());
    assert!(out.starts_with(&found), "{out}");
    assert!(out.contains("feature.fs.mode "), "{out}");
}

#[test]
fn run_without_a_target_says_how_to_give_one_and_starts_nothing() {
    let dir = ScratchDir::new("config-notarget");
    let marker = dir.join("started");
    let cmd = kmirror_in(&dir.0, &["run", "--", "touch", marker.to_str().unwrap()]);
    let out = output_within(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for way in
        ["--target pid/<PID>", "KMIRROR_TARGET", "`target` in a configuration file", ".kmirror/kmirror."]
    {
        assert!(err.contains(way), "`{way}` missing:\n{err}");
    }
    assert!(!marker.exists(), "the command ran");

    // A configuration error stops the run the same way, naming file, line and column.
    std::fs::write(dir.join("k.json"), "{\n  \"target\": \"pid/1\",\n  \"feture\": {}\n}\n").unwrap();
    let out = output_within(
        kmirror_in(&dir.0, &["run", "-f", "k.json", "--", "touch", marker.to_str().unwrap()]),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("unknown key `feture` at the top level"), "{err}");
    assert!(err.contains("--> k.json:3:3"), "{err}");
    assert!(err.contains("did you mean `feature`?"), "{err}");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_flags() {
    let script = output_within(kmirror_in(&config_dir(), &["completions", "bash"]), LIMIT);
    let script = ok(&script);
    let dir = ScratchDir::new("config-completion");
    std::fs::write(dir.join("kmirror.bash"), &script).unwrap();
    let probe = format!(
        "set -e; source {}; complete -p kmirror; \
         COMP_WORDS=(kmirror verify); COMP_CWORD=1; _kmirror kmirror verify kmirror; echo \"sub: ${{COMPREPLY[*]}}\"; \
         COMP_WORDS=(kmirror run --fs-m); COMP_CWORD=2; _kmirror kmirror --fs-m run; echo \"flag: ${{COMPREPLY[*]}}\"",
        dir.join("kmirror.bash").display()
    );
    let out = output_within(
        {
            let mut c = Command::new("bash");
            c.args(["--norc", "--noprofile", "-c", &probe]);
            c
        },
        LIMIT,
    );
    let out = ok(&out);
    assert!(out.contains("-F _kmirror kmirror"), "{out}");
    assert!(out.contains("sub: verify-config"), "{out}");
    assert!(out.contains("flag: --fs-mode"), "{out}");
    for shell in ["zsh", "fish"] {
        let script = ok(&output_within(kmirror_in(&config_dir(), &["completions", shell]), LIMIT));
        assert!(script.contains("verify-config") && script.contains("fs-mode"), "{shell}:\n{script}");
    }
}

#[test]
fn the_man_page_and_help_come_from_the_cli_definition() {
    let page = ok(&output_within(kmirror_in(&config_dir(), &["man"]), LIMIT));
    assert!(page.contains(".TH kmirror 1"), "{page}");
    for word in ["verify\\-config", "completions", "KMIRROR_LOG"] {
        assert!(page.contains(word), "`{word}` missing from the man page");
    }
    let run_page = ok(&output_within(kmirror_in(&config_dir(), &["man", "run"]), LIMIT));
    assert!(run_page.contains(".TH kmirror-run"), "{run_page}");
    for word in ["\\-\\-fs\\-mode", "\\-\\-config\\-file", "KMIRROR_TARGET"] {
        assert!(run_page.contains(word), "`{word}` missing from the run page");
    }
    // groff renders it without complaint.
    let dir = ScratchDir::new("config-man");
    std::fs::write(dir.join("kmirror.1"), &page).unwrap();
    let mut groff = Command::new("groff");
    groff.args(["-man", "-Tutf8", "-ww", "-z", dir.join("kmirror.1").to_str().unwrap()]);
    let rendered = output_within(groff, LIMIT);
    assert!(rendered.status.success() && rendered.stderr.is_empty(), "{}", text(&rendered.stderr));
    let help = ok(&output_within(kmirror_in(&config_dir(), &["run", "--help"]), LIMIT));
    assert!(help.contains("Examples:") && help.contains("[env: KMIRROR_TARGET=]"), "{help}");
}

#[test]
fn the_schema_command_prints_the_checked_in_schema() {
    let schema = ok(&output_within(kmirror_in(&config_dir(), &["schema"]), LIMIT));
    assert_eq!(schema, std::fs::read_to_string(root().join("docs/kmirror.schema.json")).unwrap());
}

#[test]
fn logs_are_plain_text_on_a_pipe_or_json_on_request() {
    let dir = ScratchDir::new("config-logs");
    // A target that does not exist: the run stops after the configuration was read (and
    // logged at info level).
    std::fs::write(dir.join("k.json"), "{\"target\": \"pid/4294967294\"}").unwrap();
    let run = |extra: &[&str], log: &str| {
        let mut args = extra.to_vec();
        args.extend(["run", "-f", "k.json", "--", "true"]);
        let mut cmd = kmirror_in(&dir.0, &args);
        cmd.env("KMIRROR_LOG", log);
        output_within(cmd, LIMIT)
    };
    let plain = run(&[], "info");
    assert_eq!(plain.status.code(), Some(2));
    let err = text(&plain.stderr);
    assert!(err.contains("INFO") && err.contains("configuration file"), "{err}");
    assert!(!err.contains('\x1b'), "colour codes on a pipe:\n{err:?}");
    let json = run(&["--log-format", "json"], "info");
    let err = text(&json.stderr);
    let line = err.lines().find(|l| l.contains("configuration file")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.starts_with('{') && line.contains("\"level\":\"INFO\""), "{line}");
    let quiet = run(&[], "warn");
    assert!(!text(&quiet.stderr).contains("configuration file"), "KMIRROR_LOG=warn filters info out");
    let bad = run(&[], "not==a filter");
    assert!(text(&bad.stderr).contains("is not a log filter"), "{}", text(&bad.stderr));
}

// ---- against local pods ----

/// Runs `command` under kmirror with configuration file `config` (written into a scratch dir)
/// and `flags`.
fn run_with_config(name: &str, config: &str, flags: &[&str], command: &[&str]) -> Output {
    let dir = ScratchDir::new(name);
    std::fs::write(dir.join("kmirror.yaml"), config).unwrap();
    let mut args = vec!["run", "-f", "kmirror.yaml"];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(command);
    output_within(kmirror_in(&dir.0, &args), LIMIT)
}

/// A Python client that reports, per destination, the first line it got or the errno.
const PROBE: &str = r#"
import socket, sys
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        s.sendall(b"GET /probe HTTP/1.0\r\n\r\n" if port == "8080" else b"ping\n")
        print(spec, "ok", s.recv(200).decode().splitlines()[0])
    except OSError as e:
        print(spec, "errno", e.errno)
"#;

#[test]
fn outgoing_filter_local_keeps_a_port_local_and_the_rest_goes_to_the_pod() {
    let pod = LocalPod::start(228);
    let config = format!(
        "target: pid/{}\nfeature:\n  network:\n    outgoing:\n      filter:\n        local: [\"tcp://:7777\"]\n",
        pod.target_pid
    );
    let echo = format!("{}:7777", pod.service_ip);
    let http = format!("{}:8080", pod.service_ip);
    let out = ok(&run_with_config("config-228", &config, &[], &["python3", "-c", PROBE, &echo, &http]));
    // The pod-only address is unreachable from this machine (the harness's guard route): a
    // connect kept local fails there, one through the pod reaches the pod's service.
    assert!(out.contains(&format!("{echo} errno {}", libc::EHOSTUNREACH)), "{out}");
    assert!(out.contains(&format!("{http} ok HTTP/1.1 200")), "{out}");
    // Without the filter, both go through the pod.
    let config = format!("target: pid/{}\n", pod.target_pid);
    let out = ok(&run_with_config("config-228b", &config, &[], &["python3", "-c", PROBE, &echo, &http]));
    assert!(out.contains(&format!("{echo} ok pod-echo {}: ping", pod.index)), "{out}");
}

#[test]
fn outgoing_filter_remote_matches_the_name_the_app_asked_for() {
    let pod = LocalPod::start(229);
    let config = format!(
        "target: pid/{}\nfeature:\n  network:\n    outgoing:\n      filter:\n        remote: [\"echo:8080\"]\n",
        pod.target_pid
    );
    let by_ip = format!("{}:8080", pod.service_ip);
    let other_port = format!("{}:7777", pod.service_ip);
    // The address named by IP, by an app that never resolved `echo`, matches no rule: local.
    let out = ok(&run_with_config("config-229a", &config, &[], &["python3", "-c", PROBE, &by_ip]));
    assert!(out.contains(&format!("{by_ip} errno {}", libc::EHOSTUNREACH)), "{out}");
    // `echo` is resolved by the pod (the filter's names are, as in mirrord) with the pod's
    // search list, and connections to its address on port 8080 go through the pod, whether
    // named or by the address the app got; another port of it matches no rule: local.
    let out = ok(&run_with_config(
        "config-229b",
        &config,
        &[],
        &["python3", "-c", PROBE, "echo:8080", &by_ip, &other_port],
    ));
    assert!(out.contains("echo:8080 ok HTTP/1.1 200"), "{out}");
    assert!(out.contains(&format!("{by_ip} ok HTTP/1.1 200")), "{out}");
    assert!(out.contains(&format!("{other_port} errno {}", libc::EHOSTUNREACH)), "{out}");
    assert!(
        pod.service_log().contains("echo.default.svc.cluster.local"),
        "the pod's DNS server saw no query"
    );
}

#[test]
fn not_found_makes_a_pod_file_vanish() {
    let pod = LocalPod::start(230);
    let config = format!(
        "target: pid/{}\nfeature:\n  fs:\n    mode: read\n    not_found: [\"^/data/pod-ONLY\"]\n",
        pod.target_pid
    );
    let script = r#"
import os
for path in ["/data/pod-only.txt", "/data/dir/a.txt"]:
    try:
        print(path, "content", repr(open(path).read()))
    except OSError as e:
        print(path, "errno", e.errno)
try:
    os.stat("/data/pod-only.txt"); print("stat found")
except OSError as e:
    print("stat errno", e.errno)
print("listing", sorted(os.listdir("/data")))
"#;
    let out = ok(&run_with_config("config-230", &config, &[], &["python3", "-c", script]));
    assert!(out.contains(&format!("/data/pod-only.txt errno {}", libc::ENOENT)), "{out}");
    assert!(out.contains(&format!("stat errno {}", libc::ENOENT)), "{out}");
    assert!(out.contains("/data/dir/a.txt content 'a\\n'"), "{out}");
    let listing = out.lines().find(|l| l.starts_with("listing")).unwrap();
    assert!(listing.contains("'dir'") && !listing.contains("pod-only"), "{listing}");
    // Without the list the file is there (the pod has it).
    let config = format!("target: pid/{}\nfeature:\n  fs: read\n", pod.target_pid);
    let out = ok(&run_with_config("config-230b", &config, &[], &["python3", "-c", script]));
    assert!(out.contains(&format!("/data/pod-only.txt content 'pod-only file {}\\n'", pod.index)), "{out}");
}

#[test]
fn env_override_env_file_and_unset_reach_the_app() {
    let pod = LocalPod::start(231);
    let dir = ScratchDir::new("config-231");
    std::fs::write(
        dir.join("dev.env"),
        "# developer values\nPOD_ONLY_VAR=from-file\nSHARED_VAR=from-file\nFILE_ONLY=\"two words\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("kmirror.yaml"),
        format!(
            "target: pid/{}\nfeature:\n  env:\n    env_file: dev.env\n    override: {{SHARED_VAR: from-override, PORT: 8080}}\n    unset: [hostname]\n",
            pod.target_pid
        ),
    )
    .unwrap();
    let script = "import os\nfor k in ['POD_ONLY_VAR', 'SHARED_VAR', 'FILE_ONLY', 'PORT', 'HOSTNAME', 'KUBERNETES_SERVICE_PORT']:\n    print(k, os.environ.get(k))\n";
    // From another directory: the env file is found beside the configuration file.
    let mut cmd = kmirror_in(
        Path::new("/"),
        &["run", "-f", dir.join("kmirror.yaml").to_str().unwrap(), "--", "python3", "-c", script],
    );
    cmd.env("HOSTNAME", "local-host");
    let out = ok(&output_within(cmd, LIMIT));
    for expected in [
        "POD_ONLY_VAR from-file",
        "SHARED_VAR from-override",
        "FILE_ONLY two words",
        "PORT 8080",
        "HOSTNAME None",
        "KUBERNETES_SERVICE_PORT 443",
    ] {
        assert!(out.lines().any(|l| l == expected), "`{expected}` missing:\n{out}");
    }
}

#[test]
fn incoming_settings_from_the_file_steal_filtered_requests_on_a_mapped_port() {
    let pod = LocalPod::start(232);
    let local = 18000 + pod.index as u16;
    let dir = ScratchDir::new("config-232");
    std::fs::write(
        dir.join("kmirror.json"),
        format!(
            r#"{{"feature": {{"network": {{"incoming": {{
                "mode": "steal",
                "port_mapping": [[{local}, 8080]],
                "http_filter": {{"header_filter": "^x-dev: alice$"}}
            }}}}}}}}"#
        ),
    )
    .unwrap();
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let config = dir.join("kmirror.json");
    let app = BackgroundApp::start(
        pod.target_pid,
        &["-f", config.to_str().unwrap()],
        &[&go, "serve", &local.to_string()],
    );
    app.wait_stdout("the app to listen", LIMIT, |l| l.iter().any(|l| l.starts_with("listening")));
    app.wait_subscribed();
    let addr = SocketAddr::from((pod.pod_ip, 8080));
    let get = |headers: &[(&str, &str)], path: &str| {
        HttpConn::connect(addr).unwrap().request("GET", path, headers, b"").unwrap().text()
    };
    // header_filter is case-insensitive, as in mirrord.
    assert_eq!(get(&[("X-Dev", "ALICE")], "/mine"), "local-app /mine\n");
    assert_eq!(get(&[("X-Dev", "bob")], "/theirs"), format!("pod-echo {} /theirs\n", pod.index));
    assert_eq!(get(&[], "/plain"), format!("pod-echo {} /plain\n", pod.index));
    assert!(app.stop().success());
}
