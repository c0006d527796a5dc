//! Judging the data path's answers against the model: the rewrite of a forwarded or reversed
//! frame, the verdict and traffic counters, and the flow maps.
use std::{
    collections::{HashMap, hash_map::Entry},
    fmt::Write as _,
    net::{IpAddr, SocketAddrV4},
    time::Instant,
};

use aya::{programs::ProgramError, sys::SyscallError};
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP, Reason, addr_words};
use xlb_tests::testrun::*;

use super::{
    DEFAULT_PACKETS, DEFAULT_SEED, EXACT_FLOWS, Flow5, UDP_MAYBE_EXPIRED, VIP1,
    generator::{Frame, kernel_refuses_skb},
    is_drop,
    model::{Headers, Icmp, Model, Parsed, ip_checksum, l4_checksum, parse, scratch_checksums},
    sock,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// XDP: DNAT of the destination.
    Dst,
    /// TC egress: the reply's source back to the VIP.
    Src,
}

/// Checks that `out` is `input` with the destination (or source) address and port rewritten
/// and nothing else but the checksums changed; that each checksum is off by exactly what it
/// was off by before (a one's complement sum over the changed data does not move), is
/// exactly the from-scratch value if it was that before, and that a UDP checksum of 0 stays 0
/// and no other becomes 0. Returns the new address and port.
fn check_rewrite(
    input: &[u8],
    out: &[u8],
    h: &Headers,
    side: Side,
) -> Result<SocketAddrV4, String> {
    if out.len() != input.len() {
        return Err(format!(
            "the rewrite changed the length from {} to {}",
            input.len(),
            out.len()
        ));
    }
    let (addr, port) = match side {
        Side::Dst => (h.l3 + IP_DADDR, h.l4() + L4_DPORT),
        Side::Src => (h.l3 + IP_SADDR, h.l4() + L4_SPORT),
    };
    let mut expect = input.to_vec();
    for (off, n) in [(addr, 4), (port, 2), (h.l3 + IP_CSUM, 2), (h.l4_csum(), 2)] {
        expect[off..off + n].copy_from_slice(&out[off..off + n]);
    }
    if let Some(at) = expect.iter().zip(out).position(|(a, b)| a != b) {
        return Err(format!(
            "the rewrite changed byte {at} ({:#04x} -> {:#04x}), which is none of the {side:?} \
             address, port or checksums",
            input[at], out[at]
        ));
    }
    let to = SocketAddrV4::new(ipv4_at(out, addr), be16(out, port));

    let (scratch_ip, scratch_l4) = scratch_checksums(input, h);
    let (ip_in, ip_out) = (be16(input, h.l3 + IP_CSUM), be16(out, h.l3 + IP_CSUM));
    if ip_checksum(input, h) != ip_checksum(out, h) {
        return Err(format!(
            "IPv4 checksum {ip_in:#06x} -> {ip_out:#06x}: the header sums to {:#06x} before and \
             {:#06x} after (must not move)",
            !ip_checksum(input, h),
            !ip_checksum(out, h)
        ));
    }
    if ip_in == scratch_ip && ip_out != scratch_checksums(out, h).0 {
        return Err(format!(
            "IPv4 checksum {ip_in:#06x} -> {ip_out:#06x}, expected {:#06x}",
            scratch_checksums(out, h).0
        ));
    }

    let proto = if h.proto == PROTO_TCP { "TCP" } else { "UDP" };
    let (l4_in, l4_out) = (be16(input, h.l4_csum()), be16(out, h.l4_csum()));
    if h.proto == PROTO_UDP && l4_in == 0 {
        if l4_out != 0 {
            return Err(format!(
                "UDP checksum 0 (none) became {l4_out:#06x}; it must stay 0"
            ));
        }
        return Ok(to);
    }
    if h.proto == PROTO_UDP && l4_out == 0 {
        return Err(format!(
            "UDP checksum {l4_in:#06x} became 0, which means none; 0xffff expected"
        ));
    }
    if l4_checksum(input, h) != l4_checksum(out, h) {
        return Err(format!(
            "{proto} checksum {l4_in:#06x} -> {l4_out:#06x}: the segment sums to {:#06x} before \
             and {:#06x} after (must not move)",
            !l4_checksum(input, h),
            !l4_checksum(out, h)
        ));
    }
    if l4_in == scratch_l4 && l4_out != scratch_checksums(out, h).1 {
        return Err(format!(
            "{proto} checksum {l4_in:#06x} -> {l4_out:#06x}, expected {:#06x}",
            scratch_checksums(out, h).1
        ));
    }
    Ok(to)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    packets: u64,
    bytes: u64,
    /// Distinct flows.
    flows: u64,
    /// Packets of UDP flows idle long enough to have expired (each may count as new).
    maybe_new: u64,
}

