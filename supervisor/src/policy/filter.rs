//! Outgoing and DNS filters: mirrord's `[proto://][name|ip|cidr][:port]` rules, and which side
//! (pod or local) a connection or a name lookup goes to.
//!
//! A name rule is matched against the name the app asked to resolve, before DNS: kmirror's DNS
//! forwarder (and the pod's `/etc/hosts`) tell which names an address was the answer for (see
//! `crate::names`). A name also matches the names the pod's search list makes of it, since that
//! is how a resolver asks for it: `db` matches `db.default.svc.cluster.local`.

use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Any,
    /// Lower case, without a trailing dot.
    Name(String),
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub proto: Option<Proto>,
    pub host: Host,
    pub port: Option<u16>,
}

/// Which list the rules came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Only what matches goes through the pod.
    Remote,
    /// What matches stays local; the rest goes through the pod.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressFilter {
    pub side: Side,
    pub rules: Vec<Rule>,
}

fn parse_port(s: &str, rule: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("`{rule}`: `{s}` is not a port (1-65535)"))
}

fn parse_net(s: &str, rule: &str) -> Result<Option<Host>, String> {
    let (addr, len) = match s.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return match len {
            Some(_) => Err(format!("`{rule}`: `{addr}` is not an IP address (a CIDR is ADDRESS/BITS)")),
            None => Ok(None),
        };
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match len {
        None => max,
        Some(len) => len.parse::<u8>().ok().filter(|&b| b <= max).ok_or_else(|| {
            format!(
                "`{rule}`: `/{len}` is not a prefix length of an IPv{} address",
                if max == 32 { 4 } else { 6 }
            )
        })?,
    };
    Ok(Some(Host::Net(
        canonical_ip(ip),
        if ip.is_ipv6() && canonical_ip(ip).is_ipv4() { bits.saturating_sub(96) } else { bits },
    )))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses one rule, `[proto://][name|ip|cidr][:port]`; IPv6 addresses with a port go in
/// brackets (`[fd00::1]:80`, `[fd00::/64]:80`).
pub fn parse_rule(rule: &str) -> Result<Rule, String> {
    let text = rule.trim();
    let (proto, rest) = match text.split_once("://") {
        Some((p, rest)) => match p.to_ascii_lowercase().as_str() {
            "tcp" => (Some(Proto::Tcp), rest),
            "udp" => (Some(Proto::Udp), rest),
            other => return Err(format!("`{rule}`: unknown protocol `{other}` (tcp or udp)")),
        },
        None => (None, text),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (inside, after) =
            inner.split_once(']').ok_or_else(|| format!("`{rule}`: `[` without a closing `]`"))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or_else(|| format!("`{rule}`: expected `:PORT` after `]`"))?,
                rule,
            )?),
        };
        let host = parse_net(inside, rule)?
            .ok_or_else(|| format!("`{rule}`: `{inside}` in brackets is not an IPv6 address or CIDR"))?;
        (host, port)
    } else if rest.matches(':').count() >= 2 {
        // A bare IPv6 address or CIDR: its colons leave no room for a port.
        let host = parse_net(rest, rule)?.ok_or_else(|| {
            format!("`{rule}`: `{rest}` is not an IPv6 address (put one with a port in brackets: `[ADDRESS]:PORT`)")
        })?;
        (host, None)
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port, rule)?)),
            None => (rest, None),
        };
        let host = if host.is_empty() {
            Host::Any
        } else if let Some(net) = parse_net(host, rule)? {
            net
        } else {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            if !valid_name(&name) {
                return Err(format!("`{rule}`: `{host}` is not a host name, an IP address or a CIDR"));
            }
            Host::Name(name)
        };
        (host, port)
    };
    if proto.is_none() && host == Host::Any && port.is_none() {
        return Err(format!(
            "`{rule}`: an empty rule would match everything; give a protocol, a host or a port"
        ));
    }
    Ok(Rule { proto, host, port })
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (canonical_ip(ip), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits as u32) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits as u32) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether `asked` (a name the app resolved, as the resolver asked for it) is `rule_name` or
/// what the pod's `search` list makes of it.
pub fn name_matches(rule_name: &str, asked: &str, search: &[String]) -> bool {
    let asked = asked.trim_end_matches('.');
    if asked.eq_ignore_ascii_case(rule_name) {
        return true;
    }
    search.iter().any(|domain| {
        asked.len() == rule_name.len() + 1 + domain.len()
            && asked[..rule_name.len()].eq_ignore_ascii_case(rule_name)
            && asked.as_bytes()[rule_name.len()] == b'.'
            && asked[rule_name.len() + 1..].eq_ignore_ascii_case(domain.trim_end_matches('.'))
    })
}

impl Rule {
    /// Whether a connection of `proto` to `dest`, whose address was the answer for `names`,
    /// matches.
    pub fn matches(&self, proto: Proto, dest: SocketAddr, names: &[String], search: &[String]) -> bool {
        self.proto.is_none_or(|p| p == proto)
            && self.port.is_none_or(|p| p == dest.port())
            && match &self.host {
                Host::Any => true,
                Host::Net(net, bits) => in_net(dest.ip(), *net, *bits),
                Host::Name(name) => names.iter().any(|asked| name_matches(name, asked, search)),
            }
    }
}

impl AddressFilter {
    pub fn parse(side: Side, rules: &[String]) -> Result<AddressFilter, String> {
        Ok(AddressFilter { side, rules: rules.iter().map(|r| parse_rule(r)).collect::<Result<_, _>>()? })
    }

    /// Whether the connection goes through the pod.
    pub fn remote(&self, proto: Proto, dest: SocketAddr, names: &[String], search: &[String]) -> bool {
        let matched = self.rules.iter().any(|r| r.matches(proto, dest, names, search));
        matched == (self.side == Side::Remote)
    }

