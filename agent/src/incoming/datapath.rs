//! Loading and attaching the incoming-traffic classifier (`bpf/incoming.bpf.c`).
//!
//! Everything here runs on one thread that entered the target's network namespace: interface
//! indexes and attachments belong to that namespace. The program is attached to the ingress of
//! every interface but `lo` as a **tcx link** (Linux 6.6+): the link belongs to this process,
//! so when the agent exits — even by SIGKILL — the program detaches and the pod's traffic is
//! untouched again. On older kernels it falls back to a classic clsact filter with kmirror's
//! own handle and priority, which persists after a crash; a stale one is removed first.

#[allow(clippy::all, dead_code, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/incoming.skel.rs"));
}

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, ProgramAttachType, TcHookBuilder};
use skel::{IncomingSkel, IncomingSkelBuilder};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;

pub const MODE_STEAL: u8 = 1;
pub const MODE_MIRROR: u8 = 2;

/// Handle and priority of kmirror's classic tc filter (fallback attachment only): "km".
const TC_HANDLE: u32 = 0x6b6d;
const TC_PRIORITY: u32 = 0x6b6d;

/// Counters kept by the program (`enum stat`); logged through `Debug`.
#[derive(Debug, Default, Clone, Copy)]
#[allow(dead_code)]
pub struct Stats {
    pub steal_assigned: u64,
    pub steal_existing: u64,
    pub steal_no_listener: u64,
    pub steal_assign_failed: u64,
    pub mirror_packets: u64,
    pub mirror_lost: u64,
    /// Packets to a subscribed port but not to one of the target's addresses.
    pub not_local: u64,
    /// Segments not mirrored because no connection or handshake socket takes them.
    pub mirror_no_socket: u64,
}

enum Attachment {
    Tcx(#[allow(dead_code)] Link),
    Clsact(libbpf_rs::TcHook),
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Attachment::Clsact(hook) = self {
            let _ = hook.detach();
        }
    }
}

pub struct Datapath {
    skel: IncomingSkel<'static>,
    attachments: Vec<(String, Attachment)>,
}

/// Interfaces of the current network namespace, except loopback: (index, name).
fn interfaces() -> Vec<(u32, String)> {
    let Ok(list) = nix::net::if_::if_nameindex() else { return Vec::new() };
    list.iter()
        .map(|interface| (interface.index(), interface.name().to_string_lossy().into_owned()))
        .filter(|(_, name)| name != "lo")
        .collect()
}

impl Datapath {
    /// Loads the program and attaches it to every non-loopback interface of the calling
    /// thread's network namespace.
    pub fn load_and_attach() -> Result<Datapath, String> {
        // The object lives as long as the agent process (one session per process).
        let storage = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = IncomingSkelBuilder::default()
            .open(storage)
            .map_err(|e| format!("cannot open the BPF object: {e}"))?;
        // libbpf attaches tcx links with the program's expected attach type.
        open.progs.incoming.set_attach_type(ProgramAttachType::TcxIngress);
        let skel = open.load().map_err(|e| format!("the kernel refused the BPF program: {e}"))?;
        let mut datapath = Datapath { skel, attachments: Vec::new() };
        let interfaces = interfaces();
        if interfaces.is_empty() {
            return Err("the target's network namespace has no interface besides lo".into());
        }
        for (index, name) in interfaces {
            let attachment = datapath.attach(index).map_err(|e| format!("cannot attach to {name}: {e}"))?;
            tracing::info!(interface = name, kind = attachment.kind(), "incoming classifier attached");
            datapath.attachments.push((name, attachment));
        }
        Ok(datapath)
    }

