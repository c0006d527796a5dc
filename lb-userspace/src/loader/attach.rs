//! Attaches the balancer to the front interfaces, make-before-break: a change of
//! `xdp_mode` never leaves an interface without a balancer. A packet XDP balanced is no
//! longer addressed to a VIP when TC ingress sees it, so the TC balancer passes it on
//! untouched (balance.rs: not a VIP, not in the flow cache); XDP and the TC balancer can
//! be attached together for a moment, and that bridges every switch:
//!
//! - XDP (driver or skb) -> tc: attach the TC balancer, detach XDP, then the TC delivery
//!   program (it hands on what XDP marked until XDP is gone).
//! - tc -> XDP: attach TC delivery, then XDP, then detach the TC balancer.
//! - driver <-> skb: an interface has one XDP mode at a time, so the TC balancer bridges:
//!   attach it, replace the XDP link, detach it. It balances mode nat only: packets of
//!   fullnat and dsr services are dropped in the instant between the two XDP links.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::DevMapHash,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        tc::TcAttachOptions,
        xdp::XdpLink,
    },
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use tracing::{info, warn};

use super::{
    Attachment, PinLayout, REPLY_LINK_PREFIX, TC_BALANCE_PROGRAM, TC_EGRESS_PROGRAM,
    TC_INGRESS_PROGRAM, TC_REPLY_PROGRAM, XDP_PROGRAM, automode, pinned_links, program, unpin_link,
};
use crate::{config::XdpMode, datapath::TX_PORTS, netdev::ifindex};

/// Attaches XDP and TC ingress and egress to every front interface, taking over pinned
/// links, and detaches pinned links of front interfaces that are no longer configured.
/// `auto` picks each interface's mode by its kind (automode.rs); `nat_only`: every
/// service is mode nat, so `auto` may pick the TC balancer.
pub fn attach(
    ebpf: &mut Ebpf,
    pin_path: &Path,
    interfaces: &[String],
    mode: XdpMode,
    nat_only: bool,
) -> Result<Vec<Attachment>> {
    let layout = PinLayout::new(pin_path);
    let modes = interface_modes(interfaces, mode, nat_only);
    let mut out = Vec::new();
    for (interface, mode) in &modes {
        out.push(attach_front(ebpf, &layout, interface, *mode)?);
    }
    set_tx_ports(ebpf, &out)?;
    for stale in pinned_links(&layout)? {
        let reply = stale
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(REPLY_LINK_PREFIX));
        let keep = reply
            || modes
                .iter()
                .any(|(i, mode)| layout.front_links(i, *mode).contains(&stale));
        if !keep {
            info!(link = %stale.display(), "detaching link of an interface no longer configured");
            unpin_link(&stale)?;
        }
    }
    Ok(out)
}

/// Each interface's attach mode: `mode`, or for `auto` the one its device kind gets
/// (logged with the reason, one line per interface).
fn interface_modes(interfaces: &[String], mode: XdpMode, nat_only: bool) -> Vec<(String, XdpMode)> {
    if mode != XdpMode::Auto {
        return interfaces.iter().map(|i| (i.clone(), mode)).collect();
    }
    let kinds = automode::device_kinds(interfaces);
    interfaces
        .iter()
        .map(|interface| {
            let kind = &kinds[interface];
            let (chosen, why) = automode::choose(kind, nat_only);
            let shown = match chosen {
                XdpMode::Auto => "driver",
                XdpMode::Driver => "driver",
                XdpMode::Skb => "skb",
                XdpMode::Tc => "tc",
            };
            info!(%interface, device = kind.name(), xdp_mode = shown, "xdp_mode auto: {why}");
            (interface.clone(), chosen)
        })
        .collect()
}

/// The XDP program on an interface as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    /// No pinned XDP link, or one no longer attached.
    None,
    /// "driver" or "skb".
    Attached(&'static str),
    /// Pinned, in a mode rtnetlink did not tell.
    Unknown,
}

