//! A namespace where the FIB answers: veth pairs stand for the links to the backends
//! (10.99.4.0/24, HOSTS) and to the client (10.99.1.0/24), with permanent neighbours. For
//! the data path tests of modes that ask the FIB for the next hop.
//! Each test crate that includes it uses a part.
#![allow(dead_code)]
use std::net::Ipv4Addr;

use xlb_tests::netns::{Netns, enter, unique_prefix};

/// The LB's address on the backends' link: the FIB's source towards them.
pub const LB_BACK: Ipv4Addr = Ipv4Addr::new(10, 99, 4, 1);
pub const HOSTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 4, 11),
    Ipv4Addr::new(10, 99, 4, 12),
    Ipv4Addr::new(10, 99, 4, 13),
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
    for (i, host) in HOSTS.iter().enumerate() {
        let mac = format!("02:00:00:00:04:{:02x}", 0x11 + i);
        ns.ip(&[
            "neigh",
            "add",
            &host.to_string(),
            "lladdr",
            &mac,
            "dev",
            "back",
            "nud",
            "permanent",
        ]);
    }
    ns.ip(&[
        "neigh",
        "add",
        "10.99.1.2",
        "lladdr",
        "02:00:00:00:01:02",
        "dev",
        "cl",
        "nud",
        "permanent",
    ]);
    // The FIB answers only for an ingress device that forwards.
    ns.sysctl("net.ipv4.ip_forward", "1");
    enter(&ns.path());
    ns
}
