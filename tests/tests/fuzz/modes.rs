//! Every mode and program beside XDP in mode nat: services in fullnat and dsr (IPIP and GUE),
//! fullnat over IPv6 on the generator's v6 VIP (its frames judged by judge6.rs),
//! XDP over random and mutated frames and over replies of the fullnat flows it opened, the
//! TC egress and TC reply programs over what XDP sent, and the TC balancer over the same
//! frames with the nat services of main.rs. There is no exact model of these paths here; what
//! each frame must meet:
//! - a valid action (XDP: PASS, DROP, TX, REDIRECT; TC: OK, SHOT, REDIRECT or next);
//! - left byte for byte as it came, or rewritten into something well formed: a TCP/UDP packet
//!   of the same layout where only MACs, TTL, addresses, ports and checksums changed and the
//!   checksums stay as right (checked with etherparse) or as wrong as they were; the packet
//!   as it came inside an outer IPv4 (IPIP or GUE) header with a right checksum and lengths;
//!   or an ICMP message with right checksums;
//! - every XDP and TC balancer frame counted under exactly one verdict (docs/architecture.md,
//!   "Verdicts"); TC egress moves event counters only.
use std::net::SocketAddrV4;

use lb_common::{GUE_PORT, PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

use super::{
    Flow5, PROTO_ICMP, ServiceSpec, VIP1, VIP2, VIP6,
    checker::{Run, counter_problems, deltas},
    checksums::checksum_problem,
    generator::{Frame, frame_among, kernel_refuses_skb, xdp_frame},
    judge6,
    model::{Headers, Model, Parsed, get16, ip_checksum, l4_checksum, parse, scratch_checksums},
    routed::{HOSTS, HOSTS6, routed_namespace},
    services_toml,
};

/// Frames per program in `cargo test`; `XLB_FUZZ_PACKETS` (divided by 4) overrides.
const MODE_PACKETS: u64 = 20_000;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Counters that are events, not verdicts (docs/architecture.md).
const EVENTS: [Reason; 8] = [
    Reason::Rehashed,
    Reason::ConntrackFull,
    Reason::Promoted,
    Reason::IcmpToBackend,
    Reason::RevNat,
    Reason::RevNatError,
    Reason::RevSnat,
    Reason::DeliverError,
];

fn hosts(port: u16) -> Vec<(SocketAddrV4, u32)> {
    HOSTS
        .iter()
        .map(|h| (SocketAddrV4::new(*h, port), 100))
        .collect()
}

/// The services of main.rs in other modes, on the hosts of the routed namespace.
fn mode_services() -> Vec<(ServiceSpec, &'static str)> {
    vec![
        (
            ("web", SocketAddrV4::new(VIP1, 80), PROTO_TCP, hosts(8080)),
            "fullnat",
        ),
        (
            ("dns", SocketAddrV4::new(VIP1, 53), PROTO_UDP, hosts(53)),
            "dsr",
        ),
        (
            ("tls", SocketAddrV4::new(VIP2, 443), PROTO_TCP, hosts(443)),
            "dsr\"\nencap = \"gue",
        ),
        (
            ("quic", SocketAddrV4::new(VIP2, 443), PROTO_UDP, hosts(4433)),
            "fullnat",
        ),
        (
            ("empty", SocketAddrV4::new(VIP1, 8443), PROTO_TCP, vec![]),
            "fullnat",
        ),
    ]
}

fn mode_toml() -> String {
    let v4: String = mode_services()
        .into_iter()
        .map(|((name, vip, proto, backends), mode)| {
            let proto = if proto == PROTO_TCP { "tcp" } else { "udp" };
            service_toml(name, vip, proto, &backends)
                .replace("mode = \"nat\"", &format!("mode = \"{mode}\""))
        })
        .collect();
    // fullnat over IPv6 on the generator's v6 VIP (no model: judged by judge6.rs).
    let v6: String = [("web6", 80, "tcp", 8080), ("dns6", 53, "udp", 53)]
        .into_iter()
        .map(|(name, port, proto, backend_port)| {
            let backends: Vec<(std::net::SocketAddr, u32)> = HOSTS6
                .iter()
                .map(|h| (std::net::SocketAddr::new((*h).into(), backend_port), 100))
                .collect();
            let vip = std::net::SocketAddr::new(VIP6.into(), port);
            service_toml(name, vip, proto, &backends)
                .replace("mode = \"nat\"", "mode = \"fullnat\"")
        })
        .collect();
    v4 + &v6
}

/// What a program did to a frame, judged well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Untouched,
    Rewritten,
    Encapsulated,
    Icmp,
}

