//! The data path's maps in domain terms (services, backends, rings, counters). Callers never
//! see a file descriptor or a raw key layout. Map names match lb-ebpf/src/maps.rs.
use std::{net::IpAddr, path::Path};

use crate::{flowtables::FlowTables, mapped::MappedArray, reconcile::Maps};
use anyhow::{Context as _, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use ipnet::IpNet;
use lb_common::{
    Backend, Counters, DoubleBuffer, FlowKey, Reason, RevNat, Service, SnatRev, VipAddrKey, VipKey,
    addr_words,
    allow::{ALLOW_SERVICE_BITS, AllowKey},
    sizes::{MAX_RING_SIZE, RING_CHUNK},
    words_addr,
};

pub const VIPS: &str = "XLB_VIPS_V2";
pub const SERVICES: &str = "XLB_SERVICES_V1";
pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS_V1";
pub const BACKENDS: &str = "XLB_BACKENDS_V4";
pub const RINGS: &str = "XLB_RINGS_V2";
pub const CONNTRACK: &str = "XLB_CONNTRACK_V3";
pub const CONNTRACK_NEW: &str = "XLB_CONNTRACK_NEW_V2";
pub const REV_NAT: &str = "XLB_REV_NAT_V2";
pub const REV_NAT_NEW: &str = "XLB_REV_NAT_NEW_V1";
pub const SNAT_REV: &str = "XLB_SNAT_REV_V1";
pub const SNAT_REV_NEW: &str = "XLB_SNAT_REV_NEW_V1";
pub const TABLE_STATS: &str = "XLB_TABLE_STATS_V1";
/// Filled by the loader (front NICs), not through `Datapath`.
pub const TX_PORTS: &str = "XLB_TX_PORTS_V1";
pub const SERVICE_STATS: &str = "XLB_SVC_STATS_V1";
pub const BACKEND_STATS: &str = "XLB_BE_STATS_V1";
pub const REASONS: &str = "XLB_REASONS_V8";
pub const ALLOW: &str = "XLB_ALLOW_V2";
/// Written by the data path; the sweep removes stale entries (replyendpoints.rs).
pub const REPLY_ENDPOINTS: &str = "XLB_REPLY_ENDPOINTS_V1";
/// `xlb trace` (trace.rs): the data path's filter and its ring buffer of records.
pub const TRACE_FILTER: &str = "XLB_TRACE_FILTER_V2";
pub const TRACE: &str = "XLB_TRACE_V3";

/// Every map, in the order they are pinned.
pub const ALL_MAPS: [&str; 20] = [
    VIPS,
    SERVICES,
    VIP_ADDRS,
    BACKENDS,
    RINGS,
    CONNTRACK,
    CONNTRACK_NEW,
    REV_NAT,
    REV_NAT_NEW,
    SNAT_REV,
    SNAT_REV_NEW,
    TABLE_STATS,
    TX_PORTS,
    SERVICE_STATS,
    BACKEND_STATS,
    REASONS,
    ALLOW,
    REPLY_ENDPOINTS,
    TRACE_FILTER,
    TRACE,
];

pub struct Datapath {
    vips: HashMap<MapData, VipKey, u32>,
    services: MappedArray<DoubleBuffer<Service>>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    backends: MappedArray<DoubleBuffer<Backend>>,
    rings: MappedArray<[u32; RING_CHUNK as usize]>,
    flow_tables: FlowTables,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    allow: LpmTrie<MapData, AllowKey, u32>,
}

impl Datapath {
    /// Builds the handle from maps handed out by name (from a loaded object or from pins).
    pub fn from_maps(mut take: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            vips: HashMap::try_from(take(VIPS)?)?,
            services: MappedArray::map(take(SERVICES)?, SERVICES)?,
            vip_addrs: HashMap::try_from(take(VIP_ADDRS)?)?,
            backends: MappedArray::map(take(BACKENDS)?, BACKENDS)?,
            rings: MappedArray::map(take(RINGS)?, RINGS)?,
            flow_tables: FlowTables::from_maps(&mut take)?,
            service_stats: PerCpuArray::try_from(take(SERVICE_STATS)?)?,
            backend_stats: PerCpuArray::try_from(take(BACKEND_STATS)?)?,
            reasons: PerCpuArray::try_from(take(REASONS)?)?,
            allow: LpmTrie::try_from(take(ALLOW)?)?,
        })
    }

    /// Opens the maps pinned under `pin_path` (they must all exist).
    pub fn open_pinned(pin_path: &Path) -> Result<Self> {
        Self::from_maps(|name| pinned_map(pin_path, name))
    }

    pub fn service_counters(&self, service_id: u32) -> Result<Counters> {
        sum_counters(&self.service_stats, service_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, backend_id)
    }

    /// Verdict counters summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, self.reasons.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Conntrack entries (walks the whole map: for tests and status, not the hot path).
    /// Every tracked flow, established and new (walks the tables: for tests and status).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, lb_common::Flow)>> {
        self.flow_tables.flows()
    }

    /// Every nat reply mapping.
    pub fn rev_nat(&self) -> Result<Vec<(FlowKey, RevNat)>> {
        self.flow_tables.rev_nat()
    }

    /// fullnat port reservations (walks the tables).
    pub fn snat_rev(&self) -> Result<Vec<(FlowKey, SnatRev)>> {
        self.flow_tables.snat()
    }

    /// The service id a VIP key leads to (None: no such VIP), as the data path reads it.
    pub fn vip_service(&self, key: &VipKey) -> Result<Option<u32>> {
        match self.vips.get(key, 0) {
            Ok(id) => Ok(Some(id)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The current copy of backend slot `id`.
    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.current(id)
    }

    /// The backend id in ring slot `index` of the whole ring map.
    pub fn ring_slot(&self, index: u32) -> Option<u32> {
        self.rings
            .as_slice()
            .as_flattened()
            .get(index as usize)
            .copied()
    }

    /// Whether `addr` matches a prefix of service `service_id`'s allow list, the lookup
    /// the data path makes.
    pub fn allowed(&self, service_id: u32, addr: IpAddr) -> Result<bool> {
        let key = allow_key(service_id, &IpNet::from(addr));
        match self.allow.get(&key, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn flow_tables(&self) -> &FlowTables {
        &self.flow_tables
    }

    pub fn flow_tables_mut(&mut self) -> &mut FlowTables {
        &mut self.flow_tables
    }
}

impl Maps for Datapath {
    fn vips(&self) -> Result<Vec<(VipKey, u32)>> {
        Ok(self.vips.iter().collect::<Result<_, _>>()?)
    }

    fn insert_vip(&mut self, key: &VipKey, service_id: u32) -> Result<()> {
        Ok(self.vips.insert(key, service_id, 0)?)
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        Ok(self.vips.remove(key)?)
    }

    fn service(&self, id: u32) -> Result<Service> {
        self.services
            .current(id)
            .with_context(|| format!("no service slot {id}"))
    }

    fn set_service(&mut self, id: u32, service: &Service) -> Result<()> {
        self.services.replace(id, service)
    }

    fn vip_addrs(&self) -> Result<Vec<(VipAddrKey, u32)>> {
        Ok(self.vip_addrs.iter().collect::<Result<_, _>>()?)
    }

    fn set_vip_addr(&mut self, key: &VipAddrKey, flags: u32) -> Result<()> {
        Ok(self.vip_addrs.insert(key, flags, 0)?)
    }

    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        Ok(self.vip_addrs.remove(key)?)
    }

    fn allow_prefixes(&self) -> Result<Vec<(u32, IpNet)>> {
        let mut out = Vec::new();
        for key in self.allow.keys() {
            let key = key?;
            let (len, data) = (key.prefix_len(), key.data());
            let addr = words_addr(data.family as u8, data.addr);
            let net = IpNet::new(addr, len.saturating_sub(ALLOW_SERVICE_BITS) as u8)?;
            out.push((data.service_id, net));
        }
        Ok(out)
    }

    fn insert_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        Ok(self.allow.insert(&allow_key(service_id, net), 1, 0)?)
    }

    fn remove_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        Ok(self.allow.remove(&allow_key(service_id, net))?)
    }

    /// Every backend slot that holds a backend, with its id.
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>> {
        Ok((0..self.backends.len() as u32)
            .filter_map(|id| Some((id, self.backends.current(id)?)))
            .filter(|(_, b)| b.flags & lb_common::BACKEND_IN_USE != 0)
            .collect())
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.replace(id, backend)
    }

    fn ring(&self, offset: u32, len: u32) -> Vec<u32> {
        ring_range(self.rings.as_slice().as_flattened(), offset, len)
            .map(<[u32]>::to_vec)
            .unwrap_or_default()
    }

    /// Writes a whole ring: into free ring space (no packet reads it until the caller flips
    /// the service to it), or over the ring in use as a fallback, slot by slot with aligned
    /// stores, so a packet reads each slot's old or new backend, never a torn id.
    fn write_ring(&mut self, offset: u32, slots: &[u32]) -> Result<()> {
        let all = self.rings.as_mut_slice().as_flattened_mut();
        let Some(ring) = ring_range_mut(all, offset, slots.len() as u32) else {
            anyhow::bail!(
                "ring of {} slots at {offset} is outside the map",
                slots.len()
            );
        };
        for (slot, &id) in ring.iter_mut().zip(slots) {
            // SAFETY: an aligned u32 in the shared mapping.
            unsafe { std::ptr::write_volatile(slot, id) };
        }
        Ok(())
    }

    /// Zeroes a slot's counters (a new service or backend must not inherit old traffic).
    fn reset_service_counters(&mut self, service_id: u32) -> Result<()> {
        reset(&mut self.service_stats, service_id)
    }

    fn reset_backend_counters(&mut self, backend_id: u32) -> Result<()> {
        reset(&mut self.backend_stats, backend_id)
    }

    /// membarrier(MEMBARRIER_CMD_GLOBAL) returns after an RCU grace period (the kernel runs
    /// synchronize_rcu for it), and XDP and TC programs run inside RCU read-side sections:
    /// every packet that could have read an old value is done with it.
    fn grace_period(&mut self) -> Result<()> {
        crate::mapped::grace_period()
    }

    /// As the maps were made (a pinned map keeps the size it was made with).
    fn slots(&self) -> (u32, u32, u32) {
        let ring_blocks = self.rings.len() as u32 * RING_CHUNK / lb_common::sizes::RING_BLOCK;
        (
            self.services.len() as u32,
            self.backends.len() as u32,
            ring_blocks,
        )
    }
}

