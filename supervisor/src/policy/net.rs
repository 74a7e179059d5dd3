//! Outgoing traffic: which destinations go through the pod, and sockaddr encoding.

use super::filter::{AddressFilter, Proto};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// What a `connect` (or `sendto`) names, decoded from the app's sockaddr bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Inet(SocketAddr),
    Unix(Vec<u8>),
    /// AF_UNSPEC (disconnect) or a family we do not handle.
    Other,
}

/// Decodes raw sockaddr bytes as the kernel would; `None` if too short for its family.
pub fn parse_sockaddr(raw: &[u8]) -> Option<Destination> {
    let family = u16::from_ne_bytes(raw.get(..2)?.try_into().ok()?) as i32;
    match family {
        libc::AF_INET => {
            let raw = raw.get(..16)?;
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let ip = Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]);
            Some(Destination::Inet(SocketAddr::V4(SocketAddrV4::new(ip, port))))
        }
        libc::AF_INET6 => {
            let raw = raw.get(..24)?;
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let flowinfo = u32::from_be_bytes(raw[4..8].try_into().ok()?);
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&raw[8..24]).ok()?);
            let scope = raw.get(24..28).map_or(0, |s| u32::from_ne_bytes(s.try_into().expect("4 bytes")));
            Some(Destination::Inet(SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope))))
        }
        libc::AF_UNIX => {
            let path = &raw[2..];
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            // Abstract sockets start with NUL and keep their full length.
            Some(Destination::Unix(if path.first() == Some(&0) {
                path.to_vec()
            } else {
                path[..end].to_vec()
            }))
        }
        _ => Some(Destination::Other),
    }
}

/// The IPv4 address behind a v4-mapped IPv6 address, so one rule covers dual-stack sockets.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Encodes `addr` as a sockaddr of the socket's own family: a v4 destination on an AF_INET6
/// socket (Java's dual-stack sockets) becomes `::ffff:a.b.c.d`. Flow info and scope are 0, as
/// the kernel reports them for v4-mapped peers.
pub fn encode_sockaddr(addr: SocketAddr, family: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    match (family, canonical(addr)) {
        (libc::AF_INET, SocketAddr::V4(v4)) => {
            out.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out.extend_from_slice(&v4.port().to_be_bytes());
            out.extend_from_slice(&v4.ip().octets());
            out.extend_from_slice(&[0; 8]);
        }
        (_, canonical_addr) => {
            let (ip, flow, scope) = match (canonical_addr, addr) {
                (SocketAddr::V4(v4), _) => (v4.ip().to_ipv6_mapped(), 0, 0),
                (SocketAddr::V6(v6), _) => (*v6.ip(), v6.flowinfo(), v6.scope_id()),
            };
            out.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out.extend_from_slice(&addr.port().to_be_bytes());
            out.extend_from_slice(&flow.to_be_bytes());
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&scope.to_ne_bytes());
        }
    }
    out
}

/// `addr` as the kernel would show it to a socket of `family`, or `None` where it cannot: an
/// AF_INET socket never has an IPv6 address as its peer or its own (only IPv4 and v4-mapped
/// addresses fit it).
pub fn encode_for_socket(addr: SocketAddr, family: i32) -> Option<Vec<u8>> {
    (family != libc::AF_INET || canonical(addr).is_ipv4()).then(|| encode_sockaddr(addr, family))
}

/// The sockaddr family a socket reports (from the first bytes of its sockaddr).
pub fn family_of(raw: &[u8]) -> i32 {
    raw.get(..2).map_or(libc::AF_UNSPEC, |b| u16::from_ne_bytes([b[0], b[1]]) as i32)
}

/// Where an outgoing connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Let the kernel handle it on this machine.
    Local,
    /// Connect from the pod to this (canonical) address.
    Remote(SocketAddr),
}

/// The outgoing-traffic filter.
#[derive(Debug, Clone)]
pub struct OutgoingPolicy {
    /// Send loopback destinations to the pod's loopback too (off by default: the developer's
    /// local databases and tools stay reachable).
    pub remote_loopback: bool,
    /// TCP connections go through the pod (`feature.network.outgoing.tcp`).
    pub tcp: bool,
    /// UDP goes through the pod (`feature.network.outgoing.udp`).
    pub udp: bool,
    /// The user's `filter.remote` or `filter.local`.
    pub filter: Option<AddressFilter>,
    /// The pod's resolver search list: a name rule matches the names it makes of the name.
    pub search: Vec<String>,
}

impl Default for OutgoingPolicy {
    fn default() -> Self {
        OutgoingPolicy { remote_loopback: false, tcp: true, udp: true, filter: None, search: Vec::new() }
    }
}

