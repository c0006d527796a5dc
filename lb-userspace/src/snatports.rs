//! Keeps the host's own connections off the ports fullnat takes on the host's address.
//!
//! fullnat without `snat` rewrites a flow's source to the LB's own address with a port from
//! `SNAT_PORTS_SHARED`. A connection of the host itself (a health check, anything) to the
//! same backend from a port in that span would share its reply 4-tuple with a flow, and one
//! of the two would get the other's replies. The kernel's default ephemeral range lies above
//! the span; on a host that widened it (`net.ipv4.ip_local_port_range`, which covers IPv6
//! too), the span goes into `net.ipv4.ip_local_reserved_ports`, as Cilium does for its
//! NodePorts: the kernel then picks none of those ports itself, while explicit binds still
//! work. The reservation stays after the agent exits: pinned flows keep their ports.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An inclusive port span.
pub type Span = (u16, u16);

/// `ip_local_port_range`: "low<TAB>high".
pub fn parse_range(text: &str) -> Option<Span> {
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    match (it.next()??, it.next()??, it.next()) {
        (low, high, None) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// `ip_local_reserved_ports`: "" or a comma-separated list of ports and ranges.
pub fn parse_reserved(text: &str) -> Option<Vec<Span>> {
    text.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => item.parse().ok().map(|p| (p, p)),
        })
        .collect()
}

fn overlaps(a: Span, b: Span) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Whether the reserved spans hold every port of `want`.
fn covered(reserved: &[Span], want: Span) -> bool {
    let mut spans = reserved.to_vec();
    spans.sort_unstable();
    let mut next = want.0 as u32;
    for (low, high) in spans {
        if low as u32 > next {
            break;
        }
        next = next.max(high as u32 + 1);
        if next > want.1 as u32 {
            return true;
        }
    }
    false
}

/// The reserved list to write, or None when the host cannot pick a port of `want` anyway
/// (its ephemeral range lies outside, or the ports are reserved already). Keeps what is
/// reserved: a write replaces the whole list.
pub fn plan(ephemeral: Span, reserved: &[Span], want: Span) -> Option<String> {
    if !overlaps(ephemeral, want) || covered(reserved, want) {
        return None;
    }
    let mut text = String::new();
    for &(low, high) in reserved.iter().chain([&want]) {
        if !text.is_empty() {
            text.push(',');
        }
        match low == high {
            true => write!(text, "{low}"),
            false => write!(text, "{low}-{high}"),
        }
        .expect("writing to a String");
    }
    Some(text)
}

/// Reserves `want` in this network namespace if the host's ephemeral range reaches into it.
/// Returns (ephemeral range, the list written) when it wrote.
pub fn reserve(want: Span) -> Result<Option<(Span, String)>> {
    reserve_in(Path::new(PORT_RANGE), Path::new(RESERVED), want)
}

fn reserve_in(range: &Path, reserved: &Path, want: Span) -> Result<Option<(Span, String)>> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let ephemeral = parse_range(&read(range)?)
        .with_context(|| format!("{}: not a port range", range.display()))?;
    let current = parse_reserved(&read(reserved)?)
        .with_context(|| format!("{}: not a port list", reserved.display()))?;
    let Some(text) = plan(ephemeral, &current, want) else {
        return Ok(None);
    };
    std::fs::write(reserved, &text).with_context(|| format!("writing {}", reserved.display()))?;
    Ok(Some((ephemeral, text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: Span = (1024, 32767);

    #[test]
    fn parses_what_the_kernel_prints() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("1024"), None);
        assert_eq!(parse_range("1 2 3"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("80,1024-32767,40000\n"),
            Some(vec![(80, 80), (1024, 32767), (40000, 40000)])
        );
        assert_eq!(parse_reserved("80,x"), None);
    }

    #[test]
    fn the_default_range_needs_nothing() {
        assert_eq!(plan((32768, 60999), &[], SHARED), None);
    }

    #[test]
    fn a_widened_range_gets_the_span_reserved_beside_what_is_there() {
        assert_eq!(
            plan((1024, 65535), &[], SHARED).as_deref(),
            Some("1024-32767")
        );
        assert_eq!(
            plan((20000, 65535), &[(80, 80), (5000, 6000)], SHARED).as_deref(),
            Some("80,5000-6000,1024-32767")
        );
    }

    #[test]
    fn a_span_reserved_in_pieces_is_covered() {
        assert_eq!(plan((1024, 65535), &[(1024, 32767)], SHARED), None);
        assert_eq!(
            plan((1024, 65535), &[(20000, 40000), (1000, 20000)], SHARED),
            None
        );
        // A hole of one port is not covered.
        assert!(plan((1024, 65535), &[(1024, 20000), (20002, 32767)], SHARED).is_some());
    }

    #[test]
    fn writes_the_reserved_list_and_then_leaves_it() {
        let dir = std::env::temp_dir().join(format!("xlb-snatports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (range, reserved) = (dir.join("range"), dir.join("reserved"));
        std::fs::write(&range, "1024\t65535\n").unwrap();
        std::fs::write(&reserved, "8080\n").unwrap();
        let wrote = reserve_in(&range, &reserved, SHARED).unwrap();
        assert_eq!(wrote, Some(((1024, 65535), "8080,1024-32767".to_string())));
        assert_eq!(
            std::fs::read_to_string(&reserved).unwrap(),
            "8080,1024-32767"
        );
        assert_eq!(reserve_in(&range, &reserved, SHARED).unwrap(), None);
        std::fs::write(&range, "garbage").unwrap();
        assert!(reserve_in(&range, &reserved, SHARED).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
