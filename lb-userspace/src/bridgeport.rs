//! Finds a local container's host-side veth on its bridge, so the data path can hand packets
//! straight to the container's eth0 (`bpf_redirect_peer`) instead of through the bridge.
//!
//! The kernel's own tables answer it, read over rtnetlink in the agent's network namespace:
//! the neighbour table gives the container's MAC (the agent's health checks keep it
//! resolved), the bridge's forwarding database the port that MAC was learned on, and the
//! link table whether that port is a veth whose other end is in another namespace (the
//! only kind `bpf_redirect_peer` can use). Anything missing leaves the backend on the bridge
//! path, which always works. `watch` reports changes of these tables as they happen.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::{Serialize, Serializer};

/// A container's host-side veth, as the data path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VethPort {
    pub ifindex: u32,
    /// The container's MAC (destination of the frames handed over).
    #[serde(serialize_with = "mac_text")]
    pub mac: [u8; 6],
    /// The bridge's MAC (their source, as if the bridge had forwarded them).
    #[serde(serialize_with = "mac_text")]
    pub bridge_mac: [u8; 6],
}

/// What the lookup needs of one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// The bridge it is a port of.
    pub controller: Option<u32>,
    /// A veth whose other end is in another network namespace.
    pub veth_to_other_netns: bool,
    /// A Linux bridge.
    pub bridge: bool,
}

/// The host's links, IPv4 neighbours and bridge forwarding entries, read once per pass.
#[derive(Debug, Default)]
pub struct HostTables {
    pub links: HashMap<u32, Link>,
    /// (ifindex, address) -> MAC of resolved neighbours.
    pub neighbours: HashMap<(u32, Ipv4Addr), [u8; 6]>,
    /// (bridge ifindex, MAC) -> port ifindex of learned forwarding entries.
    pub fdb: HashMap<(u32, [u8; 6]), u32>,
}

impl HostTables {
    /// Dumps the tables; empty ones if rtnetlink refuses (the bridge path still works).
    #[must_use]
    pub fn read() -> Self {
        match Self::try_read() {
            Ok(tables) => tables,
            Err(e) => {
                tracing::warn!("reading links and neighbours over rtnetlink: {e}");
                Self::default()
            }
        }
    }

    fn try_read() -> io::Result<Self> {
        let links = dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(&link)),
                _ => None,
            })
            .collect();
        let mut neighbours = HashMap::new();
        let mut fdb = HashMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Bridge] {
            let mut request = NeighbourMessage::default();
            request.header.family = family;
            for m in dump(RouteNetlinkMessage::GetNeighbour(request))? {
                let RouteNetlinkMessage::NewNeighbour(n) = m else {
                    continue;
                };
                add_neighbour(&n, &mut neighbours, &mut fdb);
            }
        }
        Ok(Self {
            links,
            neighbours,
            fdb,
        })
    }

    /// The veth behind which `addr` sits on the bridge `bridge`, if the tables know it.
    #[must_use]
    pub fn lookup(&self, bridge: &str, addr: IpAddr) -> Option<VethPort> {
        let IpAddr::V4(addr) = addr else { return None };
        let (&bridge_index, bridge_link) = self.links.iter().find(|(_, l)| l.name == bridge)?;
        let mac = *self.neighbours.get(&(bridge_index, addr))?;
        let ifindex = *self.fdb.get(&(bridge_index, mac))?;
        let port = self.links.get(&ifindex)?;
        (port.controller == Some(bridge_index) && port.veth_to_other_netns).then_some(VethPort {
            ifindex,
            mac,
            bridge_mac: bridge_link.mac?,
        })
    }
}

fn link_of(msg: &LinkMessage) -> (u32, Link) {
    let mut link = Link::default();
    let (mut veth, mut other_netns) = (false, false);
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(mac) => link.mac = mac.as_slice().try_into().ok(),
            LinkAttribute::Controller(index) => link.controller = Some(*index),
            // Present only when the peer lives in another namespace.
            LinkAttribute::LinkNetNsId(_) => other_netns = true,
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                link.bridge = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    link.veth_to_other_netns = veth && other_netns;
    (msg.header.index, link)
}

fn add_neighbour(
    n: &NeighbourMessage,
    neighbours: &mut HashMap<(u32, Ipv4Addr), [u8; 6]>,
    fdb: &mut HashMap<(u32, [u8; 6]), u32>,
) {
    let mut mac: Option<[u8; 6]> = None;
    let (mut addr, mut controller) = (None, None);
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = bytes.as_slice().try_into().ok(),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => addr = Some(*ip),
            NeighbourAttribute::Controller(index) => controller = Some(*index),
            _ => {}
        }
    }
    let Some(mac) = mac.filter(|m| *m != [0; 6]) else {
        return;
    };
    match n.header.family {
        AddressFamily::Inet => {
            let resolved = !matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            );
            if let (Some(addr), true) = (addr, resolved) {
                neighbours.insert((n.header.ifindex, addr), mac);
            }
        }
        // Learned on a port (not the bridge's own addresses, not a port's own list).
        AddressFamily::Bridge => {
            let learned = n.header.state != NeighbourState::Permanent
                && !n.header.flags.contains(NeighbourFlags::Own);
            if let (Some(bridge), true) = (controller, learned) {
                fdb.insert((bridge, mac), n.header.ifindex);
            }
        }
        _ => {}
    }
}

