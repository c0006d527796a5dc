//! A proxy in front of a daemon's API socket that fails chosen requests, so that tests can
//! give the agent a daemon that answers 500 (or 404) to one inspection, or does not answer
//! at all, while everything else is the real daemon's.
//!
//! Each client connection gets its own connection to the daemon. Requests are read one at a
//! time (clients such as hyper do not pipeline: the next request comes after the previous
//! response), so a fault is written straight back to the client; the connection is then
//! closed, as a daemon in trouble would. A request with a chunked body switches that
//! connection to plain copying (the agent only sends GETs). Threads end when either side
//! closes; dropping the proxy closes every connection and removes the socket.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Shutdown,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What a matching request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This status with a JSON error body, then the connection closes.
    Status(u16),
    /// No answer for this long, then the connection closes.
    Stall(Duration),
}

/// A request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub fault: Option<Fault>,
}

struct Rule {
    /// Matches a request whose path contains it (the path includes the `/v1.NN` prefix).
    pattern: String,
    fault: Fault,
    /// How many more requests it fails (None: until cleared).
    remaining: Option<usize>,
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
    /// The sockets of open connections (by connection), to close them on drop.
    streams: Mutex<Vec<(u64, UnixStream)>>,
    connections: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// The fault for this request, if a rule matches (counting it down).
    fn fault_for(&self, path: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let rule = rules.iter_mut().find(|r| path.contains(&r.pattern))?;
        let fault = rule.fault;
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        rules.retain(|r| r.remaining != Some(0));
        Some(fault)
    }

    fn track(&self, connection: u64, stream: &UnixStream) {
        if let Ok(s) = stream.try_clone() {
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((connection, s));
        }
    }

    fn forget(&self, connection: u64) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(c, _)| *c != connection);
    }
}

pub struct FaultProxy {
    pub socket: PathBuf,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `socket` and forwards to the daemon at `upstream`.
    pub fn start(upstream: &Path, socket: PathBuf) -> FaultProxy {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| panic!("binding {}: {e}", socket.display()));
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_path_buf();
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(listener, upstream, shared))
        };
        FaultProxy {
            socket,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `unix://SOCKET`, for the agent's `[docker] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Fails the requests whose path contains `pattern`: the next `times` of them, or all
    /// until [`FaultProxy::clear`] (None). The first matching rule wins.
    pub fn fail(&self, pattern: &str, fault: Fault, times: Option<usize>) {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Rule {
                pattern: pattern.to_string(),
                fault,
                remaining: times,
            });
    }

    /// Removes every rule: from now on everything is forwarded.
    pub fn clear(&self) {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The requests seen so far whose path contains `pattern`.
    pub fn seen(&self, pattern: &str) -> Vec<Seen> {
        let seen = self.shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|s| s.path.contains(pattern))
            .cloned()
            .collect()
    }

    /// How many requests whose path contains `pattern` got a fault.
    pub fn faulted(&self, pattern: &str) -> usize {
        self.seen(pattern)
            .iter()
            .filter(|s| s.fault.is_some())
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .map(|(_, s)| s)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept_loop(listener: UnixListener, upstream: PathBuf, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let shared = shared.clone();
                let upstream = upstream.clone();
                std::thread::spawn(move || serve(client, &upstream, &shared));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                eprintln!("fault proxy: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One client connection: requests in, one at a time; responses copied back by a thread.
fn serve(client: UnixStream, upstream: &Path, shared: &Shared) {
    let connection = shared.connections.fetch_add(1, Ordering::SeqCst);
    shared.track(connection, &client);
    relay(client, upstream, shared, connection);
    shared.forget(connection);
}

fn relay(client: UnixStream, upstream: &Path, shared: &Shared, connection: u64) {
    let Ok(mut daemon) = UnixStream::connect(upstream) else {
        // No daemon: the client sees the connection close, as with a dead socket.
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    shared.track(connection, &daemon);
    let (Ok(mut to_client), Ok(mut from_daemon)) = (client.try_clone(), daemon.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_daemon, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    });
    let mut reader = BufReader::new(client.try_clone().expect("dup"));
    let mut to_client = client;
    while let Some(request) = read_request(&mut reader) {
        let fault = shared.fault_for(&request.path);
        shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Seen {
                method: request.method.clone(),
                path: request.path.clone(),
                fault,
            });
        match fault {
            None => {
                if daemon.write_all(&request.bytes).is_err() {
                    break;
                }
                if request.chunked {
                    // Cannot tell where it ends: copy the rest of the connection as it is.
                    let _ = std::io::copy(&mut reader, &mut daemon);
                    break;
                }
            }
            Some(Fault::Status(code)) => {
                let body = format!("{{\"message\":\"fault injected by the test: {code}\"}}");
                let _ = write!(
                    to_client,
                    "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                break;
            }
            Some(Fault::Stall(duration)) => {
                let until = Instant::now() + duration;
                while Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
        }
    }
    let _ = to_client.shutdown(Shutdown::Both);
    let _ = daemon.shutdown(Shutdown::Both);
    let _ = back.join();
}

struct Request {
    method: String,
    path: String,
    /// The head and a Content-Length body, as received.
    bytes: Vec<u8>,
    chunked: bool,
}

/// The next request on the connection; None at its end (or on garbage).
fn read_request(reader: &mut BufReader<UnixStream>) -> Option<Request> {
    let mut bytes = Vec::new();
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
    bytes.extend_from_slice(line.as_bytes());
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let path = words.next()?.to_string();
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok().filter(|&n| n > 0)?;
        bytes.extend_from_slice(header.as_bytes());
        let trimmed = header.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    bytes.extend_from_slice(&body);
    Some(Request {
        method,
        path,
        bytes,
        chunked,
    })
}
