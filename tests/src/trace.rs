//! `xlb trace` from a test: the trace process, connections until it has its count (bounded in
//! number and time), and its JSON lines.
use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use xlb::trace::Line;

use crate::{
    agent::Agent,
    process::{Proc, binary},
    topology::Topology,
};

/// `xlb trace --json ARGS` against `agent`, logging to the topology's scratch dir.
pub fn start(topo: &Topology, agent: &Agent, name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(binary("xlb"));
    cmd.args(["trace", "--json"])
        .args(args)
        .env("XLB_CONTROL", &agent.control);
    Proc::spawn(name, cmd, topo.dir.join(format!("{name}.log")))
}

/// Calls `connect` (a connection's client port and who answered it) until the trace ends
/// (at most 200 times, 20 s); the trace must then have exited. Returns who answered each port.
pub fn until_done(
    traced: &mut Proc,
    mut connect: impl FnMut() -> (u16, String),
) -> BTreeMap<u16, String> {
    let mut answered = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while traced.is_running() && Instant::now() < deadline && answered.len() < 200 {
        let (port, name) = connect();
        answered.insert(port, name);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        traced.wait_exit(Duration::from_secs(5)).is_some(),
        "the trace ended after its count: {}",
        traced.log_text()
    );
    answered
}

/// The records the trace printed.
pub fn lines(proc: &Proc) -> Vec<Line> {
    proc.log_text()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}
