//! Delivery to local containers without the host's netfilter (DESIGN.md, Delivery). XDP
//! rewrites the packet and leaves a `DeliverMeta` in front of it; the TC ingress program of
//! the same NIC then redirects the skb to the container's bridge (neighbour resolution
//! included). Replies are caught by TC ingress on the bridge, rewritten back to the VIP and
//! redirected out of the NIC the flow came in on.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::{DELIVER_MAGIC, DELIVER_PEER_MAGIC, DeliverMeta};

use crate::maps;

/// Asks the TC ingress program to deliver this packet to the bridge `ifindex`. Returns false
/// if the driver has no room for metadata (the packet then goes through the kernel).
#[inline(always)]
pub fn mark(ctx: &XdpContext, ifindex: u32) -> bool {
    mark_with(ctx, DELIVER_MAGIC, ifindex)
}

/// Asks the TC ingress program to deliver this packet to the container of `backend_id`
/// (`to_container`). False as for `mark`.
#[inline(always)]
pub fn mark_container(ctx: &XdpContext, backend_id: u32) -> bool {
    mark_with(ctx, DELIVER_PEER_MAGIC, backend_id)
}

#[inline(always)]
fn mark_with(ctx: &XdpContext, magic: u32, target: u32) -> bool {
    let len = size_of::<DeliverMeta>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return false;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + size_of::<DeliverMeta>() > data {
        return false;
    }
    let meta = meta as *mut DeliverMeta;
    unsafe {
        (*meta).magic = magic;
        (*meta).target = target;
    }
    true
}

/// Where XDP asked TC to deliver this skb, if it did.
pub enum Marked {
    Bridge(u32),
    Container(u32),
}

/// The delivery target XDP left in the skb's metadata, if any.
#[inline(always)]
pub fn marked(ctx: &TcContext) -> Option<Marked> {
    let skb = unsafe { &*ctx.skb.skb };
    let (meta, data) = (skb.data_meta as usize, skb.data as usize);
    if meta + size_of::<DeliverMeta>() > data {
        return None;
    }
    let meta = unsafe { &*(meta as *const DeliverMeta) };
    match meta.magic {
        DELIVER_MAGIC => Some(Marked::Bridge(meta.target)),
        DELIVER_PEER_MAGIC => Some(Marked::Container(meta.target)),
        _ => None,
    }
}

/// Redirects out of `ifindex` with L2 addresses from the neighbour table (TC_ACT_REDIRECT,
/// or TC_ACT_SHOT if the helper refuses).
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    let rc = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if rc < 0 { TC_ACT_SHOT } else { rc as i32 }
}

/// Sends a packet rewritten as an answer back out of the interface it came in on.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc < 0 { TC_ACT_SHOT } else { rc as i32 }
}

/// Hands a packet rewritten for `backend_id` straight to its container's eth0: the frame
/// gets the container's and the bridge's MACs, and `bpf_redirect_peer` puts it on the ingress
/// of the other end of the host-side veth (another netns; no bridge, no backlog queue).
/// Through the bridge if the agent has not resolved that veth (any more). TC ingress only.
#[inline(always)]
pub fn to_container(ctx: &TcContext, backend_id: u32) -> i32 {
    let Some(backend) = maps::backend(backend_id) else {
        return TC_ACT_SHOT;
    };
    if backend.port_ifindex == 0
        || ctx.store(0, &backend.mac, 0).is_err()
        || ctx.store(6, &backend.gateway_mac, 0).is_err()
    {
        return redirect(backend.deliver_ifindex);
    }
    let rc = unsafe { bpf_redirect_peer(backend.port_ifindex, 0) };
    if rc < 0 { TC_ACT_SHOT } else { rc as i32 }
}