/// One front interface, make-before-break (see the module's doc).
fn attach_front(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    interface: &str,
    mode: XdpMode,
) -> Result<Attachment> {
    let attachment = |xdp_mode: &str, adopted| Attachment {
        interface: interface.into(),
        xdp_mode: xdp_mode.into(),
        adopted,
    };
    let egress = layout.tc_egress_link(interface);
    attach_tc(
        ebpf,
        TC_EGRESS_PROGRAM,
        &egress,
        interface,
        TcAttachType::Egress,
    )?;
    let xdp_link = layout.xdp_link(interface);
    let balancer = layout.tc_balance_link(interface);
    let ingress = layout.tc_ingress_link(interface);
    let current = current_xdp(&xdp_link, interface);
    if mode == XdpMode::Tc {
        let adopted = balancer.exists() && current == Current::None;
        attach_tc(
            ebpf,
            TC_BALANCE_PROGRAM,
            &balancer,
            interface,
            TcAttachType::Ingress,
        )?;
        if xdp_link.exists() {
            info!(%interface, "XDP -> tc: the TC balancer is attached; detaching XDP");
            remove_tx_port(ebpf, interface)?;
            unpin_link(&xdp_link)?;
        }
        unpin_if_pinned(&ingress)?;
        return Ok(attachment("tc", adopted));
    }
    attach_tc(
        ebpf,
        TC_INGRESS_PROGRAM,
        &ingress,
        interface,
        TcAttachType::Ingress,
    )?;
    let fits = |now: &str| match mode {
        XdpMode::Driver => now == "driver",
        XdpMode::Skb => now == "skb",
        XdpMode::Auto | XdpMode::Tc => true,
    };
    if let Current::Attached(now) = current
        && !fits(now)
    {
        info!(%interface, from = now, to = ?mode, "switching the XDP mode; the TC balancer bridges");
        attach_tc(
            ebpf,
            TC_BALANCE_PROGRAM,
            &balancer,
            interface,
            TcAttachType::Ingress,
        )?;
        if now == "driver" {
            remove_tx_port(ebpf, interface)?;
        }
        unpin_link(&xdp_link)?;
    }
    let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
    let (xdp_mode, adopted) = attach_xdp(xdp, &xdp_link, interface, mode)
        .with_context(|| format!("attaching XDP to {interface}"))?;
    // A link taken over kept its mode.
    let xdp_mode = match current {
        Current::Attached(now) if adopted => now,
        _ => xdp_mode,
    };
    if balancer.exists() {
        info!(%interface, xdp_mode, "XDP is attached; detaching the TC balancer");
        unpin_if_pinned(&balancer)?;
    }
    Ok(attachment(xdp_mode, adopted))
}

fn current_xdp(xdp_link: &Path, interface: &str) -> Current {
    if !xdp_link.exists() {
        return Current::None;
    }
    match xdp_mode_now(interface) {
        Ok(Some(mode)) => Current::Attached(mode),
        Ok(None) => Current::None,
        Err(e) => {
            warn!(%interface, "reading the XDP mode over rtnetlink: {e:#}; keeping the link as it is");
            Current::Unknown
        }
    }
}

/// "driver" or "skb" if an XDP program is attached to the interface, as rtnetlink says.
fn xdp_mode_now(interface: &str) -> Result<Option<&'static str>> {
    let index = ifindex(interface);
    let links = crate::bridgeport::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    let link = links
        .iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.header.index == index => Some(l),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no interface {interface}"))?;
    let attached = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(how) => Some(*how),
            _ => None,
        }),
        _ => None,
    });
    match attached {
        None | Some(XdpAttached::None) => Ok(None),
        Some(XdpAttached::Driver) => Ok(Some("driver")),
        Some(XdpAttached::SocketBuffer) => Ok(Some("skb")),
        Some(other) => Err(anyhow!("XDP attached as {other:?}")),
    }
}

fn unpin_if_pinned(path: &Path) -> Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        unpin_link(path)?;
    }
    Ok(())
}

fn tx_ports(ebpf: &mut Ebpf) -> Result<DevMapHash<&mut aya::maps::MapData>> {
    let map = ebpf
        .map_mut(TX_PORTS)
        .ok_or_else(|| anyhow!("the BPF object has no map {TX_PORTS}"))?;
    Ok(DevMapHash::try_from(map)?)
}

/// Before driver-mode XDP leaves an interface: no XDP may redirect to it any more.
fn remove_tx_port(ebpf: &mut Ebpf, interface: &str) -> Result<()> {
    let index = ifindex(interface);
    let mut ports = tx_ports(ebpf)?;
    let present: Vec<u32> = ports.keys().collect::<Result<_, _>>()?;
    if present.contains(&index) {
        ports.remove(index)?;
    }
    Ok(())
}

