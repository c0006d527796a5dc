//! An `xlb run` agent inside a test's LB namespace, with its own pin path and its own
//! control socket in the test's scratch directory (added to every config it starts or
//! reloads, unless the config sets `agent.control`). Drop stops it and removes everything
//! it pinned.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use crate::{
    client::http_get,
    netns::Netns,
    process::{Proc, binary, wait_for},
    topology::Topology,
};

pub struct Agent {
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    /// The control socket (`xlb drain|undrain|reload` through `cli` use it).
    pub control: PathBuf,
    pub proc: Option<Proc>,
    ns_path: String,
    log: PathBuf,
    /// While this file exists, the agent's applies wait (XLB_TEST_HOLD_APPLIES).
    hold: PathBuf,
    /// A command that execs the agent (`setpriv --bounding-set ...`), or empty.
    wrapper: Vec<String>,
}

/// Applies wait while this lives (see `Agent::hold_applies`).
pub struct HeldApplies(PathBuf);

impl Drop for HeldApplies {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Agent {
    pub fn pin_path_for(topo: &Topology) -> String {
        Agent::pin_path_of(&topo.prefix)
    }

    /// The pin path of the agent of a test with this namespace prefix.
    pub fn pin_path_of(prefix: &str) -> String {
        format!("/sys/fs/bpf/xlb-test-{prefix}")
    }

    /// Writes `config` and starts the agent in the topology's lb namespace; returns once
    /// its API answers.
    pub fn start(topo: &Topology, config: &str) -> Agent {
        Agent::start_in(&topo.lb, &topo.dir, &topo.prefix, config)
    }

    /// Writes `config` to `dir` and starts the agent in `ns`, pinning under
    /// `pin_path_of(prefix)`.
    pub fn start_in(ns: &Netns, dir: &Path, prefix: &str, config: &str) -> Agent {
        let mut agent = Agent::unstarted(ns, dir, prefix, config, &[]);
        agent.launch();
        agent
    }

    /// Like [`Agent::start_in`] but not started yet, and run through `wrapper` (a command
    /// that execs the rest of its arguments, as `setpriv ... --` does): `launch` starts it,
    /// `run_another` tries it.
    pub fn unstarted(
        ns: &Netns,
        dir: &Path,
        prefix: &str,
        config: &str,
        wrapper: &[&str],
    ) -> Agent {
        let config_path = dir.join("xlb.toml");
        let (config, control) = with_control(config, &dir.join("control.sock"));
        std::fs::write(&config_path, config).expect("write config");
        Agent {
            pin_path: Agent::pin_path_of(prefix).into(),
            config_path,
            control,
            proc: None,
            ns_path: ns.path(),
            log: dir.join("xlb.log"),
            hold: dir.join("hold-applies"),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Writes `config` and runs an agent on it that must refuse to start: returns its
    /// output once it exited (panics if it exited 0 or still ran after 10 s).
    pub fn start_refused(topo: &Topology, config: &str) -> String {
        let config_path = topo.dir.join("xlb.toml");
        let (config, control) = with_control(config, &topo.dir.join("control.sock"));
        std::fs::write(&config_path, config).expect("write config");
        let agent = Agent {
            pin_path: Agent::pin_path_for(topo).into(),
            config_path,
            control,
            proc: None,
            ns_path: topo.lb.path(),
            log: topo.dir.join("xlb.log"),
            hold: topo.dir.join("hold-applies"),
            wrapper: Vec::new(),
        };
        let (status, out) = agent.run_another(Duration::from_secs(10));
        match status {
            Some(s) if !s.success() => out,
            Some(_) => panic!("the agent exited 0:\n{out}"),
            None => panic!("the agent started:\n{out}"),
        }
    }

    /// `xlb run` on the current config, in the agent's namespace.
    fn run_command(&self) -> Command {
        // nsenter execs the agent, so the PID we hold is the agent's.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path))
            .arg("--")
            .args(&self.wrapper)
            .arg(binary("xlb"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .env("XLB_TEST_HOLD_APPLIES", &self.hold);
        cmd
    }

    /// Starts (or restarts) the process on the current config (given this agent's control
    /// socket if it names none).
    pub fn launch(&mut self) {
        if let Ok(text) = std::fs::read_to_string(&self.config_path) {
            let (edited, control) = with_control(&text, &self.control);
            if edited != text {
                std::fs::write(&self.config_path, edited).expect("write config");
            }
            self.control = control;
        }
        let mut proc = Proc::spawn("xlb", self.run_command(), self.log.clone());
        let up = wait_for(Duration::from_secs(10), || {
            if !proc.is_running() {
                panic!("xlb exited:\n{}", proc.log_text());
            }
            proc.log_text().contains("xlb is running").then_some(())
        });
        up.unwrap_or_else(|| panic!("xlb did not come up:\n{}", proc.log_text()));
        self.proc = Some(proc);
    }

    /// Starts a second `xlb run` on the same config (and pin path) while this one runs;
    /// returns its exit status, or None if it still ran after `within` (it is then
    /// stopped), and its output.
    pub fn run_another(&self, within: Duration) -> (Option<ExitStatus>, String) {
        let log = self.log.with_file_name("xlb-another.log");
        let mut proc = Proc::spawn("xlb-another", self.run_command(), log);
        let status = proc.wait_exit(within);
        (status, proc.log_text())
    }

    /// SIGTERM: the agent exits and leaves the data path pinned.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let status = p.stop(Duration::from_secs(5));
            assert!(
                status.is_some_and(|s| s.success()),
                "xlb did not exit cleanly:\n{}",
                p.log_text()
            );
        }
    }

    /// Stops the agent (its pins stay) and starts it again on `config`.
    pub fn restart_with(&mut self, config: &str) {
        self.stop();
        let (config, _) = with_control(config, &self.control);
        std::fs::write(&self.config_path, config).expect("write config");
        self.launch();
    }

    /// SIGKILL: the agent dies wherever it is, as in a crash; its pins stay.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGKILL);
            p.stop(Duration::from_secs(5));
        }
    }

