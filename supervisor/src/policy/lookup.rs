//! Looking a name up with the pod's resolver as the pod's own libc would: resolv.conf's search
//! list and `ndots`, then A and AAAA queries. Pure: the queries are built and the answers read
//! here; [`crate::port_forward`] sends them through the agent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What of resolv.conf decides which names are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRules {
    pub search: Vec<String>,
    pub ndots: usize,
}

impl Default for SearchRules {
    fn default() -> Self {
        SearchRules { search: Vec::new(), ndots: 1 }
    }
}

/// Reads `search`/`domain` and `options ndots:N` (resolv.conf(5): the last search or domain
/// line wins; ndots is capped at 15).
pub fn search_rules(resolv_conf: &str) -> SearchRules {
    let mut rules = SearchRules::default();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search" | "domain") => {
                rules.search = words.map(|w| w.trim_end_matches('.').to_string()).collect()
            }
            Some("options") => {
                for option in words {
                    if let Some(n) = option.strip_prefix("ndots:").and_then(|n| n.parse::<usize>().ok()) {
                        rules.ndots = n.min(15);
                    }
                }
            }
            _ => {}
        }
    }
    rules
}

/// The fully qualified names to ask for `name`, in order.
pub fn candidates(name: &str, rules: &SearchRules) -> Vec<String> {
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_string()];
    }
    let searched = rules.search.iter().map(|domain| format!("{name}.{domain}"));
    if name.matches('.').count() >= rules.ndots {
        std::iter::once(name.to_string()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(name.to_string())).collect()
    }
}

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("{0:?} is not a valid host name")]
    BadName(String),
    #[error("a malformed answer from the pod's resolver")]
    Malformed,
    #[error("the answer was truncated")]
    Truncated,
    #[error("the pod's resolver answered with error code {0}")]
    Failed(u8),
}

/// A recursive query for `name` (already fully qualified, without the final dot).
pub fn query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, LookupError> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00]); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    if name.is_empty() || name.len() > 253 {
        return Err(LookupError::BadName(name.to_string()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(LookupError::BadName(name.to_string()));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // IN
    Ok(out)
}

/// Skips a (possibly compressed) name at `at`, returning the offset after it.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, LookupError> {
    loop {
        let len = *msg.get(at).ok_or(LookupError::Malformed)? as usize;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l if l & 0xc0 == 0 => at += 1 + l,
            _ => return Err(LookupError::Malformed),
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, LookupError> {
    msg.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or(LookupError::Malformed)
}

/// The addresses in the answer to query `id`: `Ok(empty)` for NXDOMAIN or no such record (try
/// the next candidate), an error for a failure of the resolver itself.
pub fn addresses(msg: &[u8], id: u16) -> Result<Vec<IpAddr>, LookupError> {
    if msg.len() < 12 || u16_at(msg, 0)? != id || msg[2] & 0x80 == 0 {
        return Err(LookupError::Malformed);
    }
    if msg[2] & 0x02 != 0 {
        return Err(LookupError::Truncated);
    }
    match msg[3] & 0x0f {
        0 => {}
        3 => return Ok(Vec::new()),
        rcode => return Err(LookupError::Failed(rcode)),
    }
    let (questions, answers) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let (rtype, rdlen) = (u16_at(msg, at)?, u16_at(msg, at + 8)? as usize);
        let data = msg.get(at + 10..at + 10 + rdlen).ok_or(LookupError::Malformed)?;
        match (rtype, rdlen) {
            (TYPE_A, 4) => found.push(IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3]))),
            (TYPE_AAAA, 16) => {
                let octets: [u8; 16] = data.try_into().expect("16 bytes");
                found.push(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            // CNAMEs and the rest: the addresses that follow are the target's.
            _ => {}
        }
        at += 10 + rdlen;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_list_and_ndots_as_libc_applies_them() {
        let rules = search_rules(
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5 edns0\n",
        );
        assert_eq!(rules.ndots, 5);
        assert_eq!(
            candidates("web.shop", &rules),
            ["web.shop.ns.svc.cluster.local", "web.shop.svc.cluster.local", "web.shop"]
        );
        assert_eq!(candidates("example.com.", &rules), ["example.com"]);
        let few = SearchRules { search: vec!["lan".into()], ndots: 1 };
        assert_eq!(candidates("a.b", &few), ["a.b", "a.b.lan"]);
        assert_eq!(candidates("host", &few), ["host.lan", "host"]);
        assert_eq!(search_rules("domain corp\nsearch a b\n").search, ["a", "b"]);
        assert_eq!(search_rules("options ndots:99").ndots, 15);
    }

    /// An answer as a resolver sends it: the question, a CNAME, then an A and an AAAA record
    /// whose names are compression pointers.
    fn answer(id: u16, rcode: u8, flags: u8) -> Vec<u8> {
        let mut msg = query(id, "web.shop", TYPE_A).unwrap();
        msg[2] = 0x81 | flags;
        msg[3] = 0x80 | rcode;
        msg[7] = 3;
        let record = |msg: &mut Vec<u8>, rtype: u16, data: &[u8]| {
            msg.extend_from_slice(&[0xc0, 12]);
            msg.extend_from_slice(&rtype.to_be_bytes());
            msg.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
            msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
            msg.extend_from_slice(data);
        };
        record(&mut msg, 5, &[3, b'w', b'e', b'b', 0xc0, 12]);
        record(&mut msg, TYPE_A, &[10, 216, 0, 7]);
        record(&mut msg, TYPE_AAAA, &Ipv6Addr::LOCALHOST.octets());
        msg
    }

    #[test]
    fn answers_are_read_and_failures_told_apart() {
        assert_eq!(
            addresses(&answer(7, 0, 0), 7).unwrap(),
            [IpAddr::V4(Ipv4Addr::new(10, 216, 0, 7)), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(addresses(&answer(7, 3, 0), 7), Ok(Vec::new()));
        assert_eq!(addresses(&answer(7, 2, 0), 7), Err(LookupError::Failed(2)));
        assert_eq!(addresses(&answer(7, 0, 0x02), 7), Err(LookupError::Truncated));
        assert_eq!(addresses(&answer(7, 0, 0), 8), Err(LookupError::Malformed));
        let whole = answer(7, 0, 0);
        for cut in 12..whole.len() {
            assert!(addresses(&whole[..cut], 7).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_names_are_refused_before_asking() {
        assert!(query(1, "a..b", TYPE_A).is_err());
        assert!(query(1, &"x".repeat(64), TYPE_A).is_err());
        assert!(query(1, "", TYPE_A).is_err());
    }
}
