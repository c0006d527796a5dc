//! Reloads are all-or-nothing, and an attach-mode switch leaves no moment without a
//! balancer. Same netns topology as nat.rs. Run as root.
use std::time::Duration;

use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures},
    topology::{FRONT, Topology},
};

/// The config of `topo` with `xdp_mode` set.
fn with_mode(config: &str, mode: &str) -> String {
    config.replacen("[agent]\n", &format!("[agent]\nxdp_mode = \"{mode}\"\n"), 1)
}

/// The XDP attach mode of the front as `ip` shows it: "driver", "skb", or "none".
fn xdp_on_front(topo: &Topology) -> &'static str {
    let shown = topo.lb.ip(&["-d", "link", "show", FRONT]);
    if shown.contains("xdpgeneric") {
        "skb"
    } else if shown.contains("prog/xdp") {
        "driver"
    } else {
        "none"
    }
}

#[test]
fn switching_the_attach_mode_on_reload_fails_no_request() {
    let topo = Topology::new(2);
    let all: Vec<_> = topo.backends.iter().collect();
    let base = topo.config(&Agent::pin_path_for(&topo), &all);
    let agent = Agent::start(&topo, &with_mode(&base, "driver"));
    agent.wait_up("web", 2, Duration::from_secs(10));
    assert_eq!(xdp_on_front(&topo), "driver");

    let load = LoadLoop::start(
        &topo.client.path(),
        topo.vip(80),
        Duration::from_millis(10),
        3000,
    );
    let balance_link = format!("tc_balance_{FRONT}");
    let ingress_link = format!("tc_ingress_{FRONT}");
    for round in 0..2 {
        for (mode, xdp) in [("tc", "none"), ("skb", "skb"), ("driver", "driver")] {
            std::thread::sleep(Duration::from_millis(500));
            let (ok, out) = agent.reload(&with_mode(&base, mode));
            assert!(ok, "round {round}, reload to {mode}: {out}");
            assert_eq!(
                agent.status()["interfaces"][0]["xdp_mode"],
                mode,
                "round {round}: status after the switch to {mode}"
            );
            assert_eq!(xdp_on_front(&topo), xdp, "round {round}, mode {mode}");
            // Exactly one balancer is left, and delivery goes with XDP.
            let links = agent.links();
            let xdp_link = links.iter().any(|l| l.starts_with("xdp_"));
            assert_eq!(xdp_link, mode != "tc", "{mode}: {links:?}");
            assert_eq!(
                links.contains(&balance_link),
                mode == "tc",
                "{mode}: {links:?}"
            );
            assert_eq!(
                links.contains(&ingress_link),
                mode != "tc",
                "{mode}: {links:?}"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.stop();
    let failed = failures(&samples);
    assert!(samples.len() > 200, "only {} requests ran", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        agent.log_text()
    );
    let names: std::collections::BTreeSet<_> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().ok())
        .collect();
    assert!(
        names.iter().all(|n| *n == "be1" || *n == "be2"),
        "{names:?}"
    );
}
