//! Fuzzing the data path (issue 6): random and mutated frames through BPF_PROG_TEST_RUN,
//! each judged by an independent reference model of the verdict table in
//! docs/architecture.md.
//!
//! XDP must answer every frame with XDP_PASS or XDP_DROP, the action of the verdict the model
//! gives it. It must leave every frame byte for byte as it came, unless the model calls it a
//! well-formed IPv4 TCP/UDP packet to the VIP:port of a service with backends: then only the
//! destination address and port (now one of that service's backends, the same one for every
//! packet of a flow) and the two checksums may change, and the checksums must stay right: a
//! correct one stays correct (exactly the value computed from scratch), a wrong one stays
//! exactly as wrong (the data path does not judge checksums, the kernel does), and a UDP
//! checksum of 0 stays 0. The verdict counters must move as the model says, checked once per
//! batch (a few map reads per batch instead of per packet); a batch that disagrees is
//! replayed packet by packet to name the culprit. The service and backend counters, and at
//! the end the conntrack and reverse NAT maps, must match the forwarded packets.
//!
//! TC egress gets replies of the flows XDP created, as they are or mutated, and random
//! frames: it must return -1 for every one and change only replies of known flows (source
//! back to the VIP, under the same checksum rules).
//!
//! `cargo test` runs a fixed-seed corpus of 100k frames (CI). The full run:
//! `XLB_FUZZ_PACKETS=1000000 cargo test --release -p xlb-tests --test fuzz -- --nocapture`;
//! `XLB_FUZZ_SEED` (decimal or 0x-hex) picks another corpus. A failure names the seed, the
//! frame's index and the frame itself (hex). An XDP frame depends on (seed, index) alone; a
//! TC frame also on the flows XDP created before it.
//!
//! modes.rs does the same without an exact model for fullnat, dsr and the TC balancer and
//! reply programs (see there).
//!
//! Needs root and BPF, like tests/datapath.rs.

mod checker;
mod generator;
mod judge6;
mod model;
mod model6;
mod modes;

#[allow(dead_code)]
#[path = "../support/checksums.rs"]
mod checksums;
#[path = "../support/routed.rs"]
mod routed;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use checker::{
    Run, Tally, Tracker, check_flow_maps, check_tc_frame, check_traffic_counters, check_xdp_frame,
    counter_problems, deltas, find_culprit,
};
use generator::{tc_frame, xdp_frame};
use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use model::Model;
use xlb_tests::testrun::*;

/// Frames of a `cargo test` run (CI); `XLB_FUZZ_PACKETS` overrides.
const DEFAULT_PACKETS: u64 = 100_000;
/// "xlb_fuzz"; `XLB_FUZZ_SEED` overrides.
const DEFAULT_SEED: u64 = 0x786c_625f_6675_7a7a;
/// XDP frames between two reads of the verdict counters.
const BATCH: u64 = 10_000;
/// TC egress frames per XDP frame.
const TC_SHARE: u64 = 4;
/// Frames stay well below what BPF_PROG_TEST_RUN takes without fragments (~3.5 KiB).
const MAX_FRAME: usize = 1600;
/// Below this many flows neither conntrack nor reverse NAT (262144 entries each) evicts, so
/// the new-flow counters and the maps themselves must match the model exactly.
const EXACT_FLOWS: usize = 200_000;
/// A UDP flow idle this long may have expired (30 s, last_seen refreshed once a second).
const UDP_MAYBE_EXPIRED: Duration = Duration::from_secs(28);

const VIP1: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 7);
/// Next to the VIPs, but no VIP.
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);
const PROTO_ICMP: u8 = 1;
/// A v6 VIP address without a service (put into the map directly), the destination of
/// `ipv6_tcp_syn`.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x6400, 0, 0, 0, 0, 0, 1);

