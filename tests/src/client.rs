//! Client-side helpers. Call them inside `Netns::run` so their sockets live in the client
//! namespace. Every call is bounded by a timeout.
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection speaking the test backend's line protocol: each line gets the backend's
/// name back.
pub struct LineConn {
    reader: BufReader<TcpStream>,
}

impl LineConn {
    pub fn connect(addr: SocketAddr) -> io::Result<LineConn> {
        Self::connect_within(addr, TIMEOUT)
    }

    /// The same with each step bounded by `timeout`.
    pub fn connect_within(addr: SocketAddr, timeout: Duration) -> io::Result<LineConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(LineConn {
            reader: BufReader::new(stream),
        })
    }

    /// A connection that is to stay open, and the name of the backend it reached; panics
    /// when either fails (test setup).
    pub fn open(addr: SocketAddr) -> (LineConn, String) {
        let mut conn = Self::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let name = conn
            .ask()
            .unwrap_or_else(|e| panic!("first answer from {addr}: {e}"));
        (conn, name)
    }

    /// The connection's own address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }

    /// The next line the backend sends unasked (its name, after a push).
    pub fn hear(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim_end().to_string())
    }

    /// Sends one line and returns the backend's name.
    pub fn ask(&mut self) -> io::Result<String> {
        self.ask_with(b"who\n")
    }

    /// Sends `line` (ending in a newline; any size) and returns the backend's name.
    pub fn ask_with(&mut self, line: &[u8]) -> io::Result<String> {
        self.reader.get_mut().write_all(line)?;
        self.hear()
    }
}

/// One new connection, one question.
pub fn tcp_name(addr: SocketAddr) -> io::Result<String> {
    LineConn::connect(addr)?.ask()
}

/// A UDP question from a fixed local port.
pub fn udp_name(socket: &UdpSocket, addr: SocketAddr) -> io::Result<String> {
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"who\n", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    if from != addr {
        return Err(io::Error::other(format!("answer from {from}, not {addr}")));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

/// One request's outcome in a load loop.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: std::time::Instant,
    pub answer: Result<String, String>,
}

/// New connections at a steady pace from a client-namespace thread, until stopped.
pub struct LoadLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl LoadLoop {
    /// At most `max` requests, one every `every`, each bounded by `TIMEOUT`.
    pub fn start(client_ns: &str, addr: SocketAddr, every: Duration, max: usize) -> LoadLoop {
        Self::start_within(client_ns, addr, every, max, TIMEOUT)
    }

    /// The same with each request bounded by `timeout`.
    pub fn start_within(
        client_ns: &str,
        addr: SocketAddr,
        every: Duration,
        max: usize,
        timeout: Duration,
    ) -> LoadLoop {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = done.clone();
        let ns = client_ns.to_string();
        let handle = std::thread::spawn(move || {
            crate::netns::enter(&ns);
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) && samples.len() < max {
                let at = std::time::Instant::now();
                let answer = LineConn::connect_within(addr, timeout)
                    .and_then(|mut conn| conn.ask())
                    .map_err(|e| e.to_string());
                samples.push(Sample { at, answer });
                count.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(every.saturating_sub(at.elapsed()));
            }
            samples
        });
        LoadLoop { stop, done, handle }
    }

    /// Requests made so far.
    pub fn done(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().expect("load loop")
    }
}

/// Failed samples, for assertion messages.
pub fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.answer.is_err()).collect()
}

/// GET `path` over HTTP/1.0 from the test backend; returns the backend's name (its
/// x-backend header) and the body's length. Bounded by `timeout` per read.
pub fn http_fetch(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(String, usize)> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: xlb\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&response[..end]).to_lowercase();
    let name = head
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .ok_or_else(|| io::Error::other(format!("no x-backend in {head:?}")))?;
    Ok((name.trim().to_string(), response.len() - end - 4))
}

/// A plain HTTP/1.0 GET (for the agent's /metrics from inside its namespace).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: xlb\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    Ok(body.to_string())
}

/// How many times each backend name occurs.
pub fn count_names(names: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_insert(0) += 1;
    }
    counts
}

/// Panics unless `names` come from exactly `backends` names, each with a share of them in
/// `share` (the spread of new flows over a Maglev ring).
pub fn assert_spread(names: &[String], backends: usize, share: std::ops::RangeInclusive<f64>) {
    let counts = count_names(names);
    assert_eq!(counts.len(), backends, "every backend answers: {counts:?}");
    for (name, n) in &counts {
        let got = *n as f64 / names.len() as f64;
        assert!(
            share.contains(&got),
            "{name} got {got:.3} of {}: {counts:?}",
            names.len()
        );
    }
}
