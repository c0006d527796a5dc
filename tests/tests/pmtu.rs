//! Path MTU discovery through the LB, end to end: the client sits behind a router whose link
//! towards it has MTU 1280 (the client's own is 1500, so it asks for full-size segments).
//! Backends answer with 64 KiB; the router's "fragmentation needed" goes to the VIP, and the
//! LB must hand it to the backend that sent the reply, or the connection stalls (a PMTU black
//! hole). Every response arrives, and the backend's route cache shows the learned MTU.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    client::http_fetch,
    netns::Netns,
    remote::{HTTP_PORT, Remote},
    topology::{CLIENT_ADDR6, FRONT, Topology, VIP, VIP6},
};

const BIG: usize = 64 * 1024;
const FETCHES: usize = 6;
/// Per read: PMTU discovery costs a retransmission or two.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches 64 KiB `FETCHES` times through `vip` from the client; returns who answered.
fn fetch_big(client: &Netns, vip: SocketAddr) -> Vec<String> {
    let path = format!("/bytes/{BIG}");
    client.run(move || {
        (0..FETCHES)
            .map(|i| {
                let (name, len) = http_fetch(vip, &path, READ_TIMEOUT)
                    .unwrap_or_else(|e| panic!("64 KiB response {i} through {vip}: {e}"));
                assert_eq!(len, BIG, "response {i} from {name} is short");
                name
            })
            .collect()
    })
}

