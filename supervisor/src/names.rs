//! Which names each address was the answer for, as the app asked them (DNS answers the
//! forwarder passed on, and the pod's `/etc/hosts`), so outgoing filter rules that name a host
//! can be matched when the app connects to an address.
//!
//! Bounded: at most [`MAX_ADDRESSES`] addresses (the oldest is forgotten first) and
//! [`MAX_NAMES`] names per address. Entries do not expire with the record's TTL: apps cache
//! answers longer than that (Java does by default), and a connection to an address the app
//! got for a name is still a connection to that name.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

pub const MAX_ADDRESSES: usize = 16384;
pub const MAX_NAMES: usize = 8;

#[derive(Default)]
pub struct NameBook {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    names: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<IpAddr>,
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl NameBook {
    pub fn record(&self, name: &str, ip: IpAddr) {
        let ip = canonical(ip);
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { names, order } = &mut *inner;
        let list = names.entry(ip).or_insert_with(|| {
            order.push_back(ip);
            Vec::new()
        });
        if let Some(i) = list.iter().position(|n| *n == name) {
            list.remove(i);
        } else if list.len() == MAX_NAMES {
            list.remove(0);
        }
        list.push(name);
        while order.len() > MAX_ADDRESSES {
            if let Some(old) = order.pop_front() {
                names.remove(&old);
            }
        }
    }

    pub fn names_of(&self, ip: IpAddr) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.names.get(&canonical(ip)).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_names_within_bounds() {
        let book = NameBook::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        book.record("DB.example.", ip);
        book.record("db.example", ip);
        assert_eq!(book.names_of("::ffff:10.0.0.1".parse().unwrap()), vec!["db.example"]);
        for i in 0..MAX_NAMES + 2 {
            book.record(&format!("n{i}"), ip);
        }
        assert_eq!(book.names_of(ip).len(), MAX_NAMES);
        for i in 0..MAX_ADDRESSES as u32 + 1 {
            book.record("x", IpAddr::from((0x0b00_0000u32 + i).to_be_bytes()));
        }
        assert!(book.names_of(ip).is_empty(), "the oldest address was forgotten");
        assert_eq!(book.names_of(IpAddr::from(0x0b00_0001u32.to_be_bytes())), vec!["x"]);
    }
}
