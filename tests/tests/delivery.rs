//! Delivery to local containers under BPF_PROG_TEST_RUN: which target XDP leaves for TC in
//! the packet's metadata (the bridge, or the container's own veth once the agent has found
//! it), and what the TC balancer does with the frame. The netns side is in nat.rs.
//!
//! Needs root and BPF; each test has its own pinned copy of the data path.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    BACKEND_ALIVE, BACKEND_IN_USE, Backend, DELIVER_MAGIC, DELIVER_PEER_MAGIC, DeliverMeta, Reason,
    addr_words,
};
use xlb::reconcile::Maps as _;
use xlb_tests::testrun::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 8080);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
const BRIDGE: u32 = 71;
const VETH: u32 = 72;
const CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x63, 0x02, 0x0b];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x63, 0x02, 0x01];
/// TC_ACT_REDIRECT, what bpf_redirect_neigh and bpf_redirect_peer return on success.
const TC_ACT_REDIRECT: u32 = 7;

/// "web" with one backend on a local bridge; `veth` as the agent found it (0: not yet).
fn local_web(veth: u32) -> (LoadedDatapath, u32) {
    let mut dp = LoadedDatapath::new(&service_toml("web", WEB, "tcp", &[(BACKEND, 100)]));
    let id = dp.backend_id("web", BACKEND);
    let (family, addr) = addr_words((*BACKEND.ip()).into());
    let value = Backend {
        addr,
        port: BACKEND.port().to_be(),
        family,
        flags: BACKEND_IN_USE | BACKEND_ALIVE,
        service_id: dp.service_id("web"),
        deliver_ifindex: BRIDGE,
        port_ifindex: veth,
        mac: if veth == 0 { [0; 6] } else { CONTAINER_MAC },
        gateway_mac: if veth == 0 { [0; 6] } else { BRIDGE_MAC },
    };
    dp.datapath_mut()
        .set_backend(id, &value)
        .expect("writing the backend");
    (dp, id)
}

/// The delivery metadata XDP put in front of the frame, and the frame.
fn split_meta(data: &[u8]) -> (DeliverMeta, &[u8]) {
    let len = size_of::<DeliverMeta>();
    assert!(
        data.len() > len,
        "no room for metadata: {}",
        hexdump(data, 0)
    );
    let word = |at: usize| u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    let meta = DeliverMeta {
        magic: word(0),
        target: word(4),
    };
    (meta, &data[len..])
}

fn syn(port: u16) -> Packet {
    Packet::tcp(SocketAddrV4::new(CLIENT, port), WEB).with_tcp_flags(TCP_SYN)
}

#[test]
fn xdp_marks_the_bridge_until_the_containers_veth_is_known() {
    let (dp, _) = local_web(0);
    let before = dp.reasons();
    let out = dp.xdp(&syn(40000).build());
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    let (meta, frame) = split_meta(&out.data);
    assert_eq!((meta.magic, meta.target), (DELIVER_MAGIC, BRIDGE));
    assert_eq!(frame[..12], syn(40000).build()[..12], "XDP leaves the MACs");
    dp.reasons()
        .assert_moved(&before, &[(Reason::Forwarded, 1)], "to the bridge");
}

#[test]
fn xdp_marks_the_container_once_its_veth_is_known() {
    let (dp, id) = local_web(VETH);
    let before = dp.reasons();
    let out = dp.xdp(&syn(40001).build());
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    let (meta, frame) = split_meta(&out.data);
    // TC looks the backend up again and sets the MACs there.
    assert_eq!((meta.magic, meta.target), (DELIVER_PEER_MAGIC, id));
    assert_eq!(frame[..12], syn(40001).build()[..12]);
    let (l3, l4) = (syn(40001).l3_off(), syn(40001).l4_off());
    assert_eq!(
        SocketAddrV4::new(ipv4_at(frame, l3 + IP_DADDR), be16(frame, l4 + L4_DPORT)),
        BACKEND,
        "rewritten to the backend"
    );
    dp.reasons()
        .assert_moved(&before, &[(Reason::DeliveredPeer, 1)], "to the container");

    // A VLAN tag would reach the container's eth0 as it is: the bridge path drops it.
    let tagged = syn(40002).with_vlan(ETH_P_8021Q, 100).build();
    let (meta, _) = split_meta(&dp.xdp(&tagged).data);
    assert_eq!((meta.magic, meta.target), (DELIVER_MAGIC, BRIDGE));
}

#[test]
fn the_tc_balancer_hands_frames_to_the_container_with_its_macs() {
    let (dp, _) = local_web(VETH);
    let before = dp.reasons();
    let out = dp.tc_balance(&syn(40003).build());
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(out.data[..6], CONTAINER_MAC, "destination MAC");
    assert_eq!(out.data[6..12], BRIDGE_MAC, "source MAC");
    dp.reasons().assert_moved(
        &before,
        &[(Reason::DeliveredPeer, 1)],
        "TC to the container",
    );

    // Not found yet: through the bridge, MACs left for bpf_redirect_neigh to fill.
    let (dp, _) = local_web(0);
    let input = syn(40004).build();
    let out = dp.tc_balance(&input);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(out.data[..12], input[..12]);
}
