//! How large each map is, computed from a config: the one place the agent decides it
//! (lb_common::sizes holds the defaults and limits). The loader creates the maps with these
//! sizes; maps that are pinned already keep theirs, and the agent then works with what the
//! pins hold (`Layout::of_pins`).
use std::path::Path;

use anyhow::Result;
use lb_common::{
    Backend, Counters, DoubleBuffer, Flow, FlowKey, RevNat, Service, SnatRev, VipAddrKey, VipKey,
    sizes::*,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, Mode},
    datapath::{
        BACKEND_STATS, BACKENDS, CONNTRACK, CONNTRACK_NEW, REPLY_ENDPOINTS, REV_NAT, REV_NAT_NEW,
        RINGS, SERVICE_STATS, SERVICES, SNAT_REV, SNAT_REV_NEW, VIP_ADDRS, VIPS,
    },
};

/// Entries of every map whose size depends on the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Service slots: `VIPS`, `SERVICES`, `VIP_ADDRS`, per-service counters.
    pub services: u32,
    /// Backend slots: `BACKENDS` and per-backend counters.
    pub backends: u32,
    /// `RINGS`, in blocks of RING_BLOCK slots.
    pub ring_blocks: u32,
    /// Established flows (`CONNTRACK`).
    pub flows: u32,
    /// New flows (`CONNTRACK_NEW`).
    pub embryonic: u32,
    /// nat reply mappings (`REV_NAT`, and `REV_NAT_NEW` of new flows).
    pub rev_nat: u32,
    pub rev_nat_new: u32,
    /// fullnat port reservations (`SNAT_REV`, and `SNAT_REV_NEW` of new flows).
    pub snat: u32,
    pub snat_new: u32,
}

/// What the BPF object declares: the sizes of a load without a config (tests, bench).
impl Default for Layout {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            ring_blocks: RING_BLOCKS,
            flows: CONNTRACK_SIZE,
            embryonic: EMBRYONIC_SIZE,
            rev_nat: REV_NAT_SIZE,
            rev_nat_new: EMBRYONIC_SIZE,
            snat: SNAT_REV_SIZE,
            snat_new: EMBRYONIC_SIZE,
        }
    }
}

/// One map's share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapSize {
    pub name: &'static str,
    pub entries: u32,
    /// As the kernel counts it (memlock), from the element sizes: see `bytes`.
    pub bytes: u64,
}

impl Layout {
    /// The sizes a (validated) config needs: every service slot (there are few, and a reload
    /// may add services), backend slots for twice the static backends and at least
    /// MIN_BACKEND_SLOTS for discovered ones, the rings with room to grow, and flow tables of
    /// `agent.flow_table_size`. A reply table no configured mode uses is kept small.
    pub fn for_config(config: &Config) -> Self {
        let flows = config.agent.flow_table_size;
        let uses = |mode| config.services.iter().any(|s| s.mode == mode);
        let static_backends: u32 = config
            .services
            .iter()
            .map(|s| s.backends.len() as u32)
            .sum();
        let rings = rings_needed(config);
        let spare = (rings / 4).max(MIN_SPARE_RING_BLOCKS);
        let embryonic = (flows / EMBRYONIC_SHARE).max(1);
        // (main, embryonic) entries of a mode's reply tables.
        let replies = |mode| {
            if uses(mode) {
                (flows, embryonic)
            } else {
                (UNUSED_TABLE_SIZE, UNUSED_TABLE_SIZE)
            }
        };
        let (rev_nat, rev_nat_new) = replies(Mode::Nat);
        let (snat, snat_new) = replies(Mode::Fullnat);
        Self {
            services: MAX_SERVICES,
            backends: (2 * static_backends).clamp(MIN_BACKEND_SLOTS, MAX_BACKENDS),
            ring_blocks: (rings + spare).min(MAX_RING_BLOCKS).max(rings),
            flows,
            embryonic,
            rev_nat,
            rev_nat_new,
            snat,
            snat_new,
        }
    }

    /// Slots of all rings.
    pub fn ring_slots(&self) -> u32 {
        self.ring_blocks * RING_BLOCK
    }