/// rtnetlink multicast groups of link and neighbour changes; the bridge's forwarding entries
/// come as neighbours (family AF_BRIDGE).
/// Routes too: they say which bridge a backend is reached through (localbridge.rs).
const WATCHED_GROUPS: u32 =
    (libc::RTMGRP_LINK | libc::RTMGRP_NEIGH | libc::RTMGRP_IPV4_ROUTE | libc::RTMGRP_IPV6_ROUTE)
        as u32;
/// Changes are reported at most this often: neighbour states change all the time on a busy
/// host, and one read of the tables covers any number of them.
const CHANGE_COALESCE: Duration = Duration::from_millis(100);

/// Calls `changed` whenever a link, neighbour or bridge forwarding entry of this network
/// namespace changes (at most once per CHANGE_COALESCE), on a thread of its own, until
/// `changed` returns false.
pub fn watch(changed: impl Fn() -> bool + Send + 'static) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, WATCHED_GROUPS))?;
    std::thread::Builder::new()
        .name("xlb-link-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(_) => {}
                    // The kernel dropped messages: something changed all the same.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e) => {
                        tracing::warn!("watching links and neighbours: {e}; polling only");
                        return;
                    }
                }
                // Report, then let changes gather; report again if any came meanwhile.
                loop {
                    if !changed() {
                        return;
                    }
                    std::thread::sleep(CHANGE_COALESCE);
                    if !drain(&mut socket, &mut buf) {
                        break;
                    }
                }
            }
        })?;
    Ok(())
}

/// Reads whatever is queued on the socket without waiting; true if there was anything.
fn drain(socket: &mut Socket, buf: &mut [u8]) -> bool {
    if socket.set_non_blocking(true).is_err() {
        return true;
    }
    let mut any = false;
    // Bounded: on a host whose tables never rest, reading must not keep up forever.
    for _ in 0..1024 {
        match socket.recv(&mut &mut buf[..], 0) {
            Ok(_) => any = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
            Err(_) => break,
        }
    }
    let _ = socket.set_non_blocking(false);
    any
}

/// One rtnetlink dump request and all its answers.
pub(crate) fn dump(request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    ask(request, NLM_F_REQUEST | NLM_F_DUMP)
}

/// One rtnetlink request that is not a dump (a route lookup, say): its one answer.
pub(crate) fn get(request: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
    ask(request, NLM_F_REQUEST)?
        .pop()
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"))
}

fn ask(request: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let dumping = flags & NLM_F_DUMP != 0;
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(request));
    msg.finalize();
    let mut out = vec![0; msg.header.length as usize];
    msg.serialize(&mut out);
    socket.send(&out, 0)?;

    let mut answers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("netlink error {e:?}")));
                }
                NetlinkPayload::InnerMessage(inner) => {
                    answers.push(inner);
                    if !dumping {
                        return Ok(answers);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The name of the interface with this index here.
pub fn index_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname writes at most.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    name.to_str().ok().map(str::to_owned)
}

fn mac_text<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    let [a, b, c, d, e, f] = mac;
    s.serialize_str(&format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const CONTAINER_MAC: [u8; 6] = [2, 0x42, 10, 99, 2, 11];

    fn link(name: &str, controller: Option<u32>, veth: bool) -> Link {
        Link {
            name: name.into(),
            mac: Some(BRIDGE_MAC),
            controller,
            veth_to_other_netns: veth,
            bridge: false,
        }
    }

    /// br0 (index 5) with veth port 7, behind which 10.99.2.11 was learned.
    fn tables() -> HostTables {
        let addr = "10.99.2.11".parse().expect("addr");
        HostTables {
            links: [
                (5, link("br0", None, false)),
                (7, link("vb1", Some(5), true)),
            ]
            .into(),
            neighbours: [((5, addr), CONTAINER_MAC)].into(),
            fdb: [((5, CONTAINER_MAC), 7)].into(),
        }
    }

    #[test]
    fn a_learned_container_is_found_behind_its_veth() {
        let found = tables().lookup("br0", "10.99.2.11".parse().expect("addr"));
        let expected = VethPort {
            ifindex: 7,
            mac: CONTAINER_MAC,
            bridge_mac: BRIDGE_MAC,
        };
        assert_eq!(found, Some(expected));
        let json = serde_json::to_string(&expected).expect("json");
        assert!(json.contains("\"mac\":\"02:42:0a:63:02:0b\""), "{json}");
    }

    #[test]
    fn anything_missing_or_odd_means_the_bridge_path() {
        let addr: IpAddr = "10.99.2.11".parse().expect("addr");
        assert_eq!(tables().lookup("br1", addr), None, "another bridge");
        assert_eq!(
            tables().lookup("br0", "10.99.2.12".parse().expect("addr")),
            None
        );
        let mut t = tables();
        t.fdb.clear();
        assert_eq!(t.lookup("br0", addr), None, "not learned");
        let mut t = tables();
        t.links.insert(7, link("vb1", Some(5), false));
        assert_eq!(t.lookup("br0", addr), None, "not a veth to another netns");
        let mut t = tables();
        t.links.insert(7, link("vb1", Some(6), true));
        assert_eq!(t.lookup("br0", addr), None, "a port of another bridge");
        assert_eq!(tables().lookup("br0", "::1".parse().expect("addr")), None);
    }
}
