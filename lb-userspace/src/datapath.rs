//! The data path's maps in domain terms (services, backends, rings, counters). Callers never
//! see a file descriptor or a raw key layout. Map names match lb-ebpf/src/maps.rs.
use std::{os::fd::AsFd as _, path::Path, ptr::NonNull};

use crate::reconcile::Maps;
use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    Backend, Counters, FlowKey, Reason, RevNat, Service, SnatPool, SnatRev, VipAddrKey, VipKey,
    sizes::{MAX_BACKENDS, MAX_RING_SIZE, RING_SLOTS},
};

pub const VIPS: &str = "XLB_VIPS_V1";
pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS_V1";
pub const BACKENDS: &str = "XLB_BACKENDS_V3";
pub const RINGS: &str = "XLB_RINGS_V2";
pub const CONNTRACK: &str = "XLB_CONNTRACK_V2";
pub const REV_NAT: &str = "XLB_REV_NAT_V2";
pub const SNAT_REV: &str = "XLB_SNAT_REV_V1";
pub const SNAT_POOLS: &str = "XLB_SNAT_POOLS_V1";
/// Filled by the loader (front NICs), not through `Datapath`.
pub const TX_PORTS: &str = "XLB_TX_PORTS_V1";
pub const SERVICE_STATS: &str = "XLB_SVC_STATS_V1";
pub const BACKEND_STATS: &str = "XLB_BE_STATS_V1";
pub const REASONS: &str = "XLB_REASONS_V5";

/// Every map, in the order they are pinned.
pub const ALL_MAPS: [&str; 12] = [
    VIPS,
    VIP_ADDRS,
    BACKENDS,
    RINGS,
    CONNTRACK,
    REV_NAT,
    SNAT_REV,
    SNAT_POOLS,
    TX_PORTS,
    SERVICE_STATS,
    BACKEND_STATS,
    REASONS,
];

pub struct Datapath {
    vips: HashMap<MapData, VipKey, Service>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    backends: Array<MapData, Backend>,
    rings: RingMemory,
    conntrack: HashMap<MapData, FlowKey, lb_common::Flow>,
    rev_nat: HashMap<MapData, FlowKey, RevNat>,
    snat_rev: HashMap<MapData, FlowKey, SnatRev>,
    snat_pools: Array<MapData, SnatPool>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
}

