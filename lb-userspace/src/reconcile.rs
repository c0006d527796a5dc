//! Desired state + health -> map writes. Per service, the new ring is written into free ring
//! space and the VIP is flipped to it in one map update, so a packet never sees a half-written
//! ring. Unchanged services are not touched. Backend ids are kept for as long as a backend
//! exists (conntrack refers to them), also across agent restarts (`adopt`).
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use anyhow::{Context as _, Result};
use lb_common::{
    BACKEND_ALIVE, BACKEND_IN_USE, Backend, SERVICE_GUE, Service, SnatPool, VipAddrKey, VipKey,
    addr_words,
    sizes::{MAX_BACKENDS, MAX_SERVICES, ring_blocks},
};
use serde::Serialize;
use tracing::{info, warn};

mod rings;

use self::rings::RingSpace;
use crate::{
    bridgeport::VethPort,
    maglev::{self, MaglevBackend},
    state::{Delivery, DesiredState, Endpoint, ServiceSpec},
};

/// The map operations reconcile needs; implemented by `Datapath` and by a fake in tests.
pub trait Maps {
    fn vips(&self) -> Result<Vec<(VipKey, Service)>>;
    fn set_vip(&mut self, key: &VipKey, service: &Service) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
    fn vip_addrs(&self) -> Result<Vec<VipAddrKey>>;
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn ring(&self, offset: u32, len: u32) -> Vec<u32>;
    fn write_ring(&mut self, offset: u32, slots: &[u32]);
    fn reset_service_counters(&mut self, id: u32) -> Result<()>;
    fn reset_backend_counters(&mut self, id: u32) -> Result<()>;
    fn snat_pool(&self, service_id: u32) -> Result<SnatPool>;
    fn set_snat_pool(&mut self, service_id: u32, pool: &SnatPool) -> Result<()>;
}

/// fullnat ports on an address of the service's own: all but the well-known ones.
pub const SNAT_PORTS_OWN: (u16, u16) = (1024, 65535);
/// fullnat ports on the LB's own address (no `snat` configured): below the kernel's default
/// ephemeral range (32768-60999), so they never collide with the host's own connections,
/// such as health checks to the same backend.
pub const SNAT_PORTS_SHARED: (u16, u16) = (1024, 32767);

/// The SNAT pool the data path uses for a service.
pub fn snat_pool(spec: &ServiceSpec) -> SnatPool {
    let mut pool = SnatPool::default();
    for (slot, addr) in pool.addrs.iter_mut().zip(&spec.snat) {
        *slot = addr_words(*addr).1;
    }
    pool.count = spec.snat.len().min(pool.addrs.len()) as u32;
    (pool.port_min, pool.port_max) = if pool.count == 0 {
        SNAT_PORTS_SHARED
    } else {
        SNAT_PORTS_OWN
    };
    pool
}

/// Tells whether a backend may take traffic (health checks; always true without them).
pub trait Liveness {
    fn is_alive(&self, service: &str, endpoint: &Endpoint) -> bool;
}

/// Every backend is alive.
pub struct AllAlive;

