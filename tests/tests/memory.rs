//! Map sizes from the config (lb-userspace/src/layout.rs): what the kernel charges for the
//! maps of a loaded data path, and the limits (256 services, 16384 backends) at work.
//! BPF_PROG_TEST_RUN, as root.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use lb_common::sizes::{MAX_BACKENDS, MAX_SERVICES};
use xlb::{
    config::Config,
    layout::{Layout, possible_cpus},
};
use xlb_tests::testrun::{LoadedDatapath, Packet, XDP_PASS, ipv4_at, service_toml};

fn config(agent: &str, services: &str) -> Config {
    let text = format!("[agent]\ninterfaces = [\"xlbtest0\"]\n{agent}\n{services}");
    Config::parse(Path::new("memory-test.toml"), &text)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
}

fn one_service() -> String {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 8080);
    service_toml("web", vip, "tcp", &[(backend, 100)])
}

const MIB: u64 = 1024 * 1024;

/// Loads `services` with the maps `agent` sizes; returns the kernel's memlock of every map
/// the programs use, and of the sized ones alone, with the layout's own estimate of those.
fn measure(agent: &str, services: &str) -> (u64, u64, u64) {
    let cfg = config(agent, services);
    let layout = Layout::for_config(&cfg);
    let dp = LoadedDatapath::sized(services, &layout);
    let maps = dp.kernel_maps();
    for (name, entries) in layout.max_entries() {
        // The kernel truncates map names to 15 bytes.
        let map = maps
            .iter()
            .find(|m| name.starts_with(&m.name) && !m.name.is_empty())
            .unwrap_or_else(|| panic!("no map {name} in {maps:?}"));
        assert_eq!(
            map.entries, entries,
            "{name} was made with the layout's size"
        );
    }
    let sized: u64 = layout
        .max_entries()
        .iter()
        .map(|(name, _)| {
            maps.iter()
                .find(|m| name.starts_with(&m.name))
                .map_or(0, |m| m.memlock)
        })
        .sum();
    let total = maps.iter().map(|m| m.memlock).sum();
    eprintln!(
        "{agent:?}: all maps {:.1} MiB, sized {:.1} MiB, layout estimate {:.1} MiB ({} CPUs)",
        total as f64 / MIB as f64,
        sized as f64 / MIB as f64,
        layout.memory(possible_cpus()) as f64 / MIB as f64,
        possible_cpus()
    );
    (total, sized, layout.memory(possible_cpus()))
}

/// The layout's estimate is what the kernel charges (what `xlb check` prints is true), and a
/// one-service config with a 65536-flow table stays within 32 MiB of map memory in all.
#[test]
fn one_service_map_memory_as_the_kernel_counts_it() {
    let (total, sized, estimate) = measure("flow_table_size = 65536", &one_service());
    let off = sized.abs_diff(estimate) as f64 / sized as f64;
    assert!(off < 0.02, "estimate {estimate} vs kernel {sized}");
    assert!(total <= 32 * MIB, "{total} bytes of map memory");
    // At the default flow table the flow tables dominate: still far below the fixed 175 MiB.
    let (total, sized, estimate) = measure("", &one_service());
    assert!(sized.abs_diff(estimate) as f64 / (sized as f64) < 0.02);
    assert!(total <= 100 * MIB, "{total} bytes of map memory");
}

/// A 4M-flow table is made, and costs 144 bytes per established flow (40-byte key and value).
#[test]
fn four_million_flows() {
    let cfg = config("flow_table_size = 4194304", &one_service());
    let layout = Layout::for_config(&cfg);
    let dp = LoadedDatapath::sized(&one_service(), &layout);
    let maps = dp.kernel_maps();
    let conntrack = maps
        .iter()
        .find(|m| "XLB_CONNTRACK_V3".starts_with(&m.name))
        .expect("the flow table");
    assert_eq!(conntrack.entries, 4_194_304);
    let per_flow = conntrack.memlock as f64 / 4_194_304.0;
    eprintln!("established-flow table: {per_flow:.1} bytes per flow");
    assert!(per_flow <= 150.0, "{per_flow} bytes per flow");
}