fn allow_key(service_id: u32, net: &IpNet) -> Key<AllowKey> {
    let (family, addr) = addr_words(net.network());
    let data = AllowKey {
        service_id,
        family: family.into(),
        addr,
    };
    Key::new(ALLOW_SERVICE_BITS + u32::from(net.prefix_len()), data)
}

fn ring_range(slots: &[u32], offset: u32, len: u32) -> Option<&[u32]> {
    if len > MAX_RING_SIZE {
        return None;
    }
    slots.get(offset as usize..offset as usize + len as usize)
}

fn ring_range_mut(slots: &mut [u32], offset: u32, len: u32) -> Option<&mut [u32]> {
    if len > MAX_RING_SIZE {
        return None;
    }
    slots.get_mut(offset as usize..offset as usize + len as usize)
}

/// The map `name` pinned under `pin_path`.
pub fn pinned_map(pin_path: &Path, name: &str) -> Result<Map> {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, index: u32) -> Result<Counters> {
    let mut total = Counters::default();
    for c in map.get(&index, 0)?.iter() {
        total.add(c);
    }
    Ok(total)
}

fn reset(map: &mut PerCpuArray<MapData, Counters>, index: u32) -> Result<()> {
    let zeroes = vec![Counters::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
    Ok(map.set(index, zeroes.try_into()?, 0)?)
}
