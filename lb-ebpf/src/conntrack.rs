//! Flow tables: pin a flow to its backend while the backend set changes.
//!
//! A new flow goes into the embryonic tables (`CONNTRACK_NEW`, and its reply mapping or SNAT
//! port in `SNAT_REV_NEW`; a nat flow's replies find it through its backend's endpoint,
//! replies.rs, or through its own mapping in `REV_NAT_NEW`). It moves to the main tables once it proves
//! two-way: in nat and fullnat, where replies pass the LB, a reply was seen and then a client
//! packet that is not a SYN (the handshake's ACK; a UDP flow's next datagram); in dsr, whose
//! replies skip the LB, a client packet that is not a SYN after the first. A flood of new
//! flows from random sources never gets that far, so it only churns the embryonic tables and
//! never evicts an established flow (as the kernel's conntrack never evicts an assured one).
//! Closed flows are marked (FIN both ways, RST); the agent removes them after a short linger.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    maps::LruHashMap,
};
use lb_common::{
    Backend, FLOW_FIN_CLIENT, FLOW_FIN_SERVER, FLOW_REPLIED, FLOW_RST, Flow, FlowKey, FlowTable,
    MODE_DSR, MODE_FULLNAT, MODE_NAT, PROTO_UDP, Reason, RevNat, Service,
    sizes::{FLOW_REFRESH_NS, UDP_IDLE_TIMEOUT_NS},
};

use crate::{
    maps::{self, CONNTRACK, CONNTRACK_NEW, REV_NAT, REV_NAT_NEW, SNAT_REV, SNAT_REV_NEW, Scratch},
    nat::Snat,
    parse::Segment,
    parse6::copy_addr,
    replies, snat,
    stats::{self, TableOp},
};

/// -EEXIST from a BPF_NOEXIST insert: the entry is there already.
pub const EEXIST: i32 = -17;

/// Which generation of the flow tables an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Main,
    New,
}

impl Table {
    #[inline(always)]
    fn flows(self) -> (&'static LruHashMap<FlowKey, Flow>, FlowTable) {
        match self {
            Table::Main => (&CONNTRACK, FlowTable::Flows),
            Table::New => (&CONNTRACK_NEW, FlowTable::FlowsNew),
        }
    }

    #[inline(always)]
    fn rev_nat(self) -> (&'static LruHashMap<FlowKey, RevNat>, FlowTable) {
        match self {
            Table::Main => (&REV_NAT, FlowTable::RevNat),
            Table::New => (&REV_NAT_NEW, FlowTable::RevNatNew),
        }
    }
}

/// A known flow whose pinning still holds.
pub struct Known {
    pub table: Table,
    pub backend_id: u32,
    pub backend: &'static Backend,
    /// This packet proves an embryonic flow two-way: it moves to the main table.
    pub promote: bool,
    flow: *mut Flow,
}

/// The flow's entry (main table first), if its pinning still holds. An entry that no
/// longer holds is removed, so the new decision takes its place: its backend was removed or
/// died (a drained one keeps its flows), a UDP flow idled past its timeout, or a SYN reopens
/// a closed flow. Records the client's FIN and RST.
#[inline(always)]
pub fn lookup<P: Segment>(
    key: &FlowKey,
    svc: &Service,
    pkt: &P,
    now: u64,
    ifindex: u32,
) -> Option<Known> {
    let (table, flow) = match CONNTRACK.get_ptr_mut(key) {
        Some(flow) => (Table::Main, flow),
        None => (Table::New, CONNTRACK_NEW.get_ptr_mut(key)?),
    };
    let flow = unsafe { &mut *flow };
    let idle = now.saturating_sub(flow.last_seen_ns);
    let stale =
        (key.proto == PROTO_UDP && idle > UDP_IDLE_TIMEOUT_NS) || (pkt.syn() && flow.is_closed());
    let backend = maps::backend(flow.backend_id.into())
        .filter(|b| u32::from(flow.service_id) == svc.id && b.is_alive() && b.service_id == svc.id);
    let Some(backend) = backend.filter(|_| !stale) else {
        if !stale {
            stats::count(Reason::Rehashed);
        }
        remove(table, key);
        return None;
    };
    let state = flow.state | closing_bits(pkt.fin(), pkt.rst(), FLOW_FIN_CLIENT);
    if state != flow.state {
        flow.state = state;
    }
    if idle > FLOW_REFRESH_NS {
        flow.last_seen_ns = now;
        // The reply mapping ages with the flow: a lookup marks it used for the LRU.
        if svc.mode == MODE_NAT {
            touch_rev_nat(
                table,
                key,
                (flow.backend_id.into(), backend),
                svc.id,
                ifindex,
            );
        }
    }
    // Not by an RST: a client resets a handshake the backend answered with a stale ACK (a
    // TIME_WAIT of an earlier flow on the same SNAT port), then retries it.
    let promote = table == Table::New
        && !pkt.syn()
        && !pkt.rst()
        && (svc.mode == MODE_DSR || state & FLOW_REPLIED != 0);
    Some(Known {
        table,
        backend_id: flow.backend_id.into(),
        backend,
        promote,
        flow,
    })
}