    /// (map, entries) for the loader.
    pub fn max_entries(&self) -> [(&'static str, u32); 14] {
        [
            (VIPS, self.services),
            (SERVICES, self.services),
            (VIP_ADDRS, self.services),
            (SERVICE_STATS, self.services),
            (BACKENDS, self.backends),
            (BACKEND_STATS, self.backends),
            // Backend endpoints claimed by new nat flows; stale ones linger until a sweep.
            (REPLY_ENDPOINTS, 2 * self.backends),
            (RINGS, self.ring_slots() / RING_CHUNK),
            (CONNTRACK, self.flows),
            (CONNTRACK_NEW, self.embryonic),
            (REV_NAT, self.rev_nat),
            (REV_NAT_NEW, self.rev_nat_new),
            (SNAT_REV, self.snat),
            (SNAT_REV_NEW, self.snat_new),
        ]
    }

    /// Each sized map's memory, as the kernel counts it for `cpus` possible CPUs.
    pub fn maps(&self, cpus: u32) -> Vec<MapSize> {
        self.max_entries()
            .into_iter()
            .map(|(name, entries)| MapSize {
                name,
                entries,
                bytes: bytes(name, entries, cpus),
            })
            .collect()
    }

    /// Memory of all sized maps.
    pub fn memory(&self, cpus: u32) -> u64 {
        self.maps(cpus).iter().map(|m| m.bytes).sum()
    }

    /// What the maps pinned under `pin_path` hold; None when nothing is pinned there.
    pub fn of_pins(pin_path: &Path) -> Result<Option<Self>> {
        if !pin_path.join(CONNTRACK).exists() {
            return Ok(None);
        }
        let entries = |name| -> Result<u32> {
            let map = crate::datapath::pinned_map(pin_path, name)?;
            let data = match &map {
                aya::maps::Map::Array(d)
                | aya::maps::Map::HashMap(d)
                | aya::maps::Map::LruHashMap(d)
                | aya::maps::Map::PerCpuArray(d) => d,
                _ => anyhow::bail!("{name}: unexpected map type"),
            };
            Ok(data.info()?.max_entries())
        };
        Ok(Some(Self {
            services: entries(SERVICES)?,
            backends: entries(BACKENDS)?,
            ring_blocks: entries(RINGS)? * RING_CHUNK / RING_BLOCK,
            flows: entries(CONNTRACK)?,
            embryonic: entries(CONNTRACK_NEW)?,
            rev_nat: entries(REV_NAT)?,
            rev_nat_new: entries(REV_NAT_NEW)?,
            snat: entries(SNAT_REV)?,
            snat_new: entries(SNAT_REV_NEW)?,
        }))
    }

    /// The same for the flow tables alone.
    pub fn flows_short_of(&self, wanted: &Layout) -> Vec<String> {
        let flow_tables = [
            CONNTRACK,
            CONNTRACK_NEW,
            REV_NAT,
            REV_NAT_NEW,
            SNAT_REV,
            SNAT_REV_NEW,
        ];
        self.short_of(wanted)
            .into_iter()
            .filter(|line| {
                flow_tables
                    .iter()
                    .any(|t| line.starts_with(&format!("{t} ")))
            })
            .collect()
    }

    /// Why maps of this layout (the pinned ones) fall short of `wanted`: one line per map.
    pub fn short_of(&self, wanted: &Layout) -> Vec<String> {
        self.max_entries()
            .into_iter()
            .zip(wanted.max_entries())
            .filter(|((_, have), (_, want))| want > have)
            .map(|((name, have), (_, want))| {
                format!("{name} holds {have}, the config needs {want}")
            })
            .collect()
    }
}

impl Layout {
    /// What `xlb check` prints: the sizes and the memory they cost on this machine.
    pub fn describe(&self, cpus: u32) -> String {
        let maps = self.maps(cpus);
        let of = |names: &[&str]| {
            maps.iter()
                .filter(|m| names.contains(&m.name))
                .map(|m| m.bytes)
                .sum()
        };
        let flows: u64 = of(&[CONNTRACK, CONNTRACK_NEW]);
        let replies: u64 = of(&[REV_NAT, REV_NAT_NEW, SNAT_REV, SNAT_REV_NEW]);
        let rings: u64 = of(&[RINGS]);
        let total = self.memory(cpus);
        format!(
            "flow table: {} flows, new flows {}, nat replies {} (new {}), fullnat ports {} (new {})\n\
             slots: {} services, {} backends, rings {} ({} blocks of {RING_BLOCK})\n\
             map memory: {} for {cpus} CPUs (flows {}, reply mappings {}, rings {}, other {})",
            self.flows,
            self.embryonic,
            self.rev_nat,
            self.rev_nat_new,
            self.snat,
            self.snat_new,
            self.services,
            self.backends,
            self.ring_slots(),
            self.ring_blocks,
            mib(total),
            mib(flows),
            mib(replies),
            mib(rings),
            mib(total - flows - replies - rings),
        )
    }
}

/// One map of a loaded data path as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelMap {
    pub name: String,
    pub entries: u32,
    /// `memlock` of /proc/self/fdinfo: the memory the kernel charges for the map.
    pub memlock: u64,
}

