//! What the read API shows an operator: the recent events (`GET /events`) and the status
//! page (`GET /`), here also in headless Chromium. Same netns topology as nat.rs; health
//! checks probe every 200 ms with fall 2 / rise 2. Run as root.
use std::{path::Path, time::Duration};

use xlb_tests::{
    agent::Agent, browser::Browser, client::LoadLoop, process::wait_for, topology::Topology,
};

fn start(backends: usize) -> (Topology, Agent) {
    let topo = Topology::new(backends);
    let all: Vec<_> = topo.backends.iter().collect();
    let agent = Agent::start(&topo, &topo.config(&Agent::pin_path_for(&topo), &all));
    (topo, agent)
}

#[test]
fn a_killed_backend_is_a_down_event_with_its_reason() {
    let (mut topo, agent) = start(2);
    agent.wait_up("web", 2, Duration::from_secs(5));
    topo.kill_backend(1);
    agent.wait_state("web", "10.99.2.12:8080", "down", Duration::from_secs(3));

    let all = agent.events(None);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    let down = all
        .iter()
        .find(|e| {
            e["kind"] == "backend_down"
                && e["service"] == "web"
                && e["backend"] == "10.99.2.12:8080"
        })
        .unwrap_or_else(|| panic!("no down event for be2 of web: {all:#?}"));
    let message = down["message"].as_str().unwrap();
    assert!(
        message.starts_with("backend is down: ") && message.contains("refused"),
        "the reason is the probe's: {message}"
    );
    assert!(down["time"].as_str().unwrap().ends_with('Z'), "{down}");
    assert!(down["unix_ms"].as_u64().unwrap() > 0, "{down}");
    // The other backend did not go down.
    assert!(
        !all.iter()
            .any(|e| e["kind"] == "backend_down" && e["backend"] == "10.99.2.11:8080"),
        "{all:#?}"
    );

    // ?since= gives only what is newer.
    let seq = down["seq"].as_u64().unwrap();
    let newer = agent.events(Some(seq));
    assert!(
        newer.iter().all(|e| e["seq"].as_u64().unwrap() > seq),
        "{newer:#?}"
    );
    let last = *seqs.last().unwrap();
    assert!(agent.events(Some(last)).is_empty());

    // A drain and a rejected reload are events too.
    let (ok, out) = agent.cli(&["drain", "web", "10.99.2.11:8080"]);
    assert!(ok, "{out}");
    let (ok, out) = agent.reload("this is not toml");
    assert!(!ok, "{out}");
    let later = agent.events(Some(last));
    let kinds: Vec<&str> = later.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"drain"), "{later:#?}");
    // be2 down and be1 drained: web takes no new flow, and says so.
    let problem = later
        .iter()
        .find(|e| e["kind"] == "service_problem" && e["service"] == "web")
        .unwrap_or_else(|| panic!("no problem event for web: {later:#?}"));
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("no backend can take new flows"),
        "{problem}"
    );
    assert!(kinds.contains(&"reload_rejected"), "{later:#?}");

    // Back up after rise good probes.
    topo.restart_backend(1);
    agent.wait_state("web", "10.99.2.12:8080", "up", Duration::from_secs(3));
    let back = agent.events(Some(last));
    assert!(
        back.iter().any(|e| e["kind"] == "backend_up"
            && e["backend"] == "10.99.2.12:8080"
            && e["message"].as_str().unwrap().contains("probe ok")),
        "{back:#?}"
    );
}

/// (backend, state) of each row of the page's table for `service`, from its HTML.
fn page_backends(html: &str, service: &str) -> Vec<(String, String)> {
    let start = format!(r#"<table class="backends" data-service="{service}">"#);
    let table = html
        .split_once(&start)
        .and_then(|(_, rest)| rest.split_once("</table>"))
        .map(|(table, _)| table)
        .unwrap_or_else(|| panic!("no table for {service} in:\n{html}"));
    table
        .split(r#"data-backend=""#)
        .skip(1)
        .map(|row| {
            let (backend, rest) = row.split_once('"').unwrap();
            let state = rest
                .split_once(r#"data-state=""#)
                .and_then(|(_, s)| s.split_once('"'))
                .map(|(s, _)| s.to_string())
                .unwrap();
            (backend.to_string(), state)
        })
        .collect()
}

#[test]
fn the_status_page_in_chromium_shows_the_backends_of_status_and_a_killed_one_down() {
    let (mut topo, agent) = start(3);
    agent.wait_up("web", 3, Duration::from_secs(5));
    let load = LoadLoop::start(
        &topo.client.path(),
        topo.vip(80),
        Duration::from_millis(20),
        2000,
    );
    let browser = Browser::new(&topo.lb, &topo.dir);
    let url = "http://127.0.0.1:9900/";

    let dom = browser.dump_dom(url);
    // The script ran: it fetched the page and /history, and drew the charts.
    assert!(
        dom.contains("data-updated="),
        "the script did not update the page:\n{dom}"
    );
    assert!(dom.contains("live, updated"), "{dom}");
    assert!(dom.contains("<svg"), "no chart drawn:\n{dom}");
    let mut shown = page_backends(&dom, "web");
    let mut status = agent.backends("web");
    shown.sort();
    status.sort();
    assert_eq!(shown, status, "the page shows the backends of /status");
    assert_eq!(shown.len(), 3);

    topo.kill_backend(1);
    agent.wait_state("web", "10.99.2.12:8080", "down", Duration::from_secs(3));
    let dom = browser.dump_dom(url);
    let shown = page_backends(&dom, "web");
    assert!(
        shown.contains(&("10.99.2.12:8080".into(), "down".into())),
        "be2 is down on the page: {shown:?}"
    );
    assert!(
        dom.contains("backend down") && dom.contains("refused"),
        "the down event and its reason are on the page:\n{dom}"
    );

    // Two samples give the charts a rate; then the screenshot.
    let sampled = wait_for(Duration::from_secs(15), || {
        let history: serde_json::Value = serde_json::from_str(&agent.api_get("/history")).unwrap();
        let samples = history["samples"].as_array().cloned().unwrap_or_default();
        (samples.len() >= 2).then_some(samples)
    })
    .expect("two samples within 15 s");
    let web_rate = sampled
        .iter()
        .flat_map(|s| s["rates"].as_array().cloned().unwrap())
        .any(|r| {
            r["service"] == "web"
                && r["backend"].is_null()
                && r["packets_per_s"].as_f64().unwrap() > 0.0
        });
    assert!(web_rate, "the traffic sent shows as a rate: {sampled:#?}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browser.screenshot(url, &shot);
    eprintln!("screenshot: {}", shot.display());
    load.stop();
}
