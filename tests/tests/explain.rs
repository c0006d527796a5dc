//! `xlb explain` and `xlb flows` against real connections in network namespaces: for each
//! connection, the backend `xlb explain` names before it opens (the ring pick) and while it
//! is open (its flow-table entry) is the backend that answered, in nat and fullnat; and
//! `xlb flows` lists the open connections with their backends. Run as root.
use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    os::fd::FromRawFd as _,
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    netns::Netns,
    remote::Remote,
    topology::{CLIENT_ADDR, Topology, VIP},
};

/// A connection from a chosen local port, speaking the test backend's line protocol.
struct PortConn(BufReader<TcpStream>);

impl PortConn {
    /// Connects from `local` to `to` (bind before connect, which std cannot do).
    fn open(local: SocketAddrV4, to: SocketAddrV4) -> io::Result<PortConn> {
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as u32;
        // SAFETY: plain socket calls on a descriptor this function owns; on error it is
        // closed by the TcpStream that wraps it.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
            // Bounds the connect too (Linux applies the send timeout to it).
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let local = sockaddr(local);
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let to = sockaddr(to);
            if libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(PortConn(BufReader::new(stream)))
        }
    }

    fn ask(&mut self) -> io::Result<String> {
        self.0.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        self.0.read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }
}

fn vip(port: u16) -> SocketAddrV4 {
    format!("{VIP}:{port}").parse().expect("addr")
}

fn client(port: u16) -> SocketAddrV4 {
    format!("{CLIENT_ADDR}:{port}").parse().expect("addr")
}