impl OutgoingPolicy {
    /// The decision that needs neither the protocol nor names: addresses that never go to the
    /// pod. A `Remote` here is final only after [`OutgoingPolicy::admits`].
    pub fn route(&self, dest: SocketAddr) -> Route {
        let dest = canonical(dest);
        let ip = dest.ip();
        if dest.port() == 0 || ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
            return Route::Local;
        }
        if ip.is_loopback() && !self.remote_loopback {
            return Route::Local;
        }
        if !self.tcp && !self.udp {
            return Route::Local;
        }
        Route::Remote(dest)
    }

    /// Whether the filter needs the names an address was the answer for.
    pub fn needs_names(&self) -> bool {
        self.filter.as_ref().is_some_and(AddressFilter::has_names)
    }

    /// Whether a connection of `proto` to `dest` (routed `Remote` by [`OutgoingPolicy::route`])
    /// goes through the pod, given the names the app resolved to `dest`'s address.
    pub fn admits(&self, dest: SocketAddr, proto: Proto, names: &[String]) -> bool {
        let enabled = match proto {
            Proto::Tcp => self.tcp,
            Proto::Udp => self.udp,
        };
        enabled && self.filter.as_ref().is_none_or(|f| f.remote(proto, canonical(dest), names, &self.search))
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// glibc asks the local nscd before its own lookups; a local nscd would answer with the
/// *developer's* view of names, so the app is told it does not exist.
pub fn is_nscd_socket(path: &[u8]) -> bool {
    matches!(path, b"/var/run/nscd/socket" | b"/run/nscd/socket")
}

/// Whether a datagram's control messages need the sender's own privileges. kmirror sends
/// datagrams to pod destinations itself, on the app's socket; control messages that the kernel
/// checks against the sender's capabilities (`SO_MARK` needs CAP_NET_ADMIN, for example) must
/// then be sent with the app's credentials, not kmirror's. The ones listed here are checked
/// against nothing but the socket, so they go out directly (QUIC stacks attach `UDP_SEGMENT` or
/// `IP_TOS` to every send). Malformed control data counts as privileged: the kernel judges it.
pub fn control_needs_privilege(control: &[u8]) -> bool {
    const HEADER: usize = 16; // cmsg_len (8), cmsg_level (4), cmsg_type (4) on x86_64
    const UNPRIVILEGED: &[(i32, i32)] = &[
        (libc::SOL_IP, libc::IP_TOS),
        (libc::SOL_IP, libc::IP_TTL),
        (libc::SOL_IP, libc::IP_PKTINFO),
        (libc::SOL_IPV6, libc::IPV6_TCLASS),
        (libc::SOL_IPV6, libc::IPV6_HOPLIMIT),
        (libc::SOL_IPV6, libc::IPV6_PKTINFO),
        (libc::SOL_IPV6, libc::IPV6_DONTFRAG),
        (libc::SOL_UDP, libc::UDP_SEGMENT),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPING),
    ];
    let mut rest = control;
    while rest.len() >= HEADER {
        let len = u64::from_ne_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
        let level = i32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        let kind = i32::from_ne_bytes(rest[12..16].try_into().expect("4 bytes"));
        if len < HEADER || len > rest.len() || !UNPRIVILEGED.contains(&(level, kind)) {
            return true;
        }
        rest = &rest[len.next_multiple_of(8).min(rest.len())..];
    }
    !rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sockaddr_round_trips_in_both_families() {
        for (addr, family, len) in [
            ("10.1.2.3:80", libc::AF_INET, 16),
            ("10.1.2.3:80", libc::AF_INET6, 28),
            ("[fd00::1]:443", libc::AF_INET6, 28),
        ] {
            let raw = encode_sockaddr(sa(addr), family);
            assert_eq!(raw.len(), len);
            assert_eq!(family_of(&raw), family);
            let Some(Destination::Inet(back)) = parse_sockaddr(&raw) else { panic!("{addr}") };
            assert_eq!(canonical(back), sa(addr));
        }
        let mapped = encode_sockaddr(sa("10.1.2.3:80"), libc::AF_INET6);
        assert_eq!(
            &mapped[8..24],
            &sa("[::ffff:10.1.2.3]:0").ip().to_string().parse::<Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn an_ipv4_socket_is_never_given_an_ipv6_address() {
        assert_eq!(encode_for_socket(sa("[fd00::1]:80"), libc::AF_INET), None);
        assert_eq!(encode_for_socket(sa("[::ffff:10.0.0.1]:80"), libc::AF_INET).map(|r| r.len()), Some(16));
        assert_eq!(encode_for_socket(sa("10.0.0.1:80"), libc::AF_INET6).map(|r| r.len()), Some(28));
        assert_eq!(encode_for_socket(sa("[fd00::1]:80"), libc::AF_INET6).map(|r| r.len()), Some(28));
    }

    #[test]
    fn short_or_odd_sockaddrs() {
        assert_eq!(parse_sockaddr(&[2, 0, 0]), None);
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&(libc::AF_UNSPEC as u16).to_ne_bytes()), Some(Destination::Other));
        let mut unix = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        unix.extend_from_slice(b"/run/nscd/socket\0\0\0");
        assert_eq!(parse_sockaddr(&unix), Some(Destination::Unix(b"/run/nscd/socket".to_vec())));
        assert!(is_nscd_socket(b"/run/nscd/socket"));
        // A v6 sockaddr without scope id (24 bytes) is still accepted, as the kernel does.
        let v6 = encode_sockaddr(sa("[fd00::1]:1"), libc::AF_INET6);
        assert!(matches!(parse_sockaddr(&v6[..24]), Some(Destination::Inet(_))));
    }

    #[test]
    fn routing_keeps_loopback_local_and_sends_the_rest_to_the_pod() {
        let policy = OutgoingPolicy::default();
        assert_eq!(policy.route(sa("127.0.0.1:5432")), Route::Local);
        assert_eq!(policy.route(sa("[::1]:5432")), Route::Local);
        assert_eq!(policy.route(sa("[::ffff:127.0.0.1]:5432")), Route::Local);
        assert_eq!(policy.route(sa("0.0.0.0:80")), Route::Local);
        assert_eq!(policy.route(sa("10.96.0.1:0")), Route::Local);
        assert_eq!(policy.route(sa("224.0.0.1:5353")), Route::Local);
        assert_eq!(policy.route(sa("10.96.0.1:443")), Route::Remote(sa("10.96.0.1:443")));
        assert_eq!(policy.route(sa("[::ffff:10.96.0.1]:443")), Route::Remote(sa("10.96.0.1:443")));
        assert_eq!(policy.route(sa("[fd00::10]:443")), Route::Remote(sa("[fd00::10]:443")));
        let all = OutgoingPolicy { remote_loopback: true, ..Default::default() };
        assert_eq!(all.route(sa("127.0.0.1:8080")), Route::Remote(sa("127.0.0.1:8080")));
    }

    #[test]
    fn protocols_and_filters() {
        let no_udp = OutgoingPolicy { udp: false, ..Default::default() };
        assert!(no_udp.admits(sa("10.0.0.1:53"), Proto::Tcp, &[]));
        assert!(!no_udp.admits(sa("10.0.0.1:53"), Proto::Udp, &[]));
        let none = OutgoingPolicy { tcp: false, udp: false, ..Default::default() };
        assert_eq!(none.route(sa("10.0.0.1:53")), Route::Local);
        let filtered = OutgoingPolicy {
            filter: Some(
                AddressFilter::parse(super::super::filter::Side::Local, &["tcp://:5432".into(), "db".into()])
                    .unwrap(),
            ),
            search: vec!["svc.cluster.local".into()],
            ..Default::default()
        };
        assert!(!filtered.admits(sa("[::ffff:10.0.0.1]:5432"), Proto::Tcp, &[]));
        assert!(filtered.admits(sa("10.0.0.1:5433"), Proto::Tcp, &[]));
        assert!(!filtered.admits(sa("10.0.0.2:80"), Proto::Tcp, &["db.svc.cluster.local".into()]));
        assert!(filtered.needs_names());
    }

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut out = ((16 + data.len()) as u64).to_ne_bytes().to_vec();
        out.extend(level.to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(data);
        out.resize(out.len().next_multiple_of(8), 0);
        out
    }

    #[test]
    fn privileged_control_messages_are_told_apart() {
        assert!(!control_needs_privilege(&[]));
        let tos = cmsg(libc::SOL_IP, libc::IP_TOS, &[0x10, 0, 0, 0]);
        let gso = cmsg(libc::SOL_UDP, libc::UDP_SEGMENT, &[0x20, 0x05]);
        assert!(!control_needs_privilege(&[tos.clone(), gso.clone()].concat()));
        let mark = cmsg(libc::SOL_SOCKET, libc::SO_MARK, &7u32.to_ne_bytes());
        assert!(control_needs_privilege(&[tos.clone(), mark].concat()));
        assert!(control_needs_privilege(&tos[..12]), "a truncated header is the kernel's to judge");
        let mut bad_len = tos.clone();
        bad_len[..8].copy_from_slice(&64u64.to_ne_bytes());
        assert!(control_needs_privilege(&bad_len));
    }
}
