//! Desired state + health -> map writes. Per service: new and revived backends go into
//! `BACKENDS`, the new ring into free ring space, then the service's double-buffered value
//! flips to it in one store; after an RCU grace period, backends that died lose ALIVE and
//! removed ones their slot. Ring space and ids that packets may still read are reused only
//! after a further grace period.
//!
//! Every step updates the bookkeeping only once its write succeeded, and each step leaves the
//! maps valid for packets, so an error anywhere leaves maps and bookkeeping agreeing; the
//! next apply picks up from there. A service that cannot be applied (a failed write, no free
//! id or ring space) keeps what it had and is reported; the others still apply.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use lb_common::{
    Backend, Service, VIP_ADDR_ECHO, VipAddrKey, VipKey,
    sizes::{MAX_BACKENDS, MAX_SERVICES},
};
use serde::Serialize;
use tracing::{info, warn};

mod allow;
mod changes;
mod ids;
mod plan;
mod rings;
mod steps;

pub use self::changes::Changes;
pub use self::plan::{SNAT_PORTS_OWN, SNAT_PORTS_SHARED, snat_pool, vip_key};
use self::{
    ids::IdPool,
    plan::{Plan, RingInput, delivery_of},
    rings::RingSpace,
};
use crate::state::{Delivery, DesiredState, Endpoint, ServiceSpec};

/// The map operations reconcile needs; implemented by `Datapath` and by a fake in tests.
pub trait Maps {
    /// VIP -> service id.
    fn vips(&self) -> Result<Vec<(VipKey, u32)>>;
    fn insert_vip(&mut self, key: &VipKey, service_id: u32) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
    /// The current value of a service slot.
    fn service(&self, id: u32) -> Result<Service>;
    /// Writes the idle copy of a service slot and flips to it.
    fn set_service(&mut self, id: u32, service: &Service) -> Result<()>;
    /// VIP address -> `VIP_ADDR_*` flags.
    fn vip_addrs(&self) -> Result<Vec<(VipAddrKey, u32)>>;
    fn set_vip_addr(&mut self, key: &VipAddrKey, flags: u32) -> Result<()>;
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>>;
    /// Writes the idle copy of a backend slot and flips to it.
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn ring(&self, offset: u32, len: u32) -> Vec<u32>;
    fn write_ring(&mut self, offset: u32, slots: &[u32]) -> Result<()>;
    fn reset_service_counters(&mut self, id: u32) -> Result<()>;
    /// (service id, source prefix) entries of the `allow` trie.
    fn allow_prefixes(&self) -> Result<Vec<(u32, IpNet)>>;
    fn insert_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()>;
    fn remove_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()>;
    fn reset_backend_counters(&mut self, id: u32) -> Result<()>;
    /// Returns once every packet that was in the data path when it was called is done.
    fn grace_period(&mut self) -> Result<()>;
    /// Slots the maps hold: (services, backends, ring blocks). By default what the BPF
    /// object declares; the real maps say what was made (layout.rs).
    fn slots(&self) -> (u32, u32, u32) {
        (MAX_SERVICES, MAX_BACKENDS, lb_common::sizes::RING_BLOCKS)
    }
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
    /// The service slot's current value (once `written`).
    value: Service,
    written: bool,
    /// The VIP map names this service's id.
    in_vips: bool,
    /// Rings written for this service by this agent.
    ring_rebuilds: u64,
    /// What the ring in the map was built from (None: not known, e.g. adopted): the same
    /// input is not built again.
    ring_input: Option<RingInput>,
    backends: BTreeMap<Endpoint, AppliedBackend>,
    /// The source prefixes the `allow` trie holds for this service's id.
    allow: BTreeSet<IpNet>,
}

/// Backends that leave once no ring names them (after a grace period).
struct CleanUp {
    dying: Vec<(Endpoint, u32)>,
    removed: Vec<(Endpoint, u32)>,
}

impl CleanUp {
    fn is_empty(&self) -> bool {
        self.dying.is_empty() && self.removed.is_empty()
    }
}

