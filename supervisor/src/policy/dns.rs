//! The resolver configuration the app sees.

use std::net::Ipv4Addr;

/// The pod's resolv.conf with its nameservers replaced by kmirror's forwarder: the search list,
/// `ndots` and other options stay the pod's. With `tcp_only` (the forwarder could not bind
/// UDP port 53) resolvers are told to use TCP, which is ordinary outgoing traffic.
pub fn resolv_conf_for_app(pod: &str, forwarder: Ipv4Addr, tcp_only: bool) -> String {
    let mut out =
        String::from("# written by kmirror: the pod's resolver settings, answered through the pod\n");
    let mut options_seen = false;
    for line in pod.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        match first {
            "nameserver" => {}
            "options" => {
                options_seen = true;
                out.push_str(line);
                if tcp_only && !line.split_whitespace().any(|w| w == "use-vc") {
                    out.push_str(" use-vc");
                }
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("nameserver {forwarder}\n"));
    if tcp_only && !options_seen {
        out.push_str("options use-vc\n");
    }
    out
}

/// The local nsswitch.conf with the `hosts:` database limited to files and DNS.
pub fn nsswitch_for_app(local: &str) -> String {
    let mut out = String::new();
    let mut replaced = false;
    for line in local.lines() {
        if line.trim_start().starts_with("hosts:") {
            out.push_str("hosts: files dns\n");
            replaced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str("hosts: files dns\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_search_and_options_and_replaces_nameservers() {
        let pod = "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n";
        let fwd = Ipv4Addr::new(127, 77, 0, 1);
        let app = resolv_conf_for_app(pod, fwd, false);
        assert!(app.contains("search default.svc.cluster.local svc.cluster.local cluster.local\n"));
        assert!(app.contains("options ndots:5\n"));
        assert!(app.contains("nameserver 127.77.0.1\n"));
        assert!(!app.contains("10.96.0.10"));
        assert_eq!(app.matches("nameserver").count(), 1);
        let tcp = resolv_conf_for_app(pod, fwd, true);
        assert!(tcp.contains("options ndots:5 use-vc\n"));
        assert!(resolv_conf_for_app("nameserver 1.1.1.1\n", fwd, true).contains("options use-vc\n"));
    }

    #[test]
    fn nsswitch_hosts_line_is_replaced() {
        let local =
            "passwd: files systemd\nhosts: files mymachines resolve [!UNAVAIL=return] dns myhostname\n";
        assert_eq!(nsswitch_for_app(local), "passwd: files systemd\nhosts: files dns\n");
        assert_eq!(nsswitch_for_app(""), "hosts: files dns\n");
    }
}

/// The `search` domains of a resolv.conf (the last `search` line wins, as in glibc).
pub fn search_domains(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|line| line.strip_prefix("search").filter(|rest| rest.starts_with([' ', '\t'])))
        .next_back()
        .map(|rest| rest.split_whitespace().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect())
        .unwrap_or_default()
}

/// Names and addresses of a hosts file (`/etc/hosts` syntax).
pub fn hosts_entries(hosts: &str) -> Vec<(String, std::net::IpAddr)> {
    let mut out = Vec::new();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<std::net::IpAddr>) else { continue };
        out.extend(words.map(|name| (name.trim_end_matches('.').to_ascii_lowercase(), ip)));
    }
    out
}

/// Reads a domain name at `at` of DNS message `msg` (following compression pointers, at most
/// 64 of them); the name and the offset just past it where it was written.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(at)? as usize;
        match len {
            0 => {
                return Some((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xC0 == 0xC0 => {
                let pointer = ((l & 0x3F) << 8) | *msg.get(at + 1)? as usize;
                end.get_or_insert(at + 2);
                at = pointer;
            }
            l if l < 64 => {
                let label = msg.get(at + 1..at + 1 + l)?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
                at += 1 + l;
            }
            _ => return None,
        }
    }
    None
}

/// The name a DNS query (or answer) asks about: its first question.
pub fn question_name(msg: &[u8]) -> Option<String> {
    let qdcount = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    (qdcount >= 1).then(|| read_name(msg, 12).map(|(name, _)| name)).flatten()
}

/// The addresses (A and AAAA records) of a DNS answer, for the name it was asked about.
pub fn answer_addresses(msg: &[u8]) -> Option<(String, Vec<std::net::IpAddr>)> {
    let count =
        |i: usize| -> Option<usize> { Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]) as usize) };
    let (qdcount, ancount) = (count(4)?, count(6)?);
    let mut at = 12;
    let mut asked = None;
    for _ in 0..qdcount {
        let (name, next) = read_name(msg, at)?;
        asked.get_or_insert(name);
        at = next + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..ancount {
        let (_, next) = read_name(msg, at)?;
        let rtype = count(next)?;
        let rdlen = count(next + 8)?;
        let data = msg.get(next + 10..next + 10 + rdlen)?;
        match (rtype, rdlen) {
            (1, 4) => addresses.push(std::net::IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (28, 16) => addresses.push(std::net::IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        at = next + 10 + rdlen;
    }
    Some((asked?, addresses))
}

#[cfg(test)]
mod message_tests {
    use super::*;

    /// A query for `name` (type A), as a resolver sends it.
    fn query(name: &str) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    #[test]
    fn questions_and_answers() {
        let q = query("Echo.default.svc.cluster.local");
        assert_eq!(question_name(&q).as_deref(), Some("echo.default.svc.cluster.local"));
        let mut a = q.clone();
        a[2] = 0x81;
        a[7] = 3; // three answers: a CNAME, an A and an AAAA, names compressed
        a.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 12]);
        a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 213, 7, 9]);
        a.extend_from_slice(&[0xC0, 12, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        a.extend_from_slice(&"fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let (name, ips) = answer_addresses(&a).unwrap();
        assert_eq!(name, "echo.default.svc.cluster.local");
        assert_eq!(ips, vec!["10.213.7.9".parse::<std::net::IpAddr>().unwrap(), "fd00::9".parse().unwrap()]);
        // Truncated or looping messages are refused, not trusted.
        assert!(answer_addresses(&a[..a.len() - 3]).is_none());
        let mut looping = query("x");
        looping[12] = 0xC0;
        looping[13] = 12;
        assert_eq!(question_name(&looping), None);
    }

    #[test]
    fn search_list_and_hosts() {
        let conf =
            "search a.example\nnameserver 1.1.1.1\nsearch default.svc.cluster.local. svc.cluster.local\n";
        assert_eq!(search_domains(conf), vec!["default.svc.cluster.local", "svc.cluster.local"]);
        assert!(search_domains("searchx y\n").is_empty());
        let hosts = "127.0.0.1 localhost\n10.213.1.9 Db db.local # comment\n# 1.2.3.4 gone\n";
        assert_eq!(
            hosts_entries(hosts),
            vec![
                ("localhost".to_string(), "127.0.0.1".parse().unwrap()),
                ("db".to_string(), "10.213.1.9".parse().unwrap()),
                ("db.local".to_string(), "10.213.1.9".parse().unwrap()),
            ]
        );
    }
}
