//! `cargo xtask demo`: a client and three backends in network namespaces with xlb in front.
//! Shows live which backend answers and the requests/s per backend (what seed 001's `make
//! test` shows through HAProxy), kills one backend and brings it back while traffic flows:
//! health checks (TCP every 200 ms, fall 2, rise 2) take it out and put it back. Ctrl-C or
//! the end removes everything it made.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use xlb_tests::{agent::Agent, client::tcp_name, topology::Topology};

#[derive(Parser)]
struct Args {
    /// Seconds of traffic before the demo ends by itself.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// Answers per backend name ("failed" for errors) since the last tick.
type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

const CLIENT_THREADS: usize = 4;
/// Each client thread makes a new connection this often (about 200 requests/s in all).
const PACE: Duration = Duration::from_millis(20);

fn main() {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    ctrlc::set_handler(move || on_signal.store(true, Ordering::SeqCst)).expect("signal handler");

    println!("Creating the sandbox: client 10.99.1.2 -> xlb 10.99.1.1 -> be1..be3 10.99.2.11-13");
    let mut topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all);
    let agent = Agent::start(&topo, &config);
    println!("xlb is up. `xlb status`:\n{}", agent.cli(&["status"]).1);
    println!(
        "Traffic: {CLIENT_THREADS} clients, one new TCP connection every {}ms each, to VIP {}",
        PACE.as_millis(),
        topo.vip(80)
    );

    let tally: Tally = Arc::default();
    let last = Arc::new(Mutex::new(String::new()));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| spawn_client(&topo, stop.clone(), tally.clone(), last.clone()))
        .collect();

    let started = Instant::now();
    let mut second = 0;
    let third = args.seconds / 3;
    while !stop.load(Ordering::SeqCst) && second < args.seconds {
        thread::sleep(Duration::from_secs(1));
        second += 1;
        let counts = std::mem::take(&mut *tally.lock().expect("tally"));
        print_tick(second, &counts, &last.lock().expect("last"));
        if second == third {
            println!("---- killing be2's server: health checks take it out of the ring ----");
            topo.kill_backend(1);
        }
        if second == 2 * third {
            println!("---- starting be2 again: it rejoins after 2 good probes ----");
            topo.restart_backend(1);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.join();
    }
    println!(
        "Final `xlb status` after {:.0}s:\n{}",
        started.elapsed().as_secs_f64(),
        agent.cli(&["status"]).1
    );
    println!("Removing the sandbox (namespaces, pinned programs and maps).");
}

fn spawn_client(
    topo: &Topology,
    stop: Arc<AtomicBool>,
    tally: Tally,
    last: Arc<Mutex<String>>,
) -> thread::JoinHandle<()> {
    let vip = topo.vip(80);
    let client_ns = topo.client.path();
    thread::spawn(move || {
        xlb_tests::netns::enter(&client_ns);
        while !stop.load(Ordering::SeqCst) {
            let name = match tcp_name(vip) {
                Ok(name) => {
                    *last.lock().expect("last") = name.clone();
                    name
                }
                Err(_) => "failed".to_string(),
            };
            *tally.lock().expect("tally").entry(name).or_insert(0) += 1;
            thread::sleep(PACE);
        }
    })
}

fn print_tick(second: u64, counts: &BTreeMap<String, u64>, last: &str) {
    let mut line = format!("[{second:>3}s] last answer: {last:<4} | req/s");
    for name in ["be1", "be2", "be3"] {
        let n = counts.get(name).copied().unwrap_or(0);
        line += &format!("  {name} {n:>3} {:<12}", "#".repeat((n / 5) as usize));
    }
    line += &format!("| failed {}", counts.get("failed").copied().unwrap_or(0));
    println!("{line}");
}
