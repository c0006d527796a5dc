//! `xlb trace`, the agent's side. A trace writes the data path's filter (lb-ebpf/src/trace.rs),
//! reads the trace ring buffer while its client listens, and clears the filter when it ends
//! (count reached, client gone, agent restarted). One trace at a time: the filter is global.
//! Records name clients, so traces go through the control socket only.
use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use aya::maps::{Array, MapData, RingBuf};
use ipnet::IpNet;
use lb_common::{
    FAMILY_V6, MODE_DSR, MODE_FULLNAT, PROTO_TCP, Reason, addr_words,
    trace::{TRACE_ANY_SERVICE, TraceFilter, TraceRecord},
    words_addr,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::datapath::{TRACE, TRACE_FILTER, pinned_map};

static RUNNING: AtomicBool = AtomicBool::new(false);

/// A running trace; dropping it stops the data path's tracing.
pub struct Session {
    filter: Array<MapData, TraceFilter>,
    ring: AsyncFd<RingBuf<MapData>>,
}

/// Clears the filter a crashed agent may have left on.
pub fn reset(pin_path: &Path) -> Result<()> {
    let mut filter: Array<MapData, TraceFilter> =
        Array::try_from(pinned_map(pin_path, TRACE_FILTER)?)?;
    filter.set(0, TraceFilter::default(), 0)?;
    Ok(())
}

impl Session {
    /// Starts tracing packets of `service_ids` (one, or both halves of a dual-stack
    /// service; None: every service) from `from` (None: any source).
    pub fn start(
        pin_path: &Path,
        service_ids: Option<[u32; 2]>,
        from: Option<IpNet>,
    ) -> Result<Self> {
        if RUNNING.swap(true, Ordering::SeqCst) {
            bail!("a trace is already running (one at a time)");
        }
        let opened = (|| -> Result<Self> {
            let ring = RingBuf::try_from(pinned_map(pin_path, TRACE)?)?;
            // SAFETY: the RingBuf owns its map fd and keeps it open while the AsyncFd
            // holds it.
            let mut ring = unsafe { AsyncFd::register(ring)? };
            // Records a crashed agent's trace left behind are not this trace's.
            while ring.get_mut().next().is_some() {}
            let mut filter: Array<MapData, TraceFilter> =
                Array::try_from(pinned_map(pin_path, TRACE_FILTER)?)?;
            let (family, src_addr, src_mask) = match from {
                Some(net) => {
                    let (family, addr) = addr_words(net.network());
                    (u32::from(family), addr, addr_words(net.netmask()).1)
                }
                None => (0, [0; 4], [0; 4]),
            };
            let value = TraceFilter {
                enabled: 1,
                service_ids: service_ids.unwrap_or([TRACE_ANY_SERVICE; 2]),
                family,
                src_addr,
                src_mask,
            };
            filter.set(0, value, 0)?;
            Ok(Session { filter, ring })
        })();
        if opened.is_err() {
            RUNNING.store(false, Ordering::SeqCst);
        }
        opened
    }

    /// The next record (waits for one).
    pub async fn next(&mut self) -> Result<TraceRecord> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            if let Some(item) = guard.get_inner_mut().next() {
                if item.len() >= size_of::<TraceRecord>() {
                    // SAFETY: the data path writes whole TraceRecords; read unaligned.
                    return Ok(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
                }
                continue;
            }
            guard.clear_ready();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = self.filter.set(0, TraceFilter::default(), 0) {
            tracing::warn!(error = %e, "clearing the trace filter");
        }
        RUNNING.store(false, Ordering::SeqCst);
    }
}

/// One traced packet as `xlb trace` prints it (a JSON line on the wire).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Line {
    /// RFC 3339, microseconds.
    pub time: String,
    pub interface: String,
    pub service: String,
    pub proto: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// None: dropped before a backend was chosen (see `verdict`).
    pub backend: Option<SocketAddr>,
    pub mode: String,
    pub new_flow: bool,
    /// What the data path did (a verdict counter's name).
    pub verdict: String,
    /// The packet as it left ("none" when dropped).
    pub rewrite: String,
}

fn sock(family: u8, addr: [u32; 4], port: u16) -> SocketAddr {
    SocketAddr::new(words_addr(family, addr), u16::from_be(port))
}

