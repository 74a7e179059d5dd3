//! One `kmirror run`: set up the agent, the local services and the app, then wait for the app.

use crate::config::settings::Settings;
use crate::handlers::{self, Context};
use crate::intercept::{Interceptor, Mechanism};
use crate::keeper::{TreeControl, TreeEvent};
use crate::policy::env::{EnvPolicy, UserEnv};
use crate::policy::files::{FilePolicy, PathLists, VirtualFile};
use crate::policy::incoming::IncomingPolicy;
use crate::policy::net::OutgoingPolicy;
use crate::seccomp::{Listener, filter};
use crate::{agent, command, dns_server, keeper, launch, outgoing::Proxy, policy, signals, target};
use anyhow::{Context as _, Result};
use kmirror_protocol::{Request, Response};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// Bound of the set-up requests (environment, resolv.conf) before the app starts.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the app's processes get between SIGTERM (or the signal kmirror passed on) and
/// SIGKILL when kmirror stops them.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often pidfds of the app's threads that have exited are let go.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A failure that ends kmirror with a specific exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub message: String,
    pub code: i32,
}

pub fn run(args: Settings, command: Vec<OsString>) -> Result<ExitStatus> {
    let spec = args.target.clone().unwrap_or_default();
    let target = target::parse(&spec).map_err(|e| Exit { message: e.to_string(), code: 2 })?;
    let euid = nix::unistd::geteuid().as_raw();
    let pid = target::resolve_local(&target, euid).map_err(|e| Exit { message: e.to_string(), code: 2 })?;
    let program = command::resolve(&command[0], std::env::var_os("PATH").as_deref())
        .map_err(|e| Exit { message: e.to_string(), code: e.exit_code() })?;
    let features = crate::kernel::features();
    let choice = crate::intercept::choose(args.interceptor, crate::kernel::listener_available);
    if let Some(missing) = features.refusal_for(choice.mechanism) {
        return Err(Exit { message: crate::kernel::refusal_message(&missing), code: 1 }.into());
    }
    if choice.mechanism == Mechanism::Ptrace {
        if let Some(why) = choice.because {
            eprintln!("kmirror: {why}; intercepting the app's calls with ptrace instead (docs/ptrace.md)");
        }
        // Before any other thread exists, so that every thread inherits it: only the tracer
        // thread takes SIGCHLD, inside its wait (docs/ptrace.md, *The tracer thread*).
        crate::ptrace::block_sigchld().context("cannot block SIGCHLD for the tracer")?;
    }
    for fallback in features.fallbacks() {
        tracing::info!(
            "this kernel lacks {} (Linux {}): using {:?}",
            fallback.name,
            fallback.since,
            fallback.without
        );
    }

    // One thread runs every task (the notify thread answers what it can itself): a redirected
    // connection crosses several tasks, and with a thread each every hand-off would be a
    // cross-CPU wake-up. Blocking work goes to the blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("kmirror-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let signal_pipe = signals::install().context("cannot install signal handlers")?;
    // The session runs as a task, not as `block_on`'s own future: waking that future goes
    // through the driver's eventfd even from the runtime's own thread, one system call and one
    // extra event-loop turn per message it receives.
    runtime.block_on(async {
        tokio::spawn(session(args, command, target, pid, program, signal_pipe, choice.mechanism))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the session task failed: {e}")))
    })
}