/// Each checksum of `out` as right as in `input` (exactly the from-scratch value), or off by
/// the same sum; a UDP checksum of 0 stays 0 and none becomes 0.
fn sums_kept(input: &[u8], out: &[u8], h: &Headers) -> Result<(), String> {
    if ip_checksum(input, h) != ip_checksum(out, h) {
        return Err("the IPv4 header checksum no longer sums as before".into());
    }
    let (l4_in, l4_out) = (be16(input, h.l4_csum()), be16(out, h.l4_csum()));
    if h.proto == PROTO_UDP && (l4_in == 0) != (l4_out == 0) {
        return Err(format!("UDP checksum {l4_in:#06x} -> {l4_out:#06x}"));
    }
    if !(h.proto == PROTO_UDP && l4_in == 0) && l4_checksum(input, h) != l4_checksum(out, h) {
        return Err("the L4 checksum no longer sums as before".into());
    }
    let (ip_ok, l4_ok) = scratch_checksums(input, h);
    let right = be16(input, h.l3 + IP_CSUM) == ip_ok && (l4_in == l4_ok || l4_in == 0);
    if right {
        let (ip, l4) = scratch_checksums(out, h);
        let l4_out_ok = l4_out == l4 || (h.proto == PROTO_UDP && l4_out == 0);
        if be16(out, h.l3 + IP_CSUM) != ip || !l4_out_ok {
            return Err(format!(
                "right checksums went wrong: want {ip:#06x} {l4:#06x}"
            ));
        }
        // etherparse too, unless a reserved bit is set: it drops the IPv4 one and TCP's.
        let tcp_reserved = h.proto == PROTO_TCP && out[h.l4() + TCP_DOFF] & 0x0e != 0;
        if out[h.l3 + 6] & 0x80 == 0 && !tcp_reserved {
            checksum_problem(out, h.l3).map_err(|e| format!("right checksums went wrong: {e}"))?;
        }
    }
    Ok(())
}

/// A rewrite of a TCP/UDP packet in place: only MACs, TTL, addresses, ports, checksums.
fn same_layout(input: &[u8], out: &[u8], h: &Headers) -> Result<Done, String> {
    let mut expect = input.to_vec();
    let fields = [
        (0, 12),
        (h.l3 + 8, 1),
        (h.l3 + IP_CSUM, 10),
        (h.l4(), 4),
        (h.l4_csum(), 2),
    ];
    for (off, n) in fields {
        expect[off..off + n].copy_from_slice(&out[off..off + n]);
    }
    if let Some(at) = expect.iter().zip(out).position(|(a, b)| a != b) {
        return Err(format!("byte {at} changed, which no rewrite may change"));
    }
    let ttl = (input[h.l3 + 8], out[h.l3 + 8]);
    if ttl.0 != ttl.1 && ttl.0.wrapping_sub(1) != ttl.1 {
        return Err(format!("TTL {} -> {}", ttl.0, ttl.1));
    }
    sums_kept(input, out, h)?;
    Ok(Done::Rewritten)
}

/// The IPv4 header at `o` of `out`: sound, with a right checksum; returns (IHL, total length).
fn sound_ipv4(out: &[u8], o: usize) -> Result<(usize, usize), String> {
    let (ip, _) = etherparse::Ipv4Header::from_slice(out.get(o..).unwrap_or_default())
        .map_err(|e| format!("the IPv4 header it wrote at {o} is bad: {e}"))?;
    // RFC 1071 over the bytes (etherparse would drop the reserved flag bit).
    if checksum(&[&out[o..o + ip.header_len()]]) != 0 {
        return Err(format!(
            "the IPv4 header it wrote at {o} has a wrong checksum"
        ));
    }
    let tot = usize::from(ip.total_len);
    if o + tot > out.len() {
        return Err(format!(
            "the IPv4 header it wrote at {o} claims {tot} bytes, past the frame"
        ));
    }
    Ok((ip.header_len(), tot))
}

