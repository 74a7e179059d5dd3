//! Command-line interface. Run settings default to nothing here: an unset flag falls back to its
//! `KMIRROR_*` variable (clap's `env`), then to the configuration file, then to kmirror's
//! default (`config::settings`), and `kmirror verify-config` shows which one won.

use crate::policy::files::FsMode;
use crate::policy::incoming::IncomingSetting;
use clap::builder::FalseyValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # Run a service with the traffic, DNS, files and environment of process 4242's pod
  sudo kmirror run --target pid/4242 -- ./my-service --port 8080

  # Steal only the requests of one developer, read every pod file
  sudo kmirror run -t pid/4242 --incoming steal --steal-header '^X-Dev: alice$' \\
      --fs-mode read -- ./my-service

  # Settings from a file (JSON, TOML or YAML; .kmirror/kmirror.yaml is found on its own)
  sudo kmirror run -f kmirror.yaml -- ./my-service
  kmirror verify-config -f kmirror.yaml

  # Shell completion and the manual
  kmirror completions bash > ~/.local/share/bash-completion/completions/kmirror
  kmirror man | man -l -

Configuration: docs/config.md. Logs: KMIRROR_LOG=debug (a RUST_LOG-style filter).";

const RUN_EXAMPLES: &str = "\
Examples:
  sudo kmirror run --target pid/4242 -- ./my-service
  sudo kmirror run -t pid/4242 --incoming steal --port-map 9090:8080 -- ./my-service --port 9090
  KMIRROR_TARGET=pid/4242 sudo -E kmirror run -- curl http://echo.default.svc.cluster.local:8080/
  sudo kmirror run -f .kmirror/kmirror.toml --fs-mode read -- python3 app.py

Each setting comes from, in order: its flag, its KMIRROR_* variable, the configuration file
(-f FILE, KMIRROR_CONFIG, or .kmirror/kmirror.{json,toml,yaml} / .mirrord/mirrord.json found in
the working directory or a parent), kmirror's default. `kmirror verify-config` shows the result.";

#[derive(Parser, Debug)]
#[command(
    name = "kmirror",
    version,
    about = "Run a local process as if it were inside a running pod",
    long_about = "Run a local process as if it were inside a running pod: its outgoing \
                  connections, DNS lookups, chosen files and environment come from the pod. \
                  Interception happens at the syscall boundary (seccomp user-notify), so static \
                  binaries work like any other.",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// How kmirror's logs on stderr look (filter them with KMIRROR_LOG, e.g. `debug` or
    /// `kmirror=trace`).
    #[arg(long, global = true, value_enum, env = "KMIRROR_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only when stderr is a terminal and NO_COLOR is unset).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in the context of a target.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Check the configuration: print the settings `kmirror run` would use (with the same
    /// flags, environment and file) and the source of each value (flag, variable,
    /// file:line:column, default), or every error with its location (exit status 2).
    VerifyConfig(SettingsArgs),
    /// Show the kernel features kmirror uses, whether this kernel has them, and what kmirror
    /// does without each (exit status 1 if kmirror cannot run here).
    Features,
    /// Forward local ports to addresses or names reached from the target, until Ctrl-C:
    /// `kmirror port-forward -t pid/1234 -L 8080:web.shop:80 -L 5432:10.0.0.7:5432`.
    PortForward(PortForwardArgs),
    /// Print a completion script for a shell.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print kmirror's manual page, or a subcommand's (roff; read it with
    /// `kmirror man run | man -l -`).
    Man {
        /// A subcommand (run, verify-config, ...) whose page to print.
        subcommand: Option<String>,
    },
    /// Print the JSON schema of the configuration file.
    Schema,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Configuration file (JSON, TOML or YAML, by extension). Without it, kmirror uses
    /// .kmirror/kmirror.{json,toml,yaml} or .mirrord/mirrord.{json,toml,yaml} of the working
    /// directory or its nearest parent that has one.
    #[arg(long = "config-file", short = 'f', value_name = "FILE", env = "KMIRROR_CONFIG")]
    pub config_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct PortForwardArgs {
    /// Where the connections are made from: pid/<PID>, unit/<NAME> or user-unit/<NAME> (as
    /// for `run`).
    #[arg(long, short = 't', value_name = "TARGET")]
    pub target: String,

    /// `[BIND:]LOCAL_PORT:HOST:PORT` (repeatable): connections to LOCAL_PORT on BIND
    /// (127.0.0.1 by default; port 0 picks one) go to HOST:PORT as the target reaches it, HOST
    /// looked up with the target's resolver and search domains.
    #[arg(short = 'L', long = "forward", value_name = "[BIND:]LOCAL_PORT:HOST:PORT", required = true,
          value_parser = crate::port_forward::parse_forward)]
    pub forwards: Vec<crate::port_forward::Forward>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,

    /// The command to run, and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Everything `run` can be told besides the command (also taken by `verify-config`).
