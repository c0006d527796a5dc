//! Docker discovery over IPv6: containers on a dual-stack Docker network join both VIPs of
//! the dual-stack service their label names (the v6 one by their GlobalIPv6Address) and
//! answer the client on each through xlb's bridge delivery; a v4-only container of the same
//! service joins its v4 VIP. Run as root.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

#[path = "support/docker_lb.rs"]
mod docker_lb;
use docker_lb::{VIP, config_with, docker_host, names_on, short};
use xlb_tests::{
    agent::Agent,
    client::tcp_name,
    docker::{DaemonOptions, IMAGE},
};

const VIP6: &str = "fd99:100::1";
/// The dual-stack service's port (`web` and `api` of `config_with` take 80 and 81).
const PORT: u16 = 82;
/// The v6 listener each container adds (the image's own listeners are IPv4).
const PORT6: &str = "9001";

#[test]
fn containers_on_a_dual_stack_network_answer_on_both_vips() {
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
    let labels = [("xlb.service", "dual"), ("xlb.port", PORT6)];
    // One listener on [::] takes both families.
    let listen = format!("[::]:{PORT6}");
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            host.run_image(
                &format!("dual{i}"),
                &labels,
                &["--network", "dual"],
                IMAGE,
                &["--tcp", &listen],
            )
        })
        .collect();
    // A v4-only container of the same service, on the default bridge: it joins the v4 VIP.
    let v4 = host.run_backend(
        "v4only",
        &[("xlb.service", "dual"), ("xlb.port", "9000")],
        &[],
    );
    let extra = format!(
        "\n[[service]]\nname = \"dual\"\nvip = [\"{VIP}\", \"{VIP6}\"]\nport = {PORT}\n  \
         [service.health]\n  interval = \"200ms\"\n  timeout = \"100ms\"\n  fall = 2\n  rise = 2\n"
    );
    let config = config_with(&host, &host.endpoint(), "3s", &extra);
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config);
    agent.wait_up("dual", 4, Duration::from_secs(10));
    agent.wait_up("dual.v6", 3, Duration::from_secs(10));

    let backends: Vec<String> = agent
        .backends("dual.v6")
        .into_iter()
        .map(|(address, _)| address)
        .collect();
    assert!(
        backends
            .iter()
            .all(|a| a.starts_with("[fd00:30::") && a.ends_with(&format!("]:{PORT6}"))),
        "joined the v6 VIP by their v6 addresses: {backends:?}"
    );

    let vip6: SocketAddr = format!("[{VIP6}]:{PORT}").parse().expect("addr");
    let answered: BTreeSet<String> = host.client.run(move || {
        (0..60)
            .map(|i| tcp_name(vip6).unwrap_or_else(|e| panic!("v6 request {i}: {e}")))
            .collect()
    });
    let dual: BTreeSet<String> = ids.iter().map(|id| short(id)).collect();
    assert_eq!(
        answered, dual,
        "every dual-stack container answers on the v6 VIP"
    );
    let v4_names: BTreeSet<String> = names_on(&host, PORT, 80).into_iter().collect();
    let mut all = dual.clone();
    all.insert(short(&v4));
    assert_eq!(
        v4_names, all,
        "the dual-stack containers and the v4-only one answer on the v4 VIP"
    );
}