/// The IPv4 header at `o` of `out`, as written.
fn out_l3(out: &[u8], candidates: &[usize]) -> Result<usize, String> {
    candidates
        .iter()
        .copied()
        .find(|o| get16(out, o - 2) == Some(ETH_P_IP) && out.get(*o).is_some_and(|b| b >> 4 == 4))
        .ok_or_else(|| "the output has no IPv4 header where one belongs".to_string())
}

/// `inner` (an IPv4 packet as it came) in an outer IPIP or GUE header.
fn encapsulated(inner: &[u8], out: &[u8], l3: usize) -> Result<Done, String> {
    let o = out_l3(out, &[14, l3])?;
    let (ihl, tot) = sound_ipv4(out, o)?;
    let at = match out[o + 9] {
        4 => o + ihl,
        PROTO_UDP if get16(out, o + ihl + 2) == Some(GUE_PORT) => {
            let udp_len = usize::from(be16(out, o + ihl + 4));
            if udp_len != 8 + inner.len() {
                return Err(format!(
                    "GUE UDP length {udp_len}, the inner packet is {}",
                    inner.len()
                ));
            }
            o + ihl + 8
        }
        p => {
            return Err(format!(
                "longer output with outer protocol {p}, no encapsulation"
            ));
        }
    };
    if tot != at - o + inner.len() || out.get(at..at + inner.len()) != Some(inner) {
        return Err("the encapsulated packet is not the one that came, or the lengths lie".into());
    }
    Ok(Done::Encapsulated)
}

/// An ICMP message at `o`: sound IPv4 and a right ICMP checksum, unless `input_wrong`
/// (a message rewritten in place keeps the sums it had).
fn icmp_message(input: &[u8], out: &[u8], l3: usize) -> Result<Done, String> {
    let o = out_l3(out, &[14, l3])?;
    if out[o + 9] != PROTO_ICMP {
        return Err(format!("rewritten into protocol {}", out[o + 9]));
    }
    let sum = |f: &[u8], o: usize| -> Option<(u16, u16)> {
        let ihl = usize::from(f.get(o)? & 0xf) * 4;
        let tot = usize::from(get16(f, o + 2)?);
        Some((
            checksum(&[f.get(o..o + ihl)?]),
            checksum(&[f.get(o + ihl..o + tot)?]),
        ))
    };
    let before = sum(input, l3);
    if before == Some((0, 0)) || o != l3 || out.len() != input.len() {
        // It came right (or is new): it must be right.
        let (ihl, tot) = sound_ipv4(out, o)?;
        if checksum(&[&out[o + ihl..o + tot]]) != 0 {
            return Err("the ICMP checksum it wrote is wrong".into());
        }
    } else if before != sum(out, o) {
        return Err("an ICMP message rewritten in place no longer sums as before".into());
    }
    Ok(Done::Icmp)
}

/// Judges what a program made of `input`.
fn judge(input: &[u8], out: &[u8]) -> Result<Done, String> {
    if out == input {
        return Ok(Done::Untouched);
    }
    if let Some(l3) = judge6::ipv6_l3(input) {
        return match judge6::judge6(input, out, l3)? {
            true => Ok(Done::Rewritten),
            false => Ok(Done::Icmp),
        };
    }
    // A frame answered with ICMP (echo, fragmentation needed) or an ICMP error sent on.
    let icmp_out = |l3| {
        out_l3(out, &[14, l3]).is_ok_and(|o| out.get(o + 9) == Some(&PROTO_ICMP))
            && !(out.len() > input.len() && out.get(14 + 9) == Some(&4))
    };
    match parse(input) {
        Parsed::Ok(h) if out.len() == input.len() && !icmp_out(h.l3) => same_layout(input, out, &h),
        Parsed::Ok(h) if out.len() > input.len() => {
            encapsulated(&input[h.l3..h.l3 + h.tot_len], out, h.l3)
        }
        Parsed::Ok(h) => icmp_message(input, out, h.l3),
        Parsed::NotL4(l3) if input[l3 + 9] == PROTO_ICMP => {
            if out.len() > input.len() && !icmp_out(l3) {
                let tot = usize::from(be16(input, l3 + 2));
                return encapsulated(&input[l3..l3 + tot], out, l3);
            }
            icmp_message(input, out, l3)
        }
        p => Err(format!("changed a frame it must leave alone ({p:?})")),
    }
}

fn verdicts_moved(moved: &[u64]) -> u64 {
    Reason::ALL
        .iter()
        .filter(|r| !EVENTS.contains(r))
        .map(|r| moved[*r as usize])
        .sum()
}

