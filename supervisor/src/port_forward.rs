//! `kmirror port-forward`: local ports whose connections are made from the target, to any
//! address or name the target reaches (`-L 8080:web.shop:80`), as `kubectl port-forward` and
//! `mirrord port-forward` do. Names are looked up with the pod's resolver and search list, per
//! connection (a Service's address may change while the forward runs).

use crate::policy::lookup::{self, LookupError, SearchRules};
use anyhow::{Context as _, Result};
use kmirror_protocol::tunnel::Tunnel;
use kmirror_protocol::{OpenTarget, Request, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// One `-L [BIND:]PORT:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub bind: IpAddr,
    pub local_port: u16,
    pub host: String,
    pub port: u16,
}

/// Parses `-L`'s argument: `[BIND:]LOCAL_PORT:HOST:PORT`, with `[v6]` brackets for IPv6 bind
/// addresses and hosts. The bind address defaults to 127.0.0.1 (the ports are the user's, not
/// the network's); LOCAL_PORT 0 picks a free port, printed at start.
pub fn parse_forward(spec: &str) -> Result<Forward, String> {
    let mut parts = Vec::new();
    let mut rest = spec;
    while !rest.is_empty() {
        let (part, after) = if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').ok_or_else(|| format!("unclosed '[' in {spec:?}"))?;
            let after = &inner[end + 1..];
            if !after.is_empty() && !after.starts_with(':') {
                return Err(format!("expected ':' after ']' in {spec:?}"));
            }
            (&inner[..end], after.strip_prefix(':').unwrap_or(after))
        } else {
            match rest.split_once(':') {
                Some((part, after)) => (part, after),
                None => (rest, ""),
            }
        };
        parts.push(part);
        rest = after;
    }
    let usage = || format!("{spec:?} is not [BIND:]LOCAL_PORT:HOST:PORT (e.g. 8080:web.shop:80)");
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port number in {spec:?}"));
    let (bind, local, host, remote) = match parts.as_slice() {
        [local, host, remote] => ("127.0.0.1", *local, *host, *remote),
        [bind, local, host, remote] => (*bind, *local, *host, *remote),
        _ => return Err(usage()),
    };
    let bind = bind
        .parse::<IpAddr>()
        .map_err(|_| format!("{bind:?} is not an IP address to listen on in {spec:?}"))?;
    let port_number = port(remote)?;
    if host.is_empty() || port_number == 0 {
        return Err(usage());
    }
    Ok(Forward { bind, local_port: port(local)?, host: host.to_string(), port: port_number })
}

/// `kmirror port-forward`: starts an agent for `target` and forwards until Ctrl-C, SIGTERM or
/// the loss of the agent.
pub fn run(target: &str, forwards: Vec<Forward>) -> Result<()> {
    let exit = |message: String| crate::session::Exit { message, code: 2 };
    let target = crate::target::parse(target).map_err(|e| exit(e.to_string()))?;
    let euid = nix::unistd::geteuid().as_raw();
    let pid = crate::target::resolve_local(&target, euid).map_err(|e| exit(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let agent = crate::agent::start_local(pid, false)
            .await
            .with_context(|| format!("cannot start a session with {target}"))?;
        let resolv = match agent
            .tunnel
            .request(
                Request::ReadFile { path: b"/etc/resolv.conf".to_vec(), offset: 0, len: 1 << 16 },
                STEP_TIMEOUT,
            )
            .await
        {
            Ok(Response::FileChunk { bytes, .. }) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // The agent's own messages (none are expected) must still be taken off the tunnel.
        let mut from_agent = agent.incoming;
        tokio::spawn(async move { while from_agent.recv().await.is_some() {} });
        let _child = agent.child;
        tokio::select! {
            result = serve(agent.tunnel, forwards, lookup::search_rules(&resolv)) => result,
            _ = interrupt.recv() => Ok(()),
            _ = terminate.recv() => Ok(()),
        }
    })
}

/// How long one lookup, or one connect in the pod, may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on every forward's local port, prints `Forwarding from LOCAL -> HOST:PORT` for each
/// (stdout, so scripts can read the ports picked for 0), then serves until the tunnel closes.
pub async fn serve(tunnel: Tunnel, forwards: Vec<Forward>, rules: SearchRules) -> Result<()> {
    let rules = Arc::new(rules);
    let mut listeners = Vec::new();
    for forward in forwards {
        let listener = TcpListener::bind((forward.bind, forward.local_port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", forward.bind, forward.local_port))?;
        let local = listener.local_addr()?;
        println!("Forwarding from {local} -> {}:{}", forward.host, forward.port);
        listeners.push((listener, forward));
    }
    for (listener, forward) in listeners {
        let (tunnel, rules) = (tunnel.clone(), rules.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, client)) = listener.accept().await else { continue };
                let (tunnel, rules, forward) = (tunnel.clone(), rules.clone(), forward.clone());
                tokio::spawn(async move {
                    if let Err(e) = connect(tunnel, &rules, &forward, conn).await {
                        eprintln!(
                            "kmirror: port-forward: connection from {client} to {}:{} failed: {e}",
                            forward.host, forward.port
                        );
                    }
                });
            }
        });
    }
    let reason = tunnel.closed().await;
    anyhow::bail!("lost the connection to the pod agent ({reason})")
}