impl Liveness for AllAlive {
    fn is_alive(&self, _: &str, _: &Endpoint) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppliedBackend {
    pub id: u32,
    pub weight: u32,
    pub alive: bool,
    /// Local delivery (a container's bridge and veth); bridge 0 for kernel routing.
    pub delivery: Delivery,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AppliedService {
    /// Empty for a service adopted from pinned maps until the config claims it.
    name: String,
    value: Service,
    /// False until `value` has been written to the VIP map.
    published: bool,
    /// Rings written for this service by this agent.
    ring_rebuilds: u64,
    /// What the ring in the map was built from (None: not known, e.g. adopted): the same
    /// input is not built again.
    ring_input: Option<RingInput>,
    /// The SNAT pool in the map (None: not written yet).
    snat_pool: Option<SnatPool>,
    backends: BTreeMap<Endpoint, AppliedBackend>,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub services_added: usize,
    pub services_removed: usize,
    pub rings_written: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

pub struct Reconciler {
    services: BTreeMap<VipKey, AppliedService>,
    /// Pinned backends whose service is gone; cleared by the next apply.
    orphans: Vec<u32>,
    vip_addrs: BTreeSet<VipAddrKey>,
    service_ids: IdPool,
    backend_ids: IdPool,
    rings: RingSpace,
}

impl Reconciler {
    /// Rebuilds the bookkeeping from what the maps hold: an empty state on a new pin path,
    /// or a running data path left by a previous agent.
    pub fn adopt(maps: &impl Maps) -> Result<Self> {
        let mut services: BTreeMap<VipKey, AppliedService> = BTreeMap::new();
        for (key, value) in maps.vips().context("reading pinned VIPs")? {
            let applied = AppliedService {
                name: String::new(),
                value,
                published: true,
                ring_rebuilds: 0,
                ring_input: None,
                snat_pool: Some(
                    maps.snat_pool(value.id)
                        .context("reading pinned SNAT pools")?,
                ),
                backends: BTreeMap::new(),
            };
            services.insert(key, applied);
        }
        let mut backend_ids = Vec::new();
        let mut orphans = Vec::new();
        for (id, backend) in maps.backends_in_use().context("reading pinned backends")? {
            let owner = services
                .values_mut()
                .find(|s| s.value.id == backend.service_id);
            let endpoint = Endpoint {
                addr: lb_common::words_addr(backend.family, backend.addr),
                port: u16::from_be(backend.port),
            };
            match owner {
                Some(svc) => {
                    let applied = AppliedBackend {
                        id,
                        // Unknown until the config says; a weight change only touches the ring.
                        weight: u32::MAX,
                        alive: backend.is_alive(),
                        delivery: delivery_of(&backend),
                    };
                    svc.backends.insert(endpoint, applied);
                    backend_ids.push(id);
                }
                None => orphans.push(id),
            }
        }
        let service_ids: Vec<u32> = services.values().map(|s| s.value.id).collect();
        let rings = RingSpace::new(
            services
                .values()
                .map(|s| (s.value.ring_offset, s.value.table_size)),
        );
        Ok(Self {
            rings,
            vip_addrs: maps.vip_addrs()?.into_iter().collect(),
            service_ids: IdPool::new(MAX_SERVICES, &service_ids),
            backend_ids: IdPool::new(MAX_BACKENDS, &backend_ids),
            services,
            orphans,
        })
    }

    /// Makes the maps serve `desired`, with only live backends in the rings.
    pub fn apply(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        live: &impl Liveness,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        // Rings replaced by the previous apply: no packet reads them any more.
        self.rings.release_retired();
        for id in std::mem::take(&mut self.orphans) {
            maps.set_backend(id, &Backend::default())?;
            self.backend_ids.give_back(id);
        }
        let wanted: BTreeMap<VipKey, &ServiceSpec> =
            desired.services.values().map(|s| (vip_key(s), s)).collect();

        let gone: Vec<VipKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_service(maps, &key)?;
            changes.services_removed += 1;
        }
        for (key, spec) in wanted {
            if !self.services.contains_key(&key) {
                let id = self.service_ids.take().context("no free service id")?;
                maps.reset_service_counters(id)?;
                let value = Service {
                    id,
                    ring_offset: 0,
                    table_size: 0,
                    mode: spec.mode.number(),
                    flags: 0,
                    _pad: 0,
                };
                let applied = AppliedService {
                    name: spec.name.clone(),
                    value,
                    published: false,
                    ring_rebuilds: 0,
                    ring_input: None,
                    snat_pool: None,
                    backends: BTreeMap::new(),
                };
                self.services.insert(key, applied);
                changes.services_added += 1;
                info!(service = %spec.name, vip = %spec.vip, port = spec.port, "service added");
            }
            self.sync_service(maps, &key, spec, live, &mut changes)?;
        }
        self.sync_vip_addrs(maps)?;
        Ok(changes)
    }

    fn sync_service(
        &mut self,
        maps: &mut impl Maps,
        key: &VipKey,
        spec: &ServiceSpec,
        live: &impl Liveness,
        changes: &mut Changes,
    ) -> Result<()> {
        let svc = self.services.get_mut(key).expect("inserted by apply");
        svc.name.clone_from(&spec.name);
        let service_id = svc.value.id;

        // New and revived backends go into BACKENDS before any ring can point at them.
        let mut died = Vec::new();
        for (endpoint, backend_spec) in &spec.backends {
            let alive = live.is_alive(&spec.name, endpoint);
            let delivery = backend_spec.delivery;
            match svc.backends.get_mut(endpoint) {
                Some(applied) => {
                    applied.weight = backend_spec.weight;
                    let moved = applied.delivery != delivery;
                    applied.delivery = delivery;
                    if !alive && applied.alive {
                        died.push(applied.id);
                    } else if moved || (alive && !applied.alive) {
                        let value = backend_value(endpoint, service_id, alive, &delivery);
                        maps.set_backend(applied.id, &value)?;
                    }
                    applied.alive = alive;
                }
                None => {
                    let id = self.backend_ids.take().context("no free backend id")?;
                    maps.reset_backend_counters(id)?;
                    let value = backend_value(endpoint, service_id, alive, &delivery);
                    maps.set_backend(id, &value)?;
                    let applied = AppliedBackend {
                        id,
                        weight: backend_spec.weight,
                        alive,
                        delivery,
                    };
                    svc.backends.insert(*endpoint, applied);
                    changes.backends_added += 1;
                }
            }
        }
        let removed: Vec<(Endpoint, u32)> = svc
            .backends
            .iter()
            .filter(|(e, _)| !spec.backends.contains_key(e))
            .map(|(e, b)| (*e, b.id))
            .collect();
        for (endpoint, _) in &removed {
            svc.backends.remove(endpoint);
        }

        let mut value = svc.value;
        value.mode = spec.mode.number();
        value.flags = if spec.gue { SERVICE_GUE } else { 0 };
        // The pool goes first: the flip below may start fullnat flows.
        let pool = snat_pool(spec);
        if svc.snat_pool != Some(pool) {
            maps.set_snat_pool(service_id, &pool)?;
            svc.snat_pool = Some(pool);
        }
        let input = RingInput::new(&svc.backends, spec.table_size);
        if svc.ring_input.as_ref() != Some(&input)
            && let Some((offset, ring)) = place_ring(&mut self.rings, svc, input, maps)
        {
            value.ring_offset = offset;
            value.table_size = ring.len() as u32;
            maps.write_ring(offset, &ring);
            changes.rings_written += 1;
            svc.ring_rebuilds += 1;
            if ring.is_empty() {
                warn!(service = %spec.name, "no backend can take new flows");
            }
        }
        if value != svc.value || !svc.published {
            maps.set_vip(key, &value)?;
            svc.value = value;
            svc.published = true;
        }

        // Only now that no ring points at them: dead backends lose ALIVE (their flows
        // re-hash), removed ones lose their slot.
        for id in died {
            let (endpoint, b) = svc
                .backends
                .iter()
                .find(|(_, b)| b.id == id)
                .expect("known");
            maps.set_backend(id, &backend_value(endpoint, service_id, false, &b.delivery))?;
        }
        for (_, id) in removed {
            maps.set_backend(id, &Backend::default())?;
            self.backend_ids.give_back(id);
            changes.backends_removed += 1;
        }
        Ok(())
    }

    fn remove_service(&mut self, maps: &mut impl Maps, key: &VipKey) -> Result<()> {
        let svc = self.services.remove(key).expect("listed by caller");
        maps.remove_vip(key)?;
        for backend in svc.backends.values() {
            maps.set_backend(backend.id, &Backend::default())?;
            self.backend_ids.give_back(backend.id);
        }
        self.service_ids.give_back(svc.value.id);
        self.rings
            .retire(svc.value.ring_offset, svc.value.table_size);
        info!(service = %svc.name, "service removed");
        Ok(())
    }

    fn sync_vip_addrs(&mut self, maps: &mut impl Maps) -> Result<()> {
        let wanted: BTreeSet<VipAddrKey> = self
            .services
            .keys()
            .map(|k| VipAddrKey {
                addr: k.addr,
                family: k.family,
                _pad0: 0,
                _pad1: 0,
            })
            .collect();
        for key in wanted.difference(&self.vip_addrs) {
            maps.set_vip_addr(key)?;
        }
        for key in self.vip_addrs.difference(&wanted) {
            maps.remove_vip_addr(key)?;
        }
        self.vip_addrs = wanted;
        Ok(())
    }

    /// Whether the pinned data path had this backend alive (None: not known to it). Used to
    /// start health checks where the previous agent left off.
    pub fn pinned_alive(&self, spec: &ServiceSpec, endpoint: &Endpoint) -> Option<bool> {
        let svc = self.services.get(&vip_key(spec))?;
        svc.backends.get(endpoint).map(|b| b.alive)
    }

    /// The backends the maps hold for this service, with their delivery (used to keep them
    /// after a restart until Docker has answered).
    pub fn pinned_backends(&self, spec: &ServiceSpec) -> Vec<(Endpoint, Delivery)> {
        self.services
            .get(&vip_key(spec))
            .map(|svc| svc.backends.iter().map(|(e, b)| (*e, b.delivery)).collect())
            .unwrap_or_default()
    }

    /// Each service as applied: ids, table size, backends.
    pub fn applied(&self) -> Vec<AppliedView> {
        self.services
            .values()
            .map(|s| AppliedView {
                name: s.name.clone(),
                id: s.value.id,
                table_size: s.value.table_size,
                ring_rebuilds: s.ring_rebuilds,
                backends: s.backends.iter().map(|(e, b)| (*e, b.clone())).collect(),
            })
            .collect()
    }
}

/// A read-only view of one applied service (for status and metrics).
#[derive(Debug, Clone, Serialize)]
pub struct AppliedView {
    pub name: String,
    pub id: u32,
    pub table_size: u32,
    pub ring_rebuilds: u64,
    pub backends: BTreeMap<Endpoint, AppliedBackend>,
}

/// Builds the service's ring from `input` and picks where it goes: (offset, ring), or None
/// when the map holds that ring already. `svc.ring_input` records `input` once a ring built
/// from it is placed (or found in place).
fn place_ring(
    rings: &mut RingSpace,
    svc: &mut AppliedService,
    input: RingInput,
    maps: &impl Maps,
) -> Option<(u32, Vec<u32>)> {
    let ring = input.build();
    if ring == maps.ring(svc.value.ring_offset, svc.value.table_size) {
        svc.ring_input = Some(input);
        return None;
    }
    if let Some(offset) = rings.take(ring.len() as u32) {
        rings.retire(svc.value.ring_offset, svc.value.table_size);
        svc.ring_input = Some(input);
        return Some((offset, ring));
    }
    // Validation keeps the total within RINGS, so only scattered free blocks get here. The
    // new ring goes over the one in use: meanwhile a slot holds its old or its new backend,
    // both valid until the caller's clean-up. A larger table waits (the next apply tries
    // again).
    warn!(
        service = %svc.name,
        table_size = ring.len(),
        free_blocks = rings.free_blocks(),
        "no adjacent free ring space: rewriting the ring in place"
    );
    let ring = if ring_blocks(ring.len() as u32) > ring_blocks(svc.value.table_size) {
        RingInput {
            table_size: svc.value.table_size,
            ..input
        }
        .build()
    } else {
        svc.ring_input = Some(input);
        ring
    };
    Some((svc.value.ring_offset, ring))
}

/// What a service's ring is built from: the backends that may take new flows (alive,
/// weight > 0) with their ids, and the table size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RingInput {
    table_size: u32,
    /// (key, weight, backend id), in endpoint order.
    backends: Vec<(String, u32, u32)>,
}

impl RingInput {
    fn new(backends: &BTreeMap<Endpoint, AppliedBackend>, table_size: u32) -> Self {
        let backends = backends
            .iter()
            .filter(|(_, b)| b.alive && b.weight > 0)
            .map(|(e, b)| (e.to_string(), b.weight, b.id))
            .collect();
        Self {
            table_size,
            backends,
        }
    }