/// What the model knows of one flow.
pub struct FlowState {
    /// A reply passed TC egress while the flow was new.
    replied: bool,
    /// In the main table (it proved two-way).
    established: bool,
    /// FIN from the client, FIN from the backend, RST from either.
    fin_client: bool,
    fin_server: bool,
    rst: bool,
    backend: SocketAddrV4,
    backend_id: u32,
    service: usize,
    last: Instant,
}

impl FlowState {
    fn new() -> Self {
        FlowState {
            replied: false,
            established: false,
            fin_client: false,
            fin_server: false,
            rst: false,
            backend: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            backend_id: 0,
            service: 0,
            last: Instant::now(),
        }
    }
}

/// Packets by verdict (an array of more than 32 has no derived Default).
#[derive(Clone, Copy)]
pub struct Verdicts(pub [u64; Reason::COUNT as usize]);

impl Default for Verdicts {
    fn default() -> Self {
        Self([0; Reason::COUNT as usize])
    }
}

impl std::ops::Deref for Verdicts {
    type Target = [u64; Reason::COUNT as usize];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Verdicts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

#[derive(Default)]
pub struct Tracker {
    pub services: Vec<Tally>,
    pub backends: HashMap<u32, Tally>,
    pub flows: HashMap<Flow5, FlowState>,
    /// Reply 5-tuple -> VIP, as the reverse NAT map must hold it.
    pub rev_nat: HashMap<Flow5, SocketAddrV4>,
    pub replies: Vec<Flow5>,
    pub verdicts: Verdicts,
    /// Rewrites (XDP and TC) of frames with a wrong IPv4 checksum, a wrong L4 checksum, and
    /// UDP without a checksum: the corner cases of the checksum rules.
    pub odd_checksums: [u64; 3],
    pub xdp_packets: u64,
    pub tc_packets: u64,
    pub tc_rewritten: u64,
    pub tc_refused: u64,
}

impl Tracker {
    fn rewritten(&mut self, frame: &[u8], h: &Headers) {
        self.odd_checksums[0] += u64::from(ip_checksum(frame, h) != 0);
        if h.proto == PROTO_UDP && be16(frame, h.l4_csum()) == 0 {
            self.odd_checksums[2] += 1;
        } else {
            self.odd_checksums[1] += u64::from(l4_checksum(frame, h) != 0);
        }
    }