pub struct Reconciler {
    services: BTreeMap<VipKey, AppliedService>,
    /// Pinned backends whose service is gone; cleared by the next apply.
    orphans: Vec<u32>,
    /// Pinned VIP entries that name another VIP's slot; removed by the next apply.
    stale_vips: Vec<VipKey>,
    /// Pinned allow entries of ids no service holds (kept from reuse until removed).
    stale_allow: Vec<(u32, IpNet)>,
    vip_addrs: BTreeMap<VipAddrKey, u32>,
    service_ids: IdPool,
    backend_ids: IdPool,
    rings: RingSpace,
    /// A slot flipped, or ring space or an id was freed, since the last grace period.
    grace_owed: bool,
    /// Why services could not be applied, by name (from the last apply).
    problems: BTreeMap<String, String>,
}

impl Reconciler {
    /// Rebuilds the bookkeeping from what the maps hold: an empty state on a new pin path,
    /// or a running data path left by a previous agent (which may have been killed in the
    /// middle of an apply: whatever it left is valid for packets, and the next apply
    /// finishes the job).
    pub fn adopt(maps: &impl Maps) -> Result<Self> {
        let mut services: BTreeMap<VipKey, AppliedService> = BTreeMap::new();
        let mut stale_vips = Vec::new();
        for (key, id) in maps.vips().context("reading pinned VIPs")? {
            let value = maps.service(id).context("reading pinned services")?;
            let claimed = services.values().any(|s| s.value.id == id);
            if value.vip != key || value.id != id || claimed {
                warn!(
                    service_id = id,
                    "a pinned VIP entry names another VIP's slot"
                );
                stale_vips.push(key);
                continue;
            }
            let applied = AppliedService {
                name: String::new(),
                value,
                written: true,
                in_vips: true,
                ring_rebuilds: 0,
                ring_input: None,
                backends: BTreeMap::new(),
                allow: BTreeSet::new(),
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
                Some(svc) if !svc.backends.contains_key(&endpoint) => {
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
                _ => {
                    orphans.push(id);
                    backend_ids.push(id);
                }
            }
        }
        let stale_allow = allow::adopt(maps, &mut services)?;
        // An id with stale entries is not handed out until they are gone.
        let service_ids: Vec<u32> = services
            .values()
            .map(|s| s.value.id)
            .chain(stale_allow.iter().map(|(id, _)| *id))
            .collect();
        let (service_slots, backend_slots, ring_blocks) = maps.slots();
        let rings = RingSpace::with_blocks(
            ring_blocks,
            services
                .values()
                .map(|s| (s.value.ring_offset, s.value.table_size)),
        );
        Ok(Self {
            rings,
            vip_addrs: maps.vip_addrs()?.into_iter().collect(),
            service_ids: IdPool::new(service_slots, &service_ids),
            backend_ids: IdPool::new(backend_slots, &backend_ids),
            services,
            orphans,
            stale_vips,
            stale_allow,
            // The previous agent may have flipped slots a moment ago.
            grace_owed: true,
            problems: BTreeMap::new(),
        })
    }

    /// Makes the maps serve `desired`, with only live backends in the rings. Err only when
    /// nothing could be done (a grace period or the VIP address set failed); services that
    /// fail on their own are listed in `Changes::failed`.
    pub fn apply(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        live: &impl Liveness,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        if self.grace_owed {
            self.grace(maps)?;
        }
        self.clear_leftovers(maps, &mut changes);
        let wanted: BTreeMap<VipKey, &ServiceSpec> =
            desired.services.values().map(|s| (vip_key(s), s)).collect();

        let gone: Vec<VipKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match self.remove_service(maps, &key) {
                Ok(()) => changes.services_removed += 1,
                Err(e) => {
                    let name = self.services[&key].name.clone();
                    changes.failed.insert(name, format!("removing: {e:#}"));
                }
            }
        }
        let mut clean_ups = Vec::new();
        for (key, spec) in &wanted {
            match self.sync_service(maps, key, spec, live, &mut changes) {
                Ok(clean_up) if !clean_up.is_empty() => clean_ups.push((*key, clean_up)),
                Ok(_) => {}
                Err(e) => {
                    changes.failed.insert(spec.name.clone(), format!("{e:#}"));
                }
            }
        }
        if !clean_ups.is_empty() {
            // No packet still reads a ring that names these backends.
            self.grace(maps)?;
        }
        for (key, clean_up) in clean_ups {
            if let Err(e) = self.clean_up(maps, &key, clean_up, &mut changes) {
                let name = self.services[&key].name.clone();
                changes.failed.insert(name, format!("{e:#}"));
            }
        }
        self.sync_vip_addrs(maps, &wanted)?;
        self.problems.clone_from(&changes.failed);
        Ok(changes)
    }

