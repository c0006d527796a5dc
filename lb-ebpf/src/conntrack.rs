//! Flow table: pins a flow to its backend while the backend set changes.
use lb_common::{
    Backend, FAMILY_V4, Flow, FlowKey, MODE_NAT, PROTO_UDP, Reason, RevNat, Service,
    sizes::{FLOW_REFRESH_NS, UDP_IDLE_TIMEOUT_NS},
};

use crate::{
    maps::{self, CONNTRACK, REV_NAT},
    nat::Endpoint,
    stats,
};

/// The backend a known flow is pinned to, if that pinning still holds. A flow whose backend
/// was removed or died is re-hashed (None); a drained backend keeps its flows. A UDP flow
/// idle past its timeout starts over. Also returns the flow's SNAT endpoint (fullnat).
#[inline(always)]
pub fn pinned_backend(
    key: &FlowKey,
    svc: &Service,
    now: u64,
    ifindex: u32,
) -> Option<(u32, &'static Backend, Endpoint)> {
    let flow = CONNTRACK.get_ptr_mut(key)?;
    let flow = unsafe { &mut *flow };
    let idle = now.saturating_sub(flow.last_seen_ns);
    if key.proto == PROTO_UDP && idle > UDP_IDLE_TIMEOUT_NS {
        return None;
    }
    let backend = maps::backend(flow.backend_id)?;
    if flow.service_id != svc.id || !backend.is_alive() || backend.service_id != svc.id {
        stats::count(Reason::Rehashed);
        return None;
    }
    if idle > FLOW_REFRESH_NS {
        flow.last_seen_ns = now;
        // Keep the reply mapping as fresh as the flow, so LRU never evicts it first.
        if svc.mode == MODE_NAT {
            insert_rev_nat(key, backend, svc.id, ifindex);
        }
    }
    let snat = Endpoint {
        addr: flow.snat[0],
        port: flow.snat_port,
    };
    Some((flow.backend_id, backend, snat))
}

/// Records a new flow (or a re-hashed one) and, in mode nat, its reply mapping; `ifindex`
/// is where the flow came in.
#[inline(always)]
pub fn insert(
    key: &FlowKey,
    svc: &Service,
    backend_id: u32,
    backend: &Backend,
    snat: Endpoint,
    now: u64,
    ifindex: u32,
) {
    let flow = Flow {
        backend_id,
        service_id: svc.id,
        last_seen_ns: now,
        snat: [snat.addr, 0, 0, 0],
        snat_port: snat.port,
        _pad: [0; 6],
    };
    if CONNTRACK.insert(key, flow, 0).is_err() {
        stats::count(Reason::ConntrackFull);
    }
    if svc.mode == MODE_NAT {
        insert_rev_nat(key, backend, svc.id, ifindex);
    }
}

#[inline(always)]
fn insert_rev_nat(key: &FlowKey, backend: &Backend, service_id: u32, ifindex: u32) {
    let reply = FlowKey {
        src: backend.addr,
        dst: key.src,
        src_port: backend.port,
        dst_port: key.src_port,
        proto: key.proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let rev = RevNat {
        vip: key.dst,
        vip_port: key.dst_port,
        family: key.family,
        _pad: 0,
        service_id,
        ifindex,
    };
    if REV_NAT.insert(reply, rev, 0).is_err() {
        stats::count(Reason::ConntrackFull);
    }
}