    fn forwarded(
        &mut self,
        service: usize,
        h: &Headers,
        backend: SocketAddrV4,
        backend_id: u32,
        frame_len: usize,
    ) -> Result<(), String> {
        let key = (h.src, h.sport, h.dst, h.dport, h.proto);
        let now = Instant::now();
        let mut new = false;
        let mut maybe_new = false;
        let fin = h.tcp_flags & TCP_FIN != 0;
        let rst = h.tcp_flags & TCP_RST != 0;
        match self.flows.entry(key) {
            Entry::Occupied(mut e) => {
                let flow = e.get_mut();
                if flow.backend != backend {
                    return Err(format!(
                        "flow {}:{} -> {}:{} went to {} before and now to {backend}",
                        h.src, h.sport, h.dst, h.dport, flow.backend
                    ));
                }
                maybe_new = h.proto == PROTO_UDP && now - flow.last > UDP_MAYBE_EXPIRED;
                flow.last = now;
                let closed = flow.rst || (flow.fin_client && flow.fin_server);
                if h.syn() && closed {
                    // A SYN reopens a closed flow: a new one (Maglev picks the same backend).
                    *flow = FlowState {
                        backend,
                        backend_id,
                        service,
                        last: now,
                        fin_client: fin,
                        rst,
                        ..FlowState::new()
                    };
                    new = true;
                } else {
                    flow.fin_client |= fin;
                    flow.rst |= rst;
                    // An RST does not promote (conntrack.rs: a reset handshake is retried).
                    if !flow.established && flow.replied && !h.syn() && !rst {
                        flow.established = true;
                        self.verdicts[Reason::Promoted as usize] += 1;
                    }
                }
            }
            Entry::Vacant(e) => {
                e.insert(FlowState {
                    backend,
                    backend_id,
                    service,
                    last: now,
                    fin_client: fin,
                    rst,
                    ..FlowState::new()
                });
                new = true;
                let reply = (*backend.ip(), backend.port(), h.src, h.sport, h.proto);
                let vip = SocketAddrV4::new(h.dst, h.dport);
                if let Some(other) = self.rev_nat.insert(reply, vip) {
                    panic!("test setup: reply {reply:?} belongs to flows to {other} and {vip}");
                }
                self.replies.push(reply);
            }
        }
        let len = frame_len as u64;
        for tally in [
            &mut self.services[service],
            self.backends.entry(backend_id).or_default(),
        ] {
            tally.packets += 1;
            tally.bytes += len;
            tally.flows += u64::from(new);
            tally.maybe_new += u64::from(maybe_new);
        }
        Ok(())
    }

    /// Fewer flows than conntrack or reverse NAT could ever evict.
    pub fn exact(&self) -> bool {
        self.flows.len() < EXACT_FLOWS
    }
}

pub struct Run {
    pub seed: u64,
    pub packets: u64,
}

impl Run {
    pub fn from_env() -> Run {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.replace('_', ""));
        let packets = var("XLB_FUZZ_PACKETS").map_or(DEFAULT_PACKETS, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("XLB_FUZZ_PACKETS={v}: {e}"))
        });
        let seed = var("XLB_FUZZ_SEED").map_or(DEFAULT_SEED, |v| {
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .unwrap_or_else(|e| panic!("XLB_FUZZ_SEED={v}: {e}"))
        });
        Run { seed, packets }
    }

    pub fn replay(&self) -> String {
        format!(
            "replay: XLB_FUZZ_SEED={:#x} XLB_FUZZ_PACKETS={} cargo test -p xlb-tests --test fuzz",
            self.seed, self.packets
        )
    }

    /// Panics with everything needed to look at and replay a failing frame.
    pub fn fail(
        &self,
        what: &str,
        index: u64,
        frame: &Frame,
        out: Option<&[u8]>,
        problem: &str,
    ) -> ! {
        let mut msg = format!(
            "{what} frame {index} (seed {:#x}): {problem}\nframe: {}\ninput ({} bytes):\n{}",
            self.seed,
            frame.what,
            frame.bytes.len(),
            hexdump(&frame.bytes, usize::MAX)
        );
        if let Some(out) = out {
            let first = frame
                .bytes
                .iter()
                .zip(out)
                .position(|(a, b)| a != b)
                .unwrap_or(frame.bytes.len().min(out.len()));
            if out == frame.bytes {
                msg.push_str("output: the same\n");
            } else {
                let _ = write!(
                    msg,
                    "output ({} bytes, first difference at {first}):\n{}",
                    out.len(),
                    hexdump(out, first)
                );
            }
        }
        let _ = write!(msg, "model: {:?}\n{}", parse(&frame.bytes), self.replay());
        panic!("{msg}");
    }
}

