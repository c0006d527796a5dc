//! xlb-test-backend: a tiny TCP/HTTP/UDP server that answers with its name, so tests can
//! see which backend a load balancer picked (and, with --log, the client's source address).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgGroup, Parser};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "xlb-test-backend",
    version,
    about = "Test backend that answers with its name"
)]
#[command(group(ArgGroup::new("listeners").multiple(true).args(["tcp", "http", "udp"])))]
struct Args {
    /// Name to answer with [default: the hostname]
    #[arg(long)]
    name: Option<String>,
    /// TCP line protocol listener: every received line is answered with "NAME\n"
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    /// HTTP/1.1 listener: 200 "NAME\n" everywhere, GET/HEAD /status/CODE answers CODE,
    /// GET /bytes/N answers N bytes (header x-backend: NAME)
    #[arg(long, value_name = "ADDR")]
    http: Vec<SocketAddr>,
    /// UDP listener: every datagram is answered with "NAME\n"
    #[arg(long, value_name = "ADDR")]
    udp: Vec<SocketAddr>,
    /// Push trigger: each connection here makes the server speak first on every open TCP
    /// line connection ("NAME\n", unasked), and is answered "pushed N\n"
    #[arg(long, value_name = "ADDR")]
    push: Vec<SocketAddr>,
    /// After SIGTERM/SIGINT keep serving for this many milliseconds, then exit 0
    #[arg(long, value_name = "DURATION_MS", default_value_t = 0)]
    linger: u64,
    /// Write "ready\n" here once every listener is bound
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Print one line per connection / request / datagram to stdout
    #[arg(long)]
    log: bool,
    /// Wait this long before binding the listeners (a slow-starting server)
    #[arg(long, value_name = "DURATION_MS", default_value_t = 0)]
    start_delay: u64,
    /// Health probe for a Docker HEALTHCHECK (scratch images have no shell or curl): connect
    /// to ADDR over TCP and exit 0 if that works, 1 if not
    #[arg(long, value_name = "ADDR", conflicts_with = "listeners")]
    probe: Option<SocketAddr>,
}

struct Ctx {
    name: String,
    reply: Bytes,
    log: bool,
    /// Tells every open line connection to send `reply` unasked.
    push: tokio::sync::broadcast::Sender<()>,
}

impl Ctx {
    fn log(&self, proto: &str, peer: SocketAddr, extra: &str) {
        if self.log {
            // Locked + flushed per line so tests reading a pipe see it immediately.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{} {proto} from {peer}{extra}", self.name);
            let _ = out.flush();
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "test-backend".to_string())
}

// Current-thread runtime: tiny footprint, and a test backend never needs more than one core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.probe {
        let ok = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok());
        std::process::exit(if ok { 0 } else { 1 });
    }
    if args.tcp.is_empty() && args.http.is_empty() && args.udp.is_empty() {
        anyhow::bail!("give at least one of --tcp, --http, --udp (or --probe)");
    }
    let name = args.name.clone().unwrap_or_else(hostname);
    let ctx = Arc::new(Ctx {
        reply: Bytes::from(format!("{name}\n")),
        name,
        log: args.log,
        push: tokio::sync::broadcast::channel(16).0,
    });

    // Install signal handlers before announcing readiness so an early SIGTERM is not lost.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // HUP and USR1 ask a server to reload (nginx), not to stop: it keeps serving. A handler
    // of its own, because outside a container's PID 1 their default action ends the process.
    for kind in [SignalKind::hangup(), SignalKind::user_defined1()] {
        let mut reload = signal(kind).context("installing a reload signal handler")?;
        let name = ctx.name.clone();
        tokio::spawn(async move {
            while reload.recv().await.is_some() {
                eprintln!("{name}: reload signal received, still serving");
            }
        });
    }

    if args.start_delay > 0 {
        tokio::time::sleep(Duration::from_millis(args.start_delay)).await;
    }
    // Ready is reported only after every bind succeeded; a bad address fails the process.
    for addr in &args.tcp {
        let l = TcpListener::bind(addr)
            .await
            .context(format!("binding tcp {addr}"))?;
        tokio::spawn(accept_loop(l, ctx.clone(), "tcp"));
    }
    for addr in &args.http {
        let l = TcpListener::bind(addr)
            .await
            .context(format!("binding http {addr}"))?;
        tokio::spawn(accept_loop(l, ctx.clone(), "http"));
    }
    for addr in &args.push {
        let l = TcpListener::bind(addr)
            .await
            .context(format!("binding push {addr}"))?;
        tokio::spawn(push_loop(l, ctx.clone()));
    }
    for addr in &args.udp {
        let s = UdpSocket::bind(addr)
            .await
            .context(format!("binding udp {addr}"))?;
        tokio::spawn(serve_udp(s, ctx.clone()));
    }

    if let Some(path) = &args.ready_file {
        // Write then rename so a polling test never reads a half-written file.
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, "ready\n").with_context(|| format!("writing {tmp:?}"))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if args.linger > 0 {
        eprintln!(
            "{}: signal received, draining for {} ms",
            ctx.name, args.linger
        );
        // Listeners keep running; a second signal cuts the drain short.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.linger)) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, proto: &'static str) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                if proto == "tcp" {
                    ctx.log("tcp", peer, "");
                    tokio::spawn(serve_tcp(stream, ctx.clone()));
                } else {
                    tokio::spawn(serve_http(stream, peer, ctx.clone()));
                }
            }
            Err(e) => {
                // E.g. EMFILE or a connection reset before accept: back off, keep serving.
                eprintln!("{}: {proto} accept: {e}", ctx.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Each connection pushes `reply` to every open line connection.
async fn push_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let n = ctx.push.send(()).unwrap_or(0);
        let _ = stream.write_all(format!("pushed {n}\n").as_bytes()).await;
    }
}

