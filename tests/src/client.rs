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
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(LineConn {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one line and returns the backend's name.
    pub fn ask(&mut self) -> io::Result<String> {
        self.reader.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim_end().to_string())
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
