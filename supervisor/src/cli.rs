//! Command-line interface.

use crate::policy::files::FsMode;
use crate::policy::incoming::IncomingSetting;
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;

#[derive(Parser, Debug)]
#[command(
    name = "kmirror",
    version,
    about = "Run a local process as if it were inside a running pod",
    long_about = "Run a local process as if it were inside a running pod: its outgoing \
                  connections, DNS lookups, chosen files and environment come from the pod. \
                  Interception happens at the syscall boundary (seccomp user-notify), so static \
                  binaries work like any other."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in the context of a target.
    Run(RunArgs),
    /// Show the kernel features kmirror uses, whether this kernel has them, and what kmirror
    /// does without each (exit status 1 if kmirror cannot run here).
    Features,
    /// Forward local ports to addresses or names reached from the target, until Ctrl-C:
    /// `kmirror port-forward -t pid/1234 -L 8080:web.shop:80 -L 5432:10.0.0.7:5432`.
    PortForward(PortForwardArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PortForwardArgs {
    /// Where the connections are made from: pid/<PID> (as for `run`).
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
    /// What to mirror: pid/<PID> (a process on this machine, e.g. a pod's container process).
    #[arg(long, short = 't', value_name = "TARGET")]
    pub target: String,

    /// Which files come from the pod.
    #[arg(long, value_enum, default_value = "localwithoverrides")]
    pub fs_mode: FsMode,

    /// Resolve names locally instead of with the pod's resolver.
    #[arg(long)]
    pub no_remote_dns: bool,

    /// Do not take the pod's environment.
    #[arg(long)]
    pub no_env: bool,

    /// Take only pod variables matching this pattern (`*` and `?` wildcards; repeatable).
    #[arg(long = "env-include", value_name = "PATTERN")]
    pub env_include: Vec<String>,

    /// Ignore pod variables matching this pattern (repeatable).
    #[arg(long = "env-exclude", value_name = "PATTERN")]
    pub env_exclude: Vec<String>,

    /// What happens to the pod's incoming connections on the ports the app listens on.
    #[arg(long, value_enum, default_value = "mirror")]
    pub incoming: IncomingSetting,

    /// Serve pod port POD with the local listener on LOCAL (repeatable), e.g. 9090:8080.
    #[arg(long = "port-map", value_name = "LOCAL:POD", value_parser = crate::policy::incoming::parse_port_map)]
    pub port_map: Vec<(u16, u16)>,

    /// With --incoming steal: steal only HTTP requests with a header line matching this regex
    /// (e.g. '^X-Dev: alice$'); other requests go to the pod's app.
    #[arg(long, value_name = "REGEX")]
    pub steal_header: Option<String>,

    /// With --incoming steal: steal only HTTP requests whose path matches this regex.
    #[arg(long, value_name = "REGEX")]
    pub steal_path: Option<String>,

    /// Allow --incoming steal or mirror for a target that shares the host's network namespace
    /// (a host-network pod, a process on the node): only traffic to the node's own addresses
    /// is taken then, but that is every program's on the node, not only the target's.
    #[arg(long)]
    pub allow_host_network: bool,

    /// Longest a single pod operation (file, DNS, connect set-up) may take before the app gets
    /// ETIMEDOUT, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub remote_timeout: f64,

    /// Send connections to loopback addresses to the pod's loopback too.
    #[arg(long)]
    pub remote_loopback: bool,

    /// End every other process of the app when its main process exits (SIGKILL, as a
    /// container's runtime does), instead of serving them until the last one exits.
    #[arg(long)]
    pub exit_with_main: bool,

    /// The command to run, and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}