impl Datapath {
    /// Builds the handle from maps handed out by name (from a loaded object or from pins).
    pub fn from_maps(mut take: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            vips: HashMap::try_from(take(VIPS)?)?,
            vip_addrs: HashMap::try_from(take(VIP_ADDRS)?)?,
            backends: Array::try_from(take(BACKENDS)?)?,
            rings: RingMemory::map(take(RINGS)?)?,
            conntrack: HashMap::try_from(take(CONNTRACK)?)?,
            rev_nat: HashMap::try_from(take(REV_NAT)?)?,
            snat_rev: HashMap::try_from(take(SNAT_REV)?)?,
            snat_pools: Array::try_from(take(SNAT_POOLS)?)?,
            service_stats: PerCpuArray::try_from(take(SERVICE_STATS)?)?,
            backend_stats: PerCpuArray::try_from(take(BACKEND_STATS)?)?,
            reasons: PerCpuArray::try_from(take(REASONS)?)?,
        })
    }

    /// Opens the maps pinned under `pin_path` (they must all exist).
    pub fn open_pinned(pin_path: &Path) -> Result<Self> {
        Self::from_maps(|name| {
            let path = pin_path.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
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
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, lb_common::Flow)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    pub fn rev_nat(&self) -> Result<Vec<(FlowKey, RevNat)>> {
        Ok(self.rev_nat.iter().collect::<Result<_, _>>()?)
    }

    /// fullnat port reservations (walks the whole map).
    pub fn snat_rev(&self) -> Result<Vec<(FlowKey, SnatRev)>> {
        Ok(self.snat_rev.iter().collect::<Result<_, _>>()?)
    }
}

impl Maps for Datapath {
    fn vips(&self) -> Result<Vec<(VipKey, Service)>> {
        Ok(self.vips.iter().collect::<Result<_, _>>()?)
    }

    fn set_vip(&mut self, key: &VipKey, service: &Service) -> Result<()> {
        Ok(self.vips.insert(key, service, 0)?)
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        Ok(self.vips.remove(key)?)
    }

    fn vip_addrs(&self) -> Result<Vec<VipAddrKey>> {
        Ok(self.vip_addrs.keys().collect::<Result<_, _>>()?)
    }

    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        Ok(self.vip_addrs.insert(key, 1, 0)?)
    }

    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        Ok(self.vip_addrs.remove(key)?)
    }

    /// Every backend slot that holds a backend, with its id.
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for id in 0..MAX_BACKENDS {
            let backend = self.backends.get(&id, 0)?;
            if backend.flags & lb_common::BACKEND_IN_USE != 0 {
                out.push((id, backend));
            }
        }
        Ok(out)
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        Ok(self.backends.set(id, backend, 0)?)
    }

    fn ring(&self, offset: u32, len: u32) -> Vec<u32> {
        self.rings.slice(offset, len).to_vec()
    }

    /// Writes a whole ring (into free ring space, or over the ring in use as a fallback). The
    /// caller flips the VIP to it afterwards; the map update syscall orders these stores
    /// before the flip.
    fn write_ring(&mut self, offset: u32, slots: &[u32]) {
        self.rings
            .slice_mut(offset, slots.len() as u32)
            .copy_from_slice(slots);
    }

    /// Zeroes a slot's counters (a new service or backend must not inherit old traffic).
    fn reset_service_counters(&mut self, service_id: u32) -> Result<()> {
        reset(&mut self.service_stats, service_id)
    }

    fn reset_backend_counters(&mut self, backend_id: u32) -> Result<()> {
        reset(&mut self.backend_stats, backend_id)
    }

    fn snat_pool(&self, service_id: u32) -> Result<SnatPool> {
        Ok(self.snat_pools.get(&service_id, 0)?)
    }

    fn set_snat_pool(&mut self, service_id: u32, pool: &SnatPool) -> Result<()> {
        Ok(self.snat_pools.set(service_id, pool, 0)?)
    }
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

/// The `RINGS` array mapped into our memory (the map is BPF_F_MMAPABLE), so a 65537-slot
/// ring is written with a memcpy instead of one syscall per slot. Its elements are chunks of
/// RING_CHUNK u32 with no padding, so the slots are contiguous here.
struct RingMemory {
    ptr: NonNull<u32>,
    len_bytes: usize,
    _map: MapData,
}

// The mapping is owned by this struct and only reached through &self / &mut self.
unsafe impl Send for RingMemory {}
unsafe impl Sync for RingMemory {}

impl RingMemory {
    fn map(map: Map) -> Result<Self> {
        let Map::Array(data) = map else {
            bail!("{RINGS} is not an array map");
        };
        let len_bytes = RING_SLOTS as usize * size_of::<u32>();
        let fd = data.fd().as_fd();
        // SAFETY: a shared mapping of an mmapable BPF array; length matches the map's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the ring map");
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).context("mmap returned null")?,
            len_bytes,
            _map: data,
        })
    }

    fn check(&self, offset: u32, len: u32) {
        assert!(len <= MAX_RING_SIZE, "ring of {len} slots");
        assert!(
            (offset as usize + len as usize) * 4 <= self.len_bytes,
            "ring outside the map"
        );
    }

    fn slice(&self, offset: u32, len: u32) -> &[u32] {
        self.check(offset, len);
        // SAFETY: bounds checked above; u32 slots are naturally aligned in the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset as usize), len as usize) }
    }

    fn slice_mut(&mut self, offset: u32, len: u32) -> &mut [u32] {
        self.check(offset, len);
        // SAFETY: as above; &mut self makes this the only writer in this process.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset as usize), len as usize)
        }
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}
