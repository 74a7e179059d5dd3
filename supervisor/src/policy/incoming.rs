//! Incoming traffic: which local listening ports receive which pod ports.

use kmirror_protocol::IncomingMode;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IncomingSetting {
    /// A copy of the pod's incoming connections; the pod's app keeps answering.
    #[default]
    Mirror,
    /// The local app answers the pod's new incoming connections.
    Steal,
    /// No incoming traffic.
    Off,
}

/// Parses `LOCAL:POD` (e.g. `9090:8080`: the app listens on 9090 for the pod's port 8080).
pub fn parse_port_map(spec: &str) -> Result<(u16, u16), String> {
    let (local, pod) =
        spec.split_once(':').ok_or_else(|| format!("`{spec}`: expected LOCAL:POD, e.g. 9090:8080"))?;
    let port = |s: &str| {
        s.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("`{s}` is not a port number"))
    };
    Ok((port(local)?, port(pod)?))
}

#[derive(Debug, Clone, Default)]
pub struct IncomingPolicy {
    pub setting: IncomingSetting,
    /// local port → pod port; unmapped ports are the same on both sides.
    pub port_map: BTreeMap<u16, u16>,
    /// Pod ports never subscribed (`ignore_ports`): the app's listener on them stays local.
    pub ignore_ports: BTreeSet<u16>,
    /// If set, only these pod ports are subscribed (`ports`).
    pub only_ports: Option<BTreeSet<u16>>,
    /// If set, the HTTP filter applies to these pod ports only; other stolen ports are stolen
    /// whole (`http_filter.ports`).
    pub filter_ports: Option<BTreeSet<u16>>,
}

impl IncomingPolicy {
    /// The pod port a local listener on `local_port` subscribes to, with the mode.
    pub fn subscription(&self, local_port: u16) -> Option<(u16, IncomingMode)> {
        let mode = match self.setting {
            IncomingSetting::Mirror => IncomingMode::Mirror,
            IncomingSetting::Steal => IncomingMode::Steal,
            IncomingSetting::Off => return None,
        };
        let pod_port = self.port_map.get(&local_port).copied().unwrap_or(local_port);
        if self.ignore_ports.contains(&pod_port)
            || self.only_ports.as_ref().is_some_and(|only| !only.contains(&pod_port))
        {
            return None;
        }
        Some((pod_port, mode))
    }

    /// Whether the HTTP filter (if any) applies to stolen pod port `pod_port`.
    pub fn filters(&self, pod_port: u16) -> bool {
        self.filter_ports.as_ref().is_none_or(|ports| ports.contains(&pod_port))
    }

    /// Whether any listener of the app may receive connections from the pod.
    pub fn receives_pod_traffic(&self) -> bool {
        self.setting != IncomingSetting::Off
    }

    /// The local port that serves connections to `pod_port`.
    pub fn local_port(&self, pod_port: u16) -> u16 {
        self.port_map.iter().find(|&(_, &p)| p == pod_port).map_or(pod_port, |(&local, _)| local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_both_ways() {
        let policy = IncomingPolicy {
            setting: IncomingSetting::Steal,
            port_map: [(9090, 8080)].into(),
            ..Default::default()
        };
        assert_eq!(policy.subscription(9090), Some((8080, IncomingMode::Steal)));
        assert_eq!(policy.subscription(7000), Some((7000, IncomingMode::Steal)));
        assert_eq!(policy.local_port(8080), 9090);
        assert_eq!(policy.local_port(7000), 7000);
        let off = IncomingPolicy { setting: IncomingSetting::Off, ..Default::default() };
        assert_eq!(off.subscription(80), None);
        assert_eq!(parse_port_map("9090:8080"), Ok((9090, 8080)));
        assert!(parse_port_map("9090").is_err());
        assert!(parse_port_map("0:80").is_err());
        assert!(parse_port_map("a:80").is_err());
    }

    #[test]
    fn ignored_and_chosen_ports_are_pod_ports() {
        let ignoring = IncomingPolicy {
            setting: IncomingSetting::Mirror,
            port_map: [(9090, 8080)].into(),
            ignore_ports: [8080, 5432].into(),
            ..Default::default()
        };
        assert_eq!(ignoring.subscription(9090), None, "the pod port counts, not the local one");
        assert_eq!(ignoring.subscription(5432), None);
        assert_eq!(ignoring.subscription(7000), Some((7000, IncomingMode::Mirror)));
        let only = IncomingPolicy {
            setting: IncomingSetting::Steal,
            only_ports: Some([80].into()),
            filter_ports: Some([80].into()),
            ..Default::default()
        };
        assert_eq!(only.subscription(80), Some((80, IncomingMode::Steal)));
        assert_eq!(only.subscription(81), None);
        assert!(only.filters(80));
        assert!(!only.filters(8080));
        assert!(IncomingPolicy::default().filters(8080), "no list: the filter applies everywhere");
    }
}
