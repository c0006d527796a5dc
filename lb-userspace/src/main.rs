//! The `xlb` command line.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use xlb::{
    api,
    config::{ApiListen, Config, DEFAULT_CONTROL, XdpMode, parse_control},
    loader,
    lock::{Held, PinLock},
    status::Status,
};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "XDP L4 load balancer for Docker and Swarm hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load, attach and run the agent. agent.pin_path must be on the host's bpffs (one is
    /// mounted on /sys/fs/bpf or on an empty pin directory if needed); under `ip netns exec`
    /// it refuses to start: use `nsenter --net=/run/netns/NS xlb run ...`.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show services, backends and counters of the running agent (its read-only API).
    Status {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every second with rates (packets/s, new flows/s) instead of totals, until
        /// Ctrl-C. Without a terminal, frames are printed one after another.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Which backend the data path gives a flow, and why: its flow-table entry, or the ring
    /// slot a new flow takes; an allow-list refusal, no VIP, no backend. Read-only.
    Explain {
        /// The client: IP:PORT.
        #[arg(long, value_name = "IP:PORT")]
        from: std::net::SocketAddr,
        /// The VIP: VIP:PORT.
        #[arg(long, value_name = "VIP:PORT")]
        to: std::net::SocketAddr,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        proto: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The flows in the data path's tables, least idle first. Read-only.
    Flows {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<String>,
        /// Only flows to this backend (ADDRESS:PORT, as `xlb status` shows it).
        #[arg(long)]
        backend: Option<String>,
        /// At most this many (the agent caps it at 10000).
        #[arg(long, default_value_t = xlb::flows::DEFAULT_LIMIT)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make the running agent re-read its config. Through its control socket: root, or a
    /// member of agent.control_group.
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Stop sending new flows to a backend; its established flows go on. Through the
    /// control socket, as `reload`.
    Drain(BackendArgs),
    /// Undo `xlb drain`. Through the control socket, as `reload`.
    Undrain(BackendArgs),
    /// Print live records of the packets the data path balances (verdict, rewrite, backend,
    /// interface), at most 1000 a second per CPU. Through the control socket, as `reload`
    /// (records show client addresses). Tracing costs the data path nothing when none runs.
    Trace {
        /// Only this service's packets.
        #[arg(long)]
        service: Option<String>,
        /// Only packets from this source (CIDR or address).
        #[arg(long, value_name = "CIDR")]
        from: Option<String>,
        /// Stop after this many records (default: until interrupted).
        #[arg(long)]
        count: Option<usize>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Detach all programs and remove all pinned state. Refused while an agent runs on the
    /// pin path (stop it first), and for a pin path off a bpffs: only pins are removed.
    Detach {
        /// The pin path to clean (default: agent.pin_path of --config, else /sys/fs/bpf/xlb).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Detach even while an agent runs on the pin path: it then serves no traffic.
        #[arg(long)]
        force: bool,
    },
    /// On a backend host of a dsr service: decapsulate the balancer's IPIP, IPv6-in-IPv6 and
    /// GUE (over IPv4 or IPv6) packets for these VIPs and put the VIPs on lo. Stays attached
    /// after exit: the pin path must be on the host's bpffs, so under `ip netns exec` (which
    /// remounts /sys) it refuses; use `nsenter --net=/run/netns/NS xlb decap ...` there.
    Decap {
        /// Interfaces where encapsulated packets arrive (repeat for several).
        #[arg(long = "interface", short, required_unless_present_any = ["detach", "status"])]
        interfaces: Vec<String>,
        /// VIPs served by this host, IPv4 or IPv6 (repeat for several).
        #[arg(long = "vip", required_unless_present_any = ["detach", "status"])]
        vips: Vec<std::net::IpAddr>,
        /// Accept encapsulated packets only from these outer sources (IPv4 or IPv6 CIDR or
        /// address; the LB nodes; repeat for several); a family with no prefix here is refused.
        /// Without it, from any source of both families (a warning): anyone who reaches this
        /// host could inject packets with a forged client address.
        #[arg(long = "from", value_name = "CIDR", value_parser = xlb::decap::parse_source)]
        from: Vec<ipnet::IpNet>,
        /// auto (driver, falling back to skb), driver or skb.
        #[arg(long, default_value = "auto")]
        xdp_mode: String,
        #[arg(long, default_value = xlb::decap::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Remove the program, its pins and the VIPs from lo instead.
        #[arg(long, conflicts_with = "status")]
        detach: bool,
        /// Show the VIPs served and the counters instead.
        #[arg(long)]
        status: bool,
    },
}

#[derive(clap::Args)]
struct BackendArgs {
    service: String,
    /// ADDRESS:PORT, as `xlb status` shows it.
    backend: String,
    #[command(flatten)]
    control: ControlArgs,
}

impl BackendArgs {
    fn post(&self, runtime: &tokio::runtime::Runtime, action: &str) -> Result<ExitCode> {
        let path = format!("/backends/{}/{}/{action}", self.service, self.backend);
        post(runtime, &self.control, &path)
    }
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The agent's control socket: /path or unix:/path (default: agent.control of --config,
    /// else /run/xlb/control.sock).
    #[arg(long, env = "XLB_CONTROL")]
    control: Option<String>,
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ControlArgs {
    fn socket(&self) -> Result<PathBuf> {
        let text = match (&self.control, &self.config) {
            (Some(control), _) => control.clone(),
            (None, Some(path)) => Config::load(path)?.agent.control,
            (None, None) => DEFAULT_CONTROL.into(),
        };
        parse_control(&text).map_err(anyhow::Error::msg)
    }
}

#[derive(clap::Args)]
struct ApiArgs {
    /// The agent's API: IP:PORT or unix:/path (default: agent.api of --config, else 127.0.0.1:9900).
    #[arg(long)]
    api: Option<String>,
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ApiArgs {
    fn listen(&self) -> Result<ApiListen> {
        let text = match (&self.api, &self.config) {
            (Some(api), _) => api.clone(),
            (None, Some(path)) => Config::load(path)?.agent.api,
            (None, None) => "127.0.0.1:9900".into(),
        };
        ApiListen::parse(&text).map_err(anyhow::Error::msg)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run { config } => runtime.block_on(xlb::agent::run(&config))?,
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            let halves: usize = cfg.services.iter().map(|s| s.vip.len()).sum();
            let dual = if halves > cfg.services.len() {
                format!(", {halves} in the data path: a dual-stack service is two")
            } else {
                String::new()
            };
            println!(
                "{}: OK ({} services{dual}, {} static backends)",
                config.display(),
                cfg.services.len(),
                backends
            );
            let layout = xlb::layout::Layout::for_config(&cfg);
            println!("{}", layout.describe(xlb::layout::possible_cpus()));
        }
        Command::Status {
            watch: true, api, ..
        } => runtime.block_on(watch(&api.listen()?))?,
        Command::Explain {
            from,
            to,
            proto,
            json,
            api,
        } => {
            let path = format!(
                "/explain?from={}&to={}&proto={proto}",
                query_text(&from.to_string()),
                query_text(&to.to_string())
            );
            let body = get(&runtime, &api, &path)?;
            if json {
                println!("{body}");
            } else {
                let answer: xlb::explain::Explanation =
                    serde_json::from_str(&body).context("parsing the answer")?;
                print!("{}", answer.render());
            }
        }
        Command::Flows {
            service,
            backend,
            limit,
            json,
            api,
        } => {
            let mut path = format!("/flows?limit={limit}");
            for (name, value) in [("service", service), ("backend", backend)] {
                if let Some(value) = value {
                    path += &format!("&{name}={}", query_text(&value));
                }
            }
            let body = get(&runtime, &api, &path)?;
            if json {
                println!("{body}");
            } else {
                let list: xlb::flows::FlowList =
                    serde_json::from_str(&body).context("parsing the flows")?;
                print!("{}", list.render());
            }
        }
        Command::Status { json, api, .. } => {
            let body = get(&runtime, &api, "/status")?;
            if json {
                println!("{body}");
            } else {
                let status: Status = serde_json::from_str(&body).context("parsing the status")?;
                print!("{}", status.render());
            }
        }
        Command::Reload { control } => {
            return post(&runtime, &control, "/reload");
        }
        Command::Drain(target) => return target.post(&runtime, "drain"),
        Command::Undrain(target) => return target.post(&runtime, "undrain"),
        Command::Trace {
            service,
            from,
            count,
            json,
            control,
        } => {
            let mut query = Vec::new();
            query.extend(service.map(|s| format!("service={s}")));
            query.extend(from.map(|f| format!("from={f}")));
            query.extend(count.map(|n| format!("count={n}")));
            let path = format!("/trace?{}", query.join("&"));
            let (code, body) =
                runtime.block_on(api::control_lines(&control.socket()?, &path, |line| {
                    if json {
                        println!("{line}");
                    } else {
                        match serde_json::from_str::<xlb::trace::Line>(line) {
                            Ok(l) => println!("{}", l.render()),
                            Err(_) => println!("{line}"),
                        }
                    }
                }))?;
            if code != 200 {
                eprint!("error: {body}");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Detach {
            pin_path,
            config,
            force,
        } => {
            let pin_path = match (pin_path, config) {
                (Some(p), _) => p,
                (None, Some(c)) => Config::load(&c)?.agent.pin_path,
                (None, None) => "/sys/fs/bpf/xlb".into(),
            };
            // Held while detaching, so no agent starts on a half-removed pin path.
            let _lock = detach_lock(&pin_path, force)?;
            let done = loader::detach(&pin_path)?;
            println!(
                "detached {} links, removed {} pins under {}",
                done.links,
                done.pins,
                pin_path.display()
            );
        }
        Command::Decap {
            interfaces,
            vips,
            from,
            xdp_mode,
            pin_path,
            detach,
            status,
        } => {
            if status {
                let vips: Vec<String> = xlb::decap::served_vips(&pin_path)?
                    .iter()
                    .map(|v| v.to_string())
                    .collect();
                println!("VIPs: {}", vips.join(", "));
                let sources = xlb::decap::accepted_sources(&pin_path)?;
                println!("from: {}", xlb::decap::describe_sources(&sources));
                for (counter, n) in xlb::decap::counters(&pin_path)? {
                    println!("{:<13} {n}", counter.name());
                }
            } else if detach {
                xlb::decap::detach(&pin_path)?;
                println!("decap removed from {}", pin_path.display());
            } else {
                let mode = match xdp_mode.as_str() {
                    "auto" => XdpMode::Auto,
                    "driver" => XdpMode::Driver,
                    "skb" => XdpMode::Skb,
                    other => anyhow::bail!("--xdp-mode {other}: use auto, driver or skb"),
                };
                xlb::decap::attach(&pin_path, &interfaces, &vips, &from, mode)?;
                let vips: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
                println!(
                    "decapsulating for {} on {} (pinned under {})",
                    vips.join(", "),
                    interfaces.join(", "),
                    pin_path.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// GET `path` from the read API; the body of a 200 answer.
fn get(runtime: &tokio::runtime::Runtime, api: &ApiArgs, path: &str) -> Result<String> {
    let (code, body) = runtime.block_on(api::request(&api.listen()?, "GET", path))?;
    if code != 200 {
        anyhow::bail!("the agent answered {code}: {body}");
    }
    Ok(body)
}

/// `text` percent-encoded for a query string (all but unreserved characters and ':').
fn query_text(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `xlb status --watch`: a frame a second until Ctrl-C (SIGINT ends the process).
async fn watch(listen: &ApiListen) -> Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal();
    let fetch = || async {
        let (code, body) = api::request(listen, "GET", "/status").await?;
        if code != 200 {
            anyhow::bail!("the agent answered {code}: {body}");
        }
        let status: Status = serde_json::from_str(&body).context("parsing the status")?;
        Ok((status, std::time::Instant::now()))
    };
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    ticks.tick().await;
    let (mut before, mut then) = fetch().await?;
    loop {
        ticks.tick().await;
        let (now, at) = fetch().await?;
        let frame = xlb::watch::render(&before, &now, at - then);
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear: the table is redrawn in place.
            write!(out, "\x1b[H\x1b[2J{frame}")?;
        } else {
            writeln!(out, "{frame}")?;
        }
        out.flush()?;
        (before, then) = (now, at);
    }
}

/// The pin path's lock for `xlb detach`; none if there is no pin path, or if `force` and
/// an agent holds it.
fn detach_lock(pin_path: &std::path::Path, force: bool) -> Result<Option<PinLock>> {
    if !pin_path.is_dir() {
        return Ok(None);
    }
    match PinLock::try_existing(pin_path) {
        Ok(lock) => Ok(Some(lock)),
        Err(e) if e.is::<Held>() && force => {
            tracing::warn!("{e}; detaching anyway (--force): it no longer serves traffic");
            Ok(None)
        }
        Err(e) if e.is::<Held>() => {
            anyhow::bail!("{e}: stop the agent first (or pass --force to detach anyway)")
        }
        Err(e) => Err(e),
    }
}

/// POSTs to the agent's control socket and prints its answer; fails when the agent refused.
fn post(runtime: &tokio::runtime::Runtime, control: &ControlArgs, path: &str) -> Result<ExitCode> {
    let (code, body) = runtime.block_on(api::control(&control.socket()?, "POST", path))?;
    if code == 200 {
        print!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprint!("error: {body}");
        Ok(ExitCode::FAILURE)
    }
}