/// Every map the loaded programs use (those of the BPF object, not pinned ones alone), with
/// the memory the kernel charges for it.
pub fn kernel_maps(ebpf: &aya::Ebpf) -> Result<Vec<KernelMap>> {
    let mut ids = std::collections::BTreeSet::new();
    for (_, program) in ebpf.programs() {
        if let Some(map_ids) = program.info()?.map_ids()? {
            ids.extend(map_ids);
        }
    }
    let mut out = Vec::new();
    for id in ids {
        let map = aya::maps::MapData::from_id(id)?;
        let info = map.info()?;
        out.push(KernelMap {
            name: info.name_as_str().unwrap_or_default().to_string(),
            entries: info.max_entries(),
            memlock: memlock(map.fd())?,
        });
    }
    Ok(out)
}

fn memlock(fd: &aya::maps::MapFd) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{path} has no memlock line"))
}

/// Ring blocks the services need: the ring in use and the one being written, each.
pub fn rings_needed(config: &Config) -> u32 {
    config
        .services
        .iter()
        .map(|s| RING_HALVES * ring_blocks(s.table_size))
        .sum()
}

/// Possible CPUs (the count per-CPU maps are allocated for).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1)
}

/// A map's memory as the kernel counts it (its `memlock` in fdinfo; 6.x kernels): per
/// element, a preallocated hash map takes a 56-byte header, the key and the value (each
/// padded to 8), and 8 bytes of bucket per entry rounded up to a power of two; an array
/// the padded values (an mmapable one in whole pages); a per-CPU array one padded value per
/// CPU and a pointer per entry. Checked against the kernel by tests/tests/memory.rs.
fn bytes(name: &str, entries: u32, cpus: u32) -> u64 {
    let n = u64::from(entries);
    let pad = |size: usize| (size as u64).div_ceil(8) * 8;
    let hash = |key: usize, value: usize| {
        n * (56 + pad(key) + pad(value)) + u64::from(entries.next_power_of_two()) * 8
    };
    let mmapable = |value: usize| (n * pad(value)).div_ceil(4096) * 4096;
    let per_cpu = |value: usize| n * (pad(value) * u64::from(cpus) + 8);
    match name {
        VIPS => hash(size_of::<VipKey>(), 4),
        VIP_ADDRS => hash(size_of::<VipAddrKey>(), 4),
        // Not preallocated: the buckets, and elements only once claimed.
        REPLY_ENDPOINTS => u64::from(entries.next_power_of_two()) * 16,
        SERVICES => mmapable(size_of::<DoubleBuffer<Service>>()),
        BACKENDS => mmapable(size_of::<DoubleBuffer<Backend>>()),
        RINGS => mmapable(4 * RING_CHUNK as usize),
        SERVICE_STATS | BACKEND_STATS => per_cpu(size_of::<Counters>()),
        CONNTRACK | CONNTRACK_NEW => hash(size_of::<FlowKey>(), size_of::<Flow>()),
        REV_NAT | REV_NAT_NEW => hash(size_of::<FlowKey>(), size_of::<RevNat>()),
        SNAT_REV | SNAT_REV_NEW => hash(size_of::<FlowKey>(), size_of::<SnatRev>()),
        _ => 0,
    }
}

/// Bytes as MiB, for people.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("t.toml"), text).expect("valid")
    }

    const ONE: &str = r#"
        [agent]
        interfaces = ["eth0"]
        [[service]]
        name = "web"
        vip = "10.99.100.1"
        port = 80
          [[service.backend]]
          address = "10.99.2.11"
          port = 8080
    "#;

    #[test]
    fn one_service_gets_small_rings_and_no_snat_table() {
        let layout = Layout::for_config(&config(ONE));
        assert_eq!(layout.ring_blocks, 2 + MIN_SPARE_RING_BLOCKS);
        assert_eq!(layout.flows, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(layout.embryonic, DEFAULT_FLOW_TABLE_SIZE / EMBRYONIC_SHARE);
        assert_eq!(layout.rev_nat, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(layout.snat, UNUSED_TABLE_SIZE);
        assert_eq!(layout.snat_new, UNUSED_TABLE_SIZE);
        assert_eq!(layout.backends, MIN_BACKEND_SLOTS);
    }

    #[test]
    fn flow_table_size_sizes_every_flow_table() {
        let text = ONE.replace("[agent]", "[agent]\nflow_table_size = 4194304");
        let layout = Layout::for_config(&config(&text));
        assert_eq!(layout.flows, 4_194_304);
        assert_eq!(layout.embryonic, 1_048_576);
        // 144 bytes per established flow (40-byte key, 40-byte value).
        let conntrack = layout
            .maps(2)
            .into_iter()
            .find(|m| m.name == CONNTRACK)
            .unwrap();
        assert_eq!(conntrack.bytes, 4_194_304 * 144);
    }

    #[test]
    fn pins_short_of_a_larger_config_say_which_map() {
        let small = Layout::default();
        let large = Layout {
            flows: 2 * small.flows,
            ..small
        };
        let short = small.short_of(&large);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(short[0].starts_with(CONNTRACK), "{short:?}");
        assert!(large.short_of(&small).is_empty());
    }
}
