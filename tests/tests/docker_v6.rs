//! Docker discovery over IPv6: containers on a dual-stack Docker network join the v6 service
//! their label names by their GlobalIPv6Address, and answer the client on the v6 VIP
//! through xlb's bridge delivery, while the v4 service on the same host keeps serving. Run
//! as root.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

#[path = "support/docker_lb.rs"]
mod docker_lb;
use docker_lb::{config_with, docker_host, names, short};
use xlb_tests::{
    agent::Agent,
    client::tcp_name,
    docker::{DaemonOptions, IMAGE},
};

const VIP6: &str = "fd99:100::1";
/// The v6 listener each container adds (the image's own listeners are IPv4).
const PORT6: &str = "9001";

#[test]
fn containers_on_a_dual_stack_network_answer_on_the_v6_vip() {
    let host = docker_host(DaemonOptions::default());
    // The client reaches the v6 VIP through the host's front, as for v4.
    host.client
        .ip(&["-6", "addr", "add", "fd99:1::2/64", "dev", "eth0", "nodad"]);
    host.client
        .ip(&["-6", "route", "add", "default", "via", "fd99:1::1"]);
    host.host
        .ip(&["-6", "addr", "add", "fd99:1::1/64", "dev", "front", "nodad"]);
    host.host.sysctl("net.ipv6.conf.all.forwarding", "1");
    host.docker(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "172.30.0.0/24",
        "--subnet",
        "fd00:30::/64",
        "dual",
    ]);
    let v6_labels = [("xlb.service", "web6"), ("xlb.port", PORT6)];
    let listen6 = format!("[::]:{PORT6}");
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            host.run_image(
                &format!("v6web{i}"),
                &v6_labels,
                &["--network", "dual"],
                IMAGE,
                &["--tcp", &listen6],
            )
        })
        .collect();
    // A v4 backend of `web` beside them, on the default bridge.
    let v4 = host.run_backend(
        "v4web",
        &[("xlb.service", "web"), ("xlb.port", "9000")],
        &[],
    );
    let extra = format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = 80\n  [service.health]\n  \
         interval = \"200ms\"\n  timeout = \"100ms\"\n  fall = 2\n  rise = 2\n"
    );
    let config = config_with(&host, &host.endpoint(), "3s", &extra);
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config);
    agent.wait_up("web6", 3, Duration::from_secs(10));
    agent.wait_up("web", 1, Duration::from_secs(10));

    let backends: Vec<String> = agent
        .backends("web6")
        .into_iter()
        .map(|(address, _)| address)
        .collect();
    assert!(
        backends
            .iter()
            .all(|a| a.starts_with("[fd00:30::") && a.ends_with(&format!("]:{PORT6}"))),
        "joined by their v6 addresses: {backends:?}"
    );

    let vip6: SocketAddr = format!("[{VIP6}]:80").parse().expect("addr");
    let answered: BTreeSet<String> = host.client.run(move || {
        (0..60)
            .map(|i| tcp_name(vip6).unwrap_or_else(|e| panic!("v6 request {i}: {e}")))
            .collect()
    });
    let expected: BTreeSet<String> = ids.iter().map(|id| short(id)).collect();
    assert_eq!(
        answered, expected,
        "every v6 container answers on the v6 VIP"
    );
    let v4_names: BTreeSet<String> = names(&host, 10).into_iter().collect();
    assert_eq!(v4_names, BTreeSet::from([short(&v4)]), "v4 beside v6");
}