#[derive(Args, Debug, Clone, Default)]
pub struct SettingsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// What to mirror: pid/<PID> (a process on this machine, e.g. a pod's container process),
    /// unit/<NAME> or user-unit/<NAME> (the main process of a systemd unit).
    #[arg(long, short = 't', value_name = "TARGET", env = "KMIRROR_TARGET")]
    pub target: Option<String>,

    /// Which files come from the pod (`write`: as `read`, and writes to them go to the pod)
    /// [default: localwithoverrides].
    #[arg(long, value_enum, env = "KMIRROR_FS_MODE")]
    pub fs_mode: Option<FsMode>,

    /// Resolve names locally instead of with the pod's resolver.
    #[arg(long, env = "KMIRROR_NO_REMOTE_DNS", value_parser = FalseyValueParser::new())]
    pub no_remote_dns: bool,

    /// Do not take the pod's environment.
    #[arg(long, env = "KMIRROR_NO_ENV", value_parser = FalseyValueParser::new())]
    pub no_env: bool,

    /// Take only pod variables matching this pattern (`*` and `?` wildcards; repeatable;
    /// `;`-separated in the variable).
    #[arg(long = "env-include", value_name = "PATTERN", env = "KMIRROR_ENV_INCLUDE", value_delimiter = ';')]
    pub env_include: Vec<String>,

    /// Ignore pod variables matching this pattern (repeatable; `;`-separated in the variable).
    #[arg(long = "env-exclude", value_name = "PATTERN", env = "KMIRROR_ENV_EXCLUDE", value_delimiter = ';')]
    pub env_exclude: Vec<String>,

    /// A dotenv file (NAME=value lines) whose values beat the pod's and the local ones.
    #[arg(long = "env-file", value_name = "FILE", env = "KMIRROR_ENV_FILE")]
    pub env_file: Option<PathBuf>,

    /// What happens to the pod's incoming connections on the ports the app listens on
    /// [default: mirror].
    #[arg(long, value_enum, env = "KMIRROR_INCOMING")]
    pub incoming: Option<IncomingSetting>,

    /// Serve pod port POD with the local listener on LOCAL (repeatable; `,`-separated in the
    /// variable), e.g. 9090:8080.
    #[arg(long = "port-map", value_name = "LOCAL:POD", env = "KMIRROR_PORT_MAP", value_delimiter = ',',
          value_parser = crate::policy::incoming::parse_port_map)]
    pub port_map: Vec<(u16, u16)>,

    /// With --incoming steal: steal only HTTP requests with a header line matching this regex
    /// (e.g. '^X-Dev: alice$'); other requests go to the pod's app.
    #[arg(long, value_name = "REGEX", env = "KMIRROR_STEAL_HEADER")]
    pub steal_header: Option<String>,

    /// With --incoming steal: steal only HTTP requests whose path matches this regex.
    #[arg(long, value_name = "REGEX", env = "KMIRROR_STEAL_PATH")]
    pub steal_path: Option<String>,

    /// Allow --incoming steal or mirror for a target that shares the host's network namespace
    /// (a host-network pod, a process on the node): only traffic to the node's own addresses
    /// is taken then, but that is every program's on the node, not only the target's.
    #[arg(long, env = "KMIRROR_ALLOW_HOST_NETWORK", value_parser = FalseyValueParser::new())]
    pub allow_host_network: bool,

    /// Longest a single pod operation (file, DNS, connect set-up) may take before the app gets
    /// ETIMEDOUT, in seconds [default: 30].
    #[arg(long, value_name = "SECONDS", env = "KMIRROR_REMOTE_TIMEOUT")]
    pub remote_timeout: Option<f64>,

    /// Send connections to loopback addresses to the pod's loopback too.
    #[arg(long, env = "KMIRROR_REMOTE_LOOPBACK", value_parser = FalseyValueParser::new())]
    pub remote_loopback: bool,

    /// End every other process of the app when its main process exits (SIGKILL, as a
    /// container's runtime does), instead of serving them until the last one exits.
    #[arg(long, env = "KMIRROR_EXIT_WITH_MAIN", value_parser = FalseyValueParser::new())]
    pub exit_with_main: bool,

    /// How the app's calls are intercepted: a seccomp listener, ptrace (works where another
    /// seccomp listener already supervises kmirror: containers, sandboxes, kmirror under
    /// kmirror), or `auto`, seccomp where a listener can be installed [default: auto].
    #[arg(long, value_enum, env = "KMIRROR_INTERCEPTOR")]
    pub interceptor: Option<crate::intercept::InterceptorSetting>,
}

/// Parses the command line; the matches say which values came from flags and which from
/// `KMIRROR_*` variables.
pub fn parse() -> (Cli, clap::ArgMatches) {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, matches)
}

/// Where a `run` (or `verify-config`) argument's value came from, as `config::settings` names
/// sources: `None` when it was not given.
pub fn origin(matches: &clap::ArgMatches, sub: &str, id: &str) -> Option<crate::config::settings::Source> {
    use crate::config::settings::Source;
    let sub_matches = matches.subcommand_matches(sub)?;
    let command = Cli::command();
    let arg = command.find_subcommand(sub)?.get_arguments().find(|a| a.get_id() == id)?.clone();
    match sub_matches.value_source(id)? {
        clap::parser::ValueSource::CommandLine => {
            Some(Source::Flag(arg.get_long().map_or_else(|| id.to_string(), |l| format!("--{l}"))))
        }
        clap::parser::ValueSource::EnvVariable => {
            Some(Source::Env(arg.get_env().map_or_else(String::new, |e| e.to_string_lossy().into_owned())))
        }
        _ => None,
    }
}

pub fn completions(shell: Shell) {
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(generator, &mut Cli::command(), "kmirror", &mut std::io::stdout());
}

pub fn man(subcommand: Option<&str>) -> std::io::Result<()> {
    let mut command = Cli::command();
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => {
            let sub = command.find_subcommand(name).cloned().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("no subcommand `{name}`"))
            })?;
            // The page is printed once and the process exits: leaking the name is free.
            let full: &'static str = Box::leak(format!("kmirror-{}", sub.get_name()).into_boxed_str());
            sub.name(full)
        }
    };
    clap_mangen::Man::new(page).render(&mut std::io::stdout())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
