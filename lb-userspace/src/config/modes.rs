//! Validation of the forwarding mode fields of a service (mode, snat, encap).
use std::net::IpAddr;

use lb_common::MAX_SNAT_ADDRS;

use super::{Mode, ServiceConfig, XdpMode};

/// (field, reason) for every problem with a service's mode settings.
pub(super) fn problems(svc: &ServiceConfig, xdp_mode: XdpMode) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if svc.mode != Mode::Nat && xdp_mode == XdpMode::Tc {
        out.push((
            "mode".into(),
            format!(
                "{} needs an XDP attach mode (agent.xdp_mode \"tc\" supports nat only)",
                svc.mode.name()
            ),
        ));
    }
    if !svc.snat.is_empty() && svc.mode != Mode::Fullnat {
        out.push(("snat".into(), "only mode \"fullnat\" uses snat".into()));
    }
    // Each VIP's half takes the addresses of its family.
    for v4 in [true, false] {
        if svc.snat.iter().filter(|a| a.is_ipv4() == v4).count() > MAX_SNAT_ADDRS {
            out.push((
                "snat".into(),
                format!("at most {MAX_SNAT_ADDRS} addresses of each IP family"),
            ));
        }
    }
    if let Some(bad) = svc.snat.iter().find(|a| !usable_unicast(a)) {
        out.push(("snat".into(), format!("{bad} is not a unicast IP address")));
    }
    if let Some(bad) = svc.snat.iter().find(|a| svc.vip.of_family(**a).is_none()) {
        out.push((
            "snat".into(),
            format!("{bad} is not of the VIP's IP family: no flow could use it"),
        ));
    }
    if svc.encap.is_some() && svc.mode != Mode::Dsr {
        out.push(("encap".into(), "only mode \"dsr\" uses encap".into()));
    }
    if svc.mode == Mode::Dsr {
        // The packet reaches the backend unchanged: it must listen on the VIP's port.
        for (j, be) in svc.backends.iter().enumerate() {
            if be.port != svc.port {
                out.push((
                    format!("backend[{j}].port"),
                    format!(
                        "{} differs from the service port {}: dsr does not rewrite ports",
                        be.port, svc.port
                    ),
                ));
            }
            if be
                .bridge
                .as_deref()
                .is_some_and(|b| b != super::BRIDGE_ROUTED)
            {
                out.push((
                    format!("backend[{j}].bridge"),
                    "dsr sends to the backend's host; a bridge is for mode nat".into(),
                ));
            }
        }
    }
    out
}

fn usable_unicast(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
        }
        // A link-local source would not leave the link towards the backend.
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_loopback()
                || v6.is_unicast_link_local())
        }
    }
}