/// The verdicts this corpus reaches: every XDP packet counts under exactly one. Its services
/// are in mode nat and the test namespace has no front NIC, so the fullnat/dsr verdicts and
/// XDP's own sends (tx, redirected, handed_to_tc) must stay at zero like the events.
const VERDICTS: [Reason; 14] = [
    Reason::PassNotIp,
    Reason::PassIpv6,
    Reason::PassNotL4,
    Reason::PassNotVip,
    Reason::PassFragment,
    Reason::PassMalformed,
    Reason::DropMalformed,
    Reason::DropFragment,
    Reason::DropIpOptions,
    Reason::DropNoBackend,
    Reason::Forwarded,
    Reason::IcmpEcho,
    Reason::PassIcmp,
    Reason::DropExtHeaders,
];

fn is_drop(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DropMalformed
            | Reason::DropFragment
            | Reason::DropIpOptions
            | Reason::DropNoBackend
            | Reason::DropExtHeaders
    )
}

fn sock(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

/// (name, VIP, protocol, [(backend, weight)])
type ServiceSpec = (&'static str, SocketAddrV4, u8, Vec<(SocketAddrV4, u32)>);

/// Services: TCP and UDP on two VIP addresses, several backends each (backend address:port
/// sets are disjoint, so a reply 5-tuple belongs to one flow), and one without backends.
fn services() -> Vec<ServiceSpec> {
    let three = |port| {
        (11..=13)
            .map(|h| (sock([10, 99, 2, h], port), 100))
            .collect::<Vec<_>>()
    };
    vec![
        ("web", SocketAddrV4::new(VIP1, 80), PROTO_TCP, three(8080)),
        ("dns", SocketAddrV4::new(VIP1, 53), PROTO_UDP, three(5353)),
        (
            "tls",
            SocketAddrV4::new(VIP2, 443),
            PROTO_TCP,
            vec![
                (sock([10, 99, 3, 21], 8443), 100),
                (sock([10, 99, 3, 22], 8443), 50),
            ],
        ),
        (
            "quic",
            SocketAddrV4::new(VIP2, 443),
            PROTO_UDP,
            vec![
                (sock([10, 99, 3, 21], 4433), 100),
                (sock([10, 99, 3, 22], 4433), 100),
            ],
        ),
        ("empty", SocketAddrV4::new(VIP1, 8443), PROTO_TCP, vec![]),
    ]
}

fn services_toml() -> String {
    services()
        .into_iter()
        .map(|(name, vip, proto, backends)| {
            let proto = if proto == PROTO_TCP { "tcp" } else { "udp" };
            service_toml(name, vip, proto, &backends)
        })
        .collect()
}

/// (source, source port, destination, destination port, protocol)
type Flow5 = (Ipv4Addr, u16, Ipv4Addr, u16, u8);

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn xdp_and_tc_egress_survive_random_and_mutated_frames() {
    let run = Run::from_env();
    println!(
        "xlb fuzz: {} XDP frames, about {} TC egress frames, seed {:#x}\n{}",
        run.packets,
        run.packets / TC_SHARE,
        run.seed,
        run.replay()
    );
    let mut dp = LoadedDatapath::new(&services_toml());
    dp.add_vip_addr(VIP6.into());
    let model = Model::applied(&dp);
    let mut track = Tracker {
        services: vec![Tally::default(); model.services.len()],
        ..Default::default()
    };
    let events: Vec<Reason> = Reason::ALL
        .into_iter()
        .filter(|r| !VERDICTS.contains(r))
        .collect();
    let started = Instant::now();

    let mut start = 0;
    while start < run.packets {
        let end = (start + BATCH).min(run.packets);

        // XDP: every frame checked on its own, the verdict counters per batch.
        let before = dp.reasons();
        let histogram_before = track.verdicts;
        let mut frames = Vec::with_capacity((end - start) as usize);
        for index in start..end {
            let frame = xdp_frame(run.seed, index, &model);
            check_xdp_frame(&dp, &model, &run, &mut track, index, &frame);
            frames.push((index, frame));
        }
        let moved = deltas(&before, &dp.reasons());
        let want: Vec<u64> = Reason::ALL
            .iter()
            .map(|r| track.verdicts[*r as usize] - histogram_before[*r as usize])
            .collect();
        let problems = counter_problems(&moved, &want);
        if !problems.is_empty() {
            find_culprit(&dp, &model, &run, &frames);
            panic!(
                "XDP frames {start}..{end}: the counters disagree with the model, but no single \
                 frame does when replayed:{problems}\n{}",
                run.replay()
            );
        }
        drop(frames);

        // TC egress, replies of the flows so far among them: only rev_nat may move.
        let before = dp.reasons();
        let rewritten_before = track.tc_rewritten;
        for index in start / TC_SHARE..end / TC_SHARE {
            let frame = tc_frame(run.seed, index, &model, &track.replies);
            check_tc_frame(&dp, &run, &mut track, index, &frame);
        }
        let moved = deltas(&before, &dp.reasons());
        let mut want = [0; Reason::COUNT as usize];
        want[Reason::RevNat as usize] = track.tc_rewritten - rewritten_before;
        let problems = counter_problems(&moved, &want);
        assert!(
            problems.is_empty(),
            "TC egress frames {}..{}: counters:{problems}\n{}",
            start / TC_SHARE,
            end / TC_SHARE,
            run.replay()
        );

        check_traffic_counters(&dp, &model, &run, &track);
        start = end;
    }

    // The totals: every XDP frame under exactly one verdict, and no event but rev_nat.
    let reasons = dp.reasons();
    let verdicts: u64 = VERDICTS.iter().map(|r| reasons.get(*r)).sum();
    assert_eq!(
        verdicts,
        run.packets,
        "the verdict counters add up to {verdicts}, not the {} frames run\n{}",
        run.packets,
        run.replay()
    );
    for r in &events {
        let want = match r {
            Reason::RevNat => track.tc_rewritten,
            Reason::Promoted | Reason::IcmpToBackend => track.verdicts[*r as usize],
            _ => 0,
        };
        assert_eq!(reasons.get(*r), want, "{}\n{}", r.name(), run.replay());
    }
    let forwarded: u64 = model
        .services
        .iter()
        .map(|s| dp.service_counters(s.id).packets)
        .sum();
    // ICMP errors a backend gets are forwarded too, but are no traffic of its service.
    assert_eq!(
        forwarded,
        reasons.get(Reason::Forwarded) - reasons.get(Reason::IcmpToBackend),
        "service packet counters vs forwarded\n{}",
        run.replay()
    );
    if track.exact() {
        check_flow_maps(&dp, &model, &run, &track);
    }

    let elapsed = started.elapsed();
    let mut summary = String::new();
    for r in VERDICTS {
        let _ = write!(summary, "\n  {:<15} {:>9}", r.name(), reasons.get(r));
    }
    println!(
        "xlb fuzz: {} XDP frames in {elapsed:.1?} ({:.0}/s), verdicts:{summary}\n  \
         {} flows; TC egress: {} frames, {} rewritten, {} refused by the kernel (too short)\n  \
         rewrites with a wrong IPv4 checksum {}, a wrong L4 checksum {}, UDP without one {}",
        run.packets,
        run.packets as f64 / elapsed.as_secs_f64(),
        track.flows.len(),
        track.tc_packets,
        track.tc_rewritten,
        track.tc_refused,
        track.odd_checksums[0],
        track.odd_checksums[1],
        track.odd_checksums[2]
    );
    // The corpus must reach every verdict, or the generator has gone blind somewhere.
    if run.packets >= 10_000 {
        for r in VERDICTS {
            assert!(reasons.get(r) > 0, "the corpus never hit {}", r.name());
        }
        assert!(track.tc_rewritten > 0, "TC egress never saw a known reply");
        for event in [Reason::Promoted, Reason::IcmpToBackend] {
            assert!(
                reasons.get(event) > 0,
                "the corpus never caused {}",
                event.name()
            );
        }
        assert!(
            track.odd_checksums.iter().all(|n| *n > 0),
            "the corpus missed a checksum corner case: {:?}",
            track.odd_checksums
        );
    }
}
