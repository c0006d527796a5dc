//! fullnat source address and port allocation. A port is reserved for one backend by
//! inserting the reply's 5-tuple into SNAT_REV with BPF_NOEXIST: the kernel's hash map makes
//! that insert atomic across CPUs, so two flows never get the same (SNAT address, port,
//! backend). A reserved port is handed out again only once its flow is over.
use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use lb_common::{
    Backend, FAMILY_V4, FlowKey, PROTO_UDP, Service, SnatRev,
    sizes::{
        FLOW_REFRESH_NS, SNAT_CLOSED_REUSE_NS, SNAT_PORT_TRIES, SNAT_TCP_IDLE_REUSE_NS,
        UDP_IDLE_TIMEOUT_NS,
    },
};

use crate::maps::SNAT_REV;

/// The reply 5-tuple of a fullnat flow: backend -> SNAT address:port.
#[inline(always)]
pub fn reply_key(backend: &Backend, proto: u8, snat: u32, snat_port: u16) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: [snat, 0, 0, 0],
        src_port: backend.port,
        dst_port: snat_port,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    }
}

/// Whether a reserved port's flow is over, so the port may serve a new flow.
#[inline(always)]
fn reusable(entry: &SnatRev, proto: u8, now: u64) -> bool {
    let idle = now.saturating_sub(entry.last_seen_ns);
    let limit = if proto == PROTO_UDP {
        UDP_IDLE_TIMEOUT_NS
    } else if entry.closing != 0 {
        SNAT_CLOSED_REUSE_NS
    } else {
        SNAT_TCP_IDLE_REUSE_NS
    };
    idle > limit
}

/// Reserves a SNAT address and port (network order) for a new flow `key` of `svc` to
/// `backend`, from the service's pool. `fib_source` is the LB's own address towards the backend, used
/// when the service names no SNAT address. None: every port tried is in use.
#[inline(always)]
pub fn allocate(
    key: &FlowKey,
    hash: u32,
    svc: &Service,
    backend: &Backend,
    fib_source: u32,
    now: u64,
) -> Option<(u32, u16)> {
    let pool = &svc.snat;
    let service_id = svc.id;
    let (port_min, port_max) = (pool.port_min as u32, pool.port_max as u32);
    if port_max < port_min {
        return None;
    }
    let span = port_max - port_min + 1;
    let rev = SnatRev {
        client: key.src,
        vip: key.dst,
        client_port: key.src_port,
        vip_port: key.dst_port,
        service_id,
        last_seen_ns: now,
        closing: 0,
        _pad: [0; 7],
    };
    // Candidates follow the flow hash, so concurrent new flows rarely race for a port.
    let mut seed = hash;
    for _ in 0..SNAT_PORT_TRIES {
        seed = seed.wrapping_mul(0x9e37_79b1).wrapping_add(0x7f4a_7c15);
        let addr = if pool.count == 0 {
            fib_source
        } else {
            let index = ((seed >> 24) % pool.count) as usize;
            match pool.addrs.get(index) {
                Some(addr) => addr[0],
                None => continue,
            }
        };
        let port = ((port_min + seed % span) as u16).to_be();
        let reply = reply_key(backend, key.proto, addr, port);
        if SNAT_REV.insert(reply, rev, BPF_NOEXIST as u64).is_ok() {
            return Some((addr, port));
        }
        if let Some(old) = unsafe { SNAT_REV.get(reply) }
            && reusable(old, key.proto, now)
            && SNAT_REV.insert(reply, rev, BPF_EXIST as u64).is_ok()
        {
            return Some((addr, port));
        }
    }
    None
}

/// Whether an established flow still owns its port (an idle flow's port may have been
/// handed to another flow; then this one must start over). Refreshes the entry's age about
/// once a second and marks it closing on FIN/RST.
#[inline(always)]
pub fn still_owned(
    key: &FlowKey,
    backend: &Backend,
    snat: u32,
    snat_port: u16,
    now: u64,
    closing: bool,
) -> bool {
    let reply = reply_key(backend, key.proto, snat, snat_port);
    let Some(entry) = SNAT_REV.get_ptr_mut(reply) else {
        return false;
    };
    let entry = unsafe { &mut *entry };
    if entry.client != key.src || entry.client_port != key.src_port {
        return false;
    }
    touch(entry, now, closing);
    true
}

/// Keeps a mapping's age and closing mark current, writing only when something changed.
#[inline(always)]
pub fn touch(entry: &mut SnatRev, now: u64, closing: bool) {
    if now.saturating_sub(entry.last_seen_ns) > FLOW_REFRESH_NS {
        entry.last_seen_ns = now;
    }
    if closing && entry.closing == 0 {
        entry.closing = 1;
    }
}