struct Tally {
    done: [u64; 4],
}

impl Tally {
    fn add(&mut self, d: Done) {
        self.done[d as usize] += 1;
    }
}

fn check(
    run: &Run,
    what: &str,
    index: u64,
    frame: &Frame,
    action: u32,
    ok: &[u32],
    out: Vec<u8>,
) -> Done {
    if !ok.contains(&action) {
        run.fail(
            what,
            index,
            frame,
            Some(&out),
            &format!("returned {action:#x}, not one of {ok:x?}"),
        );
    }
    let out = strip_delivery_meta(out);
    judge(&frame.bytes, &out).unwrap_or_else(|e| run.fail(what, index, frame, Some(&out), &e))
}

#[test]
fn every_mode_and_tc_program_survives_random_and_mutated_frames() {
    let run = Run::from_env();
    let packets = if std::env::var_os("XLB_FUZZ_PACKETS").is_some() {
        run.packets / 4
    } else {
        MODE_PACKETS
    };
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&mode_toml());
    let model = Model::applied_from(&dp, mode_services().into_iter().map(|(s, _)| s).collect());
    let xdp_ok = [XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT];
    let mut xdp = Tally { done: [0; 4] };
    let mut egress = Tally { done: [0; 4] };
    // (backend, port, SNAT address, port, protocol) of the fullnat flows XDP opened.
    let mut replies: Vec<Flow5> = Vec::new();
    let mut v6_rewritten = 0;
    let before = dp.reasons();
    for index in 0..packets {
        let frame = frame_among(run.seed, 3, index, &model, &replies);
        let r = dp.xdp(&frame.bytes);
        let done = check(
            &run,
            "XDP (modes)",
            index,
            &frame,
            r.action,
            &xdp_ok,
            r.data.clone(),
        );
        xdp.add(done);
        if done == Done::Rewritten && judge6::ipv6_l3(&frame.bytes).is_some() {
            v6_rewritten += 1;
        }
        let out = strip_delivery_meta(r.data);
        if done == Done::Rewritten
            && replies.len() < 4096
            && let Parsed::Ok(h) = parse(&out)
            && HOSTS.contains(&h.dst)
        {
            replies.push((h.dst, h.dport, h.src, h.sport, h.proto));
        }
        // What XDP let through meets TC egress as it leaves.
        if r.action == XDP_PASS && !kernel_refuses_skb(&out) {
            let e = dp.tc_egress(&out);
            let frame = Frame::of(out.clone(), "the output of XDP");
            egress.add(check(
                &run,
                "TC egress (modes)",
                index,
                &frame,
                e.action,
                &[TC_ACT_UNSPEC],
                e.data,
            ));
        }
    }
    let moved = deltas(&before, &dp.reasons());
    assert_eq!(
        verdicts_moved(&moved),
        packets,
        "XDP frames counted under {} verdicts, not one each:{}\n{}",
        verdicts_moved(&moved),
        counter_problems(&moved, &[0; Reason::COUNT as usize]),
        run.replay()
    );
    println!(
        "xlb fuzz (modes): XDP {:?} (untouched, rewritten, encapsulated, ICMP; {v6_rewritten} \
         of them v6 rewrites), TC egress {:?}, {} fullnat flows",
        xdp.done,
        egress.done,
        replies.len()
    );
    for (name, n) in [("rewritten", 1), ("encapsulated", 2), ("ICMP", 3)] {
        assert!(
            xdp.done[n] > 0,
            "XDP never {name} a frame: the corpus went blind"
        );
    }
    assert!(
        moved[Reason::RevSnat as usize] > 0,
        "no fullnat reply was translated back"
    );
    assert!(
        moved[Reason::HandedToTc as usize] > 0,
        "nothing was handed to TC"
    );
    assert!(v6_rewritten > 0, "no v6 frame went through fullnat over v6");
}