/// Checks XDP's answer to an echo request, or its rewrite of an error for a backend: only
/// what must change changed, and every checksum that was right is still right.
fn check_icmp(
    model: &Model,
    track: &mut Tracker,
    input: &[u8],
    out: &[u8],
    icmp: Icmp,
) -> Result<(), String> {
    if out.len() != input.len() {
        return Err(format!("ICMP: {} bytes became {}", input.len(), out.len()));
    }
    let l3 = match icmp {
        Icmp::Echo { l3 } | Icmp::ToBackend { l3, .. } => l3,
    };
    let end = l3 + usize::from(be16(input, l3 + IP_TOT_LEN));
    let sums = |f: &[u8], quoted: Option<usize>| {
        let ip = checksum(&[&f[l3..l3 + 20]]) == 0;
        let icmp = checksum(&[&f[l3 + 20..end]]) == 0;
        let inner = quoted.map(|q| checksum(&[&f[q..q + 20]]) == 0);
        (ip, icmp, inner)
    };
    let mut expected = input.to_vec();
    match icmp {
        Icmp::Echo { .. } => {
            expected[..6].copy_from_slice(&input[6..12]);
            expected[6..12].copy_from_slice(&input[..6]);
            expected[l3 + 12..l3 + 16].copy_from_slice(&input[l3 + 16..l3 + 20]);
            expected[l3 + 16..l3 + 20].copy_from_slice(&input[l3 + 12..l3 + 16]);
            expected[l3 + 8] = 64;
            expected[l3 + 20] = 0;
            if sums(out, None) != sums(input, None) {
                return Err("echo reply: a checksum went wrong".into());
            }
        }
        Icmp::ToBackend { service, flow, .. } => {
            let q = l3 + 28;
            let to = SocketAddrV4::new(ipv4_at(out, l3 + IP_DADDR), be16(out, q + 20));
            let svc = &model.services[service];
            if !svc.backends.iter().any(|(b, _)| *b == to) {
                return Err(format!(
                    "ICMP error sent to {to}, not a backend of {}",
                    svc.name
                ));
            }
            if let Some(known) = track.flows.get(&flow)
                && known.backend != to
            {
                return Err(format!(
                    "ICMP error sent to {to}, its flow is on {}",
                    known.backend
                ));
            }
            if ipv4_at(out, q + IP_SADDR) != *to.ip() {
                return Err("the quoted source is not the backend".into());
            }
            expected[l3 + 16..l3 + 20].copy_from_slice(&to.ip().octets());
            expected[q + 12..q + 16].copy_from_slice(&to.ip().octets());
            expected[q + 20..q + 22].copy_from_slice(&to.port().to_be_bytes());
            if sums(out, Some(q)) != sums(input, Some(q)) {
                return Err("ICMP error: a checksum went wrong".into());
            }
            track.verdicts[Reason::IcmpToBackend as usize] += 1;
        }
    }
    // Everything else as sent (the checksums were judged above).
    let q = l3 + 28;
    let masked = |f: &mut [u8]| {
        f[l3 + 10..l3 + 12].fill(0);
        f[l3 + 22..l3 + 24].fill(0);
        if matches!(icmp, Icmp::ToBackend { .. }) {
            f[q + 10..q + 12].fill(0);
        }
    };
    let (mut got, mut want) = (out.to_vec(), expected);
    masked(&mut got);
    masked(&mut want);
    if got != want {
        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "ICMP: byte {at} is {:#04x}, expected {:#04x}",
            got[at], want[at]
        ));
    }
    Ok(())
}

pub fn deltas(before: &ReasonCounts, after: &ReasonCounts) -> [u64; Reason::COUNT as usize] {
    let mut d = [0; Reason::COUNT as usize];
    for r in Reason::ALL {
        d[r as usize] = after.get(r).wrapping_sub(before.get(r));
    }
    d
}

/// Names every counter whose move differs from `want`.
pub fn counter_problems(got: &[u64], want: &[u64]) -> String {
    let mut s = String::new();
    for r in Reason::ALL {
        let (g, w) = (got[r as usize], want[r as usize]);
        if g != w {
            let _ = write!(s, "\n  {}: moved by {g}, expected {w}", r.name());
        }
    }
    s
}