    /// The agent's PID (it must be running).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("agent running").pid()
    }

    /// Holds the agent's next applies (each waits until the guard is dropped, at most 60 s).
    pub fn hold_applies(&self) -> HeldApplies {
        std::fs::write(&self.hold, "").expect("write the hold file");
        HeldApplies(self.hold.clone())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The flow from `client` ("ADDR:PORT" as `xlb flows` prints it) that `xlb flows
    /// --service SERVICE --json` lists; panics if it lists none.
    pub fn flow_from(&self, service: &str, client: &str) -> serde_json::Value {
        let (ok, out) = self.cli(&["flows", "--service", service, "--json"]);
        assert!(ok, "{out}");
        let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
        let flows = listed["flows"].as_array().cloned().unwrap_or_default();
        flows
            .into_iter()
            .find(|f| f["client"] == client)
            .unwrap_or_else(|| panic!("{client} not in {listed}"))
    }

    /// Runs an `xlb` subcommand in the lb namespace; returns (success, stdout + stderr).
    /// Control commands go to this agent's control socket (XLB_CONTROL).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        self.cli_as(&[], args)
    }

    /// `cli` through `wrapper` (such as `setpriv --reuid nobody ...`), inside the namespace.
    pub fn cli_as(&self, wrapper: &[&str], args: &[&str]) -> (bool, String) {
        let xlb = binary("xlb");
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .arg("--")
            .args(wrapper)
            .arg(xlb)
            .args(args)
            .env("XLB_CONTROL", &self.control)
            .output()
            .expect("run xlb");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// `service` in `xlb status --json` (Null if there is none).
    pub fn service(&self, service: &str) -> serde_json::Value {
        let status = self.status();
        let services = status["services"].as_array().cloned().unwrap_or_default();
        services
            .into_iter()
            .find(|s| s["name"] == service)
            .unwrap_or_default()
    }

    /// Each service of `xlb status --json` without its counters and probe times (that
    /// move on their own): name, VIP, port, ring size and rebuilds, and each backend's
    /// address, id, state and weight.
    pub fn services_summary(&self) -> Vec<String> {
        let status = self.status();
        let services = status["services"].as_array().cloned().unwrap_or_default();
        services
            .iter()
            .map(|s| {
                let backends: Vec<String> = s["backends"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|b| {
                        format!(
                            "{}#{} {} {}",
                            b["address"], b["id"], b["state"], b["weight"]
                        )
                    })
                    .collect();
                format!(
                    "{} {}:{} size={} rebuilds={} [{}]",
                    s["name"],
                    s["vip"],
                    s["port"],
                    s["table_size"],
                    s["ring_rebuilds"],
                    backends.join(", ")
                )
            })
            .collect()
    }

    /// (address, state) of each backend of `service`, as `xlb status --json` shows them.
    pub fn backends(&self, service: &str) -> Vec<(String, String)> {
        let svc = self.service(service);
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        svc["backends"]
            .as_array()
            .map(|b| {
                b.iter()
                    .map(|b| (text(&b["address"]), text(&b["state"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (bounded) until exactly `n` backends of `service` are up.
    pub fn wait_up(&self, service: &str, n: usize, within: Duration) {
        let up = || {
            self.backends(service)
                .iter()
                .filter(|(_, s)| s == "up")
                .count()
        };
        wait_for(within, || (up() == n).then_some(())).unwrap_or_else(|| {
            panic!(
                "{n} backends of {service} not up within {within:?}: {:?}\n{}",
                self.backends(service),
                self.log_text()
            )
        });
    }

    /// `wait_up`, and each of them answered its last probe: on a first start backends are up
    /// before any probe, and a probe lost while the programs attach takes them down again.
    pub fn wait_probed_up(&self, service: &str, n: usize, within: Duration) {
        let probed = || -> usize {
            let status = self.status();
            let services = status["services"].as_array().cloned().unwrap_or_default();
            services
                .iter()
                .filter(|s| s["name"] == service)
                .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                .filter(|b| b["state"] == "up" && b["last_probe"]["ok"] == true)
                .count()
        };
        wait_for(within, || (probed() == n).then_some(())).unwrap_or_else(|| {
            panic!(
                "{n} backends of {service} not up and probed within {within:?}: {}",
                self.status()
            )
        });
    }

    /// Waits (bounded) until `address` of `service` is in `state`.
    pub fn wait_state(&self, service: &str, address: &str, state: &str, within: Duration) {
        let is = || {
            self.backends(service)
                .iter()
                .any(|(a, s)| a == address && s == state)
        };
        wait_for(within, || is().then_some(())).unwrap_or_else(|| {
            panic!("{address} not {state} within {within:?}: {}", self.status())
        });
    }

    /// Waits (bounded) until `n` backends, of all services, are delivered through their own
    /// host-side veth (`delivery` in `xlb status --json`), and no other backend is.
    pub fn wait_for_veths(&self, n: usize, within: Duration) {
        let deliveries = || -> Vec<String> {
            let status = self.status();
            let services = status["services"].as_array().cloned().unwrap_or_default();
            services
                .iter()
                .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                .map(|b| b["delivery"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        let found = wait_for(within, || {
            let d = deliveries();
            (d.len() == n && d.iter().all(|d| d.starts_with("veth "))).then_some(())
        });
        assert!(
            found.is_some(),
            "{n} veths not found within {within:?}: {:?}\n{}",
            deliveries(),
            self.log_text()
        );
    }

    /// The data path's verdict counter `reason` (`xlb status --json`).
    pub fn verdicts(&self, reason: &str) -> u64 {
        let status = self.status();
        status["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|pair| pair[0] == reason))
            .and_then(|pair| pair[1].as_u64())
            .unwrap_or(0)
    }

    /// The names of the links pinned under the pin path.
    pub fn links(&self) -> Vec<String> {
        std::fs::read_dir(self.pin_path.join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// GET `path` on the agent's read-only API (`agent.api` of its config, a TCP address;
    /// else 127.0.0.1:9900), from inside its namespace.
    pub fn api_get(&self, path: &str) -> String {
        let config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let api: SocketAddr = config
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("agent")?.get("api")?.as_str()?.parse().ok())
            .unwrap_or_else(|| "127.0.0.1:9900".parse().expect("addr"));
        let (ns, path) = (self.ns_path.clone(), path.to_string());
        std::thread::spawn(move || {
            crate::netns::enter(&ns);
            http_get(api, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The events of `GET /events` (after event `since`, if given), each line parsed.
    pub fn events(&self, since: Option<u64>) -> Vec<serde_json::Value> {
        let path = match since {
            Some(seq) => format!("/events?since={seq}"),
            None => "/events".into(),
        };
        self.api_get(&path)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    /// (kind, service, backend, message) of each event of `kinds` (after `since`), oldest
    /// first.
    pub fn events_of(&self, since: Option<u64>, kinds: &[&str]) -> Vec<[String; 4]> {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        self.events(since)
            .iter()
            .filter(|e| kinds.iter().any(|k| e["kind"] == *k))
            .map(|e| {
                [
                    text(&e["kind"]),
                    text(&e["service"]),
                    text(&e["backend"]),
                    text(&e["message"]),
                ]
            })
            .collect()
    }

    /// The sequence number of the newest event (0 if none).
    pub fn last_event(&self) -> u64 {
        let events = self.events(None);
        events.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0)
    }

    pub fn status(&self) -> serde_json::Value {
        let (ok, out) = self.cli(&["status", "--json"]);
        assert!(ok, "xlb status failed: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad status JSON ({e}): {out}"))
    }

    /// Rewrites the config file (with this agent's control socket if it names none) and
    /// asks the agent to reload it.
    pub fn reload(&self, config: &str) -> (bool, String) {
        let (config, _) = with_control(config, &self.control);
        std::fs::write(&self.config_path, config).expect("write config");
        self.cli(&["reload"])
    }

    pub fn detach(&self) -> String {
        let (ok, out) = self.cli(&[
            "detach",
            "--pin-path",
            self.pin_path.to_str().expect("utf-8"),
        ]);
        assert!(ok, "xlb detach failed: {out}");
        out
    }
}

/// `config` with `control = "<default>"` on the line after `[agent]` if its agent table
/// sets no control socket (the lines below move down by one), and the control socket it
/// then names. Text that is not TOML, or has no `[agent]` line, is left as it is.
/// Also sets `xdp_mode = "driver"` if the config sets none: most tests exercise XDP on the
/// front, which is a veth here, where `auto` would pick the TC balancer (see
/// xlb::loader::automode). A config with the comment line [`XDP_MODE_AS_WRITTEN`] is left
/// without one (the default, `auto`, as a user's config gets it).
pub fn with_control(config: &str, default: &Path) -> (String, PathBuf) {
    let (config, control) = with_control_only(config, default);
    (with_xdp_mode(&config), control)
}

/// A comment line that keeps the harness from setting `xdp_mode` (see [`with_control`]).
pub const XDP_MODE_AS_WRITTEN: &str = "# xlb-tests: xdp_mode as written (unset: auto)\n";

/// `config` with `xdp_mode = "driver"` after `[agent]` if its agent table sets no mode.
fn with_xdp_mode(config: &str) -> String {
    let Ok(doc) = config.parse::<toml::Table>() else {
        return config.to_string();
    };
    if config.contains(XDP_MODE_AS_WRITTEN.trim_end()) {
        return config.to_string();
    }
    let agent = doc.get("agent");
    if agent.is_none() || agent.and_then(|a| a.get("xdp_mode")).is_some() {
        return config.to_string();
    }
    let mut out = String::with_capacity(config.len() + 24);
    let mut added = false;
    for line in config.split_inclusive('\n') {
        out.push_str(line);
        if !added && line.split('#').next().unwrap_or_default().trim() == "[agent]" {
            let ending = if line.ends_with('\n') { "" } else { "\n" };
            out.push_str(&format!("{ending}xdp_mode = \"driver\"\n"));
            added = true;
        }
    }
    out
}

fn with_control_only(config: &str, default: &Path) -> (String, PathBuf) {
    let Ok(doc) = config.parse::<toml::Table>() else {
        return (config.to_string(), default.into());
    };
    if let Some(set) = doc
        .get("agent")
        .and_then(|a| a.get("control"))
        .and_then(|c| c.as_str())
    {
        return (config.to_string(), set.trim_start_matches("unix:").into());
    }
    let mut out = String::with_capacity(config.len() + 80);
    let mut added = false;
    for line in config.split_inclusive('\n') {
        out.push_str(line);
        if !added && line.split('#').next().unwrap_or_default().trim() == "[agent]" {
            let ending = if line.ends_with('\n') { "" } else { "\n" };
            out.push_str(&format!(
                "{ending}control = {:?}\n",
                default.display().to_string()
            ));
            added = true;
        }
    }
    (out, default.into())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
        let _ = xlb::loader::detach(&self.pin_path);
        // The ports detach kept for a next agent on this pin path, which never comes.
        let _ = std::fs::remove_file(xlb::snatheld::held_path(&self.pin_path));
    }
}
