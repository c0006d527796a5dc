//! A namespace where the FIB answers: veth pairs stand for the links to the backends
//! (10.99.4.0/24 and fd99:4::/64, HOSTS and HOSTS6) and to the client (10.99.1.0/24 and
//! fd99:1::/64), with permanent neighbours. For the data path tests of modes that ask the
//! FIB for the next hop.
//! Each test crate that includes it uses a part.
#![allow(dead_code)]
use std::net::{Ipv4Addr, Ipv6Addr};

use xlb_tests::netns::{Netns, enter, unique_prefix};

/// The LB's address on the backends' link: the FIB's source towards them.
pub const LB_BACK: Ipv4Addr = Ipv4Addr::new(10, 99, 4, 1);
pub const HOSTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 4, 11),
    Ipv4Addr::new(10, 99, 4, 12),
    Ipv4Addr::new(10, 99, 4, 13),
];
/// The same over IPv6.
pub const LB_BACK6: Ipv6Addr = Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 1);
pub const HOSTS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 0x13),
];

/// Moves this test's thread into a new namespace with routes to the client and the hosts.
pub fn routed_namespace() -> Netns {
    let ns = Netns::new(&format!("{}-fib", unique_prefix()));
    for (dev, addr) in [("back", "10.99.4.1/24"), ("cl", "10.99.1.1/24")] {
        let peer = format!("{dev}-peer");
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", &peer, "up"]);
    }
    // Without duplicate address detection: the FIB takes no tentative source.
    for (dev, addr) in [("back", "fd99:4::1/64"), ("cl", "fd99:1::1/64")] {
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    let neighbour = |addr: String, mac: &str, dev: &str| {
        ns.ip(&[
            "neigh",
            "add",
            &addr,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    };
    for (i, (host, host6)) in HOSTS.iter().zip(HOSTS6).enumerate() {
        let mac = format!("02:00:00:00:04:{:02x}", 0x11 + i);
        neighbour(host.to_string(), &mac, "back");
        neighbour(host6.to_string(), &mac, "back");
    }
    neighbour("10.99.1.2".into(), "02:00:00:00:01:02", "cl");
    neighbour("fd99:1::2".into(), "02:00:00:00:01:02", "cl");
    // The FIB answers only for an ingress device that forwards.
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    enter(&ns.path());
    ns
}
