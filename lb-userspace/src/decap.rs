//! `xlb decap`: the backend-host side of mode dsr. Attaches the decapsulation program
//! (lb-ebpf/src/decap.rs) to the host's interfaces, tells it the VIPs this host serves, and
//! puts those VIPs on lo so the kernel accepts the inner packets and answers from the VIP.
//! VIPs and sources may be IPv4 or IPv6, mixed. The link is pinned: it stays after the
//! command exits, until `xlb decap --detach`. Encapsulated packets are accepted only from the
//! `--from` prefixes (the LB nodes), of the outer header's family; with none, from anyone in
//! both families, which lets any host that reaches this one forge client addresses.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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
const SOURCES6: &str = "XLB_DECAP_SOURCES6_V1";
const STATS: &str = "XLB_DECAP_STATS_V3";
/// Pins of older layouts, removed on attach (the program that used them is replaced).
const STALE: [&str; 2] = ["XLB_DECAP_STATS_V1", "XLB_DECAP_STATS_V2"];

/// What decap says when it accepts encapsulated packets from anyone.
pub const ANY_SOURCE_WARNING: &str = "accepting encapsulated packets from any source: anyone \
     who can reach this host can inject packets with a forged client address; pass --from \
     with the LB nodes' addresses";

/// Attaches decapsulation to `interfaces` for exactly `vips`, accepting encapsulated
/// packets only from `sources` (empty: any), replacing an earlier set of each.
pub fn attach(
    pin_path: &Path,
    interfaces: &[String],
    vips: &[IpAddr],
    sources: &[IpNet],
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
    // host would attract the VIP's traffic away from the balancer. IPv6 needs no knob:
    // Linux answers a neighbour solicitation only for an address of the interface it came in
    // on (ndisc_recv_ns looks the target up strictly on that device), so a v6 VIP on lo is
    // never claimed on eth0 unless proxy_ndp is on (tests/tests/decap_v6.rs checks it).
    for (knob, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let path = format!("/proc/sys/net/ipv4/conf/all/{knob}");
        fs::write(&path, value).with_context(|| format!("setting {path}"))?;
    }
    Ok(())
}

