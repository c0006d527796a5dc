//! fullnat source address and port allocation. A port is reserved for one backend by
//! inserting the reply's 5-tuple into SNAT_REV_NEW with BPF_NOEXIST (the kernel's hash map
//! makes that insert atomic across CPUs) and finding it free in SNAT_REV, where it moves
//! once the flow is established: two flows never get the same (SNAT address, port,
//! backend). Only a packet that can open a flow (a TCP SYN, or UDP) reserves one, and a
//! reserved port is handed out again only once its flow is over.
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use lb_common::{
    Backend, FlowKey, FlowTable, PROTO_UDP, SNAT_CLOSING, SNAT_REPLIED, Service, SnatRev,
    sizes::{
        FLOW_REFRESH_NS, SNAT_CLOSED_REUSE_NS, SNAT_PORT_TRIES, SNAT_TCP_IDLE_REUSE_NS,
        SNAT_UNANSWERED_REUSE_NS, UDP_IDLE_TIMEOUT_NS,
    },
};

use crate::{
    conntrack::EEXIST,
    maps::{self, SNAT_REV, SNAT_REV_NEW},
    nat::Snat,
    parse6::copy_addr,
    stats::{self, TableOp},
};

/// Writes the reply 5-tuple of a fullnat flow (backend -> SNAT address:port) into `out`;
/// the backend's family is the flow's.
#[inline(always)]
pub fn reply_key(out: &mut FlowKey, backend: &Backend, proto: u8, snat: &[u32; 4], port: u16) {
    copy_addr(&mut out.src, &backend.addr);
    copy_addr(&mut out.dst, snat);
    out.src_port = backend.port;
    out.dst_port = port;
    out.proto = proto;
    out.family = backend.family;
    out._pad = 0;
}

/// Whether a reserved port's flow is over, so the port may serve a new flow. An embryonic
/// reservation whose backend never answered is over soon: spoofed SYNs cannot hold ports.
#[inline(always)]
fn reusable(entry: &SnatRev, proto: u8, now: u64, embryonic: bool) -> bool {
    let idle = now.saturating_sub(entry.last_seen_ns);
    let limit = if embryonic && entry.state & SNAT_REPLIED == 0 {
        SNAT_UNANSWERED_REUSE_NS
    } else if proto == PROTO_UDP {
        UDP_IDLE_TIMEOUT_NS
    } else if entry.state & SNAT_CLOSING != 0 {
        SNAT_CLOSED_REUSE_NS
    } else {
        SNAT_TCP_IDLE_REUSE_NS
    };
    idle > limit
}

/// A new fullnat flow that needs a port.
pub struct Request<'a> {
    pub key: &'a FlowKey,
    pub hash: u32,
    pub svc: &'a Service,
    pub backend: &'a Backend,
}

