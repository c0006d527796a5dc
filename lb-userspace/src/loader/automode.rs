//! `xdp_mode = "auto"`: the attach mode each front interface gets, by the kind of device it
//! is (rtnetlink's link kind), and why. Measured in docs/benchmarks.md ("Attach mode by
//! device"):
//!
//! - veth: the balancer at TC ingress (`tc`). A veth with an XDP program, native or not,
//!   queues every packet to its own NAPI and copies each cloned or headroom-short skb first,
//!   also traffic that is not for a VIP; at TC ingress none of that happens. `tc` balances
//!   mode nat only: with a fullnat or dsr service, XDP in driver mode.
//! - bridge: XDP in skb mode (a bridge has no driver mode).
//! - anything else (a physical NIC, a bond, a VLAN): XDP in driver mode, where the driver
//!   runs it before any skb exists; skb mode if the driver has none (with a warning).
use std::collections::HashMap;

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};

use crate::{bridgeport::dump, config::XdpMode};

/// What kind of device a front interface is, as far as the attach mode goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    Veth,
    Bridge,
    /// Any other link kind rtnetlink names (bond, vlan, macvlan, …).
    Other(String),
    /// No link kind: a physical NIC (or one rtnetlink could not tell).
    Physical,
}

impl DeviceKind {
    pub fn name(&self) -> &str {
        match self {
            DeviceKind::Veth => "veth",
            DeviceKind::Bridge => "bridge",
            DeviceKind::Other(kind) => kind,
            DeviceKind::Physical => "physical NIC",
        }
    }
}

/// The attach mode `auto` picks for a device of this kind, and why (for the log).
/// `nat_only`: every service is mode nat (the only one the TC balancer handles).
pub fn choose(kind: &DeviceKind, nat_only: bool) -> (XdpMode, &'static str) {
    match kind {
        DeviceKind::Veth if nat_only => (
            XdpMode::Tc,
            "XDP on a veth copies and defers every packet, also those not for a VIP; the \
             balancer at TC ingress does neither",
        ),
        DeviceKind::Veth => (
            XdpMode::Driver,
            "veth; the TC balancer would be faster but handles mode nat only, and a service \
             is fullnat or dsr",
        ),
        DeviceKind::Bridge => (XdpMode::Skb, "a bridge has no driver-mode XDP"),
        DeviceKind::Other(_) | DeviceKind::Physical => (
            XdpMode::Auto,
            "driver-mode XDP runs before the kernel builds an skb (skb mode if the driver has \
             none)",
        ),
    }
}

/// The kind of each interface, by name (rtnetlink's link dump); Physical for any it does
/// not list or when it cannot be read (driver mode then, with its fallback, as before).
pub fn device_kinds(interfaces: &[String]) -> HashMap<String, DeviceKind> {
    let links = dump(RouteNetlinkMessage::GetLink(LinkMessage::default())).unwrap_or_else(|e| {
        tracing::warn!("reading the interfaces' kinds over rtnetlink: {e}");
        Vec::new()
    });
    let mut kinds: HashMap<String, DeviceKind> = links
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(kind_of(link)),
            _ => None,
        })
        .filter(|(name, _)| interfaces.contains(name))
        .collect();
    for interface in interfaces {
        kinds
            .entry(interface.clone())
            .or_insert(DeviceKind::Physical);
    }
    kinds
}

fn kind_of(link: &LinkMessage) -> (String, DeviceKind) {
    let mut name = String::new();
    let mut kind = DeviceKind::Physical;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = match k {
                            InfoKind::Veth => DeviceKind::Veth,
                            InfoKind::Bridge => DeviceKind::Bridge,
                            other => DeviceKind::Other(other.to_string()),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    (name, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_veth_gets_the_tc_balancer_when_every_service_is_nat() {
        assert_eq!(choose(&DeviceKind::Veth, true).0, XdpMode::Tc);
        assert_eq!(choose(&DeviceKind::Veth, false).0, XdpMode::Driver);
    }

    #[test]
    fn other_devices_get_xdp() {
        assert_eq!(choose(&DeviceKind::Bridge, true).0, XdpMode::Skb);
        for kind in [DeviceKind::Physical, DeviceKind::Other("bond".into())] {
            for nat_only in [true, false] {
                let (mode, why) = choose(&kind, nat_only);
                assert_eq!(mode, XdpMode::Auto, "{kind:?}: driver, skb as fallback");
                assert!(why.contains("driver"), "{why}");
            }
        }
    }
}