/// 256 services with 64 backends each (16384 in all) apply, and every service forwards a
/// new flow to one of its own backends.
#[test]
fn max_services_and_backends() {
    let per_service = MAX_BACKENDS / MAX_SERVICES;
    let vip = |i: u32| {
        SocketAddrV4::new(
            Ipv4Addr::new(10, 99, 100 + (i / 250) as u8, (1 + i % 250) as u8),
            80,
        )
    };
    let backends = |i: u32| -> Vec<(SocketAddrV4, u32)> {
        (0..per_service)
            .map(|j| {
                let addr = Ipv4Addr::new(10, 99, 2 + (i % 64) as u8, (1 + j) as u8);
                (SocketAddrV4::new(addr, 8000 + (i / 64) as u16), 100)
            })
            .collect()
    };
    let services: String = (0..MAX_SERVICES)
        .map(|i| {
            service_toml(&format!("s{i}"), vip(i), "tcp", &backends(i))
                .replace("mode = \"nat\"\n", "mode = \"nat\"\ntable_size = 257\n")
        })
        .collect();
    let layout = Layout::for_config(&config("", &services));
    assert_eq!(layout.backends, MAX_BACKENDS);
    let dp = LoadedDatapath::sized(&services, &layout);
    assert_eq!(dp.service_ids().len(), MAX_SERVICES as usize);
    let total: usize = (0..MAX_SERVICES)
        .map(|i| dp.backend_ids(&format!("s{i}")).len())
        .sum();
    assert_eq!(total, MAX_BACKENDS as usize);
    for i in 0..MAX_SERVICES {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000 + i as u16);
        let out = dp.xdp(&Packet::tcp(client, vip(i)).build());
        assert_eq!(out.action, XDP_PASS, "service s{i}");
        let to = SocketAddrV4::new(
            ipv4_at(&out.data, 14 + 16),
            u16::from_be_bytes([out.data[36], out.data[37]]),
        );
        assert!(
            backends(i).iter().any(|(b, _)| *b == to),
            "service s{i} sent its flow to {to}"
        );
    }
}

/// The established-flow cost with `flows` flows in a table of `table` entries: `samples`
/// distinct flows (beyond the per-CPU flow cache's 4096 slots) run once each; the median of
/// the kernel's single-run times. A measurement, not a test: run it with
/// `cargo test -p xlb-tests --test memory -- --ignored --nocapture established_cost`.
fn established_cost(table: u32, flows: u32, samples: u32) -> f64 {
    let services = one_service();
    let layout = Layout::for_config(&config(&format!("flow_table_size = {table}"), &services));
    let dp = LoadedDatapath::sized(&services, &layout);
    let service_id = dp.service_id("web");
    let (_, backend_id) = dp.backend_ids("web")[0];
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    // Flow n: 60000 ports per client address, addresses from 10.99.10.0 up (test range).
    let client = |n: u32| {
        let host = n / 60000;
        SocketAddrV4::new(
            Ipv4Addr::new(10, 99, 10 + (host / 256) as u8, (host % 256) as u8),
            (1024 + n % 60000) as u16,
        )
    };
    fill(dp.pin_path(), flows, vip, (service_id, backend_id), client);
    let new_before = dp.service_counters(service_id).new_flows;
    let step = (flows / samples).max(1);
    let mut times: Vec<u128> = (0..samples)
        .map(|i| {
            let pkt = Packet::tcp(client((i * step) % flows), vip).build();
            let (action, took) = dp.xdp_timed(&pkt);
            assert_eq!(action, XDP_PASS);
            took.as_nanos()
        })
        .collect();
    assert_eq!(
        dp.service_counters(service_id).new_flows,
        new_before,
        "every sample was an established flow"
    );
    times.sort_unstable();
    times[times.len() / 2] as f64
}

/// Writes `flows` established flows from `client(n)` to `vip` into the pinned flow table.
fn fill(
    pin_path: &Path,
    flows: u32,
    vip: SocketAddrV4,
    (service_id, backend_id): (u32, u32),
    client: impl Fn(u32) -> SocketAddrV4,
) {
    use aya::maps::HashMap;
    use lb_common::{FAMILY_V4, FLOW_REPLIED, Flow, FlowKey, PROTO_TCP};
    let map = xlb::datapath::pinned_map(pin_path, xlb::datapath::CONNTRACK).unwrap();
    let mut conntrack: HashMap<_, FlowKey, Flow> = HashMap::try_from(map).unwrap();
    let now = xlb::flowtables::monotonic_ns();
    for n in 0..flows {
        let c = client(n);
        let key = FlowKey {
            src: [u32::from_ne_bytes(c.ip().octets()), 0, 0, 0],
            dst: [u32::from_ne_bytes(vip.ip().octets()), 0, 0, 0],
            src_port: c.port().to_be(),
            dst_port: vip.port().to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: 0,
        };
        let flow = Flow {
            backend_id: backend_id.try_into().expect("a backend id fits 16 bits"),
            service_id: service_id.try_into().expect("a service id fits 16 bits"),
            last_seen_ns: now,
            state: FLOW_REPLIED,
            ..Default::default()
        };
        conntrack.insert(key, flow, 0).unwrap();
    }
}

