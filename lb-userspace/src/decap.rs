//! `xlb decap`: the backend-host side of mode dsr. Attaches the decapsulation program
//! (lb-ebpf/src/decap.rs) to the host's interfaces, tells it the VIPs this host serves, and
//! puts those VIPs on lo so the kernel accepts the inner packets and answers from the VIP.
//! The link is pinned: it stays after the command exits, until `xlb decap --detach`.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::{DecapCounter, VipAddrKey, addr_words, words_addr};
use tracing::info;

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
const STATS: &str = "XLB_DECAP_STATS_V1";

/// Attaches decapsulation to `interfaces` for exactly `vips` (replacing an earlier set).
pub fn attach(
    pin_path: &Path,
    interfaces: &[String],
    vips: &[Ipv4Addr],
    mode: XdpMode,
) -> Result<()> {
    if interfaces.is_empty() || vips.is_empty() {
        bail!("give at least one --interface and one --vip");
    }
    loader::ensure_bpffs(pin_path)?;
    let layout = PinLayout::new(pin_path);
    fs::create_dir_all(layout.links()).context("creating the pin directory")?;
    fs::create_dir_all(layout.programs()).context("creating the pin directory")?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .load(DECAP_OBJECT)
        .context("loading the decap object (are you root?)")?;
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
    let mut map: HashMap<_, VipAddrKey, u32> =
        HashMap::try_from(ebpf.map_mut(VIPS).ok_or_else(|| anyhow!("no map {VIPS}"))?)?;
    for vip in &old {
        if !vips.contains(vip) {
            map.remove(&vip_key(*vip))?;
            ip_addr("del", *vip)?;
        }
    }
    for vip in vips {
        map.insert(vip_key(*vip), 1, 0)?;
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