/// Replies once per '\n' received (plus once for a trailing unterminated line at EOF), and
/// speaks first when a push asks it to. Counting newlines in a fixed buffer keeps memory
/// bounded whatever the client sends.
async fn serve_tcp(mut stream: TcpStream, ctx: Arc<Ctx>) {
    let mut buf = [0u8; 4096];
    let mut partial = false;
    let mut pushes = ctx.push.subscribe();
    loop {
        let n = tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            Ok(()) = pushes.recv() => {
                if stream.write_all(&ctx.reply).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
        partial = buf[n - 1] != b'\n';
        for _ in 0..lines {
            if stream.write_all(&ctx.reply).await.is_err() {
                return;
            }
        }
    }
    if partial {
        let _ = stream.write_all(&ctx.reply).await;
    }
    let _ = stream.shutdown().await;
}

async fn serve_http(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(respond(&ctx, peer, &req)) }
    });
    // Errors here are per-connection (client reset, bad request); hyper already answered
    // what it could, so there is nothing useful to do but drop the connection.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn respond(ctx: &Ctx, peer: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    ctx.log(
        "http",
        peer,
        &format!(" {} {}", req.method(), req.uri().path()),
    );
    let status = match req.uri().path().strip_prefix("/status/") {
        Some(code) if req.method() == Method::GET || req.method() == Method::HEAD => code
            .parse::<u16>()
            .ok()
            .filter(|c| (200..600).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST),
        _ => StatusCode::OK,
    };
    // GET /bytes/N: a body of N bytes (at most 16 MiB), for tests of large responses.
    let body = match req.uri().path().strip_prefix("/bytes/") {
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n <= 16 << 20 => Bytes::from(vec![b'x'; n]),
            _ => return bad_request(),
        },
        None => ctx.reply.clone(),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&ctx.name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

fn bad_request() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"bad request\n")));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp
}

async fn serve_udp(sock: UdpSocket, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((_, peer)) => {
                ctx.log("udp", peer, "");
                if let Err(e) = sock.send_to(&ctx.reply, peer).await {
                    eprintln!("{}: udp send to {peer}: {e}", ctx.name);
                }
            }
            // Some kernels surface ICMP errors from earlier sends here; they are not fatal.
            Err(e) => eprintln!("{}: udp recv: {e}", ctx.name),
        }
    }
}
