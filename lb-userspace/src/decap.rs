//! `xlb decap`: the backend-host side of mode dsr. Attaches the decapsulation program
//! (lb-ebpf/src/decap.rs) to the host's interfaces, tells it the VIPs this host serves, and
//! puts those VIPs on lo so the kernel accepts the inner packets and answers from the VIP.
//! The link is pinned: it stays after the command exits, until `xlb decap --detach`.
//! Encapsulated packets are accepted only from the `--from` prefixes (the LB nodes); with
//! none, from anyone, which lets any host that reaches this one forge client addresses.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use ipnet::Ipv4Net;
use lb_common::{DecapCounter, VipAddrKey, addr_words, words_addr};
use tracing::{info, warn};

use crate::{
    config::XdpMode,
    iproute::{self, ip},
    loader::{self, PinLayout},
};

pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-decap"));
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb-decap";
const PROGRAM: &str = "xlb_decap";
const VIPS: &str = "XLB_DECAP_VIPS_V1";
const SOURCES: &str = "XLB_DECAP_SOURCES_V1";
const STATS: &str = "XLB_DECAP_STATS_V2";
/// Pins of older layouts, removed on attach (the program that used them is replaced).
const STALE: [&str; 1] = ["XLB_DECAP_STATS_V1"];

/// What decap says when it accepts encapsulated packets from anyone.
pub const ANY_SOURCE_WARNING: &str = "accepting encapsulated packets from any source: anyone \
     who can reach this host can inject packets with a forged client address; pass --from \
     with the LB nodes' addresses";

/// Attaches decapsulation to `interfaces` for exactly `vips`, accepting encapsulated
/// packets only from `sources` (empty: any), replacing an earlier set of each.
pub fn attach(
    pin_path: &Path,
    interfaces: &[String],
    vips: &[Ipv4Addr],
    sources: &[Ipv4Net],
    mode: XdpMode,
) -> Result<()> {
    if interfaces.is_empty() || vips.is_empty() {
        bail!("give at least one --interface and one --vip");
    }
    crate::bpffs::ensure(pin_path)?;
    let layout = PinLayout::new(pin_path);
    fs::create_dir_all(layout.links()).context("creating the pin directory")?;
    fs::create_dir_all(layout.programs()).context("creating the pin directory")?;
    for stale in STALE {
        let path = pin_path.join(stale);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .load(DECAP_OBJECT)
        .context("loading the decap object (are you root?)")?;
    // Before the program sees a packet: the sources it may accept them from.
    set_sources(&mut ebpf, sources)?;
    if sources.is_empty() {
        warn!("{ANY_SOURCE_WARNING}");
    }
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("no program {PROGRAM}"))?
        .try_into()?;
    prog.load().context("verifying the decap program")?;
    loader::repin(layout.programs().join(PROGRAM), |p| prog.pin(p))?;
    for interface in interfaces {
        let (how, _) = loader::attach_xdp(prog, &layout.xdp_link(interface), interface, mode)
            .with_context(|| format!("attaching decap to {interface}"))?;
        info!(%interface, mode = how, "decap attached");
    }

    let old = served_vips(pin_path).unwrap_or_default();
    set_vips(&mut ebpf, vips)?;
    for vip in &old {
        if !vips.contains(vip) {
            ip_addr("del", *vip)?;
        }
    }
    for vip in vips {
        ip_addr("replace", *vip)?;
    }
    // Classic DSR host setup: the VIP on lo must not answer ARP on the real NICs, or the
    // host would attract the VIP's traffic away from the balancer.
    for (knob, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let path = format!("/proc/sys/net/ipv4/conf/all/{knob}");
        fs::write(&path, value).with_context(|| format!("setting {path}"))?;
    }
    Ok(())
}

/// Makes the loaded object decapsulate for exactly `vips`.
pub fn set_vips(ebpf: &mut Ebpf, vips: &[Ipv4Addr]) -> Result<()> {
    let mut map: HashMap<_, VipAddrKey, u32> =
        HashMap::try_from(ebpf.map_mut(VIPS).ok_or_else(|| anyhow!("no map {VIPS}"))?)?;
    let old: Vec<VipAddrKey> = map.keys().collect::<Result<_, _>>()?;
    for vip in vips {
        map.insert(vip_key(*vip), 1, 0)?;
    }
    let wanted: Vec<VipAddrKey> = vips.iter().map(|v| vip_key(*v)).collect();
    for key in old {
        if !wanted.contains(&key) {
            map.remove(&key)?;
        }
    }
    Ok(())
}