#[inline(always)]
fn closing_bits(fin: bool, rst: bool, fin_bit: u8) -> u8 {
    (if fin { fin_bit } else { 0 }) | (if rst { FLOW_RST } else { 0 })
}

/// Removes a flow's entry (a re-hashed or reopened flow starts over as a new one).
#[inline(always)]
pub fn remove(table: Table, key: &FlowKey) {
    let (map, which) = table.flows();
    if map.remove(key).is_ok() {
        stats::table(which, TableOp::Removed);
    }
}

/// Inserts into `map`, counting an entry that was not there before.
#[inline(always)]
fn insert<V>(map: &LruHashMap<FlowKey, V>, which: FlowTable, key: &FlowKey, value: &V) -> bool {
    match map.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            stats::table(which, TableOp::Added);
            true
        }
        Err(EEXIST) => map.insert(key, value, BPF_ANY as u64).is_ok(),
        Err(_) => {
            stats::table(which, TableOp::Failed);
            false
        }
    }
}

impl Known {
    /// fullnat: the flow's SNAT address and port, in its entry.
    #[inline(always)]
    fn snat(&self) -> (&[u32; 4], u16) {
        let flow = unsafe { &*self.flow };
        (&flow.snat, flow.snat_port)
    }

    /// Writes the flow's SNAT address and port into `out`.
    #[inline(always)]
    pub fn write_snat(&self, out: &mut Snat) {
        let (addr, port) = self.snat();
        copy_addr(&mut out.addr, addr);
        out.port = port;
    }
}

/// Records a new flow (or a re-hashed one) in the embryonic table, with the FIN or RST its
/// first packet carries, and, in mode nat, its reply mapping; `ifindex` is where the flow
/// came in. Without room the packet is still
/// forwarded: Maglev sends the flow's next packets to the same backend.
#[inline(always)]
pub fn insert_new<P: Segment>(
    key: &FlowKey,
    pkt: &P,
    svc: &Service,
    (backend_id, backend): (u32, &Backend),
    snat: &Snat,
    now: u64,
    ifindex: u32,
) {
    let Some(s) = maps::scratch() else { return };
    // Ids are below MAX_BACKENDS and MAX_SERVICES (lb-common asserts they fit).
    s.flow.backend_id = backend_id as u16;
    s.flow.service_id = svc.id as u16;
    s.flow.last_seen_ns = now;
    copy_addr(&mut s.flow.snat, &snat.addr);
    s.flow.snat_port = snat.port;
    s.flow.state = closing_bits(pkt.fin(), pkt.rst(), FLOW_FIN_CLIENT);
    s.flow._pad = 0;
    s.flow.created_s = (now / 1_000_000_000) as u32;
    s.flow.ifindex = ifindex;
    if !insert(&CONNTRACK_NEW, FlowTable::FlowsNew, key, &s.flow) {
        stats::count(Reason::ConntrackFull);
    }
    // Replies find the flow through its backend's endpoint, unless that stands for another
    // backend id.
    if svc.mode == MODE_NAT && !replies::claim(&mut s.endpoint, backend_id, backend, key.proto) {
        rev_nat_entry(s, key, backend, svc.id, ifindex);
        if !insert(&REV_NAT_NEW, FlowTable::RevNatNew, &s.key, &s.rev_nat) {
            stats::count(Reason::ConntrackFull);
        }
    }
}

/// Moves a flow that proved two-way to the main tables: its SNAT port (fullnat) and the
/// flow itself, then its reply mapping (nat), and only then out of the embryonic ones. What
/// cannot move stays embryonic and keeps working.
#[inline(always)]
pub fn promote(key: &FlowKey, known: &Known, svc: &Service, now: u64, ifindex: u32) {
    let backend = known.backend;
    let Some(s) = maps::scratch() else { return };
    if svc.mode == MODE_FULLNAT {
        let (addr, port) = known.snat();
        snat::reply_key(&mut s.key, backend, key.proto, addr, port);
        let Some(reservation) = (unsafe { SNAT_REV_NEW.get(&s.key) }) else {
            return;
        };
        if !insert(&SNAT_REV, FlowTable::SnatRev, &s.key, reservation) {
            return;
        }
    }
    // The embryonic entry, made current, is copied as it is.
    let flow = unsafe { &mut *known.flow };
    flow.state &= !FLOW_REPLIED;
    flow.last_seen_ns = now;
    if !insert(&CONNTRACK, FlowTable::Flows, key, flow) {
        return;
    }
    remove(Table::New, key);
    match svc.mode {
        MODE_NAT => {
            rev_nat_entry(s, key, backend, svc.id, ifindex);
            if insert(&REV_NAT, FlowTable::RevNat, &s.key, &s.rev_nat)
                && REV_NAT_NEW.remove(&s.key).is_ok()
            {
                stats::table(FlowTable::RevNatNew, TableOp::Removed);
            }
        }
        // s.key still holds the SNAT reply key.
        MODE_FULLNAT if SNAT_REV_NEW.remove(&s.key).is_ok() => {
            stats::table(FlowTable::SnatRevNew, TableOp::Removed);
        }
        _ => {}
    }
    stats::count(Reason::Promoted);
}

