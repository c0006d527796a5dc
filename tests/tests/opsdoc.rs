//! Not a test: captures the command output that docs/operations.md shows, from a real run
//! (a client, three backends, one killed, one drained, a service with an allow list).
//! `cargo test -p xlb-tests --test opsdoc -- --ignored --nocapture` as root.
use std::time::Duration;

use xlb_tests::{
    agent::Agent,
    client::{LineConn, tcp_name},
    process::{Proc, binary},
    topology::{CLIENT_ADDR, Topology, VIP},
};

fn show(agent: &Agent, args: &[&str]) {
    let (_, out) = agent.cli(args);
    println!("$ xlb {}\n{out}", args.join(" "));
}

/// Prints `xlb trace ARGS` (it ends after its `--count`) while `traffic` runs, at most 10 s.
fn show_trace(
    topo: &Topology,
    agent: &Agent,
    args: &[&str],
    traffic: impl FnOnce() + Send + 'static,
) {
    let mut cmd = std::process::Command::new(binary("xlb"));
    cmd.arg("trace")
        .args(args)
        .env("XLB_CONTROL", &agent.control);
    let mut trace = Proc::spawn("trace", cmd, topo.dir.join("trace.log"));
    // The trace is on once the agent has its request.
    std::thread::sleep(Duration::from_millis(300));
    topo.client.run(traffic);
    let ended = trace.wait_exit(Duration::from_secs(10)).is_some();
    if !ended {
        trace.stop(Duration::from_secs(5));
    }
    let note = if ended {
        ""
    } else {
        "   (still running after 10 s: stopped)"
    };
    println!("$ xlb trace {}{note}\n{}", args.join(" "), trace.log_text());
}

#[test]
#[ignore = "prints the output docs/operations.md shows; run by hand"]
fn capture_operations_doc_output() {
    let mut topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let mut config = topo.config(&Agent::pin_path_for(&topo), &all);
    config += &format!(
        "\n[[service]]\nname = \"admin\"\nvip = \"{VIP}\"\nport = 82\nallow = [\"10.99.3.0/24\"]\n\
         [service.health]\n  type = \"tcp\"\n  interval = \"200ms\"\n  timeout = \"100ms\"\n\
         [[service.backend]]\n  address = \"{}\"\n  port = 8080\n",
        topo.backends[0].addr
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 3, Duration::from_secs(5));
    let vip = topo.vip(80);
    let (mut conns, names): (Vec<LineConn>, Vec<String>) = topo
        .client
        .run(move || (0..6).map(|_| LineConn::open(vip)).unzip());
    println!("answered by: {names:?}");
    let port = conns[0].local_addr().unwrap().port();
    topo.client.run(move || {
        for _ in 0..30 {
            let _ = tcp_name(vip);
        }
    });
    let admin = topo.vip(82);
    topo.client.run(move || {
        let _ = LineConn::connect(admin);
    });
    let down = topo.backends[1].addr.clone();
    topo.kill_backend(1);
    agent.wait_state(
        "web",
        &format!("{down}:8080"),
        "down",
        Duration::from_secs(5),
    );
    let drained = format!("{}:8080", topo.backends[2].addr);
    show(&agent, &["drain", "web", &drained]);

    show(&agent, &["status"]);
    let from = format!("{CLIENT_ADDR}:{port}");
    show(
        &agent,
        &["explain", "--from", &from, "--to", &format!("{VIP}:80")],
    );
    show(
        &agent,
        &[
            "explain",
            "--from",
            &format!("{CLIENT_ADDR}:50000"),
            "--to",
            &format!("{VIP}:80"),
        ],
    );
    show(
        &agent,
        &[
            "explain",
            "--from",
            &format!("{CLIENT_ADDR}:50000"),
            "--to",
            &format!("{VIP}:82"),
        ],
    );
    show(&agent, &["flows", "--service", "web", "--limit", "5"]);
    show(&agent, &["flows", "--backend", &drained]);
    let load = topo.client.run(move || {
        for conn in conns.iter_mut() {
            let _ = conn.ask();
        }
        conns
    });
    let client_ns = topo.client.path();
    let loop_ = xlb_tests::client::LoadLoop::start(&client_ns, vip, Duration::from_millis(10), 300);
    let (_, out) = agent.cli_as(&["timeout", "2.5"], &["status", "--watch"]);
    println!("$ xlb status --watch   (not a terminal: one frame a second)\n{out}");
    loop_.stop();
    let metrics = topo
        .lb
        .exec(&["curl", "-s", "http://127.0.0.1:9900/metrics"]);
    let verdicts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("xlb_verdicts_total"))
        .collect();
    println!(
        "$ curl -s 127.0.0.1:9900/metrics | grep ^xlb_verdicts_total\n{}",
        verdicts.join("\n")
    );
    drop(load);

    // Traces: one connection's packets to web; the allow list refusing the client on admin.
    show_trace(
        &topo,
        &agent,
        &["--service", "web", "--count", "6"],
        move || {
            for _ in 0..3 {
                let _ = tcp_name(vip);
            }
        },
    );
    show_trace(
        &topo,
        &agent,
        &["--from", "10.99.1.0/24", "--count", "2"],
        move || {
            let _ = LineConn::connect(admin);
        },
    );

    // The events: the killed backend back, a reload, then what GET /events has.
    topo.restart_backend(1);
    agent.wait_state("web", &format!("{down}:8080"), "up", Duration::from_secs(5));
    show(&agent, &["reload"]);
    let events = topo
        .lb
        .exec(&["curl", "-s", "http://127.0.0.1:9900/events"]);
    println!("$ curl -s 127.0.0.1:9900/events\n{events}");
    let page = topo.lb.exec(&["curl", "-s", "http://127.0.0.1:9900/"]);
    println!("GET / is {} bytes of HTML", page.len());
}