/// A batch's verdict counters disagree with the model: replays its frames one at a time to
/// find one whose counted verdict is not the model's. (Verdicts do not depend on conntrack
/// state here: every backend stays alive.)
pub fn find_culprit(dp: &LoadedDatapath, model: &Model, run: &Run, frames: &[(u64, Frame)]) {
    for (index, frame) in frames {
        let before = dp.reasons();
        let out = dp.xdp(&frame.bytes);
        let moved = deltas(&before, &dp.reasons());
        let mut want = [0; Reason::COUNT as usize];
        want[model.xdp_verdict(&frame.bytes).reason as usize] = 1;
        let problems = counter_problems(&moved, &want);
        if !problems.is_empty() {
            run.fail(
                "XDP",
                *index,
                frame,
                Some(&out.data),
                &format!("counted a verdict other than the model's:{problems}"),
            );
        }
    }
}

pub fn check_xdp_frame(
    dp: &LoadedDatapath,
    model: &Model,
    run: &Run,
    track: &mut Tracker,
    index: u64,
    frame: &Frame,
) {
    let verdict = model.xdp_verdict(&frame.bytes);
    let out = dp.xdp(&frame.bytes);
    macro_rules! fail {
        ($($arg:tt)*) => {
            run.fail("XDP", index, frame, Some(&out.data), &format!($($arg)*))
        };
    }
    let echo = verdict.reason == Reason::IcmpEcho;
    if out.action != XDP_PASS && out.action != XDP_DROP && !(echo && out.action == XDP_TX) {
        fail!(
            "returned {}: only XDP_PASS and XDP_DROP are allowed (and XDP_TX for an echo)",
            xdp_action_name(out.action)
        );
    }
    let want = if is_drop(verdict.reason) {
        XDP_DROP
    } else if echo {
        XDP_TX
    } else {
        XDP_PASS
    };
    if out.action != want {
        fail!(
            "returned {}, the model says {} ({})",
            xdp_action_name(out.action),
            xdp_action_name(want),
            verdict.reason.name()
        );
    }
    track.verdicts[verdict.reason as usize] += 1;
    track.xdp_packets += 1;
    if let Some(icmp) = verdict.icmp {
        if let Err(e) = check_icmp(model, track, &frame.bytes, &out.data, icmp) {
            fail!("{e}");
        }
        return;
    }
    let Some((k, h)) = verdict.forward else {
        if out.data != frame.bytes {
            fail!(
                "changed a frame it must leave alone ({})",
                verdict.reason.name()
            );
        }
        return;
    };
    let svc = &model.services[k];
    let to = check_rewrite(&frame.bytes, &out.data, &h, Side::Dst)
        .unwrap_or_else(|e| fail!("forward to {}: {e}", svc.name));
    let Some(&(_, backend_id)) = svc.backends.iter().find(|(b, _)| *b == to) else {
        fail!(
            "rewritten to {to}, not a backend of {} ({:?})",
            svc.name,
            svc.backends
        );
    };
    if let Err(e) = track.forwarded(k, &h, to, backend_id, frame.bytes.len()) {
        fail!("{e}");
    }
    track.rewritten(&frame.bytes, &h);
}

pub fn check_tc_frame(
    dp: &LoadedDatapath,
    run: &Run,
    track: &mut Tracker,
    index: u64,
    frame: &Frame,
) {
    track.tc_packets += 1;
    let reply = match parse(&frame.bytes) {
        Parsed::Ok(h) => track
            .rev_nat
            .get(&(h.src, h.sport, h.dst, h.dport, h.proto))
            .map(|vip| (h, *vip)),
        _ => None,
    };
    let out = match dp.try_tc_egress(&frame.bytes) {
        Ok(out) => out,
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::EINVAL)
                && kernel_refuses_skb(&frame.bytes) =>
        {
            track.tc_refused += 1;
            return;
        }
        Err(e) => run.fail(
            "TC egress",
            index,
            frame,
            None,
            &format!("BPF_PROG_TEST_RUN failed: {e:?}"),
        ),
    };
    macro_rules! fail {
        ($($arg:tt)*) => {
            run.fail("TC egress", index, frame, Some(&out.data), &format!($($arg)*))
        };
    }
    if out.action != TC_ACT_UNSPEC {
        fail!("returned {:#x}, only -1 (next) is allowed", out.action);
    }
    match reply {
        Some((h, vip)) => {
            let to = check_rewrite(&frame.bytes, &out.data, &h, Side::Src)
                .unwrap_or_else(|e| fail!("reverse NAT to {vip}: {e}"));
            if to != vip {
                fail!("reply source rewritten to {to}, not the VIP {vip}");
            }
            track.tc_rewritten += 1;
            track.rewritten(&frame.bytes, &h);
            let forward = (h.dst, h.dport, *vip.ip(), vip.port(), h.proto);
            if let Some(flow) = track.flows.get_mut(&forward) {
                flow.replied |= !flow.established;
                flow.fin_server |= h.tcp_flags & TCP_FIN != 0;
                flow.rst |= h.tcp_flags & TCP_RST != 0;
            }
        }
        None => {
            if out.data != frame.bytes {
                fail!("changed a frame that is no reply of a known flow");
            }
        }
    }
}

