//! One agent per pin path: a second `xlb run` on a pin path in use is refused before it
//! changes anything, a killed agent's lock is gone at once, and `xlb detach` refuses while
//! an agent runs. Same netns topology as nat.rs. Run as root.
use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use xlb_tests::{
    agent::Agent,
    client::tcp_name,
    process::wait_for,
    topology::{FRONT, Topology},
};

fn start(backends: usize) -> (Topology, Agent) {
    let topo = Topology::new(backends);
    let all: Vec<_> = topo.backends.iter().collect();
    let agent = Agent::start(&topo, &topo.config(&Agent::pin_path_for(&topo), &all));
    agent.wait_up("web", backends, Duration::from_secs(10));
    // The first agent's own changes are over before a test compares pins: it attaches the
    // reply program to each backend's veth once it finds it.
    let replies = |links: Vec<String>| {
        topo.backends
            .iter()
            .all(|b| links.contains(&format!("tc_reply_{}", b.name)))
    };
    let attached = wait_for(Duration::from_secs(10), || {
        replies(agent.links()).then_some(())
    });
    assert!(attached.is_some(), "reply links: {:?}", agent.links());
    (topo, agent)
}

/// Every pin below the pin path with its inode: a program pinned anew, a map or link
/// replaced, shows as another inode.
fn pins(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("pin directory").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("pin");
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            let name = path
                .strip_prefix(root)
                .expect("below")
                .display()
                .to_string();
            out.insert(name, meta.ino());
        }
    }
    out
}

/// The id of the XDP program on the front, as `ip` shows it.
fn xdp_program(topo: &Topology) -> String {
    let shown = topo.lb.ip(&["-d", "link", "show", FRONT]);
    let at = shown.find("prog/xdp id ").expect("XDP attached");
    shown[at..].split_whitespace().nth(2).expect("id").into()
}

/// Twelve new connections through the VIP; the backends that answered.
fn serve(topo: &Topology) -> Vec<String> {
    let vip = topo.vip(80);
    topo.client.run(move || {
        (0..12)
            .map(|_| tcp_name(vip).expect("served through the VIP"))
            .collect()
    })
}

fn assert_served_by_backends(topo: &Topology, what: &str) {
    let names = serve(topo);
    assert!(
        names.iter().all(|n| n == "be1" || n == "be2"),
        "{what}: answered by {names:?}"
    );
}

#[test]
fn a_second_agent_on_the_same_pin_path_is_refused_before_it_changes_anything() {
    let (topo, agent) = start(2);
    let before = (pins(&agent.pin_path), agent.links(), xdp_program(&topo));
    let services = agent.services_summary();

    let (status, out) = agent.run_another(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("the second agent kept running:\n{out}"));
    assert!(!status.success(), "the second agent started:\n{out}");
    let pin = agent.pin_path.display().to_string();
    assert!(out.contains(&pin), "the refusal names the pin path:\n{out}");
    assert!(
        out.contains(&format!("PID {}", agent.pid())),
        "the refusal names the holder:\n{out}"
    );

    let after = (pins(&agent.pin_path), agent.links(), xdp_program(&topo));
    assert_eq!(
        before, after,
        "the second agent changed the pinned data path"
    );
    assert_eq!(agent.services_summary(), services);
    assert_served_by_backends(&topo, "after the refused start");
    assert!(
        !agent.log_text().contains("reloaded") && agent.log_text().contains("xlb is running"),
        "the first agent runs on:\n{}",
        agent.log_text()
    );
}

#[test]
fn after_a_kill_the_next_agent_starts_at_once() {
    let (topo, mut agent) = start(2);
    agent.kill();
    // The kernel released the lock with the process: no wait, no stale lock to clear.
    let started = std::time::Instant::now();
    agent.launch();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!agent.log_text().contains("in use"), "{}", agent.log_text());
    assert_served_by_backends(&topo, "after the restart");
    // And the new one holds the lock in turn.
    let (status, out) = agent.run_another(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{out}");
}

#[test]
fn detach_is_refused_while_an_agent_runs_unless_forced() {
    let (topo, mut agent) = start(2);
    let pin = agent.pin_path.display().to_string();
    let links = agent.links();
    let (ok, out) = agent.cli(&["detach", "--pin-path", &pin]);
    assert!(!ok, "detach went ahead: {out}");
    assert!(
        out.contains("stop the agent first") && out.contains(&pin),
        "{out}"
    );
    assert_eq!(agent.links(), links, "detach removed links: {out}");
    assert_served_by_backends(&topo, "after the refused detach");

    let (ok, out) = agent.cli(&["detach", "--pin-path", &pin, "--force"]);
    assert!(ok, "forced detach failed: {out}");
    assert!(agent.links().is_empty(), "{:?}", agent.links());
    agent.stop();
    // Nothing runs on the pin path now: an ordinary detach is allowed (nothing is left).
    agent.detach();
}
