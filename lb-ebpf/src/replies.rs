//! Replies of new nat flows without a reverse-NAT entry per flow.
//!
//! A new flow used to cost two LRU inserts: its conntrack entry and its reply mapping. Most
//! backend endpoints (address, port, protocol) serve one service, so a reply's source names
//! the backend, the backend its service, the service its VIP, and the VIP the flow's
//! forward key: the embryonic conntrack entry is the reply mapping. `REPLY_ENDPOINTS` records
//! which backend id an endpoint stands for, written once per endpoint with BPF_NOEXIST and
//! never changed by the data path. A flow whose endpoint names another backend id (an
//! endpoint in two services, or a stale entry the agent has not swept yet) or that finds no
//! room gets its own mapping in `REV_NAT_NEW`, as before. A promoted flow gets one in
//! `REV_NAT`.
use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{Backend, Flow, FlowKey, MODE_NAT, VipKey};

use crate::{
    maps::{self, CONNTRACK_NEW, REPLY_ENDPOINTS},
    parse6::copy_addr,
};

#[inline(always)]
fn endpoint_key(key: &mut VipKey, addr: &[u32; 4], port: u16, proto: u8, family: u8) {
    copy_addr(&mut key.addr, addr);
    key.port = port;
    key.proto = proto;
    key.family = family;
}

/// Whether replies from `backend` find this backend's new flows through `REPLY_ENDPOINTS`
/// (then the flow needs no reply mapping of its own). `key` is scratch room.
#[inline(always)]
pub fn claim(key: &mut VipKey, backend_id: u32, backend: &Backend, proto: u8) -> bool {
    endpoint_key(key, &backend.addr, backend.port, proto, backend.family);
    if let Some(id) = unsafe { REPLY_ENDPOINTS.get(&*key) } {
        return *id == backend_id;
    }
    // Another CPU may claim it first: then its answer counts.
    REPLY_ENDPOINTS
        .insert(&*key, &backend_id, BPF_NOEXIST as u64)
        .is_ok()
        || unsafe { REPLY_ENDPOINTS.get(key) }.is_some_and(|id| *id == backend_id)
}

/// A new flow's reply mapping found through its backend's endpoint: the VIP and port to put
/// back, and the embryonic entry (which the reply marks).
pub struct Embryonic {
    pub vip: [u32; 4],
    pub vip_port: u16,
    pub flow: *mut Flow,
}

/// The embryonic nat flow a reply (backend -> client) belongs to, if its backend's endpoint
/// stands for one backend and that backend's service has such a flow to it.
#[inline(always)]
pub fn embryonic(reply: &FlowKey, key: &mut VipKey, forward: &mut FlowKey) -> Option<Embryonic> {
    endpoint_key(key, &reply.src, reply.src_port, reply.proto, reply.family);
    let backend_id = *unsafe { REPLY_ENDPOINTS.get(key) }?;
    let backend = maps::backend(backend_id)?;
    let svc = maps::service(backend.service_id)?;
    if backend.addr != reply.src
        || backend.port != reply.src_port
        || svc.mode != MODE_NAT
        || svc.vip.proto != reply.proto
    {
        return None;
    }
    copy_addr(&mut forward.src, &reply.dst);
    copy_addr(&mut forward.dst, &svc.vip.addr);
    forward.src_port = reply.dst_port;
    forward.dst_port = svc.vip.port;
    forward.proto = reply.proto;
    forward.family = svc.vip.family;
    forward._pad = 0;
    let flow = CONNTRACK_NEW.get_ptr_mut(forward)?;
    let f = unsafe { &*flow };
    if u32::from(f.backend_id) != backend_id || u32::from(f.service_id) != backend.service_id {
        return None;
    }
    Some(Embryonic {
        vip: svc.vip.addr,
        vip_port: svc.vip.port,
        flow,
    })
}