async fn connect(tunnel: Tunnel, rules: &SearchRules, forward: &Forward, conn: TcpStream) -> Result<()> {
    let addrs = match forward.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => resolve(&tunnel, rules, &forward.host).await?,
    };
    let mut last = None;
    for ip in addrs {
        let dest = SocketAddr::new(ip, forward.port);
        match tunnel.open(OpenTarget::Tcp(dest), STEP_TIMEOUT).await {
            Ok(stream) => {
                let end = stream.relay_tcp(conn).await;
                tracing::debug!(%dest, ?end, "port-forward connection finished");
                return Ok(());
            }
            Err(e) => {
                last = Some(format!(
                    "{dest}: {}",
                    std::io::Error::from_raw_os_error(crate::handlers::tunnel_errno(&e))
                ))
            }
        }
    }
    anyhow::bail!("cannot connect from the target to {}", last.unwrap_or_default())
}

/// The addresses of `name` as the pod would look it up: each candidate of the search list,
/// A then AAAA, the first that has any.
async fn resolve(tunnel: &Tunnel, rules: &SearchRules, name: &str) -> Result<Vec<IpAddr>> {
    for candidate in lookup::candidates(name, rules) {
        let mut found = Vec::new();
        for qtype in [lookup::TYPE_A, lookup::TYPE_AAAA] {
            found.extend(ask(tunnel, &candidate, qtype).await?);
        }
        if !found.is_empty() {
            tracing::debug!(name, candidate, ?found, "resolved in the pod");
            return Ok(found);
        }
    }
    anyhow::bail!("the target's resolver does not know {name:?}")
}

async fn ask(tunnel: &Tunnel, name: &str, qtype: u16) -> Result<Vec<IpAddr>> {
    let id = u16::from_ne_bytes(crate::random::bytes::<2>());
    let query = lookup::query(id, name, qtype)?;
    // UDP first; a truncated answer is asked again over TCP, as resolvers do.
    for tcp in [false, true] {
        let answer = match tunnel.request(Request::Dns { query: query.clone(), tcp }, STEP_TIMEOUT).await {
            Ok(Response::Dns(answer)) => answer,
            Ok(Response::Error(errno)) => {
                anyhow::bail!("the target's resolver failed: {}", std::io::Error::from_raw_os_error(errno.0))
            }
            Ok(other) => anyhow::bail!("unexpected answer {other:?}"),
            Err(e) => anyhow::bail!("the target's resolver did not answer: {e}"),
        };
        match lookup::addresses(&answer, id) {
            Err(LookupError::Truncated) if !tcp => continue,
            result => return Ok(result?),
        }
    }
    unreachable!("the TCP answer is returned above")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_like_ssh_and_kubectl() {
        let f = parse_forward("8080:web.shop:80").unwrap();
        assert_eq!(
            f,
            Forward {
                bind: "127.0.0.1".parse().unwrap(),
                local_port: 8080,
                host: "web.shop".into(),
                port: 80
            }
        );
        let f = parse_forward("0.0.0.0:0:10.0.0.7:5432").unwrap();
        assert_eq!((f.bind.to_string().as_str(), f.local_port, f.host.as_str()), ("0.0.0.0", 0, "10.0.0.7"));
        let f = parse_forward("[::1]:9000:[fd00::9]:443").unwrap();
        assert_eq!((f.bind.to_string().as_str(), f.host.as_str(), f.port), ("::1", "fd00::9", 443));
        for bad in
            ["8080", "8080:web", "x:web:80", "8080:web:0", "8080::80", "host:8080:web:80", "[::1:80:a:1"]
        {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }
}