/// The service and backend counters against the forwarded packets.
pub fn check_traffic_counters(dp: &LoadedDatapath, model: &Model, run: &Run, track: &Tracker) {
    let check = |what: &str, got: lb_common::Counters, want: &Tally| {
        let new_flows = if track.exact() {
            want.flows..=want.flows + want.maybe_new
        } else {
            want.flows..=want.packets
        };
        assert!(
            got.packets == want.packets
                && got.bytes == want.bytes
                && new_flows.contains(&got.new_flows),
            "{what}: counters {got:?}, expected {} packets, {} bytes, new flows in \
             {new_flows:?}\n{}",
            want.packets,
            want.bytes,
            run.replay()
        );
    };
    for (k, svc) in model.services.iter().enumerate() {
        let counters = dp.service_counters(svc.id);
        check(
            &format!("service {}", svc.name),
            counters,
            &track.services[k],
        );
        let mut new_flows = 0;
        for (backend, id) in &svc.backends {
            let got = dp.backend_counters(*id);
            let want = track.backends.get(id).copied().unwrap_or_default();
            check(&format!("backend {backend} of {}", svc.name), got, &want);
            new_flows += got.new_flows;
        }
        assert_eq!(
            new_flows,
            counters.new_flows,
            "service {}: backend new_flows must add up to the service's\n{}",
            svc.name,
            run.replay()
        );
    }
}

/// The conntrack and reverse NAT maps against the flows the model saw forwarded.
pub fn check_flow_maps(dp: &LoadedDatapath, model: &Model, run: &Run, track: &Tracker) {
    let key = |(src, sport, dst, dport, proto): &Flow5| FlowKey {
        src: addr_words(IpAddr::V4(*src)).1,
        dst: addr_words(IpAddr::V4(*dst)).1,
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto: *proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let want: HashMap<FlowKey, (u32, u32)> = track
        .flows
        .iter()
        .map(|(flow, state)| {
            let svc = model.services[state.service].id;
            (key(flow), (state.backend_id, svc))
        })
        .collect();
    let got: HashMap<FlowKey, (u32, u32)> = dp
        .datapath()
        .conntrack()
        .expect("reading conntrack")
        .into_iter()
        .map(|(k, f)| (k, (u32::from(f.backend_id), u32::from(f.service_id))))
        .collect();
    if got != want {
        let missing = want.keys().filter(|k| !got.contains_key(k)).count();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(k))
            .take(3)
            .collect();
        let wrong = want
            .iter()
            .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
            .count();
        panic!(
            "conntrack holds {} flows, the model {}: {missing} missing, {wrong} with another \
             backend or service, extra ones: {extra:?}\n{}",
            got.len(),
            want.len(),
            run.replay()
        );
    }
    // A new nat flow has a reply mapping of its own, or its backend's endpoint is claimed by
    // its backend id (replies then find the flow's embryonic entry through it).
    let claims: HashMap<([u32; 4], u16, u8), u32> =
        xlb::replyendpoints::ReplyEndpoints::open_pinned(dp.pin_path())
            .and_then(|e| e.claims())
            .expect("reading the reply endpoints")
            .into_iter()
            .map(|(k, id)| ((k.addr, k.port, k.proto), id))
            .collect();
    let got: HashMap<FlowKey, ([u32; 4], u16)> = dp
        .datapath()
        .rev_nat()
        .expect("reading reverse NAT")
        .into_iter()
        .map(|(k, r)| (k, (r.vip, r.vip_port)))
        .collect();
    let mut problems = Vec::new();
    let mut own = 0;
    for (reply, vip) in &track.rev_nat {
        let vip_words = addr_words(IpAddr::V4(*vip.ip())).1;
        let k = key(reply);
        match got.get(&k) {
            Some(v) if *v == (vip_words, vip.port().to_be()) => own += 1,
            Some(v) => problems.push(format!("{reply:?} maps to {v:?}, not {vip}")),
            None => {
                let forward = (reply.2, reply.3, *vip.ip(), vip.port(), reply.4);
                let backend_id = track.flows.get(&forward).map(|f| f.backend_id);
                let claimed = claims.get(&(k.src, k.src_port, k.proto)).copied();
                if backend_id.is_none() || claimed != backend_id {
                    problems.push(format!(
                        "{reply:?}: no mapping, endpoint claimed by {claimed:?}, flow's backend {backend_id:?}"
                    ));
                }
            }
        }
    }
    let extra = got.len() - own;
    assert!(
        problems.is_empty() && extra == 0,
        "reverse NAT holds {} entries ({extra} the model has not), the model {}: {:?}\n{}",
        got.len(),
        track.rev_nat.len(),
        &problems[..problems.len().min(3)],
        run.replay()
    );
}

