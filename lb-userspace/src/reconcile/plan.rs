//! What one service's sync will write, worked out before anything is written: which backends
//! enter `BACKENDS` (new, revived, moved), which ring the service gets, and which backends
//! leave after the flip (died, removed). Pure: no map access.
use std::collections::BTreeMap;

use lb_common::{
    BACKEND_ALIVE, BACKEND_IN_USE, Backend, SERVICE_ALLOW, SERVICE_GUE, SERVICE_SOURCE_HASH,
    Service, SnatPool, VipKey, addr_words,
};

use super::{AppliedBackend, Liveness};
use crate::{
    bridgeport::VethPort,
    config::HashMode,
    maglev::{self, MaglevBackend},
    state::{Delivery, Endpoint, ServiceSpec},
};

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

/// A backend the sync writes into `BACKENDS` before the ring may name it.
pub struct Entering {
    pub endpoint: Endpoint,
    /// None: a new backend, which needs an id.
    pub id: Option<u32>,
    pub applied: AppliedBackend,
}

/// The writes one service needs, in the order they are made.
pub struct Plan {
    pub entering: Vec<Entering>,
    /// What the ring is built from; also what the bookkeeping records once it is in place.
    pub ring_input: RingInput,
    /// Backends that lose ALIVE once no ring names them (their flows re-hash).
    pub dying: Vec<(Endpoint, u32)>,
    /// Backends that leave `BACKENDS` once no ring names them.
    pub removed: Vec<(Endpoint, u32)>,
}

impl Plan {
    pub fn new(
        spec: &ServiceSpec,
        current: &BTreeMap<Endpoint, AppliedBackend>,
        live: &impl Liveness,
    ) -> Plan {
        let mut entering = Vec::new();
        let mut dying = Vec::new();
        let mut after = BTreeMap::new();
        for (endpoint, want) in &spec.backends {
            let alive = live.is_alive(&spec.name, endpoint);
            let next = |id| AppliedBackend {
                id,
                weight: want.weight,
                alive,
                delivery: want.delivery,
            };
            match current.get(endpoint) {
                None => entering.push(Entering {
                    endpoint: *endpoint,
                    id: None,
                    applied: next(u32::MAX),
                }),
                Some(old) if !alive && old.alive => dying.push((*endpoint, old.id)),
                Some(old) if old.delivery != want.delivery || (alive && !old.alive) => {
                    entering.push(Entering {
                        endpoint: *endpoint,
                        id: Some(old.id),
                        applied: next(old.id),
                    });
                }
                Some(_) => {}
            }
            // The ring sees each backend as it will be (new ones get their id later).
            let id = current.get(endpoint).map_or(u32::MAX, |b| b.id);
            after.insert(*endpoint, next(id));
        }
        let removed = current
            .iter()
            .filter(|(e, _)| !spec.backends.contains_key(e))
            .map(|(e, b)| (*e, b.id))
            .collect();
        Plan {
            entering,
            ring_input: RingInput::new(&after, spec.table_size),
            dying,
            removed,
        }
    }

    /// Backend ids this plan takes from the pool.
    pub fn new_ids(&self) -> usize {
        self.entering.iter().filter(|e| e.id.is_none()).count()
    }

    /// Records the id a new backend got, for the ring to name it.
    pub fn assign(&mut self, endpoint: &Endpoint, id: u32) {
        self.ring_input.assign(&endpoint.to_string(), id);
    }
}

/// What a service's ring is built from: the backends that may take new flows (alive,
/// weight > 0) with their ids, and the table size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingInput {
    pub table_size: u32,
    /// (key, weight, backend id), in endpoint order.
    backends: Vec<(String, u32, u32)>,
}

impl RingInput {
    pub fn new(backends: &BTreeMap<Endpoint, AppliedBackend>, table_size: u32) -> Self {
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

    fn assign(&mut self, key: &str, id: u32) {
        for entry in self.backends.iter_mut().filter(|(k, _, _)| k == key) {
            entry.2 = id;
        }
    }

    /// The same backends in a table of another size.
    pub fn resized(&self, table_size: u32) -> Self {
        Self {
            table_size,
            backends: self.backends.clone(),
        }
    }

    /// The ring: a backend id per slot.
    pub fn build(&self) -> Vec<u32> {
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

/// The service's value with a ring at `ring_offset` of `table_size` slots.
pub fn service_value(spec: &ServiceSpec, id: u32, ring_offset: u32, table_size: u32) -> Service {
    Service {
        vip: vip_key(spec),
        id,
        ring_offset,
        table_size,
        mode: spec.mode.number(),
        flags: if spec.gue { SERVICE_GUE } else { 0 }
            | if spec.allow.is_empty() {
                0
            } else {
                SERVICE_ALLOW
            }
            | if spec.hash == HashMode::Source {
                SERVICE_SOURCE_HASH
            } else {
                0
            },
        _pad: 0,
        snat: snat_pool(spec),
    }
}

pub fn backend_value(
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
pub fn delivery_of(backend: &Backend) -> Delivery {
    Delivery {
        bridge: backend.deliver_ifindex,
        veth: (backend.port_ifindex != 0).then_some(VethPort {
            ifindex: backend.port_ifindex,
            mac: backend.mac,
            bridge_mac: backend.gateway_mac,
        }),
    }
}