    /// Waits for a grace period, then frees what waited for one.
    fn grace(&mut self, maps: &mut impl Maps) -> Result<()> {
        maps.grace_period()
            .context("waiting for an RCU grace period")?;
        self.rings.release_retired();
        self.service_ids.release();
        self.backend_ids.release();
        self.grace_owed = false;
        Ok(())
    }

    /// Pinned state a previous agent left without a service: orphaned backends, stale VIPs.
    fn clear_leftovers(&mut self, maps: &mut impl Maps, changes: &mut Changes) {
        let mut failed = Vec::new();
        for id in std::mem::take(&mut self.orphans) {
            match maps.set_backend(id, &Backend::default()) {
                Ok(()) => {
                    self.backend_ids.quarantine(id);
                    self.grace_owed = true;
                }
                Err(e) => {
                    failed.push(format!("backend {id}: {e:#}"));
                    self.orphans.push(id);
                }
            }
        }
        for key in std::mem::take(&mut self.stale_vips) {
            if let Err(e) = maps.remove_vip(&key) {
                failed.push(format!("stale VIP: {e:#}"));
                self.stale_vips.push(key);
            }
        }
        let stale = std::mem::take(&mut self.stale_allow);
        let (left, clean) = allow::clear_stale(stale, maps, &mut failed);
        self.stale_allow = left;
        for id in clean {
            self.service_ids.quarantine(id);
            self.grace_owed = true;
        }
        if !failed.is_empty() {
            changes
                .failed
                .insert("(pinned leftovers)".into(), failed.join("; "));
        }
    }

    /// The service's steps, each its own function (steps.rs): backends in, the ring placed,
    /// the flip, the VIP published. The clean-up waits for a grace period (`clean_up`).
    fn sync_service(
        &mut self,
        maps: &mut impl Maps,
        key: &VipKey,
        spec: &ServiceSpec,
        live: &impl Liveness,
        changes: &mut Changes,
    ) -> Result<CleanUp> {
        if !self.services.contains_key(key) {
            self.add_service(maps, key, spec)?;
            changes.services_added += 1;
        }
        let svc = self.services.get_mut(key).expect("added above");
        svc.name.clone_from(&spec.name);
        let mut plan = Plan::new(spec, &svc.backends, live);
        let needed = plan.new_ids();
        if needed > self.backend_ids.available() {
            bail!(
                "{needed} new backends need ids, {} of {} are free",
                self.backend_ids.available(),
                self.backend_ids.max()
            );
        }
        let owed = &mut self.grace_owed;
        steps::enter_backends(svc, &mut plan, &mut self.backend_ids, maps, changes, owed)?;
        steps::set_weights(svc, spec);
        allow::enter(svc, spec, maps)?;
        let placed = steps::place_ring(svc, &plan.ring_input, &mut self.rings, maps)?;
        steps::flip(svc, spec, placed, &mut self.rings, maps, changes, owed)?;
        allow::leave(svc, spec, maps)?;
        steps::publish(svc, key, maps)?;
        Ok(CleanUp {
            dying: plan.dying,
            removed: plan.removed,
        })
    }

    fn add_service(
        &mut self,
        maps: &mut impl Maps,
        key: &VipKey,
        spec: &ServiceSpec,
    ) -> Result<()> {
        let id = self
            .service_ids
            .take()
            .with_context(|| format!("no free service id ({} services at most)", MAX_SERVICES))?;
        if let Err(e) = maps.reset_service_counters(id) {
            self.service_ids.untake(id);
            return Err(e);
        }
        let applied = AppliedService {
            name: spec.name.clone(),
            value: Service {
                vip: *key,
                id,
                ..Service::default()
            },
            written: false,
            in_vips: false,
            ring_rebuilds: 0,
            ring_input: None,
            backends: BTreeMap::new(),
            allow: BTreeSet::new(),
        };
        self.services.insert(*key, applied);
        info!(service = %spec.name, vip = %spec.vip, port = spec.port, "service added");
        Ok(())
    }

    /// Dead backends lose ALIVE (their flows re-hash), removed ones their slot.
    fn clean_up(
        &mut self,
        maps: &mut impl Maps,
        key: &VipKey,
        clean_up: CleanUp,
        changes: &mut Changes,
    ) -> Result<()> {
        let svc = self.services.get_mut(key).expect("synced");
        let owed = &mut self.grace_owed;
        steps::clean_up(svc, clean_up, &mut self.backend_ids, maps, changes, owed)
    }

