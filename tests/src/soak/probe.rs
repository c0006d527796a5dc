//! Samples of what could grow over a soak: the agent's RSS, its anonymous part (the heap: a
//! debug build's RSS is mostly its binary's pages) and open fds (from /proc), the
//! flow tables' occupancy (`xlb status --json`, `flow_tables`) and the backend slots in use
//! in the pinned maps.
use std::time::{Duration, Instant};

use xlb::{datapath::Datapath, reconcile::Maps as _};

use crate::agent::Agent;

#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    pub insert_failures: u64,
    pub evictions: u64,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub label: String,
    pub at: Instant,
    pub pid: u32,
    /// How long the agent sampled had been running.
    pub agent_age: Duration,
    pub rss_kb: u64,
    pub anon_kb: u64,
    pub fds: usize,
    pub tables: Vec<Table>,
    pub backends_in_use: usize,
}

/// A sample of `agent`, started at `launched`.
pub fn sample(agent: &Agent, launched: Instant, label: &str) -> Sample {
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let kb = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("agent fds")
        .count();
    let json = agent.status();
    let number = |t: &serde_json::Value, k: &str| t[k].as_u64().unwrap_or(0);
    let tables = json["flow_tables"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| Table {
                    name: t["name"].as_str().unwrap_or_default().to_string(),
                    entries: number(t, "entries"),
                    capacity: number(t, "capacity"),
                    insert_failures: number(t, "insert_failures"),
                    evictions: number(t, "evictions"),
                })
                .collect()
        })
        .unwrap_or_default();
    let backends_in_use = Datapath::open_pinned(&agent.pin_path)
        .and_then(|d| d.backends_in_use())
        .map(|b| b.len())
        .expect("pinned backends");
    Sample {
        label: label.to_string(),
        at: Instant::now(),
        pid,
        agent_age: launched.elapsed(),
        rss_kb: kb("VmRSS:"),
        anon_kb: kb("RssAnon:"),
        fds,
        tables,
        backends_in_use,
    }
}
