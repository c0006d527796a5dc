//! Which bridge of this host a backend is reached through, so that a backend on a local
//! bridge gets the fast delivery (bridge, then its own veth) with no config key.
//!
//! The kernel's route lookup answers it (`ip route get ADDR`, over rtnetlink): a backend is
//! on a local bridge when its route is a direct one (no gateway) out of a bridge, or out of
//! a port of one. Anything else (a gateway, a local address, no route, an error) is routed
//! by the kernel as before.
use std::{collections::HashMap, net::IpAddr};

use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};

use crate::bridgeport::{Link, get};

/// What the route lookup says about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOut {
    pub kind: RouteType,
    /// The output interface.
    pub oif: u32,
    /// Through a gateway: the backend is not on that link itself.
    pub gateway: bool,
}

/// The kernel's route to `addr`; None if there is none or rtnetlink refuses.
#[must_use]
pub fn route_to(addr: IpAddr) -> Option<RouteOut> {
    let mut request = RouteMessage::default();
    request.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    request.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    request.header.table = RouteHeader::RT_TABLE_UNSPEC;
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    let RouteNetlinkMessage::NewRoute(answer) = get(RouteNetlinkMessage::GetRoute(request)).ok()?
    else {
        return None;
    };
    let mut out = RouteOut {
        kind: answer.header.kind,
        oif: 0,
        gateway: false,
    };
    for attr in &answer.attributes {
        match attr {
            RouteAttribute::Oif(index) => out.oif = *index,
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => out.gateway = true,
            _ => {}
        }
    }
    Some(out)
}

/// The bridge (by name) a backend whose route is `route` sits on, if any: a direct unicast
/// route out of a bridge, or out of a port of a bridge.
#[must_use]
pub fn bridge_of(route: &RouteOut, links: &HashMap<u32, Link>) -> Option<String> {
    if route.kind != RouteType::Unicast || route.gateway {
        return None;
    }
    let out = links.get(&route.oif)?;
    if out.bridge {
        return Some(out.name.clone());
    }
    let controller = links.get(&out.controller?)?;
    controller.bridge.then(|| controller.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, controller: Option<u32>, bridge: bool) -> Link {
        Link {
            name: name.into(),
            controller,
            bridge,
            ..Link::default()
        }
    }

    /// br0 (5) with port vb1 (7); eth0 (2); bond0 (8) with port eth1 (9).
    fn links() -> HashMap<u32, Link> {
        [
            (2, link("eth0", None, false)),
            (5, link("br0", None, true)),
            (7, link("vb1", Some(5), false)),
            (8, link("bond0", None, false)),
            (9, link("eth1", Some(8), false)),
        ]
        .into()
    }

    fn direct(oif: u32) -> RouteOut {
        RouteOut {
            kind: RouteType::Unicast,
            oif,
            gateway: false,
        }
    }

    #[test]
    fn a_direct_route_out_of_a_bridge_or_its_port_is_that_bridge() {
        assert_eq!(bridge_of(&direct(5), &links()).as_deref(), Some("br0"));
        assert_eq!(bridge_of(&direct(7), &links()).as_deref(), Some("br0"));
    }

    #[test]
    fn anything_else_is_routed() {
        let links = links();
        assert_eq!(bridge_of(&direct(2), &links), None, "a plain NIC");
        assert_eq!(bridge_of(&direct(9), &links), None, "a port of a bond");
        assert_eq!(bridge_of(&direct(42), &links), None, "an unknown interface");
        let via = RouteOut {
            gateway: true,
            ..direct(5)
        };
        assert_eq!(
            bridge_of(&via, &links),
            None,
            "behind a gateway on the bridge"
        );
        let local = RouteOut {
            kind: RouteType::Local,
            ..direct(5)
        };
        assert_eq!(bridge_of(&local, &links), None, "an address of this host");
    }
}