    fn remove_service(&mut self, maps: &mut impl Maps, key: &VipKey) -> Result<()> {
        let svc = self.services.get_mut(key).expect("listed by caller");
        if svc.in_vips {
            maps.remove_vip(key)?;
            svc.in_vips = false;
        }
        // Its slot stays as it is: a packet that found the VIP a moment ago still reads it.
        // Its allow entries go now: its id must come back clean.
        allow::remove_except(svc, &BTreeSet::new(), maps)?;
        for (endpoint, b) in svc.backends.clone() {
            maps.set_backend(b.id, &Backend::default())?;
            svc.backends.remove(&endpoint);
            self.backend_ids.quarantine(b.id);
            self.grace_owed = true;
        }
        let svc = self.services.remove(key).expect("listed by caller");
        self.service_ids.quarantine(svc.value.id);
        self.rings
            .retire(svc.value.ring_offset, svc.value.table_size);
        self.grace_owed = true;
        info!(service = %svc.name, "service removed");
        Ok(())
    }

    /// The VIP addresses of the applied services, each with its flags (echo is answered
    /// when any service on the address asks for it).
    fn sync_vip_addrs(
        &mut self,
        maps: &mut impl Maps,
        desired: &BTreeMap<VipKey, &ServiceSpec>,
    ) -> Result<()> {
        let mut wanted: BTreeMap<VipAddrKey, u32> = BTreeMap::new();
        for key in self.services.keys() {
            let addr = VipAddrKey {
                addr: key.addr,
                family: key.family,
                _pad0: 0,
                _pad1: 0,
            };
            let echo = desired.get(key).is_some_and(|s| s.icmp_echo);
            *wanted.entry(addr).or_default() |= if echo { VIP_ADDR_ECHO } else { 0 };
        }
        for (key, flags) in &wanted {
            if self.vip_addrs.get(key) != Some(flags) {
                maps.set_vip_addr(key, *flags)?;
                self.vip_addrs.insert(*key, *flags);
            }
        }
        let gone: Vec<VipAddrKey> = self
            .vip_addrs
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            maps.remove_vip_addr(&key)?;
            self.vip_addrs.remove(&key);
        }
        Ok(())
    }

    /// The backends the maps hold for this service, with their delivery (used to keep them
    /// after a restart until Docker has answered).
    pub fn pinned_backends(&self, spec: &ServiceSpec) -> Vec<(Endpoint, Delivery)> {
        self.services
            .get(&vip_key(spec))
            .map(|svc| svc.backends.iter().map(|(e, b)| (*e, b.delivery)).collect())
            .unwrap_or_default()
    }

    /// Each service as applied: ids, table size, backends, and why it failed if it did.
    pub fn applied(&self) -> Vec<AppliedView> {
        self.services
            .values()
            .map(|s| AppliedView {
                name: s.name.clone(),
                id: s.value.id,
                table_size: s.value.table_size,
                ring_rebuilds: s.ring_rebuilds,
                backends: s.backends.iter().map(|(e, b)| (*e, b.clone())).collect(),
                problem: self.problems.get(&s.name).cloned(),
            })
            .collect()
    }

    /// Services of the desired state that could not be applied at all, and other failures
    /// of the last apply, by name.
    pub fn problems(&self) -> &BTreeMap<String, String> {
        &self.problems
    }

    /// What the agent's loop reads of the bookkeeping, detached from it (the reconciler
    /// itself lives on the applier's thread).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.applied(),
            problems: self.problems.clone(),
            alive: self
                .services
                .iter()
                .map(|(k, s)| (*k, s.backends.iter().map(|(e, b)| (*e, b.alive)).collect()))
                .collect(),
        }
    }
}

/// The reconciler's state after an apply.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: Vec<AppliedView>,
    /// As `Reconciler::problems`.
    pub problems: BTreeMap<String, String>,
    alive: BTreeMap<VipKey, BTreeMap<Endpoint, bool>>,
}

impl Snapshot {
    /// Whether the maps have this backend alive (None: not known to them). Used to start
    /// health checks where the previous agent left off.
    pub fn pinned_alive(&self, spec: &ServiceSpec, endpoint: &Endpoint) -> Option<bool> {
        self.alive.get(&vip_key(spec))?.get(endpoint).copied()
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
    /// Why the last apply left this service as it was.
    pub problem: Option<String>,
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