/// The MTU `ns`'s route cache holds towards `to`, if it learned one.
fn learned_mtu(ns: &Netns, to: &str) -> Option<u32> {
    let route = ns.ip(&["route", "get", to]);
    let mut words = route.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

fn reason(agent: &Agent, name: &str) -> u64 {
    agent.verdicts(name)
}

#[test]
fn nat_backends_learn_the_path_mtu_from_errors_sent_to_the_vip() {
    nat_backends_learn_the_path_mtu("");
}

/// The same with the balancer at TC ingress.
#[test]
fn nat_backends_learn_the_path_mtu_through_the_tc_balancer() {
    nat_backends_learn_the_path_mtu("xdp_mode = \"tc\"\n");
}

fn nat_backends_learn_the_path_mtu(agent_extra: &str) {
    let topo = Topology::behind_router(3, "1280");
    let pin = Agent::pin_path_for(&topo);
    let mut config =
        format!("[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{pin}\"\n{agent_extra}");
    config += &format!("\n[[service]]\nname = \"http\"\nvip = \"{VIP}\"\nport = 81\n");
    for b in &topo.backends {
        config += &format!(
            "  [[service.backend]]\n  address = \"{}\"\n  port = 8081\n",
            b.addr
        );
    }
    let agent = Agent::start(&topo, &config);
    agent.wait_up("http", 3, Duration::from_secs(10));
    let served = fetch_big(&topo.client, topo.vip(81));
    assert!(reason(&agent, "icmp_to_backend") > 0, "{}", agent.status());
    for b in topo.backends.iter().filter(|b| served.contains(&b.name)) {
        assert_eq!(
            learned_mtu(&b.ns, "10.99.1.2"),
            Some(1280),
            "{} towards the client",
            b.name
        );
    }
}

/// The same over IPv6: the router's "packet too big" to the v6 VIP reaches the backend
/// whose reply it quotes (the link's 1280 is IPv6's minimum MTU).
#[test]
fn nat_backends_learn_the_path_mtu_over_ipv6() {
    let topo = Topology::behind_router_dual_stack(3, "1280");
    let pin = Agent::pin_path_for(&topo);
    let mut config = format!("[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{pin}\"\n");
    config += &format!("\n[[service]]\nname = \"http\"\nvip = \"{VIP6}\"\nport = 81\n");
    for b in &topo.backends {
        config += &format!(
            "  [[service.backend]]\n  address = \"{}\"\n  port = 8081\n",
            b.addr6()
        );
    }
    let agent = Agent::start(&topo, &config);
    agent.wait_up("http", 3, Duration::from_secs(10));
    let served = fetch_big(&topo.client, topo.vip6(81));
    assert!(reason(&agent, "icmp_to_backend") > 0, "{}", agent.status());
    for b in topo.backends.iter().filter(|b| served.contains(&b.name)) {
        let route = b.ns.ip(&["-6", "route", "get", CLIENT_ADDR6]);
        assert!(
            route.contains("mtu 1280"),
            "{} towards the client: {route}",
            b.name
        );
    }
}

#[test]
fn fullnat_and_dsr_backends_learn_the_path_mtu_from_errors_sent_to_the_vip() {
    let remote = Remote::new(1, 3);
    remote.router.ip(&["link", "set", FRONT, "mtu", "1280"]);
    remote.decap_on_hosts();
    let agent = remote.serve(
        0,
        &[
            ("full", 85, HTTP_PORT, "mode = \"fullnat\""),
            ("direct", HTTP_PORT, HTTP_PORT, "mode = \"dsr\""),
        ],
    );
    let vip = |port| SocketAddr::new(VIP.parse::<IpAddr>().unwrap(), port);
    let lb_addr = remote.lbs[0].addr.clone();

    let before = reason(&agent, "icmp_to_backend");
    let served = fetch_big(&remote.client, vip(85));
    assert!(
        reason(&agent, "icmp_to_backend") > before,
        "fullnat: {}",
        agent.status()
    );
    for host in remote.hosts.iter().filter(|h| served.contains(&h.name)) {
        // A fullnat backend's peer is the LB's address.
        assert_eq!(
            learned_mtu(&host.ns, &lb_addr),
            Some(1280),
            "{} towards the LB",
            host.name
        );
    }

    let before = reason(&agent, "icmp_to_backend");
    let served = fetch_big(&remote.client, vip(HTTP_PORT));
    assert!(
        reason(&agent, "icmp_to_backend") > before,
        "dsr: {}",
        agent.status()
    );
    for host in remote.hosts.iter().filter(|h| served.contains(&h.name)) {
        assert_eq!(
            learned_mtu(&host.ns, "10.99.1.2"),
            Some(1280),
            "{} towards the client",
            host.name
        );
    }
}

/// fullnat over IPv6: the router's "packet too big" to the v6 VIP reaches the backend from
/// the flow's SNAT address (the LB's v6 address), which its path MTU then holds.
#[test]
fn fullnat_backends_learn_the_path_mtu_over_ipv6() {
    let remote = Remote::dual_stack(1, 3);
    remote.router.ip(&["link", "set", FRONT, "mtu", "1280"]);
    let agent = remote.serve6(0, &[("full", 85, HTTP_PORT, "mode = \"fullnat\"")]);
    let lb_addr = remote.lbs[0].addr6.clone().expect("dual stack");
    let served = fetch_big(&remote.client, SocketAddr::new(VIP6.parse().unwrap(), 85));
    assert!(reason(&agent, "icmp_to_backend") > 0, "{}", agent.status());
    for host in remote.hosts.iter().filter(|h| served.contains(&h.name)) {
        assert_eq!(
            learned_mtu(&host.ns, &lb_addr),
            Some(1280),
            "{} towards the LB",
            host.name
        );
    }
}

/// A nat backend's "port unreachable" about a UDP flow reaches the client as one about the
/// VIP: its connected socket sees the refusal at once instead of waiting out a timeout.
/// Both reply paths: routed by the kernel (TC egress of the front NIC) and delivered on the
/// bridge (the reply program).
#[test]
fn a_nat_backends_port_unreachable_reaches_the_client_about_the_vip() {
    port_unreachable_reaches_the_client(false);
}

/// The same over IPv6 (ICMPv6 destination unreachable, translated by icmp6.rs).
#[test]
fn a_nat_backends_port_unreachable_reaches_a_v6_client_about_the_vip() {
    port_unreachable_reaches_the_client(true);
}

fn port_unreachable_reaches_the_client(v6: bool) {
    for bridge in ["bridge = \"none\"\n", "  bridge = \"br0\"\n"] {
        let topo = if v6 {
            Topology::dual_stack(1)
        } else {
            Topology::new(1)
        };
        let pin = Agent::pin_path_for(&topo);
        let backend = &topo.backends[0];
        let (vip, address) = if v6 {
            (VIP6, backend.addr6())
        } else {
            (VIP, backend.addr.clone())
        };
        let config = format!(
            "[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{pin}\"\n\n\
             [[service]]\nname = \"closed\"\nvip = \"{vip}\"\nport = 54\nprotocol = \"udp\"\n\
             [service.health]\ntype = \"none\"\n\
             [[service.backend]]\naddress = \"{address}\"\nport = 9\n{bridge}",
        );
        let agent = Agent::start(&topo, &config);
        agent.wait_up("closed", 1, Duration::from_secs(10));
        let to = if v6 { topo.vip6(54) } else { topo.vip(54) };
        let outcome = refused(&topo.client, to);
        let how = if bridge.contains("none") {
            "routed"
        } else {
            "on the bridge"
        };
        assert_eq!(
            outcome,
            Ok(()),
            "{how}: the client did not see the refusal; rev_nat {}",
            reason(&agent, "rev_nat")
        );
    }
}

/// The same in fullnat: the backend's error goes to the SNAT address, and the LB sends it on
/// to the client about the VIP.
#[test]
fn a_fullnat_backends_port_unreachable_reaches_the_client_about_the_vip() {
    fullnat_port_unreachable_reaches_the_client(false);
}

/// The same over IPv6: the backend's error goes to the LB's v6 address, and the LB sends it
/// on to the client about the v6 VIP.
#[test]
fn a_fullnat_backends_port_unreachable_reaches_a_v6_client_about_the_vip() {
    fullnat_port_unreachable_reaches_the_client(true);
}

fn fullnat_port_unreachable_reaches_the_client(v6: bool) {
    let remote = if v6 {
        Remote::dual_stack(1, 1)
    } else {
        Remote::new(1, 1)
    };
    let services = [("closed", 54, 9, "mode = \"fullnat\"\nprotocol = \"udp\"")];
    let no_probes = |config: String| config.replace("type = \"tcp\"", "type = \"none\"");
    let agent = if v6 {
        remote.serve6_with(0, &services, no_probes)
    } else {
        remote.serve_with(0, &services, no_probes)
    };
    let vip = SocketAddr::new(if v6 { VIP6 } else { VIP }.parse::<IpAddr>().unwrap(), 54);
    assert_eq!(
        refused(&remote.client, vip),
        Ok(()),
        "the client did not see the refusal; rev_snat {}",
        reason(&agent, "rev_snat")
    );
}

/// Whether a connected UDP socket on `client` sees its datagrams to `vip` refused (ICMP
/// port unreachable about them). Backends rate-limit their ICMP: a few tries.
fn refused(client: &Netns, vip: SocketAddr) -> Result<(), String> {
    client.run(move || {
        let any = if vip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let socket = std::net::UdpSocket::bind(any).expect("bind");
        socket.connect(vip).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut last = None;
        for _ in 0..3 {
            socket.send(b"anyone?\n").expect("send");
            let mut buf = [0u8; 64];
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
                other => last = Some(format!("{other:?}")),
            }
        }
        Err(last.unwrap_or_default())
    })
}