/// Makes the loaded object decapsulate for exactly `vips`.
pub fn set_vips(ebpf: &mut Ebpf, vips: &[IpAddr]) -> Result<()> {
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

/// Makes the loaded object accept encapsulated packets from exactly `sources`, each in the
/// trie of its family (none: from any, written as 0.0.0.0/0 and ::/0). New prefixes go in
/// before old ones leave, so a change never refuses the LB nodes in between.
pub fn set_sources(ebpf: &mut Ebpf, sources: &[IpNet]) -> Result<()> {
    let (v4, v6) = source_tries(sources);
    let max = lb_common::sizes::MAX_DECAP_SOURCES as usize;
    if v4.len() > max || v6.len() > max {
        bail!("at most {max} --from prefixes per address family");
    }
    let v4: Vec<Key<u32>> = v4.iter().map(|n| source_key(*n)).collect();
    let v6: Vec<Key<[u8; 16]>> = v6.iter().map(|n| source6_key(*n)).collect();
    replace_prefixes(ebpf, SOURCES, &v4)?;
    replace_prefixes(ebpf, SOURCES6, &v6)
}

/// What goes in the v4 and the v6 trie for `sources`: each family's prefixes (host bits
/// cleared), or both "any" when there are none. A family with no prefix while the other has
/// some gets nothing: it is refused.
pub fn source_tries(sources: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    if sources.is_empty() {
        return (vec![Ipv4Net::default()], vec![Ipv6Net::default()]);
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in sources {
        match net.trunc() {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    (v4, v6)
}

/// `--from`: a CIDR of either family, or a bare address (a /32 or /128).
pub fn parse_source(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text}: not a CIDR (10.0.0.0/24, fd00::/64) or address"))
}

/// `xlb decap --status`'s line about `sources` (as `accepted_sources` lists them).
pub fn describe_sources(sources: &[IpNet]) -> String {
    let any4 = sources.contains(&IpNet::V4(Ipv4Net::default()));
    let any6 = sources.contains(&IpNet::V6(Ipv6Net::default()));
    if any4 && any6 && sources.len() == 2 {
        return format!("any (warning: {ANY_SOURCE_WARNING})");
    }
    if sources.is_empty() {
        return "none (every encapsulated packet to a served VIP is dropped)".into();
    }
    let list: Vec<String> = sources.iter().map(|n| n.to_string()).collect();
    let mut line = list.join(", ");
    if any4 || any6 {
        line += &format!(" (warning: {ANY_SOURCE_WARNING})");
    }
    line
}

/// Makes the trie `name` hold exactly `wanted`, adding before removing.
fn replace_prefixes<K: aya::Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &str,
    wanted: &[Key<K>],
) -> Result<()> {
    let mut map: LpmTrie<_, K, u32> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name}"))?)?;
    let old: Vec<Key<K>> = map.keys().collect::<Result<_, _>>()?;
    for key in wanted {
        map.insert(key, 1, 0)?;
    }
    for key in old {
        if !wanted.iter().any(|w| same_key(w, &key)) {
            map.remove(&key)?;
        }
    }
    Ok(())
}

/// The prefixes the pinned program accepts encapsulated packets from, v4 then v6
/// (0.0.0.0/0 and ::/0: any).
pub fn accepted_sources(pin_path: &Path) -> Result<Vec<IpNet>> {
    let map: LpmTrie<MapData, u32, u32> = LpmTrie::try_from(open_pinned(pin_path, SOURCES)?)?;
    let mut v4 = Vec::new();
    for key in map.keys() {
        let key = key?;
        let addr = Ipv4Addr::from(key.data().to_ne_bytes());
        v4.push(Ipv4Net::new(addr, key.prefix_len() as u8)?);
    }
    v4.sort();
    let mut v6 = Vec::new();
    // A layout from before IPv6 has no v6 trie: it accepted no v6 packets.
    if pin_path.join(SOURCES6).exists() {
        let map: LpmTrie<MapData, [u8; 16], u32> =
            LpmTrie::try_from(open_pinned(pin_path, SOURCES6)?)?;
        for key in map.keys() {
            let key = key?;
            let addr = Ipv6Addr::from(key.data());
            v6.push(Ipv6Net::new(addr, key.prefix_len() as u8)?);
        }
    }
    v6.sort();
    Ok(v4
        .into_iter()
        .map(IpNet::V4)
        .chain(v6.into_iter().map(IpNet::V6))
        .collect())
}

fn source_key(net: Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

fn source6_key(net: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn same_key<K: aya::Pod + PartialEq>(a: &Key<K>, b: &Key<K>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
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

/// The VIPs the pinned program decapsulates for, v4 then v6.
pub fn served_vips(pin_path: &Path) -> Result<Vec<IpAddr>> {
    let map: HashMap<MapData, VipAddrKey, u32> = HashMap::try_from(open_pinned(pin_path, VIPS)?)?;
    let mut out = Vec::new();
    for key in map.keys() {
        let key = key?;
        out.push(words_addr(key.family, key.addr));
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

fn vip_key(vip: IpAddr) -> VipAddrKey {
    let (family, addr) = addr_words(vip);
    VipAddrKey {
        addr,
        family,
        _pad0: 0,
        _pad1: 0,
    }
}

/// `ip [-6] addr replace|del VIP/32|128 dev lo`; deleting an absent address is not an error.
fn ip_addr(action: &str, vip: IpAddr) -> Result<()> {
    let (family, len) = match vip {
        IpAddr::V4(_) => ("-4", 32),
        IpAddr::V6(_) => ("-6", 128),
    };
    let args = [family, "addr", action, &format!("{vip}/{len}"), "dev", "lo"];
    if action == "del" {
        iproute::run(&args)?;
        return Ok(());
    }
    ip(&args).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|t| parse_source(t).unwrap()).collect()
    }

    #[test]
    fn from_takes_addresses_and_prefixes_of_both_families() {
        assert_eq!(
            nets(&["10.99.5.2", "10.99.6.0/24", "fd99:5::2", "fd99:4::/64"]),
            [
                "10.99.5.2/32".parse::<IpNet>().unwrap(),
                "10.99.6.0/24".parse().unwrap(),
                "fd99:5::2/128".parse().unwrap(),
                "fd99:4::/64".parse().unwrap(),
            ]
        );
        assert!(parse_source("fd99::/129").is_err());
        assert!(parse_source("lb1").is_err());
    }

    #[test]
    fn sources_go_to_the_trie_of_their_family() {
        let (v4, v6) = source_tries(&nets(&["fd99:4::11/64", "10.99.6.7/24", "fd99:5::2"]));
        assert_eq!(v4, ["10.99.6.0/24".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(
            v6,
            [
                "fd99:4::/64".parse::<Ipv6Net>().unwrap(),
                "fd99:5::2/128".parse().unwrap()
            ]
        );
        // Only v4 given: v6 encapsulated packets are refused, not accepted from anyone.
        let (v4, v6) = source_tries(&nets(&["10.99.5.2"]));
        assert_eq!((v4.len(), v6.len()), (1, 0));
        // None given: any source, in both families.
        let (v4, v6) = source_tries(&[]);
        assert_eq!(
            (v4, v6),
            (vec![Ipv4Net::default()], vec![Ipv6Net::default()])
        );
    }

    #[test]
    fn status_names_the_sources_and_warns_about_any() {
        let any = describe_sources(&nets(&["0.0.0.0/0", "::/0"]));
        assert!(any.starts_with("any (warning"), "{any}");
        assert_eq!(
            describe_sources(&nets(&["10.99.5.2", "fd99:5::2"])),
            "10.99.5.2/32, fd99:5::2/128"
        );
        let half = describe_sources(&nets(&["10.99.5.2", "::/0"]));
        assert!(half.starts_with("10.99.5.2/32, ::/0 (warning"), "{half}");
        assert!(describe_sources(&[]).starts_with("none"));
    }
}