    fn attach(&self, ifindex: u32) -> Result<Attachment, String> {
        let prog = &self.skel.progs.incoming;
        // KMIRROR_AGENT_ATTACH=clsact exercises the pre-6.6 path on a kernel that has tcx.
        let tcx_error = if std::env::var_os("KMIRROR_AGENT_ATTACH").is_some_and(|v| v == "clsact") {
            std::io::Error::other("tcx disabled by KMIRROR_AGENT_ATTACH=clsact")
        } else {
            // SAFETY: the program pointer is valid while the skeleton lives; libbpf returns an
            // owned link (or NULL with errno set), which `Link` destroys on drop.
            let link = unsafe {
                use libbpf_rs::AsRawLibbpf;
                libbpf_sys::bpf_program__attach_tcx(
                    prog.as_libbpf_object().as_ptr(),
                    ifindex as i32,
                    std::ptr::null(),
                )
            };
            if let Some(link) = NonNull::new(link) {
                // SAFETY: a link just created by libbpf, owned by nobody else.
                return Ok(Attachment::Tcx(unsafe { Link::from_ptr(link) }));
            }
            std::io::Error::last_os_error()
        };
        tracing::info!("tcx unavailable ({tcx_error}); falling back to a clsact filter");
        let mut builder = TcHookBuilder::new(prog.as_fd());
        builder.ifindex(ifindex as i32).replace(true).handle(TC_HANDLE).priority(TC_PRIORITY);
        let mut hook = builder.hook(libbpf_rs::TC_INGRESS);
        hook.create().map_err(|e| format!("clsact qdisc: {e}"))?;
        // A filter left behind by an agent that crashed on this kernel.
        let _ = hook.detach();
        hook.attach().map_err(|e| format!("tcx: {tcx_error}; clsact filter: {e}"))?;
        Ok(Attachment::Clsact(hook))
    }

    /// Makes the program act on packets to the current addresses of the calling thread's
    /// network namespace only (those present now; stale ones are removed).
    pub fn refresh_local_addresses(&self) -> Result<(), String> {
        let current = crate::netns::interface_addresses()
            .map_err(|e| format!("cannot list the target's addresses: {e}"))?;
        let map = &self.skel.maps.local_addrs;
        let wanted: std::collections::HashSet<[u8; 16]> = current.iter().map(|ip| mapped(*ip)).collect();
        let stale: Vec<Vec<u8>> =
            map.keys().filter(|k| !<[u8; 16]>::try_from(&k[..]).is_ok_and(|k| wanted.contains(&k))).collect();
        for key in stale {
            let _ = map.delete(&key);
        }
        for key in &wanted {
            map.update(key, &[1], MapFlags::ANY)
                .map_err(|e| format!("cannot record a target address: {e}"))?;
        }
        tracing::debug!(?current, "incoming traffic taken for these addresses only");
        Ok(())
    }

    pub fn set_port(&self, port: u16, mode: u8) -> Result<(), String> {
        self.refresh_local_addresses()?;
        self.skel
            .maps
            .incoming_ports
            .update(&port.to_ne_bytes(), &[mode], MapFlags::ANY)
            .map_err(|e| format!("cannot set port {port}: {e}"))
    }

    pub fn set_steal_listener(&self, listener: BorrowedFd<'_>) -> Result<(), String> {
        let fd = listener.as_raw_fd() as u64;
        self.skel
            .maps
            .steal_listener
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| format!("cannot register the steal listener: {e}"))
    }

    pub fn mirror_events(&self) -> &libbpf_rs::MapMut<'static> {
        &self.skel.maps.mirror_events
    }

    pub fn stats(&self) -> Stats {
        let read = |i: u32| -> u64 {
            self.skel
                .maps
                .stats
                .lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
                .ok()
                .flatten()
                .map(|per_cpu| {
                    per_cpu.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8]))).sum()
                })
                .unwrap_or(0)
        };
        Stats {
            steal_assigned: read(0),
            steal_existing: read(1),
            steal_no_listener: read(2),
            steal_assign_failed: read(3),
            mirror_packets: read(4),
            mirror_lost: read(5),
            not_local: read(6),
            mirror_no_socket: read(7),
        }
    }
}

/// An address as the program keys it: IPv4 as v4-mapped IPv6.
fn mapped(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

impl Attachment {
    fn kind(&self) -> &'static str {
        match self {
            Attachment::Tcx(_) => "tcx link",
            Attachment::Clsact(_) => "clsact filter",
        }
    }
}
