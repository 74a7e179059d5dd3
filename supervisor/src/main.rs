//! `kmirror`: run a local process as if it were inside a running pod.

mod abi;
mod agent;
mod caller;
mod cli;
mod command;
mod dns_server;
mod handlers;
mod incoming;
mod keeper;
mod kernel;
mod launch;
mod localfs;
mod outgoing;
mod policy;
mod random;
mod seccomp;
mod session;
mod signals;
mod sockets;
mod stats;
mod sys;
mod target;
mod tracee;
mod uts;

use clap::Parser;

/// Every tunnelled connection holds a descriptor here; the default soft limit (often 1024)
/// would cap an app at about that many pod connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Failure leaves the limit as it was.
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() {
    // kmirror's own binary started again as the app's keeper: nothing of a session runs there.
    if keeper::invoked() {
        keeper::main();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMIRROR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    raise_fd_limit();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => match session::run(args) {
            Ok(status) => signals::exit_like(status),
            Err(e) => {
                eprintln!("kmirror: {e:#}");
                let code = e.downcast_ref::<session::Exit>().map_or(1, |exit| exit.code);
                std::process::exit(code);
            }
        },
        cli::Command::Features => {
            let features = kernel::features();
            print!("{}", kernel::report(features));
            std::process::exit(i32::from(features.refusal().is_some()));
        }
    }
}