/// Makes the front NICs with driver-mode XDP, and only them, targets XDP may redirect to:
/// an interface where XDP fell back to skb mode (a bridge, say) usually cannot transmit
/// XDP frames, so packets for it go through TC instead (route.rs).
fn set_tx_ports(ebpf: &mut Ebpf, attached: &[Attachment]) -> Result<()> {
    let mut ports = tx_ports(ebpf)?;
    let present: Vec<u32> = ports.keys().collect::<Result<_, _>>()?;
    let wanted: Vec<u32> = attached
        .iter()
        .filter_map(|a| {
            let ifindex = ifindex(&a.interface);
            // An adopted link of unknown mode keeps its place in the map.
            let driver =
                a.xdp_mode == "driver" || (a.xdp_mode == "unchanged" && present.contains(&ifindex));
            (driver && ifindex != 0).then_some(ifindex)
        })
        .collect();
    for stale in present.iter().filter(|i| !wanted.contains(i)) {
        ports.remove(*stale)?;
    }
    for &ifindex in &wanted {
        ports.insert(ifindex, ifindex, None, 0)?;
    }
    Ok(())
}

/// Attaches the reply program to exactly these interfaces (container bridges and veths, by
/// name), detaching it from the others. A veth that went away with its container takes its
/// attachment along; only the pin is left to remove.
pub fn attach_reply(ebpf: &mut Ebpf, pin_path: &Path, interfaces: &[String]) -> Result<()> {
    let layout = PinLayout::new(pin_path);
    for interface in interfaces {
        let link = layout.tc_reply_link(interface);
        attach_tc(
            ebpf,
            TC_REPLY_PROGRAM,
            &link,
            interface,
            TcAttachType::Ingress,
        )?;
    }
    for stale in pinned_links(&layout)? {
        let name = stale
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(interface) = name.strip_prefix(REPLY_LINK_PREFIX)
            && !interfaces.iter().any(|i| i == interface)
        {
            info!(%interface, "detaching the reply program: no local backend behind it");
            unpin_link(&stale)?;
        }
    }
    Ok(())
}

pub(crate) fn attach_xdp(
    prog: &mut Xdp,
    link_path: &Path,
    interface: &str,
    mode: XdpMode,
) -> Result<(&'static str, bool)> {
    if let Some(link) = open_pinned_link(link_path)? {
        match prog.attach_to_link(XdpLink::try_from(link)?) {
            Ok(id) => {
                drop(prog.take_link(id)?);
                // The link keeps the mode it was created with; the kernel reports it
                // only through netlink, so it is not re-read here.
                return Ok(("unchanged", true));
            }
            Err(e) => {
                warn!(%interface, error = %e, "pinned XDP link is stale; attaching anew");
                fs::remove_file(link_path)?;
            }
        }
    }
    let (id, mode_name) = match mode {
        XdpMode::Driver => (prog.attach(interface, AyaXdpMode::Driver)?, "driver"),
        XdpMode::Skb => (prog.attach(interface, AyaXdpMode::Skb)?, "skb"),
        XdpMode::Tc => unreachable!("the TC balancer is attached instead"),
        XdpMode::Auto => match prog.attach(interface, AyaXdpMode::Driver) {
            Ok(id) => (id, "driver"),
            Err(e) => {
                warn!(%interface, error = %e, "XDP driver mode unavailable; falling back to skb mode (slower)");
                (prog.attach(interface, AyaXdpMode::Skb)?, "skb")
            }
        },
    };
    let link = FdLink::try_from(prog.take_link(id)?)?;
    link.pin(link_path)?;
    Ok((mode_name, false))
}

fn attach_tc(
    ebpf: &mut Ebpf,
    name: &str,
    link_path: &Path,
    interface: &str,
    direction: TcAttachType,
) -> Result<()> {
    let prog: &mut SchedClassifier = program(ebpf, name)?.try_into()?;
    attach_tc_program(prog, link_path, interface, direction)
        .with_context(|| format!("attaching {name} to {interface}"))
}

fn attach_tc_program(
    prog: &mut SchedClassifier,
    link_path: &Path,
    interface: &str,
    direction: TcAttachType,
) -> Result<()> {
    if let Some(link) = open_pinned_link(link_path)? {
        match prog.attach_to_link(SchedClassifierLink::try_from(link)?) {
            Ok(id) => {
                drop(prog.take_link(id)?);
                return Ok(());
            }
            Err(e) => {
                warn!(%interface, error = %e, "pinned TC link is stale; attaching anew");
                fs::remove_file(link_path)?;
            }
        }
    }
    let id = prog.attach_with_options(
        interface,
        direction,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )?;
    let link = FdLink::try_from(prog.take_link(id)?)?;
    link.pin(link_path)?;
    Ok(())
}

fn open_pinned_link(path: &Path) -> Result<Option<FdLink>> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(link.into())),
        Err(_) if !path.exists() => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening pinned link {}", path.display())),
    }
}