#[test]
fn the_tc_balancer_and_tc_reply_survive_random_and_mutated_frames() {
    let run = Run::from_env();
    let packets = MODE_PACKETS;
    let dp = LoadedDatapath::new(&services_toml());
    let model = Model::applied(&dp);
    let tc_ok = [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT, TC_ACT_UNSPEC];
    let mut balance = Tally { done: [0; 4] };
    // Replies (backend -> client) of the flows the balancer forwarded.
    let mut replies: Vec<Flow5> = Vec::new();
    let before = dp.reasons();
    let mut ran = 0;
    for index in 0..packets {
        let frame = xdp_frame(run.seed ^ 0x7c, index, &model);
        if kernel_refuses_skb(&frame.bytes) {
            continue;
        }
        let r = dp.tc_balance(&frame.bytes);
        let done = check(
            &run,
            "TC balancer",
            index,
            &frame,
            r.action,
            &tc_ok,
            r.data.clone(),
        );
        balance.add(done);
        if done == Done::Rewritten
            && replies.len() < 4096
            && let Parsed::Ok(h) = parse(&r.data)
        {
            replies.push((h.dst, h.dport, h.src, h.sport, h.proto));
        }
        ran += 1;
    }
    let moved = deltas(&before, &dp.reasons());
    assert_eq!(
        verdicts_moved(&moved),
        ran,
        "TC balancer frames counted under {} verdicts, not one each:{}\n{}",
        verdicts_moved(&moved),
        counter_problems(&moved, &[0; Reason::COUNT as usize]),
        run.replay()
    );

    // TC reply (a container bridge's ingress): replies of those flows and anything else; it
    // moves event counters only.
    let mut reply = Tally { done: [0; 4] };
    let before = dp.reasons();
    for index in 0..packets / 2 {
        let frame = frame_among(run.seed, 4, index, &model, &replies);
        if kernel_refuses_skb(&frame.bytes) {
            continue;
        }
        let r = dp.tc_reply(&frame.bytes);
        reply.add(check(
            &run, "TC reply", index, &frame, r.action, &tc_ok, r.data,
        ));
    }
    let moved = deltas(&before, &dp.reasons());
    assert_eq!(
        verdicts_moved(&moved),
        0,
        "TC reply moved verdicts:{}\n{}",
        counter_problems(&moved, &[0; Reason::COUNT as usize]),
        run.replay()
    );
    println!(
        "xlb fuzz (TC): balancer {:?}, reply {:?} (untouched, rewritten, encapsulated, ICMP)",
        balance.done, reply.done
    );
    assert!(
        balance.done[Done::Rewritten as usize] > 0,
        "the TC balancer never forwarded"
    );
    assert!(
        reply.done[Done::Rewritten as usize] > 0,
        "TC reply never translated a reply"
    );
}

/// The judge must be able to fail: wrong rewrites of each kind are caught.
#[test]
fn the_mode_judge_catches_wrong_rewrites() {
    let client = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 99, 1, 2), 40000);
    let input = Packet::tcp(client, SocketAddrV4::new(VIP1, 80))
        .with_payload(&b"GET /\n"[..])
        .build();
    let Parsed::Ok(h) = parse(&input) else {
        panic!("fixture does not parse")
    };
    assert_eq!(judge(&input, &input), Ok(Done::Untouched));
    // A destination rewrite with both checksums made right again is fine.
    let mut out = input.clone();
    out[h.l3 + IP_DADDR..h.l3 + IP_DADDR + 4].copy_from_slice(&HOSTS[0].octets());
    let (ip, l4) = scratch_checksums(&out, &h);
    put_be16(&mut out, h.l3 + IP_CSUM, ip);
    put_be16(&mut out, h.l4_csum(), l4);
    assert_eq!(judge(&input, &out), Ok(Done::Rewritten));
    // The same without the L4 checksum update, or a payload byte changed: caught.
    let mut stale = out.clone();
    put_be16(&mut stale, h.l4_csum(), be16(&input, h.l4_csum()));
    assert!(judge(&input, &stale).is_err());
    let mut payload = out.clone();
    *payload.last_mut().unwrap() ^= 1;
    assert!(judge(&input, &payload).is_err());
    // IPIP around the packet as it came: fine; with a wrong outer checksum or inner byte: caught.
    let inner = &input[h.l3..h.l3 + h.tot_len];
    let outer = Packet::other(std::net::Ipv4Addr::new(10, 99, 4, 1), HOSTS[0], 4)
        .with_payload(inner.to_vec())
        .build();
    assert_eq!(judge(&input, &outer), Ok(Done::Encapsulated));
    let mut bad = outer.clone();
    bad[14 + IP_CSUM] ^= 1;
    assert!(judge(&input, &bad).is_err());
    let mut bad = outer.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(judge(&input, &bad).is_err());
}
