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
