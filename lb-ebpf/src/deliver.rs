//! Delivery to local containers without the host's netfilter (DESIGN.md, Delivery). XDP
//! rewrites the packet and leaves a `DeliverMeta` in front of it; the TC ingress program of
//! the same NIC then redirects the skb to the container's bridge (neighbour resolution
//! included). Replies are caught by TC ingress on the bridge, rewritten back to the VIP and
//! redirected out of the NIC the flow came in on.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect_neigh, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::{DELIVER_MAGIC, DeliverMeta};

/// Asks the TC ingress program to deliver this packet to `ifindex`. Returns false if the
/// driver has no room for metadata (the packet then goes through the kernel).
#[inline(always)]
pub fn mark(ctx: &XdpContext, ifindex: u32) -> bool {
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
        (*meta).magic = DELIVER_MAGIC;
        (*meta).ifindex = ifindex;
    }
    true
}

/// The delivery target XDP left in the skb's metadata, if any.
#[inline(always)]
pub fn marked(ctx: &TcContext) -> Option<u32> {
    let skb = unsafe { &*ctx.skb.skb };
    let (meta, data) = (skb.data_meta as usize, skb.data as usize);
    if meta + size_of::<DeliverMeta>() > data {
        return None;
    }
    let meta = unsafe { &*(meta as *const DeliverMeta) };
    (meta.magic == DELIVER_MAGIC).then_some(meta.ifindex)
}

/// Redirects out of `ifindex` with L2 addresses from the neighbour table (TC_ACT_REDIRECT,
/// or TC_ACT_SHOT if the helper refuses).
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    let rc = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if rc < 0 { TC_ACT_SHOT } else { rc as i32 }
}
