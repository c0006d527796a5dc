//! The soak's client load, from threads in the client namespace: new TCP connections and new
//! UDP flows at a steady pace, and a few long-lived TCP connections and UDP flows held on the
//! stable backends (never killed nor removed), asked at a slower pace. Every request is
//! bounded by `client::TIMEOUT`; every loop stops when told or after `max` requests.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::client::{LineConn, tcp_name, udp_name};

/// The kind of load a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    TcpNew,
    UdpNew,
    TcpLong,
    UdpLong,
    /// New TCP connections to the Docker host's VIP (its containers).
    ContainerTcpNew,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::TcpNew,
        Kind::UdpNew,
        Kind::TcpLong,
        Kind::UdpLong,
        Kind::ContainerTcpNew,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Kind::TcpNew => "TCP, a new connection per request",
            Kind::UdpNew => "UDP, a new flow (source port) per request",
            Kind::TcpLong => "TCP, long-lived connections",
            Kind::UdpLong => "UDP, long-lived flows (fixed source port)",
            Kind::ContainerTcpNew => "TCP to Docker containers, a new connection per request",
        }
    }

    /// A request to the Docker host's agent (not the static backends').
    pub fn to_containers(self) -> bool {
        self == Kind::ContainerTcpNew
    }

    /// A new flow: it is balanced by the ring, so it can meet a dying backend.
    pub fn is_new_flow(self) -> bool {
        matches!(self, Kind::TcpNew | Kind::UdpNew | Kind::ContainerTcpNew)
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    pub at: Instant,
    /// The backend a long-lived flow was on (new flows: the one that answered).
    pub backend: Option<String>,
    pub answer: Result<String, String>,
}

/// All load threads; `stop` joins them and returns every request made.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Request>>>,
}

/// Pace and size of the load.
pub struct Pace {
    pub tcp_every: Duration,
    pub udp_every: Duration,
    pub long_every: Duration,
    pub tcp_long: usize,
    pub udp_long: usize,
    pub container_every: Duration,
    /// Upper bound of requests per thread.
    pub max: usize,
}

impl Load {
    /// Starts the load on `tcp` and `udp` (VIP addresses); long-lived flows are opened until
    /// they land on one of `stable` (backend names).
    pub fn start(
        client_ns: &str,
        tcp: SocketAddr,
        udp: SocketAddr,
        stable: &[String],
        pace: &Pace,
    ) -> Load {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let max = pace.max;
        load.new_connections(client_ns, tcp, Kind::TcpNew, pace.tcp_every, max);
        load.spawn(
            client_ns,
            pace.udp_every,
            max,
            Box::new(move || {
                Some(new_flow(Kind::UdpNew, || {
                    udp_name(&UdpSocket::bind("0.0.0.0:0")?, udp)
                }))
            }),
        );
        for _ in 0..pace.tcp_long {
            let mut held = Held::new(Kind::TcpLong, tcp, stable);
            load.spawn(
                client_ns,
                pace.long_every,
                max,
                Box::new(move || held.ask()),
            );
        }
        for _ in 0..pace.udp_long {
            let mut held = Held::new(Kind::UdpLong, udp, stable);
            load.spawn(
                client_ns,
                pace.long_every,
                max,
                Box::new(move || held.ask()),
            );
        }
        load
    }

    /// Adds a loop of new TCP connections to `vip` from `client_ns`.
    pub fn new_connections(
        &mut self,
        client_ns: &str,
        vip: SocketAddr,
        kind: Kind,
        every: Duration,
        max: usize,
    ) {
        let ask = Box::new(move || Some(new_flow(kind, || tcp_name(vip))));
        self.spawn(client_ns, every, max, ask);
    }

    fn spawn(&mut self, client_ns: &str, every: Duration, max: usize, f: Asker) {
        let (stop, ns) = (self.stop.clone(), client_ns.to_string());
        self.threads.push(std::thread::spawn(move || {
            crate::netns::enter(&ns);
            steady(&stop, every, max, f)
        }));
    }

    pub fn stop(self) -> Vec<Request> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all: Vec<Request> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        all.sort_by_key(|r| r.at);
        all
    }
}

/// One request of a load, or None (nothing counted: a long-lived flow being opened).
type Asker = Box<dyn FnMut() -> Option<Request> + Send>;

/// Calls `f` once every `every` until stopped or `max` requests were made.
fn steady(stop: &AtomicBool, every: Duration, max: usize, mut f: Asker) -> Vec<Request> {
    let mut done = Vec::new();
    while !stop.load(Ordering::SeqCst) && done.len() < max {
        let at = Instant::now();
        done.extend(f());
        std::thread::sleep(every.saturating_sub(at.elapsed()));
    }
    done
}

fn new_flow(kind: Kind, ask: impl FnOnce() -> std::io::Result<String>) -> Request {
    let at = Instant::now();
    let answer = ask().map_err(|e| e.to_string());
    Request {
        kind,
        at,
        backend: answer.as_ref().ok().cloned(),
        answer,
    }
}

/// A long-lived TCP connection or UDP flow on a stable backend; reopened (and that counted)
/// when it fails.
struct Held {
    kind: Kind,
    vip: SocketAddr,
    stable: Vec<String>,
    tcp: Option<LineConn>,
    udp: Option<UdpSocket>,
    backend: Option<String>,
}

impl Held {
    fn new(kind: Kind, vip: SocketAddr, stable: &[String]) -> Held {
        Held {
            kind,
            vip,
            stable: stable.to_vec(),
            tcp: None,
            udp: None,
            backend: None,
        }
    }

    /// Asks on the held flow; opens one first if there is none. Opening is not a request
    /// of the long-lived load (a refused open shows up in the new-flow loads).
    fn ask(&mut self) -> Option<Request> {
        if self.backend.is_none() {
            self.open();
            return None;
        }
        let at = Instant::now();
        let answer = match self.kind {
            Kind::TcpLong => self.tcp.as_mut().expect("open").ask(),
            _ => udp_name(self.udp.as_ref().expect("open"), self.vip),
        }
        .map_err(|e| e.to_string());
        let backend = self.backend.clone();
        // An answer from another backend means the flow moved: as bad as an error.
        let answer = match answer {
            Ok(name) if Some(&name) != backend.as_ref() => {
                Err(format!("answered by {name}, not {backend:?}"))
            }
            other => other,
        };
        if answer.is_err() {
            (self.tcp, self.udp, self.backend) = (None, None, None);
        }
        Some(Request {
            kind: self.kind,
            at,
            backend,
            answer,
        })
    }

    /// Up to 20 tries to land a flow on a stable backend.
    fn open(&mut self) {
        for _ in 0..20 {
            let name = match self.kind {
                Kind::TcpLong => LineConn::connect(self.vip).and_then(|mut c| {
                    let name = c.ask()?;
                    self.tcp = Some(c);
                    Ok(name)
                }),
                _ => UdpSocket::bind("0.0.0.0:0").and_then(|s| {
                    let name = udp_name(&s, self.vip)?;
                    self.udp = Some(s);
                    Ok(name)
                }),
            };
            if let Ok(name) = name
                && self.stable.contains(&name)
            {
                self.backend = Some(name);
                return;
            }
            (self.tcp, self.udp) = (None, None);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