/// Makes the loaded object accept encapsulated packets from exactly `sources` (empty: from
/// any, written as 0.0.0.0/0). New prefixes go in before old ones leave, so a change never
/// refuses the LB nodes in between.
pub fn set_sources(ebpf: &mut Ebpf, sources: &[Ipv4Net]) -> Result<()> {
    if sources.len() > lb_common::sizes::MAX_DECAP_SOURCES as usize {
        bail!(
            "at most {} --from prefixes",
            lb_common::sizes::MAX_DECAP_SOURCES
        );
    }
    let mut map: LpmTrie<_, u32, u32> = LpmTrie::try_from(
        ebpf.map_mut(SOURCES)
            .ok_or_else(|| anyhow!("no map {SOURCES}"))?,
    )?;
    let any = [Ipv4Net::default()];
    let wanted: Vec<Ipv4Net> = if sources.is_empty() {
        any.to_vec()
    } else {
        sources.iter().map(|n| n.trunc()).collect()
    };
    let old: Vec<Key<u32>> = map.keys().collect::<Result<_, _>>()?;
    for net in &wanted {
        map.insert(&source_key(*net), 1, 0)?;
    }
    for key in old {
        if !wanted.iter().any(|n| same_key(&source_key(*n), &key)) {
            map.remove(&key)?;
        }
    }
    Ok(())
}

/// The prefixes the pinned program accepts encapsulated packets from (0.0.0.0/0: any).
pub fn accepted_sources(pin_path: &Path) -> Result<Vec<Ipv4Net>> {
    let map: LpmTrie<MapData, u32, u32> = LpmTrie::try_from(open_pinned(pin_path, SOURCES)?)?;
    let mut out = Vec::new();
    for key in map.keys() {
        let key = key?;
        let addr = Ipv4Addr::from(key.data().to_ne_bytes());
        out.push(Ipv4Net::new(addr, key.prefix_len() as u8)?);
    }
    out.sort();
    Ok(out)
}

fn source_key(net: Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

fn same_key(a: &Key<u32>, b: &Key<u32>) -> bool {
    (a.prefix_len(), a.data()) == (b.prefix_len(), b.data())
}

/// Removes the VIPs from lo, detaches and unpins everything under `pin_path`.
pub fn detach(pin_path: &Path) -> Result<()> {
    for vip in served_vips(pin_path).unwrap_or_default() {
        ip_addr("del", vip)?;
    }
    let done = loader::detach(pin_path)?;
    info!(links = done.links, pins = done.pins, "decap detached");
    Ok(())
}

/// The VIPs the pinned program decapsulates for.
pub fn served_vips(pin_path: &Path) -> Result<Vec<Ipv4Addr>> {
    let map: HashMap<MapData, VipAddrKey, u32> = HashMap::try_from(open_pinned(pin_path, VIPS)?)?;
    let mut out = Vec::new();
    for key in map.keys() {
        let key = key?;
        if let IpAddr::V4(v4) = words_addr(key.family, key.addr) {
            out.push(v4);
        }
    }
    out.sort();
    Ok(out)
}

/// The decap counters summed over CPUs.
pub fn counters(pin_path: &Path) -> Result<Vec<(DecapCounter, u64)>> {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_pinned(pin_path, STATS)?)?;
    DecapCounter::ALL
        .iter()
        .map(|&c| Ok((c, map.get(&(c as u32), 0)?.iter().sum())))
        .collect()
}

fn open_pinned(pin_path: &Path, name: &str) -> Result<aya::maps::Map> {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(aya::maps::Map::from_map_data(data)?)
}

fn vip_key(vip: Ipv4Addr) -> VipAddrKey {
    let (family, addr) = addr_words(IpAddr::V4(vip));
    VipAddrKey {
        addr,
        family,
        _pad0: 0,
        _pad1: 0,
    }
}

/// `ip addr replace|del VIP/32 dev lo`; deleting an absent address is not an error.
fn ip_addr(action: &str, vip: Ipv4Addr) -> Result<()> {
    let args = ["addr", action, &format!("{vip}/32"), "dev", "lo"];
    if action == "del" {
        iproute::run(&args)?;
        return Ok(());
    }
    ip(&args).map(|_| ())
}