#[test]
#[ignore = "a measurement: takes a minute and prints figures (docs/benchmarks.md)"]
fn established_cost_at_10k_and_4m_flows() {
    // Side by side, twice, so that a noisy moment shows as disagreement between rounds.
    for round in 0..2 {
        let small = established_cost(16_384, 10_000, 10_000);
        let large = established_cost(4_194_304, 4_000_000, 10_000);
        eprintln!(
            "round {round}: established flow, median single run: {small:.0} ns at 10k flows, \
             {large:.0} ns at 4M flows (ratio {:.3})",
            large / small
        );
    }
}

/// `VmRSS` and its kinds (kB) of a process, from /proc/PID/status.
fn rss(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| {
            ["VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent's memory with a 4M-flow table, empty and then full (after its sweeps read it).
#[test]
#[ignore = "a measurement: prints the agent's RSS by kind (docs/benchmarks.md)"]
fn agent_rss_at_4m_flows() {
    use xlb_tests::{agent::Agent, topology::Topology};
    let topo = Topology::new(1);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "[agent]\n",
        "[agent]\nflow_table_size = 4194304\n",
        1,
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 1, std::time::Duration::from_secs(10));
    eprintln!("empty 4M-flow table: {}", rss(agent.pid()));
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    let client = |n: u32| {
        let host = n / 60000;
        SocketAddrV4::new(
            Ipv4Addr::new(10, 99, 10 + (host / 256) as u8, (host % 256) as u8),
            (1024 + n % 60000) as u16,
        )
    };
    // Ids as the agent gave them: service 0 and backend 0 are its first.
    fill(
        Path::new(&Agent::pin_path_for(&topo)),
        4_000_000,
        vip,
        (0, 0),
        client,
    );
    // Two sweeps (every 5 s) read the full table.
    std::thread::sleep(std::time::Duration::from_secs(12));
    eprintln!("4M flows, after two sweeps: {}", rss(agent.pid()));
}

/// The sweep reads the tables in chunks and keeps only hashes of the live flows: a reply
/// mapping whose flow is gone (evicted) goes at the second sweep that finds it so (it may
/// belong to a flow made after the first read the flow tables); one with its flow stays.
#[test]
fn a_reply_mapping_without_its_flow_goes_at_the_second_sweep() {
    use aya::maps::HashMap;
    use lb_common::{Flow, FlowKey};
    use xlb::flowtables::monotonic_ns;

    let mut dp = LoadedDatapath::new(&one_service());
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    // The backend's endpoint claimed by another backend id (as when it serves two
    // services): its new flows get reply mappings of their own, which the sweep tends.
    let claims = xlb::datapath::pinned_map(dp.pin_path(), xlb::datapath::REPLY_ENDPOINTS).unwrap();
    let mut claims: HashMap<_, lb_common::VipKey, u32> = HashMap::try_from(claims).unwrap();
    let endpoint = lb_common::VipKey {
        addr: lb_common::addr_words(std::net::IpAddr::V4(Ipv4Addr::new(10, 99, 2, 11))).1,
        port: 8080u16.to_be(),
        proto: lb_common::PROTO_TCP,
        family: lb_common::FAMILY_V4,
    };
    claims.insert(endpoint, 4095, 0).unwrap();
    for port in [40001, 40002] {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), port);
        let syn = Packet::tcp(client, vip).with_tcp_flags(xlb_tests::testrun::TCP_SYN);
        assert_eq!(dp.xdp(&syn.build()).action, XDP_PASS);
    }
    assert_eq!(dp.datapath().rev_nat().unwrap().len(), 2);
    // As if the kernel evicted the first flow.
    let map = xlb::datapath::pinned_map(dp.pin_path(), xlb::datapath::CONNTRACK_NEW).unwrap();
    let mut new: HashMap<_, FlowKey, Flow> = HashMap::try_from(map).unwrap();
    let evicted = new
        .keys()
        .map(Result::unwrap)
        .find(|k| k.src_port == 40001u16.to_be())
        .expect("the first flow");
    new.remove(&evicted).unwrap();

    let sweep = |dp: &mut LoadedDatapath| {
        dp.datapath_mut()
            .flow_tables_mut()
            .sweep(monotonic_ns())
            .unwrap();
    };
    sweep(&mut dp);
    assert_eq!(
        dp.datapath().rev_nat().unwrap().len(),
        2,
        "kept at the first sweep"
    );
    sweep(&mut dp);
    let left = dp.datapath().rev_nat().unwrap();
    assert_eq!(left.len(), 1, "gone at the second: {left:?}");
    assert_eq!(
        left[0].0.dst_port,
        40002u16.to_be(),
        "the live flow's mapping stays"
    );
}
