//! `kmirror`: run a local process as if it were inside a running pod.

mod abi;
mod agent;
mod caller;
mod cli;
mod command;
mod config;
mod cwd;
mod dns_server;
mod handlers;
mod incoming;
mod inotify;
mod intercept;
mod keeper;
mod kernel;
mod launch;
mod localfs;
mod logging;
mod names;
mod outgoing;
mod policy;
mod port_forward;
mod ptrace;
mod random;
mod seccomp;
mod service_manager;
mod session;
mod signals;
mod sockets;
mod standin;
mod stats;
mod sys;
mod target;
mod tracee;
mod uts;
mod writeback;

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

/// Ends kmirror with the error's message and its exit status (a [`session::Exit`]'s, else 1).
fn fail(e: anyhow::Error) -> ! {
    eprintln!("kmirror: {e:#}");
    std::process::exit(e.downcast_ref::<session::Exit>().map_or(1, |exit| exit.code))
}

fn main() {
    // kmirror's own binary started again as the app's keeper: nothing of a session runs there.
    if keeper::invoked() {
        keeper::main();
    }
    let (cli, matches) = cli::parse();
    logging::init(cli.log_format);
    raise_fd_limit();
    match cli.command {
        cli::Command::Run(args) => {
            let settings = config::settings_or_exit(&args.settings, &matches);
            signals::exit_like(session::run(settings, args.command).unwrap_or_else(|e| fail(e)))
        }
        cli::Command::PortForward(args) => {
            port_forward::run(&args.target, args.forwards).unwrap_or_else(|e| fail(e))
        }
        cli::Command::Features => {
            let features = kernel::features();
            print!("{}", kernel::report(features));
            std::process::exit(i32::from(features.refusal().is_some()));
        }
        cli::Command::VerifyConfig(args) => std::process::exit(config::verify(&args, &matches)),
        cli::Command::Completions { shell } => cli::completions(shell),
        cli::Command::Man { subcommand } => cli::man(subcommand.as_deref()).unwrap_or_else(|e| {
            eprintln!("kmirror: {e}");
            std::process::exit(2)
        }),
        cli::Command::Schema => print!("{}", config::schema::json()),
    }
}