async fn session(
    args: Settings,
    command: Vec<OsString>,
    target: target::Target,
    pid: u32,
    program: PathBuf,
    signal_pipe: std::os::fd::OwnedFd,
    mechanism: Mechanism,
) -> Result<ExitStatus> {
    let traced = mechanism == Mechanism::Ptrace;
    // Start-up work that needs no agent runs while the agent starts, and the pod's environment
    // and resolv.conf are asked for together: every step here delays the app's start.
    // The write family is trapped only where writes may reach the pod: other sessions pay
    // nothing for it.
    let writes_remote = args.fs_mode == policy::files::FsMode::Write || !args.fs_read_write.is_empty();
    let trapped: Vec<&'static str> = handlers::TRAPPED
        .iter()
        .chain(if writes_remote { handlers::TRAPPED_FOR_WRITES } else { &[] })
        // Working in a pod directory: only where pod directories exist for the app at large.
        .chain(match args.fs_mode {
            policy::files::FsMode::Read | policy::files::FsMode::Write => handlers::TRAPPED_FOR_CWD,
            _ => &[],
        })
        .copied()
        .collect();
    let filter_trapped = trapped.clone();
    let filter = tokio::task::spawn_blocking(move || {
        filter::build(
            &filter_trapped,
            handlers::TRAPPED_WITH_ARG,
            handlers::TRAPPED_WHEN_EQUAL,
            handlers::DISABLED,
            traced,
        )
    });
    // What a service manager handed to kmirror for the app (socket activation, notifications).
    let own_env: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
        std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec())).collect();
    let handover = policy::service_manager::read(&own_env, std::process::id()).map_err(|e| Exit {
        message: format!("{e}; check the unit or wrapper that started kmirror"),
        code: 2,
    })?;
    let activated = crate::service_manager::take_activated(handover.listen_fds)
        .map_err(|e| Exit { message: e.to_string(), code: 2 })?;
    let pass_fds: Vec<i32> = activated.iter().map(|a| a.fd.as_raw_fd()).collect();
    // The keeper first: its start-up (an exec of this binary) then overlaps the agent's.
    let pass: Vec<_> = activated.iter().map(|a| a.fd.as_fd()).collect();
    let keeper = keeper::spawn(&pass).context("cannot start the process keeper")?;
    drop(pass);
    let keeper_pid = keeper.pid;
    // The app owns the activated sockets from here (through the keeper): only their ports stay.
    let activated_ports: Vec<u16> = activated.into_iter().filter_map(|a| a.tcp_listener_port).collect();
    let agent = agent::start_local(pid, args.allow_host_network)
        .await
        .with_context(|| format!("cannot start a session with {target}"))?;
    let tunnel = agent.tunnel.clone();

    let pod_env = async {
        if args.no_env {
            return Ok(Vec::new());
        }
        match tunnel.request(Request::Environ, REMOTE_TIMEOUT).await? {
            Response::Environ(vars) => Ok(vars),
            Response::Error(kmirror_protocol::Errno(libc::E2BIG)) => anyhow::bail!(
                "the environment of {target} is larger than one tunnel message ({} MiB); \
                 run with --no-env to start without it",
                kmirror_protocol::codec::MAX_FRAME >> 20
            ),
            Response::Error(errno) => anyhow::bail!(
                "cannot read the environment of {target}: {} (run with --no-env to start without it)",
                std::io::Error::from_raw_os_error(errno.0)
            ),
            other => anyhow::bail!("cannot read the environment of {target}: unexpected answer {other:?}"),
        }
    };
    let pod_resolv = async {
        match args.no_remote_dns {
            true => Vec::new(),
            false => read_pod_file(&tunnel, b"/etc/resolv.conf").await.unwrap_or_default(),
        }
    };
    let pod_hostname = async { read_pod_file(&tunnel, b"/etc/hostname").await.unwrap_or_default() };
    // Names in the pod's hosts file are names the app can connect to, for the outgoing filter.
    let needs_names = args.outgoing_filter.as_ref().is_some_and(|f| f.has_names());
    let pod_hosts = async {
        match needs_names {
            true => read_pod_file(&tunnel, b"/etc/hosts").await.unwrap_or_default(),
            false => Vec::new(),
        }
    };
    let (pod_env, pod_resolv, pod_hostname, pod_hosts) =
        tokio::join!(pod_env, pod_resolv, pod_hostname, pod_hosts);
    let pod_hostname = policy::host::pod_hostname(&pod_hostname);
    let local_env = std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec()));
    let mut merged = EnvPolicy { include: args.env_include.clone(), exclude: args.env_exclude.clone() }
        .merge(local_env, pod_env?);
    UserEnv {
        env_file: args.env_file.clone(),
        overrides: args.env_override.clone(),
        unset: args.env_unset.clone(),
    }
    .apply(&mut merged.env);
    if !merged.kept_local.is_empty() {
        let names: Vec<_> = merged.kept_local.iter().map(|n| String::from_utf8_lossy(n)).collect();
        eprintln!(
            "kmirror: kept the pod's {} out of the app's environment: they make a runtime load code; \
             --env-include NAME takes the pod's value",
            names.join(", ")
        );
    }
    let env = merged.env;

    let search = policy::dns::search_domains(&String::from_utf8_lossy(&pod_resolv));
    let names = Arc::new(crate::names::NameBook::default());
    for (name, ip) in policy::dns::hosts_entries(&String::from_utf8_lossy(&pod_hosts)) {
        names.record(&name, ip);
    }
    let mut virtual_files = HashMap::new();
    if !args.no_remote_dns {
        let routing = dns_server::Routing {
            filter: args.dns_filter.clone(),
            search: search.clone(),
            local_servers: local_nameservers(),
            names: needs_names.then(|| names.clone()),
        };
        let forwarder = dns_server::start(tunnel.clone(), routing).await?;
        let resolv =
            policy::dns::resolv_conf_for_app(&String::from_utf8_lossy(&pod_resolv), forwarder.addr, false);
        virtual_files.insert(VirtualFile::ResolvConf, sealed_file("resolv.conf", resolv.as_bytes())?);
        let local_nss = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
        virtual_files.insert(
            VirtualFile::NsSwitch,
            sealed_file("nsswitch.conf", policy::dns::nsswitch_for_app(&local_nss).as_bytes())?,
        );
        tracing::debug!(addr = %forwarder.addr, "DNS forwarder ready");
    }

    let scratch = std::env::temp_dir().join(format!(
        "kmirror-{}-{}",
        std::process::id(),
        crate::random::token()[..8].to_owned()
    ));
    let materialized = scratch.join("pod");
    std::fs::create_dir_all(&materialized)
        .with_context(|| format!("cannot create {}", materialized.display()))?;
    let mut env = env;
    let relay = match handover.notify_socket.as_deref().map(policy::service_manager::notify_address) {
        Some(
            target @ (policy::service_manager::NotifyAddress::Path(_)
            | policy::service_manager::NotifyAddress::Abstract(_)),
        ) => Some(crate::service_manager::start_notify_relay(&scratch, target, keeper_pid).with_context(
            || format!("cannot relay the app's notifications to NOTIFY_SOCKET in {}", scratch.display()),
        )?),
        _ => None,
    };
    let own_pid_vars = policy::service_manager::app_env(
        &mut env,
        &handover,
        relay.as_ref().map(|p| p.as_os_str().as_bytes()),
    );
    let standins = crate::standin::StandIns::create(&scratch).context("cannot create the stand-in tree")?;
    let writebacks = Arc::new(
        crate::writeback::WriteBacks::create(
            &scratch,
            tunnel.clone(),
            Duration::from_secs_f64(args.remote_timeout.max(0.001)),
        )
        .context("cannot create the tree of the app's copies of pod files")?,
    );
    writebacks.watch();
    let files = FilePolicy {
        mode: args.fs_mode,
        remote_dns: !args.no_remote_dns,
        extra_local: local_only_paths(&program, &env),
        materialized_root: materialized.as_os_str().as_bytes().to_vec(),
        standin_root: standins.root().as_os_str().as_bytes().to_vec(),
        link_root: standins.links().as_os_str().as_bytes().to_vec(),
        lists: PathLists::new(&args.fs_read_write, &args.fs_read_only, &args.fs_local, &args.fs_not_found)
            .context("invalid feature.fs regex")?,
    };

    if files.writes_remote() && tunnel.version() < kmirror_protocol::WRITES_VERSION {
        return Err(Exit {
            message: format!(
                "the pod agent speaks protocol {}, and writes to pod files need {}: use an agent of this \
                 kmirror's version, or a mode without writes (--fs-mode read)",
                tunnel.version(),
                kmirror_protocol::WRITES_VERSION
            ),
            code: 2,
        }
        .into());
    }
    let incoming = Arc::new(IncomingPolicy {
        setting: args.incoming,
        port_map: args.port_map.iter().copied().collect(),
        ignore_ports: args.ignore_ports.iter().copied().collect(),
        only_ports: args.ports.as_ref().map(|p| p.iter().copied().collect()),
        filter_ports: args.http_filter_ports.as_ref().map(|p| p.iter().copied().collect()),
    });
    let incoming_filter = (args.steal_header.is_some() || args.steal_path.is_some()).then(|| {
        kmirror_protocol::HttpFilter { header: args.steal_header.clone(), path: args.steal_path.clone() }
    });
    let proxy = Proxy::start(tunnel.clone()).await.context("cannot start the outgoing proxy")?;
    let filter =
        filter.await.context("the filter task failed")?.context("cannot build the seccomp filter")?;
    let app_args: Vec<OsString> = command[1..].to_vec();
    // The ptrace interceptor's thread, started before the app (it attaches it), and a SIGCHLD
    // handler (tokio's) for the signal to wake it with.
    let (tracer, _sigchld) = match traced {
        true => (
            Some(crate::ptrace::Tracer::start().context("cannot start the tracer thread")?),
            Some(
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
                    .context("cannot handle SIGCHLD")?,
            ),
        ),
        false => (None, None),
    };
    let trap = match &tracer {
        Some(tracer) => launch::Trap::Tracer(tracer.clone()),
        None => launch::Trap::Listener(Box::new(|listener| {
            if let Err(e) = Listener::set_sync_wake_up_fd(listener) {
                tracing::info!(
                    "seccomp SYNC_WAKE_UP unavailable ({e}; Linux 6.6): each trapped call's answer wakes the app more slowly"
                );
            }
        })),
    };
    let app = tokio::task::spawn_blocking(move || {
        let inherit = launch::Inheritance { env, own_pid_vars, pass_fds };
        launch::launch(keeper, program, app_args, inherit, filter, trap)
    })
    .await
    .context("the launcher task failed")?
    .map_err(|e| {
        let code = match &e {
            launch::LaunchError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 127,
            launch::LaunchError::Spawn { .. } => 126,
            _ => 1,
        };
        Exit { message: e.to_string(), code }
    })?;
    let main = app.handle;
    let tree = app.tree;
    let (signals_tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    signals::report_to(signal_pipe, signals_tx);

    let ctx = Arc::new(Context {
        interceptor: Arc::new(match (tracer, app.listener) {
            (Some(tracer), _) => Interceptor::Ptrace(tracer),
            (None, Some(listener)) => Interceptor::Seccomp(Listener::new(listener)),
            (None, None) => anyhow::bail!("the app was started without a seccomp listener"),
        }),
        tunnel: tunnel.clone(),
        runtime: tokio::runtime::Handle::current(),
        outgoing: OutgoingPolicy {
            remote_loopback: args.remote_loopback,
            tcp: args.outgoing_tcp,
            udp: args.outgoing_udp,
            filter: args.outgoing_filter.clone(),
            search,
        },
        names,
        files,
        proxy,
        threads: Default::default(),
        virtual_files,
        materialized,
        standins: Arc::new(standins),
        incoming: incoming.clone(),
        incoming_filter,
        subscribed: Default::default(),
        incoming_peers: Default::default(),
        hostname: handlers::host::Hostname::new(pod_hostname.unwrap_or_else(handlers::host::local_hostname)),
        remote_timeout: Duration::from_secs_f64(args.remote_timeout.max(0.001)),
        pod_fds: Default::default(),
        writebacks,
        cwds: Default::default(),
    });
    match &*ctx.interceptor {
        Interceptor::Seccomp(_) => start_notify_thread(ctx.clone()),
        Interceptor::Ptrace(tracer) => tracer.serve(ctx.clone()),
    }
    // Listeners passed by socket activation take part in incoming traffic as if the app had
    // called listen on them.
    for port in activated_ports {
        handlers::subscribe_listener(ctx.clone(), port);
    }

    let mut events = app.events;
    let mut agent_child = agent.child;
    let agent_pid = agent_child.id();
    let mut agent_running = true;
    // Our own flag, not `tunnel.is_closed()`: when the agent dies, its exit can wake this loop
    // first, and by the next turn the tunnel is already closed; a guard on the tunnel's state
    // would then skip the report of the loss.
    let mut tunnel_up = true;
    let mut from_agent = agent.incoming;
    // Why the session failed while the app ran, if it did: kmirror then exits non-zero.
    let mut failure: Option<String> = None;
    let mut main_status: Option<ExitStatus> = None;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether kmirror itself told the app to stop (SIGTERM, then SIGKILL).
    let mut stopped = false;
    // The last request to stop passed to the main process: it goes to the rest of the tree
    // when the main process exits (see `signals::ends_the_rest`).
    let mut stop_forwarded: Option<i32> = None;
    // Served until the last process of the tree has exited; the keeper's status only if it
    // died before.
    let keeper_died = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(TreeEvent::MainExited(status)) => {
                    tracing::debug!(?status, "the main process exited");
                    main_status = Some(status);
                    if args.exit_with_main {
                        tree.end();
                    } else if let Some(sig) = stop_forwarded {
                        tree.signal(sig, false);
                        end_after_grace(tree.clone());
                    }
                }
                Some(TreeEvent::TreeEnded) => break None,
                Some(TreeEvent::KeeperDied(status)) => break Some(status),
                None => break Some(ExitStatus::from_raw(1 << 8)),
            },
            Some(received) = received.recv() => {
                let main_running = main_status.is_none() && !main.has_exited();
                match signals::route(received, main_running) {
                    signals::Route::Main => {
                        main.signal(received.sig);
                        if signals::ends_the_rest(received.sig) {
                            stop_forwarded = Some(received.sig);
                        }
                    }
                    signals::Route::Nowhere => {}
                    signals::Route::Rest { outside_group_only, then_end } => {
                        tree.signal(received.sig, outside_group_only);
                        if then_end {
                            end_after_grace(tree.clone());
                        }
                    }
                }
            }
            _ = sweep.tick() => ctx.threads.forget_exited(),
            Some(message) = from_agent.recv() => match message {
                kmirror_protocol::tunnel::Incoming::Goodbye { reason } => {
                    eprintln!("kmirror: the session ended: {reason}; stopping the app");
                    failure.get_or_insert(reason);
                    stopped = true;
                    stop_tree(&tree);
                }
                kmirror_protocol::tunnel::Incoming::Open {
                    stream,
                    target: kmirror_protocol::OpenTarget::Incoming { server, client, mode },
                } => {
                    let peers = ctx.incoming_peers.clone();
                    let delivered = crate::incoming::Delivered { client, server };
                    tokio::spawn(crate::incoming::serve(incoming.clone(), peers, stream, delivered, mode));
                }
                kmirror_protocol::tunnel::Incoming::Open { stream, .. } => {
                    stream.opened(Err(kmirror_protocol::Errno(libc::EINVAL)));
                }
                kmirror_protocol::tunnel::Incoming::Request { id, .. } => {
                    // Not awaited here: this loop must keep taking what the agent sends.
                    let tunnel = tunnel.clone();
                    tokio::spawn(async move {
                        tunnel.respond(id, Response::Error(kmirror_protocol::Errno(libc::ENOSYS))).await
                    });
                }
            },
            reason = tunnel.closed(), if tunnel_up => {
                tunnel_up = false;
                if failure.is_none() {
                    eprintln!(
                        "kmirror: lost the connection to the pod agent ({reason}); the app keeps running, \
                         but its pod connections were reset and pod files, DNS and new pod connections now fail"
                    );
                    failure = Some(format!("lost the pod agent: {reason}"));
                }
            }
            _ = agent_child.wait(), if agent_running => agent_running = false,
        }
    };
    if let Some(keeper_status) = keeper_died {
        // The keeper was killed on its own (it never fails while kmirror lives): the main
        // process died with it (PDEATHSIG) and its orphans came to kmirror, the subreaper.
        let ended = tokio::task::spawn_blocking(move || keeper::end_leftovers(agent_pid, STOP_GRACE))
            .await
            .unwrap_or(0);
        let reason = format!(
            "the process keeper (pid {}) ended unexpectedly ({keeper_status}); the app ended with it{}",
            app.keeper_pid,
            if ended > 0 {
                format!("; kmirror ended the {ended} processes left of it")
            } else {
                String::new()
            }
        );
        eprintln!("kmirror: {reason}");
        failure.get_or_insert(reason);
    }
    let status = main_status.unwrap_or(ExitStatus::from_raw(libc::SIGKILL));
    let trapped: Vec<&str> = trapped
        .iter()
        .copied()
        .chain(handlers::TRAPPED_WITH_ARG.iter().map(|&(name, _)| name))
        .chain(handlers::TRAPPED_WHEN_EQUAL.iter().map(|&(name, _)| name))
        .collect();
    crate::stats::write_if_requested(&trapped);
    // Every process of the app has exited: what its descriptors wrote goes to the pod now.
    if tunnel_up {
        ctx.writebacks.finish_all().await;
    }
    tunnel.goodbye("the app exited".into());
    let _ = std::fs::remove_dir_all(&scratch);
    // Give the goodbye a moment to reach the agent; it also exits when the tunnel closes.
    let _ = tokio::time::timeout(Duration::from_millis(500), agent_child.wait()).await;
    Ok(session_status(status, failure.is_some(), stopped))
}