    /// Whether any rule names a host, so connections need the names their address answered.
    pub fn has_names(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.host, Host::Name(_)))
    }

    /// The host names of the rules (mirrord resolves them on the same side as the connections).
    pub fn names(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter_map(|r| match &r.host {
                Host::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Which names the pod's resolver answers (`feature.network.dns.filter`): a list of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameFilter {
    pub side: Side,
    pub names: Vec<String>,
}

impl NameFilter {
    /// Parses DNS filter entries: host names only (an address or port says nothing about a
    /// lookup kmirror's forwarder sees).
    pub fn parse(side: Side, entries: &[String]) -> Result<NameFilter, String> {
        let mut names = Vec::new();
        for entry in entries {
            match parse_rule(entry)? {
                Rule { proto: None, host: Host::Name(name), port: None } => names.push(name),
                _ => {
                    return Err(format!(
                        "`{entry}`: kmirror's DNS filter matches host names only; addresses, ports \
                         and protocols in it are not supported yet"
                    ));
                }
            }
        }
        Ok(NameFilter { side, names })
    }

    /// Whether the lookup of `asked` goes to the pod's resolver.
    pub fn remote(&self, asked: &str, search: &[String]) -> bool {
        let matched = self.names.iter().any(|n| name_matches(n, asked, search));
        matched == (self.side == Side::Remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_form() {
        let r = |s: &str| parse_rule(s).unwrap();
        let net = |s: &str, bits| Host::Net(s.parse().unwrap(), bits);
        assert_eq!(r("tcp://:5432"), Rule { proto: Some(Proto::Tcp), host: Host::Any, port: Some(5432) });
        assert_eq!(r(":53"), Rule { proto: None, host: Host::Any, port: Some(53) });
        assert_eq!(r("udp://"), Rule { proto: Some(Proto::Udp), host: Host::Any, port: None });
        assert_eq!(
            r("tcp://1.1.1.0/24:1337"),
            Rule { proto: Some(Proto::Tcp), host: net("1.1.1.0", 24), port: Some(1337) }
        );
        assert_eq!(r("10.0.0.1"), Rule { proto: None, host: net("10.0.0.1", 32), port: None });
        assert_eq!(r("Google.COM."), Rule { proto: None, host: Host::Name("google.com".into()), port: None });
        assert_eq!(r("db:5432").host, Host::Name("db".into()));
        assert_eq!(r("fd00::1"), Rule { proto: None, host: net("fd00::1", 128), port: None });
        assert_eq!(r("fd00::/64").host, net("fd00::", 64));
        assert_eq!(r("[fd00::1]:80"), Rule { proto: None, host: net("fd00::1", 128), port: Some(80) });
        assert_eq!(r("udp://[fd00::/64]:53").port, Some(53));
        assert_eq!(r("::ffff:10.0.0.0/104").host, net("10.0.0.0", 8), "v4-mapped is IPv4");
        for bad in [
            "",
            "http://x",
            "x:0",
            "x:70000",
            "1.2.3.4/33",
            "[fd00::1",
            "[x]:1",
            "bad_name!",
            "a..b",
            "[::1]80",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_filter_keeps_matches_local() {
        let f = AddressFilter::parse(Side::Local, &["tcp://:5432".into()]).unwrap();
        assert!(!f.remote(Proto::Tcp, sa("10.213.1.9:5432"), &[], &[]));
        assert!(f.remote(Proto::Udp, sa("10.213.1.9:5432"), &[], &[]));
        assert!(f.remote(Proto::Tcp, sa("10.213.1.9:7777"), &[], &[]));
    }

    #[test]
    fn remote_filter_sends_only_matches() {
        let f = AddressFilter::parse(
            Side::Remote,
            &["10.96.0.0/12".into(), "db".into(), "[fd00::/8]:443".into()],
        )
        .unwrap();
        let search = vec!["default.svc.cluster.local".to_string(), "svc.cluster.local".to_string()];
        assert!(f.remote(Proto::Tcp, sa("10.100.1.1:80"), &[], &search));
        assert!(!f.remote(Proto::Tcp, sa("10.112.0.1:80"), &[], &search));
        assert!(f.remote(Proto::Tcp, sa("[::ffff:10.100.1.1]:80"), &[], &search), "dual-stack sockets");
        assert!(f.remote(
            Proto::Udp,
            sa("192.168.1.5:5432"),
            &["db.default.svc.cluster.local.".into()],
            &search
        ));
        assert!(f.remote(Proto::Tcp, sa("192.168.1.5:5432"), &["DB".into()], &search));
        assert!(!f.remote(Proto::Tcp, sa("192.168.1.5:5432"), &["db.example.com".into()], &search));
        assert!(!f.remote(Proto::Tcp, sa("192.168.1.5:5432"), &["dbx.svc.cluster.local".into()], &search));
        assert!(f.remote(Proto::Tcp, sa("[fd00::5]:443"), &[], &search));
        assert!(!f.remote(Proto::Tcp, sa("[fd00::5]:80"), &[], &search));
        assert!(f.has_names());
        assert_eq!(f.names(), vec!["db".to_string()]);
    }

    #[test]
    fn dns_filter_takes_names_only() {
        let f = NameFilter::parse(Side::Local, &["example.com".into()]).unwrap();
        assert!(!f.remote("example.com.", &[]));
        assert!(f.remote("echo.default.svc.cluster.local", &[]));
        assert!(
            NameFilter::parse(Side::Remote, &["10.0.0.0/8".into()]).unwrap_err().contains("host names only")
        );
        assert!(NameFilter::parse(Side::Remote, &[":53".into()]).is_err());
    }
}
