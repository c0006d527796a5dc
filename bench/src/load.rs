//! The loads: wrk (keep-alive and `Connection: close`) and a UDP generator, each run in the
//! client namespace pinned to the load CPU.
use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use xlb_tests::netns::Netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// wrk over keep-alive connections: requests/s.
    KeepAlive,
    /// wrk with `Connection: close`: one new connection per request.
    Close,
    /// Small UDP datagrams: packets/s delivered to the backends.
    Udp,
}

pub const ALL: [Load; 3] = [Load::KeepAlive, Load::Close, Load::Udp];

impl Load {
    pub fn title(self) -> &'static str {
        match self {
            Load::KeepAlive => "wrk keep-alive",
            Load::Close => "wrk Connection: close",
            Load::Udp => "UDP 64-byte frames",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Load::KeepAlive => "req/s",
            Load::Close => "conn/s",
            Load::Udp => "pps delivered",
        }
    }

    /// One unit of the rate.
    pub fn noun(self) -> &'static str {
        match self {
            Load::KeepAlive => "request",
            Load::Close => "connection",
            Load::Udp => "datagram delivered",
        }
    }

    /// What CPU time is divided by.
    pub fn per(self) -> &'static str {
        match self {
            Load::KeepAlive => "µs/req",
            Load::Close => "µs/conn",
            Load::Udp => "ns/pkt",
        }
    }
}

/// What wrk reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// wrk settings shared by every mode.
pub struct Wrk<'a> {
    pub client: &'a Netns,
    pub cpu: usize,
    pub threads: u32,
    pub connections: u32,
    pub seconds: u64,
    /// Where the per-thread target script goes.
    pub scratch: &'a Path,
}

impl Wrk<'_> {
    /// Runs wrk against `targets`: one target is the URL; several are spread over wrk's
    /// threads (thread i connects to target i mod n) by a Lua `setup` hook, which leaves the
    /// per-request path in C.
    pub fn run(&self, targets: &[SocketAddrV4], close: bool) -> Result<WrkResult> {
        let first = targets.first().context("no target")?;
        let mut cmd = self.client.command("taskset");
        cmd.args(["-c", &self.cpu.to_string(), "wrk"])
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.seconds))
            .args(["--latency", "--timeout", "2s"]);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        if targets.len() > 1 {
            let list: Vec<String> = targets
                .iter()
                .map(|t| format!("{{\"{}\", \"{}\"}}", t.ip(), t.port()))
                .collect();
            let script = format!(
                "local targets = {{ {} }}\n\
                 local assigned = 0\n\
                 function setup(thread)\n\
                 \x20 local t = targets[assigned % #targets + 1]\n\
                 \x20 assigned = assigned + 1\n\
                 \x20 thread.addr = wrk.lookup(t[1], t[2])[1]\n\
                 end\n",
                list.join(", ")
            );
            let path = self.scratch.join("targets.lua");
            std::fs::write(&path, script)?;
            cmd.arg("-s").arg(path);
        }
        cmd.arg(format!("http://{first}/"));
        let out = cmd.output().context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "wrk failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
    }
}

/// Parses wrk's text report (with --latency).
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, value)) = line.split_once(char::is_whitespace) {
                match pct {
                    "50%" => r.p50_us = duration_us(value.trim())?,
                    "99%" => {
                        r.p99_us = duration_us(value.trim())?;
                        in_distribution = false;
                    }
                    _ => {}
                }
            }
            continue;
        }
        if let Some((n, rest)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().context("request count")?;
            let secs = rest.split(',').next().unwrap_or_default();
            r.seconds = duration_us(secs)? / 1e6;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            r.errors += rest
                .split(',')
                .filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += rest.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            r.rate = rest.trim().parse().context("Requests/sec")?;
        }
    }
    if r.requests == 0 && r.rate == 0.0 {
        bail!("no request count");
    }
    Ok(r)
}

/// "382.00us", "1.12ms", "2.00s", "1.50m" → µs.
fn duration_us(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {s:?}"))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("number in {s:?}"))?;
    Ok(n * match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        other => bail!("unknown unit {other} in {s:?}"),
    })
}

/// What the UDP generator did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UdpSent {
    pub packets: u64,
    pub seconds: f64,
}

/// UDP payload bytes: 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18 = a 60-byte frame, the
/// minimum Ethernet frame without its FCS.
pub const UDP_PAYLOAD: usize = 18;
/// Datagrams per sendmmsg call.
const BATCH: usize = 64;

/// Sends small datagrams from `flows` sockets (one source port each; flow i goes to
/// target i mod n) as fast as one thread pinned to `cpu` can, with sendmmsg, for
/// `duration`. Runs on a thread inside the namespace at `ns_path`.
pub fn udp_flood(
    ns_path: &str,
    cpu: usize,
    targets: &[SocketAddrV4],
    flows: usize,
    duration: Duration,
    stop: &'static AtomicBool,
) -> Result<UdpSent> {
    let ns_path = ns_path.to_string();
    let targets = targets.to_vec();
    std::thread::spawn(move || -> Result<UdpSent> {
        xlb_tests::netns::enter(&ns_path);
        crate::cpu::pin_thread(cpu)?;
        let sockets: Vec<UdpSocket> = (0..flows)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(targets[i % targets.len()])?;
                Ok(s)
            })
            .collect::<std::io::Result<_>>()
            .context("UDP sockets")?;
        let payload = [0x5au8; UDP_PAYLOAD];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        // SAFETY: mmsghdr is plain data; zeroed = no name, no control data.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let start = Instant::now();
        let deadline = start + duration;
        let mut sent = 0u64;
        'outer: loop {
            for s in &sockets {
                // SAFETY: msgs point at iov and payload, which outlive the call.
                let n =
                    unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
                if n > 0 {
                    sent += n as u64;
                }
                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break 'outer;
                }
            }
        }
        Ok(UdpSent {
            packets: sent,
            seconds: start.elapsed().as_secs_f64(),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("UDP generator panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ http://10.99.100.1/
  3 threads and 48 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   420.11us  200.00us   9.31ms   90.00%
    Req/Sec    30.01k     1.20k   33.00k    70.00%
  Latency Distribution
     50%  382.00us
     75%  450.00us
     90%  600.00us
     99%    1.12ms
  450123 requests in 5.00s, 64.82MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  90024.60
Transfer/sec:     12.96MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 450123);
        assert!((r.seconds - 5.0).abs() < 1e-9);
        assert!((r.rate - 90024.60).abs() < 1e-6);
        assert!((r.p50_us - 382.0).abs() < 1e-9);
        assert!((r.p99_us - 1120.0).abs() < 1e-6);
        assert_eq!(r.errors, 7);
    }
}
