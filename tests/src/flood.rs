//! Floods of new flows from random sources, sent through AF_PACKET from a test namespace
//! (its own stack cannot send from addresses it does not hold): TCP SYNs or UDP datagrams
//! to one address, each from another source in 10.99.128.0/17 and port, with valid
//! checksums so that the backends answer them as they would a real flood.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    netns::{Netns, enter},
    testrun::checksum,
};

/// What kind of packet to flood with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Syn,
    Udp,
}

/// The MAC address of `interface` in `ns`.
pub fn mac_of(ns: &Netns, interface: &str) -> [u8; 6] {
    let text = ns.ip(&["-j", "link", "show", interface]);
    let links: serde_json::Value = serde_json::from_str(&text).expect("ip -j link");
    let mac = links[0]["address"].as_str().expect("link address");
    let mut out = [0u8; 6];
    for (b, part) in out.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    out
}

/// A flood running on a thread of its own in a namespace, until its count or time is up or
/// it is stopped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    handle: JoinHandle<(u64, Duration)>,
}

impl Flood {
    /// Sends up to `count` packets for up to `limit` out of `interface` of `ns` towards
    /// `next_hop` (a MAC), to `to`, at most `rate` a second (0: as fast as it can).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ns: &Netns,
        interface: &str,
        next_hop: [u8; 6],
        to: SocketAddrV4,
        kind: Kind,
        count: u64,
        limit: Duration,
        rate: u64,
    ) -> Flood {
        let source_mac = mac_of(ns, interface);
        let ns_path = ns.path();
        let interface = interface.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shown = progress.clone();
        let handle = std::thread::spawn(move || {
            enter(&ns_path);
            let socket = PacketSocket::bind(&interface);
            let mut frame = Frame::new(next_hop, source_mac, to, kind);
            let started = Instant::now();
            let mut sent = 0;
            let mut state = 0x2545_f491_u32 ^ std::process::id();
            while sent < count && !flag.load(Ordering::Relaxed) {
                if sent % 256 == 0 {
                    shown.store(sent, Ordering::Relaxed);
                    let elapsed = started.elapsed();
                    if elapsed > limit {
                        break;
                    }
                    if rate > 0 {
                        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                        std::thread::sleep(due.saturating_sub(elapsed));
                    }
                }
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                frame.randomize(state);
                if socket.send(&frame.bytes) {
                    sent += 1;
                } else {
                    // The queue is full: let the receiver catch up.
                    std::thread::yield_now();
                }
            }
            (sent, started.elapsed())
        });
        Flood {
            stop,
            sent: progress,
            handle,
        }
    }

    /// Packets sent so far (updated every 1024).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the flood; returns how many packets it sent and for how long.
    pub fn stop(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("flood thread")
    }

    /// Waits until the flood has sent its count (or its time is up).
    pub fn finish(self) -> (u64, Duration) {
        self.handle.join().expect("flood thread")
    }
}

/// An AF_PACKET socket bound to an interface, for sending hand-built frames.
pub struct PacketSocket(i32);

impl PacketSocket {
    pub fn bind(interface: &str) -> PacketSocket {
        let name = std::ffi::CString::new(interface).expect("name");
        // SAFETY: plain socket calls with valid arguments.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert!(ifindex != 0, "no interface {interface}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(
                rc == 0,
                "bind AF_PACKET: {}",
                std::io::Error::last_os_error()
            );
            PacketSocket(fd)
        }
    }

    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sending a buffer we own on our socket.
        unsafe { libc::send(self.0, frame.as_ptr().cast(), frame.len(), 0) >= 0 }
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: closing our own fd.
        unsafe { libc::close(self.0) };
    }
}

const L3: usize = 14;
const L4: usize = L3 + 20;

struct Frame {
    bytes: Vec<u8>,
    kind: Kind,
}

impl Frame {
    fn new(dst_mac: [u8; 6], src_mac: [u8; 6], to: SocketAddrV4, kind: Kind) -> Frame {
        let l4_len = match kind {
            Kind::Syn => 20,
            Kind::Udp => 8 + 18,
        };
        let mut b = vec![0u8; L4 + l4_len];
        b[..6].copy_from_slice(&dst_mac);
        b[6..12].copy_from_slice(&src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        b[L3] = 0x45;
        b[L3 + 2..L3 + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        b[L3 + 6] = 0x40; // DF
        b[L3 + 8] = 64;
        b[L3 + 9] = if kind == Kind::Syn { 6 } else { 17 };
        b[L3 + 16..L3 + 20].copy_from_slice(&to.ip().octets());
        b[L4 + 2..L4 + 4].copy_from_slice(&to.port().to_be_bytes());
        match kind {
            Kind::Syn => {
                b[L4 + 12] = 5 << 4;
                b[L4 + 13] = 0x02;
                b[L4 + 14..L4 + 16].copy_from_slice(&64240u16.to_be_bytes());
            }
            Kind::Udp => {
                b[L4 + 4..L4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                b[L4 + 8..].copy_from_slice(b"xlb flood datagram");
            }
        }
        Frame { bytes: b, kind }
    }

    /// A new source address (in 10.99.128.0/17) and port, and the checksums for them.
    fn randomize(&mut self, r: u32) {
        let b = &mut self.bytes;
        let src = Ipv4Addr::new(10, 99, 128 | ((r >> 8) & 0x7f) as u8, r as u8);
        b[L3 + 12..L3 + 16].copy_from_slice(&src.octets());
        let port = 1024 + (r >> 16) as u16 % 60000;
        b[L4..L4 + 2].copy_from_slice(&port.to_be_bytes());
        if self.kind == Kind::Syn {
            b[L4 + 4..L4 + 8].copy_from_slice(&r.to_be_bytes());
        }
        b[L3 + 10..L3 + 12].fill(0);
        let ip = checksum(&[&b[L3..L4]]);
        b[L3 + 10..L3 + 12].copy_from_slice(&ip.to_be_bytes());
        let csum_at = if self.kind == Kind::Syn {
            L4 + 16
        } else {
            L4 + 6
        };
        b[csum_at..csum_at + 2].fill(0);
        let len = (b.len() - L4) as u16;
        let pseudo = [
            &b[L3 + 12..L3 + 20],
            &[0, b[L3 + 9]][..],
            &len.to_be_bytes()[..],
            &b[L4..],
        ];
        let mut l4 = checksum(&pseudo);
        if self.kind == Kind::Udp && l4 == 0 {
            l4 = 0xffff;
        }
        b[csum_at..csum_at + 2].copy_from_slice(&l4.to_be_bytes());
    }
}
