//! Crash safety: the agent is killed (SIGKILL) at random points of a churn, backends added
//! and removed by a reload every 100 ms (one backend stays), many times in a row. After each kill, and after
//! each restart, every ring slot names an in-use backend of its own service, and a request
//! loop running all along fails nothing: the backends leaving the config keep serving, so
//! any failure is a packet sent where it must not go.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use lb_common::BACKEND_IN_USE;
use xlb::{datapath::Datapath, reconcile::Maps as _};
use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures},
    topology::Topology,
};

const ROUNDS: usize = 10;

/// Every VIP leads to its own service, and every slot of its ring to an in-use backend of
/// that service.
fn assert_rings_consistent(pin_path: &Path, what: &str) {
    let maps = Datapath::open_pinned(pin_path).expect("pinned maps");
    let backends: std::collections::HashMap<u32, lb_common::Backend> = maps
        .backends_in_use()
        .expect("backends")
        .into_iter()
        .collect();
    for (key, id) in maps.vips().expect("vips") {
        let svc = maps.service(id).expect("service");
        assert_eq!(
            (svc.vip, svc.id),
            (key, id),
            "{what}: VIP {key:?} leads to another slot"
        );
        for (slot, backend_id) in maps
            .ring(svc.ring_offset, svc.table_size)
            .iter()
            .enumerate()
        {
            let ok = backends
                .get(backend_id)
                .is_some_and(|b| b.flags & BACKEND_IN_USE != 0 && b.service_id == id);
            assert!(
                ok,
                "{what}: service {id} slot {slot} names backend {backend_id}"
            );
        }
    }
}

/// xorshift, seeded from the clock (printed, so a failure can be told apart from another).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn killed_at_random_points_of_a_churn_the_agent_restarts_into_a_consistent_data_path() {
    let topo = Topology::new(4);
    let pin = Agent::pin_path_for(&topo);
    // Backend 1 stays in every config: a config whose backends are all new would leave the
    // service empty until their first good probes (a documented window, not this test's).
    let subsets: [&[usize]; 6] = [
        &[0, 1, 2],
        &[1, 2, 3],
        &[1, 3],
        &[0, 1, 2, 3],
        &[1],
        &[0, 1],
    ];
    let config = |i: usize| {
        let chosen: Vec<_> = subsets[i % subsets.len()]
            .iter()
            .map(|&b| &topo.backends[b])
            .collect();
        // Probes slow enough that a loaded machine does not fail them (the topology's own
        // 100 ms timeout would): a backend that leaves the ring here is the agent's doing.
        topo.config(&pin, &chosen)
            .replace("timeout = \"100ms\"", "timeout = \"1s\"")
            .replace("fall = 2", "fall = 5")
    };
    let mut agent = Agent::start(&topo, &config(3));
    agent.wait_up("web", 4, Duration::from_secs(10));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed:#x}");
    let mut rng = Rng(seed);
    let load = LoadLoop::start(
        &topo.client.path(),
        topo.vip(80),
        Duration::from_millis(20),
        5000,
    );

    let started = Instant::now();
    let mut events: Vec<(Duration, String)> = Vec::new();
    let mut history = String::new();
    let mut step = 0;
    for round in 0..ROUNDS {
        // Churn for a random while, then kill wherever the agent is.
        let until = Instant::now() + Duration::from_millis(300 + rng.next() % 1500);
        while Instant::now() < until {
            step += 1;
            // Written whole, then renamed: the agent must never read half a config.
            let tmp = agent.config_path.with_extension("toml.tmp");
            std::fs::write(&tmp, config(step)).expect("config");
            std::fs::rename(&tmp, &agent.config_path).expect("config");
            // SAFETY: a signal to the agent we started, by PID.
            unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
            std::thread::sleep(Duration::from_millis(100 - rng.next() % 50));
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 50_000));
        agent.kill();
        events.push((
            started.elapsed(),
            format!("killed (config {})", step % subsets.len()),
        ));
        assert_rings_consistent(&agent.pin_path, &format!("round {round}, after the kill"));
        history.push_str(&agent.log_text());
        agent.launch();
        events.push((started.elapsed(), "restarted".into()));
        assert_rings_consistent(
            &agent.pin_path,
            &format!("round {round}, after the restart"),
        );
    }
    // The last config is applied in full, and the data path serves it.
    std::thread::sleep(Duration::from_secs(1));
    assert_rings_consistent(&agent.pin_path, "at the end");
    let samples = load.stop();
    let failed = failures(&samples);
    assert!(samples.len() > 100, "only {} requests ran", samples.len());
    history.push_str(&agent.log_text());
    let dropped = agent.verdicts("drop_no_backend");
    assert_eq!(dropped, 0, "a ring was empty:\n{history}");
    let when: Vec<String> = failed
        .iter()
        .map(|f| format!("{:?}: {:?}", f.at.duration_since(started), f.answer))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed (seed {seed:#x}): {when:?}\nevents: {events:?}\n{history}",
        failed.len(),
        samples.len(),
    );
}