/// The rewrite checker must catch a wrong rewrite (no BPF).
#[test]
fn rewrite_checker_catches_wrong_rewrites() {
    let client = sock([10, 99, 1, 2], 40000);
    let backend = sock([10, 99, 2, 11], 8080);
    for pkt in [
        Packet::tcp(client, SocketAddrV4::new(VIP1, 80)).with_payload(*b"abc"),
        Packet::udp(client, SocketAddrV4::new(VIP1, 53)).with_payload(*b"abcd"),
        Packet::udp(client, SocketAddrV4::new(VIP1, 53))
            .with_vlan(ETH_P_8021Q, 1)
            .with_padding(5),
    ] {
        let input = pkt.build();
        let Parsed::Ok(h) = parse(&input) else {
            panic!("fixture {pkt:?} does not parse");
        };
        let good = pkt.clone().with_dst(backend).build();
        assert_eq!(check_rewrite(&input, &good, &h, Side::Dst), Ok(backend));
        let bad = |at: usize| {
            let mut f = good.clone();
            f[at] ^= 0x01;
            f
        };
        for (what, out) in [
            ("IPv4 checksum", bad(h.l3 + IP_CSUM + 1)),
            ("L4 checksum", bad(h.l4_csum())),
            ("source address", bad(h.l3 + IP_SADDR)),
            ("TTL", bad(h.l3 + 8)),
            ("payload", bad(h.l4_end() - 1)),
            ("padding", bad(input.len() - 1)),
            ("length", good[..good.len() - 1].to_vec()),
        ] {
            assert!(
                check_rewrite(&input, &out, &h, Side::Dst).is_err(),
                "{what} went unnoticed"
            );
        }
        // A broken input checksum must come out as broken, not repaired.
        let mut broken = input.clone();
        broken[h.l4_csum()] ^= 0x10;
        assert!(check_rewrite(&broken, &good, &h, Side::Dst).is_err());
        let mut broken = input.clone();
        broken[h.l3 + IP_CSUM] ^= 0x10;
        assert!(check_rewrite(&broken, &good, &h, Side::Dst).is_err());
        // UDP without checksum: stays 0, and the rewrite must not invent one.
        if h.proto == PROTO_UDP {
            let none = pkt.clone().without_udp_checksum();
            let (input, good) = (none.build(), none.clone().with_dst(backend).build());
            assert_eq!(check_rewrite(&input, &good, &h, Side::Dst), Ok(backend));
            let invented = pkt.clone().with_dst(backend).build();
            assert!(check_rewrite(&input, &invented, &h, Side::Dst).is_err());
        }
    }
}