/// kmirror's own exit status for the app's `status`. The app's own failure says more than
/// ours, but a clean exit must not hide ours (`failed`); and when kmirror stopped the app
/// itself (`stopped`), dying of the SIGTERM or SIGKILL it sent is not the app's failure: the
/// session's is reported, as exit status 1.
fn session_status(status: std::process::ExitStatus, failed: bool, stopped: bool) -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    let killed_by_us = stopped && matches!(status.signal(), Some(libc::SIGTERM | libc::SIGKILL));
    if failed && (status.success() || killed_by_us) { ExitStatusExt::from_raw(1 << 8) } else { status }
}

/// Asks every process of the app to stop (SIGTERM) and makes sure they do (SIGKILL after a
/// grace period). The keeper signals through pidfds, so a reused pid is never hit.
fn stop_tree(tree: &TreeControl) {
    tree.signal(libc::SIGTERM, false);
    end_after_grace(tree.clone());
}

fn end_after_grace(tree: TreeControl) {
    tokio::spawn(async move {
        tokio::time::sleep(STOP_GRACE).await;
        tree.end();
    });
}

fn start_notify_thread(ctx: Arc<Context>) {
    std::thread::Builder::new()
        .name("kmirror-notify".into())
        .spawn(move || {
            // RECV blocks until a notification is pending, so the hot path is one ioctl per
            // notification; poll is only consulted when RECV finds nothing, to tell a
            // withdrawn notification (the caller was killed) from "every task has exited".
            let Interceptor::Seccomp(listener) = &*ctx.interceptor else { return };
            loop {
                match listener.receive() {
                    Ok(Some(n)) => handlers::dispatch(&ctx, n),
                    Ok(None) => match listener.wait() {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::error!("seccomp listener failed: {e}");
                            return;
                        }
                    },
                    Err(e) => {
                        tracing::error!("seccomp listener failed: {e}");
                        return;
                    }
                }
            }
        })
        .expect("cannot start the notify thread");
}

