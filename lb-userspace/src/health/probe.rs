//! One health probe of one backend: TCP connect, HTTP GET (hyper), or a UDP round trip.
//! Every probe is bounded by the check's timeout.
use std::net::SocketAddr;

use http_body_util::Empty;
use hyper::body::Bytes;
use tokio::net::{TcpStream, UdpSocket};

use crate::{
    config::{HealthConfig, HealthKind},
    state::Endpoint,
};

/// Probes one backend over the network. The caller bounds it by the check's timeout.
pub async fn probe(endpoint: Endpoint, check: HealthConfig) -> Result<(), String> {
    let addr = SocketAddr::new(endpoint.addr, check.port.unwrap_or(endpoint.port));
    match check.kind {
        HealthKind::Tcp => tcp(addr).await,
        HealthKind::Http => http(addr, &check).await,
        HealthKind::Udp => udp(addr).await,
        HealthKind::None => Ok(()),
    }
}

async fn tcp(addr: SocketAddr) -> Result<(), String> {
    TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|e| format!("connect: {e}"))
}

async fn http(addr: SocketAddr, check: &HealthConfig) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(&check.path)
        .header("host", addr.to_string())
        .header(
            "user-agent",
            concat!("xlb-health/", env!("CARGO_PKG_VERSION")),
        )
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("http: {e}"));
    conn.abort();
    let status = response?.status().as_u16();
    if status != check.expect_status {
        return Err(format!("HTTP {status} (expected {})", check.expect_status));
    }
    Ok(())
}

/// A datagram out and any datagram back. A closed port answers with ICMP unreachable,
/// which a connected socket reports as "connection refused".
async fn udp(addr: SocketAddr) -> Result<(), String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("addr");
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("udp: {e}"))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| format!("udp: {e}"))?;
    socket
        .send(b"xlb-health\n")
        .await
        .map_err(|e| format!("udp send: {e}"))?;
    let mut buf = [0u8; 512];
    socket
        .recv(&mut buf)
        .await
        .map(drop)
        .map_err(|e| format!("udp: {e}"))
}
