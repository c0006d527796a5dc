//! Checksum checks with etherparse, an implementation independent of the data path and of
//! the fixture builder. Shared by the BPF_PROG_TEST_RUN test files.
use etherparse::{IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use xlb_tests::testrun::hexdump;

/// Panics unless the IPv4 header checksum and the TCP/UDP checksum of the IPv4 packet at
/// `l3` are valid.
pub fn verify_checksums(frame: &[u8], l3: usize, what: &str) {
    if let Err(problem) = checksum_problem(frame, l3) {
        panic!("{what}: {problem}\nframe:\n{}", hexdump(frame, usize::MAX));
    }
}

/// Checks the checksums with etherparse (a UDP checksum of 0 means none and is accepted).
pub fn checksum_problem(frame: &[u8], l3: usize) -> Result<(), String> {
    let (ip, _) =
        Ipv4Header::from_slice(&frame[l3..]).map_err(|e| format!("bad IPv4 header: {e}"))?;
    if ip.header_checksum != ip.calc_header_checksum() {
        return Err(format!(
            "IPv4 header checksum {:#06x} is wrong, expected {:#06x}",
            ip.header_checksum,
            ip.calc_header_checksum()
        ));
    }
    let end = l3 + usize::from(ip.total_len);
    if end > frame.len() {
        return Err("IPv4 total length past the frame".into());
    }
    let segment = &frame[l3 + ip.header_len()..end];
    let (got, want, proto) = if ip.protocol == IpNumber::TCP {
        let (tcp, payload) =
            TcpHeader::from_slice(segment).map_err(|e| format!("bad TCP header: {e}"))?;
        let want = tcp
            .calc_checksum_ipv4(&ip, payload)
            .map_err(|e| e.to_string())?;
        (tcp.checksum, want, "TCP")
    } else if ip.protocol == IpNumber::UDP {
        let (udp, rest) =
            UdpHeader::from_slice(segment).map_err(|e| format!("bad UDP header: {e}"))?;
        if udp.checksum == 0 {
            return Ok(());
        }
        let payload = usize::from(udp.length)
            .checked_sub(UdpHeader::LEN)
            .and_then(|n| rest.get(..n))
            .ok_or("bad UDP length")?;
        let want = udp
            .calc_checksum_ipv4(&ip, payload)
            .map_err(|e| e.to_string())?;
        (udp.checksum, want, "UDP")
    } else {
        return Err(format!("protocol {:?} is neither TCP nor UDP", ip.protocol));
    };
    if got != want {
        return Err(format!(
            "{proto} checksum {got:#06x} is wrong, expected {want:#06x}"
        ));
    }
    Ok(())
}

/// Panics unless the checksum of the IPv6 packet at `l3` is valid, whose upper layer
/// (`proto`, TCP or UDP) starts at `l4`, after any extension headers. In v6 a UDP checksum
/// of 0 is wrong too.
#[allow(dead_code)] // only the v6 test files call it
pub fn verify_checksums6(frame: &[u8], l3: usize, l4: usize, proto: u8, what: &str) {
    if let Err(problem) = checksum_problem6(frame, l3, l4, proto) {
        panic!("{what}: {problem}\nframe:\n{}", hexdump(frame, usize::MAX));
    }
}

#[allow(dead_code)] // as verify_checksums6
fn checksum_problem6(frame: &[u8], l3: usize, l4: usize, proto: u8) -> Result<(), String> {
    let (ip, _) = etherparse::Ipv6Header::from_slice(&frame[l3..])
        .map_err(|e| format!("bad IPv6 header: {e}"))?;
    let end = l3 + 40 + usize::from(ip.payload_length);
    let segment = frame.get(l4..end).ok_or("payload length past the frame")?;
    let (got, want, name) = if proto == IpNumber::TCP.0 {
        let (tcp, payload) =
            TcpHeader::from_slice(segment).map_err(|e| format!("bad TCP header: {e}"))?;
        let want = tcp
            .calc_checksum_ipv6(&ip, payload)
            .map_err(|e| e.to_string())?;
        (tcp.checksum, want, "TCP")
    } else {
        let (udp, rest) =
            UdpHeader::from_slice(segment).map_err(|e| format!("bad UDP header: {e}"))?;
        let payload = usize::from(udp.length)
            .checked_sub(UdpHeader::LEN)
            .and_then(|n| rest.get(..n))
            .ok_or("bad UDP length")?;
        let want = udp
            .calc_checksum_ipv6(&ip, payload)
            .map_err(|e| e.to_string())?;
        (udp.checksum, want, "UDP")
    };
    if got != want {
        return Err(format!(
            "{name} checksum {got:#06x} is wrong, expected {want:#06x}"
        ));
    }
    Ok(())
}