/// A reply of the flow `forward` (its client -> VIP key) passed the LB: marks an embryonic
/// flow replied, and records the backend's FIN or RST.
#[inline(always)]
pub fn reply_seen(forward: &FlowKey, table: Table, fin: bool, rst: bool) {
    let (map, _) = table.flows();
    if let Some(flow) = map.get_ptr_mut(forward) {
        mark_reply(flow, table, fin, rst);
    }
}

/// The same, for a flow entry at hand.
#[inline(always)]
pub fn mark_reply(flow: *mut Flow, table: Table, fin: bool, rst: bool) {
    let bits = closing_bits(fin, rst, FLOW_FIN_SERVER)
        | if table == Table::New { FLOW_REPLIED } else { 0 };
    let flow = unsafe { &mut *flow };
    if flow.state | bits != flow.state {
        flow.state |= bits;
    }
}

/// Where a nat reply goes back to.
pub struct ReplyTo {
    pub vip: [u32; 4],
    pub vip_port: u16,
    /// The flow's ingress interface.
    pub ifindex: u32,
    pub table: Table,
    /// The embryonic entry, when the reply found it through its backend's endpoint.
    pub flow: Option<*mut Flow>,
}

/// The reply mapping of a nat flow: its own (main table first), or an embryonic flow's
/// found through its backend's endpoint.
#[inline(always)]
pub fn reply_mapping(reply: &FlowKey) -> Option<ReplyTo> {
    let own = |rev: &RevNat, table| ReplyTo {
        vip: rev.vip,
        vip_port: rev.vip_port,
        ifindex: rev.ifindex,
        table,
        flow: None,
    };
    if let Some(rev) = unsafe { REV_NAT.get(reply) } {
        return Some(own(rev, Table::Main));
    }
    let s = maps::scratch()?;
    if let Some(e) = replies::embryonic(reply, &mut s.endpoint, &mut s.key) {
        return Some(ReplyTo {
            vip: e.vip,
            vip_port: e.vip_port,
            ifindex: unsafe { (*e.flow).ifindex },
            table: Table::New,
            flow: Some(e.flow),
        });
    }
    unsafe { REV_NAT_NEW.get(reply) }.map(|rev| own(rev, Table::New))
}

/// The client -> VIP key of the flow a nat reply (backend -> client) belongs to.
#[inline(always)]
pub fn forward_of_reply(reply: &FlowKey, rev: &ReplyTo) -> FlowKey {
    FlowKey {
        src: reply.dst,
        dst: rev.vip,
        src_port: reply.dst_port,
        dst_port: rev.vip_port,
        proto: reply.proto,
        family: reply.family,
        _pad: 0,
    }
}

/// Writes a nat flow's reply key and mapping into the scratch room.
#[inline(always)]
fn rev_nat_entry(s: &mut Scratch, key: &FlowKey, backend: &Backend, service_id: u32, ifindex: u32) {
    copy_addr(&mut s.key.src, &backend.addr);
    copy_addr(&mut s.key.dst, &key.src);
    s.key.src_port = backend.port;
    s.key.dst_port = key.src_port;
    s.key.proto = key.proto;
    s.key.family = key.family;
    s.key._pad = 0;
    copy_addr(&mut s.rev_nat.vip, &key.dst);
    s.rev_nat.vip_port = key.dst_port;
    s.rev_nat.family = key.family;
    s.rev_nat._pad = 0;
    s.rev_nat.service_id = service_id;
    s.rev_nat.ifindex = ifindex;
}

/// Marks an established flow's reply mapping used (so LRU keeps it as long as the flow),
/// and puts it back if it was lost. A new flow whose replies find it through its backend's
/// endpoint has none.
#[inline(always)]
fn touch_rev_nat(
    table: Table,
    key: &FlowKey,
    (backend_id, backend): (u32, &Backend),
    service_id: u32,
    ifindex: u32,
) {
    let (map, which) = table.rev_nat();
    let Some(s) = maps::scratch() else { return };
    rev_nat_entry(s, key, backend, service_id, ifindex);
    if unsafe { map.get(&s.key) }.is_none()
        && !(table == Table::New && replies::claim(&mut s.endpoint, backend_id, backend, key.proto))
    {
        insert(map, which, &s.key, &s.rev_nat);
    }
}

/// Whether an established flow still owns its SNAT port in its table (an idle flow's port
/// may have gone to another flow; then this one must start over).
#[inline(always)]
pub fn still_owns_port(known: &Known, key: &FlowKey, now: u64, closing: bool) -> bool {
    let map = match known.table {
        Table::Main => &SNAT_REV,
        Table::New => &SNAT_REV_NEW,
    };
    snat::still_owned(map, key, known.backend, known.snat(), now, closing)
}