async fn read_pod_file(tunnel: &kmirror_protocol::tunnel::Tunnel, path: &[u8]) -> Option<Vec<u8>> {
    let request = Request::ReadFile { path: path.to_vec(), offset: 0, len: 1 << 19 };
    match tunnel.request(request, REMOTE_TIMEOUT).await {
        Ok(Response::FileChunk { bytes, .. }) => Some(bytes),
        _ => None,
    }
}

fn sealed_file(name: &str, content: &[u8]) -> Result<std::fs::File> {
    let memfd = memfd::MemfdOptions::default().allow_sealing(true).create(format!("kmirror:{name}"))?;
    memfd.as_file().write_all(content)?;
    // The mode `stat` of its path reports (see `handlers::files::virtual_stat`), so the
    // descriptor's fstat agrees.
    memfd.as_file().set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    memfd.add_seals(&[
        memfd::FileSeal::SealShrink,
        memfd::FileSeal::SealGrow,
        memfd::FileSeal::SealWrite,
        memfd::FileSeal::SealSeal,
    ])?;
    Ok(memfd.into_file())
}

/// This machine's own nameservers (the local resolv.conf's), for names the DNS filter keeps
/// local.
fn local_nameservers() -> Vec<std::net::SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}

/// Directories that stay local in `read` mode besides the built-in list: the app's own
/// directory, the working directory and runtime homes. (Files named on the command line are not
/// included: `app cat /etc/passwd` must read the pod's file.)
fn local_only_paths(
    program: &std::path::Path,
    env: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(dir) = program.canonicalize().ok().and_then(|p| p.parent().map(|d| d.to_path_buf())) {
        out.push(dir.as_os_str().as_bytes().to_vec());
    }
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.as_os_str().as_bytes().to_vec());
    }
    for var in [&b"JAVA_HOME"[..], b"GOROOT"] {
        if let Some(v) = env.get(var).filter(|v| v.starts_with(b"/")) {
            out.push(v.clone());
        }
    }
    out.retain(|p| p.as_slice() != b"/");
    out
}

#[cfg(test)]
mod tests {
    use super::session_status;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn a_failed_session_exits_1_unless_the_app_failed_by_itself() {
        let exited = |code: i32| ExitStatus::from_raw(code << 8);
        let killed = |signal: i32| ExitStatus::from_raw(signal);
        assert_eq!(session_status(exited(0), false, false), exited(0));
        assert_eq!(session_status(exited(3), false, false), exited(3));
        assert_eq!(session_status(killed(libc::SIGKILL), false, false), killed(libc::SIGKILL));
        assert_eq!(session_status(exited(0), true, false), exited(1));
        assert_eq!(session_status(exited(3), true, true), exited(3));
        // Stopped by kmirror because the target exited: its signals are not the app's failure.
        assert_eq!(session_status(killed(libc::SIGTERM), true, true), exited(1));
        assert_eq!(session_status(killed(libc::SIGKILL), true, true), exited(1));
        assert_eq!(session_status(killed(libc::SIGSEGV), true, true), killed(libc::SIGSEGV));
        // Not stopped by kmirror (the agent was lost): a signal is the app's own story.
        assert_eq!(session_status(killed(libc::SIGKILL), true, false), killed(libc::SIGKILL));
    }
}
