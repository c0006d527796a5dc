//! State changes are atomic for the data path: a packet reads one service's value and one
//! backend's value, never a mix of two versions or another service's. Under
//! BPF_PROG_TEST_RUN with maps pinned under a private directory.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData};
use lb_common::{Backend, DoubleBuffer, Reason, Service};
use xlb::{
    datapath::{self, Datapath},
    mapped::MappedArray,
    reconcile::{AllAlive, Maps as _, Reconciler, vip_key},
};
use xlb_tests::testrun::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const API: SocketAddrV4 = SocketAddrV4::new(VIP, 81);

fn backend(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, last), port)
}

fn web_and_api(web: &[u8], api: &[u8]) -> String {
    let list = |lasts: &[u8], port| -> Vec<(SocketAddrV4, u32)> {
        lasts.iter().map(|l| (backend(*l, port), 100)).collect()
    };
    service_toml("web", WEB, "tcp", &list(web, 8080))
        + &service_toml("api", API, "tcp", &list(api, 9090))
}

fn syn(port: u16, to: SocketAddrV4) -> Packet {
    Packet::tcp(SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), port), to).with_tcp_flags(TCP_SYN)
}

/// Where XDP sent the packet: (action, destination).
fn sent(dp: &LoadedDatapath, pkt: &Packet) -> (u32, SocketAddrV4) {
    let out = dp.xdp(&pkt.build());
    let dst = SocketAddrV4::new(
        ipv4_at(&out.data, pkt.l3_off() + IP_DADDR),
        be16(&out.data, pkt.l4_off() + L4_DPORT),
    );
    (out.action, dst)
}

fn mapped<T: Copy>(dp: &LoadedDatapath, name: &str) -> MappedArray<DoubleBuffer<T>> {
    let data = MapData::from_pin(dp.pin_path().join(name)).expect("pinned map");
    MappedArray::map(Map::Array(data), name).expect("mmap")
}

#[test]
fn a_ring_slot_naming_another_services_backend_is_not_followed() {
    let mut dp = LoadedDatapath::new(&web_and_api(&[11, 12], &[21]));
    let web = dp.datapath().service(dp.service_id("web")).unwrap();
    let stranger = dp.backend_id("api", backend(21, 9090));
    let ring = vec![stranger; web.table_size as usize];
    dp.datapath_mut().grace_period().unwrap();
    dp.datapath_mut()
        .write_ring(web.ring_offset, &ring)
        .unwrap();
    let before = dp.reasons();
    let (action, dst) = sent(&dp, &syn(40000, WEB));
    assert_eq!(
        (action, dst.ip()),
        (XDP_DROP, &VIP),
        "sent to {dst}, a backend of another service"
    );
    dp.reasons()
        .assert_moved(&before, &[(Reason::DropNoBackend, 1)], "foreign slot");
}

#[test]
fn a_vip_entry_leading_to_another_services_slot_is_not_balanced() {
    // The kernel reuses a replaced VIP map element at once; a packet holding it then reads
    // another VIP's service id. The slot's own VIP tells them apart.
    let mut dp = LoadedDatapath::new(&web_and_api(&[11, 12], &[21]));
    let api_id = dp.service_id("api");
    let web_key = vip_key(&desired_state(&web_and_api(&[11], &[21])).services["web"]);
    dp.datapath_mut().insert_vip(&web_key, api_id).unwrap();
    let before = dp.reasons();
    let (action, dst) = sent(&dp, &syn(40001, WEB));
    assert_eq!(
        (action, dst),
        (XDP_PASS, WEB),
        "balanced through api's slot"
    );
    dp.reasons()
        .assert_moved(&before, &[(Reason::PassNotVip, 1)], "foreign VIP entry");
}

#[test]
fn packets_read_the_current_copy_never_the_idle_one() {
    let dp = LoadedDatapath::new(&web_and_api(&[11], &[21]));
    let web_id = dp.service_id("web");
    let a = dp.backend_id("web", backend(11, 8080));
    let mut services = mapped::<Service>(&dp, datapath::SERVICES);
    let mut backends = mapped::<Backend>(&dp, datapath::BACKENDS);
    // Garbage in the idle copies, as while the agent writes them.
    let slot = &mut services.as_mut_slice()[web_id as usize];
    let idle = (slot.active & 1 ^ 1) as usize;
    slot.halves[idle].table_size = 7;
    slot.halves[idle].ring_offset = 12345;
    slot.halves[idle].mode = 9;
    let slot = &mut backends.as_mut_slice()[a as usize];
    let idle = (slot.active & 1 ^ 1) as usize;
    slot.halves[idle].addr = [u32::from_ne_bytes([10, 99, 9, 9]), 0, 0, 0];
    slot.halves[idle].flags = 0;
    for port in 40000..40050 {
        assert_eq!(sent(&dp, &syn(port, WEB)), (XDP_PASS, backend(11, 8080)));
    }
}

/// Backends and tables change as fast as the agent can apply while packets flow on the
/// other CPU: every packet goes to a backend its service has in one of the states, none is
/// dropped, none reaches the other service's backends.
#[test]
fn flips_under_traffic_never_misroute_or_drop() {
    // Different table sizes move the rings around, too.
    let sized = |web: &[u8], api: &[u8], table: u32| {
        web_and_api(web, api).replace(
            "mode = \"nat\"\n",
            &format!("mode = \"nat\"\ntable_size = {table}\n"),
        )
    };
    let states = [
        sized(&[11, 12], &[21, 22], 101),
        sized(&[12, 13], &[22, 23], 211),
        sized(&[11, 13, 14], &[21, 23], 65537),
    ];
    let dp = LoadedDatapath::new(&states[0]);
    let web_backends: Vec<SocketAddrV4> = [11, 12, 13, 14].map(|l| backend(l, 8080)).into();
    let api_backends: Vec<SocketAddrV4> = [21, 22, 23].map(|l| backend(l, 9090)).into();

    let done = AtomicBool::new(false);
    let pin_path = dp.pin_path().to_path_buf();
    let flips = std::thread::scope(|scope| {
        let flipper = scope.spawn(|| {
            let mut maps = Datapath::open_pinned(&pin_path).expect("pinned maps");
            let mut rec = Reconciler::adopt(&maps).expect("adopt");
            let mut flips = 0;
            while !done.load(Ordering::Relaxed) {
                let desired = desired_state(&states[flips % states.len()]);
                let changes = rec.apply(&mut maps, &desired, &AllAlive).expect("apply");
                assert!(changes.failed.is_empty(), "{changes:?}");
                flips += 1;
            }
            flips
        });
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut port = 1024u16;
        let mut sent_packets = 0;
        while Instant::now() < deadline && sent_packets < 200_000 {
            for (to, allowed) in [(WEB, &web_backends), (API, &api_backends)] {
                let (action, dst) = sent(&dp, &syn(port, to));
                assert_eq!(action, XDP_PASS, "packet {sent_packets} to {to} dropped");
                assert!(
                    allowed.contains(&dst),
                    "packet {sent_packets} to {to} went to {dst}"
                );
                sent_packets += 1;
            }
            port = port.wrapping_add(1).max(1024);
        }
        done.store(true, Ordering::Relaxed);
        flipper.join().expect("flipper")
    });
    assert!(flips >= 20, "only {flips} applies ran during the traffic");
}