/// Reserves a SNAT address and port (network order) for a new flow from its service's
/// pool into `out`, whose address is the LB's own towards the backend when the service
/// names none. False: every port tried is in use.
///
/// A port is reserved in the embryonic table first, then checked against the main one (and
/// a promotion inserts into the main table before it deletes the embryonic entry), so a
/// port is never held by two flows, whichever CPUs race.
#[inline(always)]
pub fn allocate(request: &Request, out: &mut Snat) -> bool {
    let Request {
        key,
        hash,
        svc,
        backend,
    } = *request;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let pool = &svc.snat;
    let (port_min, port_max) = (pool.port_min as u32, pool.port_max as u32);
    if port_max < port_min {
        return false;
    }
    let span = port_max - port_min + 1;
    // Key and value are built in the scratch room, not on the stack.
    let Some(s) = maps::scratch() else {
        return false;
    };
    copy_addr(&mut s.snat.client, &key.src);
    copy_addr(&mut s.snat.vip, &key.dst);
    s.snat.client_port = key.src_port;
    s.snat.vip_port = key.dst_port;
    s.snat.service_id = svc.id;
    s.snat.last_seen_ns = now;
    s.snat.state = 0;
    s.snat._pad = [0; 7];
    // Candidates follow the flow hash, so concurrent new flows rarely race for a port.
    let mut seed = hash;
    for _ in 0..SNAT_PORT_TRIES {
        seed = seed.wrapping_mul(0x9e37_79b1).wrapping_add(0x7f4a_7c15);
        if pool.count != 0 {
            let index = ((seed >> 24) % pool.count) as usize;
            match pool.addrs.get(index) {
                Some(addr) => copy_addr(&mut out.addr, addr),
                None => continue,
            }
        }
        out.port = ((port_min + seed % span) as u16).to_be();
        reply_key(&mut s.key, backend, key.proto, &out.addr, out.port);
        if !reserve_new(&s.key, &s.snat, key.proto, now) {
            continue;
        }
        match unsafe { SNAT_REV.get(&s.key) } {
            None => return true,
            Some(old) if reusable(old, key.proto, now, false) => {
                if SNAT_REV.remove(&s.key).is_ok() {
                    stats::table(FlowTable::SnatRev, TableOp::Removed);
                }
                return true;
            }
            Some(_) => {
                if SNAT_REV_NEW.remove(&s.key).is_ok() {
                    stats::table(FlowTable::SnatRevNew, TableOp::Removed);
                }
            }
        }
    }
    false
}

/// Takes the port in the embryonic table: free, or held by an embryonic flow that is over.
#[inline(always)]
fn reserve_new(reply: &FlowKey, rev: &SnatRev, proto: u8, now: u64) -> bool {
    match SNAT_REV_NEW.insert(reply, rev, BPF_NOEXIST as u64) {
        Ok(()) => {
            stats::table(FlowTable::SnatRevNew, TableOp::Added);
            return true;
        }
        Err(EEXIST) => {}
        Err(_) => {
            stats::table(FlowTable::SnatRevNew, TableOp::Failed);
            return false;
        }
    }
    matches!(unsafe { SNAT_REV_NEW.get(reply) }, Some(old) if reusable(old, proto, now, true))
        && SNAT_REV_NEW.insert(reply, rev, BPF_EXIST as u64).is_ok()
}

/// Whether a known flow still owns its port in `map` (an idle flow's port may have been
/// handed to another flow; then this one must start over). Refreshes the entry's age about
/// once a second and marks it closing on FIN/RST.
#[inline(always)]
pub fn still_owned(
    map: &LruHashMap<FlowKey, SnatRev>,
    key: &FlowKey,
    backend: &Backend,
    (snat, port): (&[u32; 4], u16),
    now: u64,
    closing: bool,
) -> bool {
    let Some(s) = maps::scratch() else {
        return false;
    };
    reply_key(&mut s.key, backend, key.proto, snat, port);
    let Some(entry) = map.get_ptr_mut(&s.key) else {
        return false;
    };
    let entry = unsafe { &mut *entry };
    if entry.client != key.src || entry.client_port != key.src_port {
        return false;
    }
    touch(entry, now, closing, false);
    true
}

/// Keeps a mapping's age and state current, writing only when something changed.
#[inline(always)]
pub fn touch(entry: &mut SnatRev, now: u64, closing: bool, replied: bool) {
    if now.saturating_sub(entry.last_seen_ns) > FLOW_REFRESH_NS {
        entry.last_seen_ns = now;
    }
    let state = entry.state
        | if closing { SNAT_CLOSING } else { 0 }
        | if replied { SNAT_REPLIED } else { 0 };
    if state != entry.state {
        entry.state = state;
    }
}

/// The fullnat reservation a reply (backend -> SNAT address:port) belongs to, main table
/// first; true when it is embryonic.
#[inline(always)]
pub fn reservation(reply: &FlowKey) -> Option<(*mut SnatRev, bool)> {
    if let Some(entry) = SNAT_REV.get_ptr_mut(reply) {
        return Some((entry, false));
    }
    SNAT_REV_NEW.get_ptr_mut(reply).map(|entry| (entry, true))
}