/// `xlb explain --json` for a TCP flow.
fn explain(agent: &Agent, from: SocketAddrV4, to: SocketAddrV4) -> serde_json::Value {
    let (ok, out) = agent.cli(&[
        "explain",
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--json",
    ]);
    assert!(ok, "xlb explain: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn flows(agent: &Agent, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["flows", "--json"];
    all.extend_from_slice(args);
    let (ok, out) = agent.cli(&all);
    assert!(ok, "xlb flows: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The agent serving web (VIP:80) in `mode`, its three backends up; and each backend's
/// name by address (ADDR:8080, as the API shows it).
fn serve(mode: &str) -> (Topology, Agent, BTreeMap<String, String>) {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "port = 80\n",
        &format!("port = 80\nmode = \"{mode}\"\n"),
        1,
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 3, Duration::from_secs(5));
    let names = topo
        .backends
        .iter()
        .map(|b| (format!("{}:8080", b.addr), b.name.clone()))
        .collect();
    (topo, agent, names)
}

/// For 20 client ports: the ring pick `xlb explain` names is the backend that answers the
/// connection, and while it is open its entry names that backend too; `xlb flows` lists them.
/// `client` runs the connections to VIP:`port`; `names` maps backend addresses to names.
fn explain_matches_the_answers(
    agent: &Agent,
    client_ns: &Netns,
    port_: u16,
    names: &BTreeMap<String, String>,
    mode: &str,
) {
    let vip = move |_: u16| self::vip(port_);
    let ports: Vec<u16> = (0..20).map(|i| 41000 + i * 7).collect();
    let mut conns = Vec::new();
    let mut answered = BTreeMap::new();
    for &port in &ports {
        let before = explain(agent, client(port), vip(80));
        assert_eq!(before["verdict"], "forward", "{before}");
        assert_eq!(before["reason"], "new_flow", "{before}");
        assert!(before["ring"]["slot"].is_u64(), "{before}");
        let predicted = names[before["backend"]["address"].as_str().unwrap()].clone();

        let conn = client_ns.run(move || {
            let mut conn = PortConn::open(client(port), vip(80))
                .unwrap_or_else(|e| panic!("connect from port {port}: {e}"));
            let name = conn.ask().unwrap_or_else(|e| panic!("port {port}: {e}"));
            (conn, name)
        });
        assert_eq!(conn.1, predicted, "port {port}: explain said {before}");
        answered.insert(port, conn.1.clone());

        let during = explain(agent, client(port), vip(80));
        assert_eq!(during["reason"], "known_flow", "{during}");
        let table = during["entry"]["table"].as_str().unwrap_or_default();
        assert!(table == "flows" || table == "flows_new", "{during}");
        let age = during["entry"]["age_s"].as_u64();
        assert!(age.is_some_and(|a| a < 60), "the entry's age: {during}");
        let named = &names[during["backend"]["address"].as_str().unwrap()];
        assert_eq!(named, &conn.1, "port {port}: {during}");
        conns.push(conn);
    }
    // Every answer came from the backend the data path chose, and more than one was chosen.
    let used: std::collections::BTreeSet<_> = answered.values().collect();
    assert!(used.len() > 1, "{answered:?}");

    let listed = flows(agent, &["--service", "web", "--limit", "1000"]);
    let list = listed["flows"].as_array().unwrap();
    for (port, name) in &answered {
        let client = format!("{CLIENT_ADDR}:{port}");
        let flow = list
            .iter()
            .find(|f| f["client"] == client.as_str())
            .unwrap_or_else(|| panic!("{client} not listed: {listed}"));
        assert_eq!(&names[flow["backend"].as_str().unwrap()], name, "{flow}");
        assert_eq!(flow["mode"], mode, "{flow}");
        assert_eq!(flow["vip"], vip(80).to_string().as_str(), "{flow}");
    }
    // --limit bounds the answer, --backend filters it.
    let two = flows(agent, &["--limit", "2"]);
    assert_eq!(two["flows"].as_array().unwrap().len(), 2, "{two}");
    assert!(two["matching"].as_u64().unwrap() >= 20, "{two}");
    let (addr, name) = names.iter().find(|(_, n)| used.contains(n)).unwrap();
    let one = flows(agent, &["--backend", addr, "--limit", "1000"]);
    let only = one["flows"].as_array().unwrap();
    let want = answered.values().filter(|n| *n == name).count();
    assert!(only.len() >= want, "{one}");
    assert!(only.iter().all(|f| f["backend"] == addr.as_str()), "{one}");
    // The text forms work too.
    let (ok, text) = agent.cli(&["flows", "--limit", "3"]);
    assert!(
        ok && text.contains("CLIENT") && text.contains("3 of "),
        "{text}"
    );
    let from = client(ports[0]).to_string();
    let to = vip(80).to_string();
    let (ok, text) = agent.cli(&["explain", "--from", &from, "--to", &to]);
    assert!(ok && text.contains("table flows"), "{text}");
    drop(conns);
}

#[test]
fn explain_names_the_backend_that_answered_nat() {
    let (topo, agent, names) = serve("nat");
    explain_matches_the_answers(&agent, &topo.client, 80, &names, "nat");
}

/// fullnat with backends on other hosts (tests/src/remote.rs), where it is meant to run.
#[test]
fn explain_names_the_backend_that_answered_fullnat() {
    let remote = Remote::new(1, 3);
    let agent = remote.serve(0, &[("web", 81, 8080, "mode = \"fullnat\"")]);
    let names = remote
        .hosts
        .iter()
        .map(|h| (format!("{}:8080", h.addr), h.name.clone()))
        .collect();
    explain_matches_the_answers(&agent, &remote.client, 81, &names, "fullnat");
}

#[test]
fn explain_says_why_nothing_is_forwarded() {
    let (_topo, agent, _) = serve("nat");
    let none = explain(&agent, client(42000), vip(81));
    assert_eq!(
        (none["verdict"].as_str(), none["reason"].as_str()),
        (Some("pass"), Some("pass_not_vip")),
        "{none}"
    );
    // UDP: the dns service's ring.
    let (ok, out) = agent.cli(&[
        "explain",
        "--from",
        "10.99.1.2:5353",
        "--to",
        "10.99.100.1:53",
        "--proto",
        "udp",
        "--json",
    ]);
    assert!(ok, "{out}");
    let udp: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(udp["service"]["name"], "dns", "{udp}");
    assert_eq!(udp["reason"], "new_flow", "{udp}");
    // The agent refuses an address it cannot read.
    let (ok, out) = agent.cli(&["explain", "--from", "nonsense", "--to", "10.99.100.1:80"]);
    assert!(!ok, "{out}");
}