    /// The ring: a backend id per slot.
    fn build(&self) -> Vec<u32> {
        let input: Vec<MaglevBackend> = self
            .backends
            .iter()
            .map(|(key, weight, _)| MaglevBackend {
                key,
                weight: *weight,
            })
            .collect();
        maglev::build_table(&input, self.table_size)
            .into_iter()
            .map(|i| self.backends[i as usize].2)
            .collect()
    }
}

pub fn vip_key(spec: &ServiceSpec) -> VipKey {
    let (family, addr) = addr_words(spec.vip);
    VipKey {
        addr,
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        family,
    }
}

fn backend_value(
    endpoint: &Endpoint,
    service_id: u32,
    alive: bool,
    delivery: &Delivery,
) -> Backend {
    let (family, addr) = addr_words(endpoint.addr);
    let veth = delivery.veth.filter(|_| delivery.bridge != 0);
    Backend {
        addr,
        port: endpoint.port.to_be(),
        family,
        flags: BACKEND_IN_USE | if alive { BACKEND_ALIVE } else { 0 },
        service_id,
        deliver_ifindex: delivery.bridge,
        port_ifindex: veth.map_or(0, |v| v.ifindex),
        mac: veth.map_or([0; 6], |v| v.mac),
        gateway_mac: veth.map_or([0; 6], |v| v.bridge_mac),
    }
}

/// The delivery a pinned backend entry describes (adopted on restart).
fn delivery_of(backend: &Backend) -> Delivery {
    Delivery {
        bridge: backend.deliver_ifindex,
        veth: (backend.port_ifindex != 0).then_some(VethPort {
            ifindex: backend.port_ifindex,
            mac: backend.mac,
            bridge_mac: backend.gateway_mac,
        }),
    }
}

/// Free ids, handed out first-in first-out so a freed id is reused as late as possible
/// (a stale conntrack entry then finds an empty slot, not a stranger).
struct IdPool(VecDeque<u32>);

impl IdPool {
    fn new(max: u32, used: &[u32]) -> Self {
        Self((0..max).filter(|id| !used.contains(id)).collect())
    }
    fn take(&mut self) -> Option<u32> {
        self.0.pop_front()
    }
    fn give_back(&mut self, id: u32) {
        self.0.push_back(id);
    }
}

#[cfg(test)]
mod tests;
