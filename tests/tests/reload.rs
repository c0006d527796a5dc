//! Reloads are all-or-nothing, and an attach-mode switch leaves no moment without a
//! balancer. Same netns topology as nat.rs. Run as root.
use std::time::Duration;

use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures, tcp_name},
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
        5000,
    );
    let balance_link = format!("tc_balance_{FRONT}");
    let ingress_link = format!("tc_ingress_{FRONT}");
    // Every switch between the three: driver->tc->skb->driver->skb->tc->driver, twice.
    let modes = [
        ("tc", "none"),
        ("skb", "skb"),
        ("driver", "driver"),
        ("skb", "skb"),
        ("tc", "none"),
        ("driver", "driver"),
    ];
    for round in 0..2 {
        for (mode, xdp) in modes {
            std::thread::sleep(Duration::from_millis(300));
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

/// Twelve new connections through the VIP; the backends that answered.
fn served_by(topo: &Topology) -> std::collections::BTreeSet<String> {
    let vip = topo.vip(80);
    topo.client.run(move || {
        (0..12)
            .map(|_| tcp_name(vip).expect("served through the VIP"))
            .collect()
    })
}

#[test]
fn a_reload_that_cannot_take_effect_in_full_changes_nothing() {
    let topo = Topology::new(2);
    // A second front interface, without driver-mode XDP (a bridge has none).
    topo.lb.ip(&["link", "add", "extra0", "type", "bridge"]);
    topo.lb.ip(&["link", "set", "extra0", "up"]);
    let pin = Agent::pin_path_for(&topo);
    let all: Vec<_> = topo.backends.iter().collect();
    let agent = Agent::start(&topo, &topo.config(&pin, &all));
    agent.wait_up("web", 2, Duration::from_secs(10));
    // The backends are on br0: their veths are found (and the reply program attached there)
    // before the state is taken.
    agent.wait_for_veths(4, Duration::from_secs(15));
    let state = || {
        let mut links = agent.links();
        links.sort();
        (
            links,
            agent.services_summary(),
            agent.status()["interfaces"].clone(),
        )
    };
    let before = state();
    let both: std::collections::BTreeSet<String> = ["be1".into(), "be2".into()].into();
    assert_eq!(served_by(&topo), both);

    // Each config also drops be2: none of it may take effect.
    let only_be1 = topo.config(&pin, &[&topo.backends[0]]);
    let fronts = |list: &str| only_be1.replace("interfaces = [\"front\"]", list);
    let refused = [
        // Refused before any change: an interface that does not exist.
        (
            "a missing interface",
            fronts("interfaces = [\"front\", \"extra0\", \"nosuch0\"]"),
            "nosuch0",
        ),
        // Fails part way (front and extra0's TC links are made, then XDP in driver mode on
        // the bridge fails): what was done is undone.
        (
            "driver mode on a bridge",
            with_mode(&fronts("interfaces = [\"front\", \"extra0\"]"), "driver"),
            "extra0",
        ),
    ];
    for (what, config, named) in refused {
        let (ok, out) = agent.reload(&config);
        assert!(!ok, "{what}: the reload went ahead: {out}");
        assert!(
            out.contains("reload rejected, the running state is kept") && out.contains(named),
            "{what}: {out}"
        );
        assert_eq!(state(), before, "{what}: the running state changed");
        assert_eq!(served_by(&topo), both, "{what}");
    }

    // A valid change applies in full (`auto`: extra0, a bridge, gets skb mode).
    let (ok, out) = agent.reload(&with_mode(
        &fronts("interfaces = [\"front\", \"extra0\"]"),
        "auto",
    ));
    assert!(ok, "{out}");
    let links = agent.links();
    assert!(links.contains(&"xdp_extra0".to_string()), "{links:?}");
    let web = agent.backends("web");
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(served_by(&topo), ["be1".to_string()].into());

    // A mode switch that fails half way (extra0: skb, as auto picked for a bridge, to driver) is
    // undone too: extra0 is back in skb mode, behind its own links only.
    let applied = state();
    assert_eq!(applied.2[1]["xdp_mode"], "skb", "{:?}", applied.2);
    let (ok, out) = agent.reload(&with_mode(
        &fronts("interfaces = [\"front\", \"extra0\"]"),
        "driver",
    ));
    assert!(!ok, "driver mode on a bridge went ahead: {out}");
    assert!(
        out.contains("reload rejected, the running state is kept"),
        "{out}"
    );
    assert_eq!(state(), applied, "the failed switch was not undone");
    let extra = topo.lb.ip(&["-d", "link", "show", "extra0"]);
    assert!(extra.contains("xdpgeneric"), "{extra}");
    assert_eq!(served_by(&topo), ["be1".to_string()].into());
}