fn interface_name(ifindex: u32) -> String {
    // IFNAMSIZ.
    let mut buf = [0 as libc::c_char; 16];
    // SAFETY: buf has IFNAMSIZ bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl Line {
    /// `service` names the record's service id; `boot_offset` turns its monotonic time into
    /// wall-clock time.
    pub fn from_record(r: &TraceRecord, service: &str, boot_offset: Duration) -> Line {
        let client = sock(r.family, r.saddr, r.sport);
        let vip = sock(r.family, r.daddr, r.dport);
        let backend = (r.has_backend != 0).then(|| sock(r.family, r.backend_addr, r.backend_port));
        let mode = match r.mode {
            MODE_FULLNAT => "fullnat",
            MODE_DSR => "dsr",
            _ => "nat",
        };
        let rewrite = match backend {
            None => "none".to_string(),
            Some(to) if r.mode == MODE_FULLNAT => {
                let snat = sock(r.family, r.snat_addr, r.snat_port);
                format!("{snat} -> {to}")
            }
            Some(to) if r.mode == MODE_DSR => {
                let tunnel = if r.family == FAMILY_V6 {
                    "IPv6/GUE"
                } else {
                    "IPIP/GUE"
                };
                format!("{client} -> {vip} in {tunnel} to {to}")
            }
            Some(to) => format!("{client} -> {to}"),
        };
        let time = SystemTime::UNIX_EPOCH + boot_offset + Duration::from_nanos(r.time_ns);
        Line {
            time: humantime::format_rfc3339_micros(time).to_string(),
            interface: interface_name(r.ifindex),
            service: service.to_string(),
            proto: if r.proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
            client,
            vip,
            backend,
            mode: mode.into(),
            new_flow: r.new_flow != 0,
            verdict: Reason::ALL
                .iter()
                .find(|x| **x as u32 == r.reason)
                .map_or("unknown", |x| x.name())
                .into(),
            rewrite,
        }
    }

    /// One line of `xlb trace`.
    pub fn render(&self) -> String {
        let head = format!(
            "{} {} {} {} {} -> {}",
            self.time, self.interface, self.service, self.proto, self.client, self.vip
        );
        match self.backend {
            Some(backend) => format!(
                "{head} backend {backend} {}{} (rewritten {})",
                self.verdict,
                if self.new_flow { ", new flow" } else { "" },
                self.rewrite
            ),
            None => format!("{head} no backend: {}", self.verdict),
        }
    }
}

/// Wall-clock time at CLOCK_MONOTONIC zero.
pub fn boot_offset() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(mono)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(has_backend: u8, reason: Reason) -> TraceRecord {
        let mut r: TraceRecord = unsafe { core::mem::zeroed() };
        r.family = lb_common::FAMILY_V4;
        r.saddr = [u32::from_ne_bytes([10, 99, 1, 2]), 0, 0, 0];
        r.sport = 40000u16.to_be();
        r.daddr = [u32::from_ne_bytes([10, 99, 0, 10]), 0, 0, 0];
        r.dport = 80u16.to_be();
        r.proto = PROTO_TCP;
        r.new_flow = 1;
        r.has_backend = has_backend;
        r.reason = reason as u32;
        if has_backend != 0 {
            r.backend_addr = [u32::from_ne_bytes([10, 99, 2, 11]), 0, 0, 0];
            r.backend_port = 8080u16.to_be();
        }
        r
    }

    #[test]
    fn a_forwarded_packet_names_its_backend_and_rewrite() {
        let line = Line::from_record(&record(1, Reason::Tx), "web", Duration::ZERO);
        assert_eq!(line.backend, Some("10.99.2.11:8080".parse().unwrap()));
        assert_eq!(line.rewrite, "10.99.1.2:40000 -> 10.99.2.11:8080");
        assert!(
            line.render().ends_with(
                "web tcp 10.99.1.2:40000 -> 10.99.0.10:80 backend 10.99.2.11:8080 tx, new flow \
                 (rewritten 10.99.1.2:40000 -> 10.99.2.11:8080)"
            ),
            "{}",
            line.render()
        );
    }

    #[test]
    fn a_packet_dropped_before_a_backend_says_why_and_names_none() {
        let line = Line::from_record(&record(0, Reason::DropNotAllowed), "admin", Duration::ZERO);
        assert_eq!((line.backend, line.rewrite.as_str()), (None, "none"));
        assert!(
            line.render().ends_with(
                "admin tcp 10.99.1.2:40000 -> 10.99.0.10:80 no backend: drop_not_allowed"
            ),
            "{}",
            line.render()
        );
        let json = serde_json::to_string(&line).unwrap();
        assert!(json.contains("\"backend\":null"), "{json}");
    }

    #[test]
    fn a_v6_packet_prints_bracketed_endpoints() {
        let mut r = record(1, Reason::Forwarded);
        let words = |a: &str| addr_words(a.parse().unwrap()).1;
        r.family = lb_common::FAMILY_V6;
        r.saddr = words("fd99:1::2");
        r.daddr = words("fd99:100::1");
        r.backend_addr = words("fd99:2::11");
        let line = Line::from_record(&r, "web.v6", Duration::ZERO);
        assert!(
            line.render().ends_with(
                "web.v6 tcp [fd99:1::2]:40000 -> [fd99:100::1]:80 backend [fd99:2::11]:8080 \
                 forwarded, new flow (rewritten [fd99:1::2]:40000 -> [fd99:2::11]:8080)"
            ),
            "{}",
            line.render()
        );
        // In fullnat the rewrite names the v6 SNAT address the packet left from.
        r.mode = MODE_FULLNAT;
        r.snat_addr = words("fd99:5::2");
        r.snat_port = 1234u16.to_be();
        let line = Line::from_record(&r, "web.v6", Duration::ZERO);
        assert_eq!(line.rewrite, "[fd99:5::2]:1234 -> [fd99:2::11]:8080");
        // In dsr the client's packet goes unchanged inside IPv6 to the backend's host.
        r.mode = MODE_DSR;
        let line = Line::from_record(&r, "web.v6", Duration::ZERO);
        assert_eq!(
            line.rewrite,
            "[fd99:1::2]:40000 -> [fd99:100::1]:80 in IPv6/GUE to [fd99:2::11]:8080"
        );
    }
}
