//! Maps in memory for the reconciler's tests: a log of writes (to check their order), a
//! write that fails on demand (to test every failure point), and the data path's rules as
//! assertions: a double-buffered slot is not flipped twice without a grace period in between,
//! and ring space a packet may still read is not written.
use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet, HashMap},
};

use anyhow::{Result, bail};
use ipnet::IpNet;
use lb_common::{BACKEND_IN_USE, Backend, Service, VipAddrKey, VipKey, sizes::RING_SLOTS};

use super::Maps;

#[derive(Default)]
pub struct FakeMaps {
    pub vips: BTreeMap<VipKey, u32>,
    pub services: HashMap<u32, Service>,
    pub vip_addrs: BTreeMap<VipAddrKey, u32>,
    pub backends: HashMap<u32, Backend>,
    pub rings: HashMap<u32, u32>,
    /// The `allow` trie: (service id, prefix).
    pub allow: BTreeSet<(u32, IpNet)>,
    pub log: Vec<String>,
    pub ring_reads: Cell<usize>,
    /// Writes made so far (every call that changes a map counts, failed ones too).
    pub writes: usize,
    /// The write with this number fails.
    pub fail_at: Option<usize>,
    pub graces: usize,
    /// Slots flipped since the last grace period: ('s' | 'b', id).
    flipped: BTreeSet<(char, u32)>,
    /// Rings that service values replaced since the last grace period (offset, len): a
    /// packet may still be reading them.
    replaced_rings: Vec<(u32, u32)>,
}

impl FakeMaps {
    fn write(&mut self, what: String) -> Result<()> {
        let n = self.writes;
        self.writes += 1;
        if self.fail_at == Some(n) {
            bail!("injected failure of write {n} ({what})");
        }
        self.log.push(what);
        Ok(())
    }

    fn flip(&mut self, kind: char, id: u32) {
        assert!(
            self.flipped.insert((kind, id)),
            "slot {kind}{id} flipped twice without a grace period: a packet may hold its idle copy"
        );
    }

    /// The service value a VIP leads to.
    pub fn svc(&self, key: &VipKey) -> Service {
        self.services[&self.vips[key]]
    }

    /// Backend id of every slot of the service's active ring.
    pub fn active_ring(&self, key: &VipKey) -> Vec<u32> {
        let s = self.svc(key);
        self.ring(s.ring_offset, s.table_size)
    }
}

fn overlaps(a: (u32, u32), b: (u32, u32)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Maps for FakeMaps {
    fn vips(&self) -> Result<Vec<(VipKey, u32)>> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn insert_vip(&mut self, key: &VipKey, service_id: u32) -> Result<()> {
        self.write(format!("vip {service_id}"))?;
        assert!(
            !self.vips.contains_key(key),
            "a VIP value is written once, never replaced"
        );
        self.vips.insert(*key, service_id);
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.write("remove vip".into())?;
        self.vips.remove(key);
        Ok(())
    }
    fn service(&self, id: u32) -> Result<Service> {
        Ok(self.services.get(&id).copied().unwrap_or_default())
    }
    fn set_service(&mut self, id: u32, service: &Service) -> Result<()> {
        self.write(format!("service {id} -> ring {}", service.ring_offset))?;
        self.flip('s', id);
        if let Some(old) = self.services.insert(id, *service)
            && (old.ring_offset, old.table_size) != (service.ring_offset, service.table_size)
        {
            self.replaced_rings.push((old.ring_offset, old.table_size));
        }
        Ok(())
    }
    fn vip_addrs(&self) -> Result<Vec<(VipAddrKey, u32)>> {
        Ok(self.vip_addrs.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey, flags: u32) -> Result<()> {
        self.write("vip addr".into())?;
        self.vip_addrs.insert(*key, flags);
        Ok(())
    }
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.write("remove vip addr".into())?;
        self.vip_addrs.remove(key);
        Ok(())
    }
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>> {
        let mut v: Vec<_> = self
            .backends
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_IN_USE != 0)
            .map(|(i, b)| (*i, *b))
            .collect();
        v.sort_by_key(|(i, _)| *i);
        Ok(v)
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.write(format!("backend {id} flags {}", backend.flags))?;
        self.flip('b', id);
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn ring(&self, offset: u32, len: u32) -> Vec<u32> {
        self.ring_reads.set(self.ring_reads.get() + 1);
        (offset..offset + len)
            .map(|i| self.rings.get(&i).copied().unwrap_or(0))
            .collect()
    }
    fn write_ring(&mut self, offset: u32, slots: &[u32]) -> Result<()> {
        assert!(offset + slots.len() as u32 <= RING_SLOTS);
        let span = (offset, slots.len() as u32);
        for &old in &self.replaced_rings {
            // A ring rewritten in place at the same offset keeps every slot valid.
            assert!(
                old.0 == offset || !overlaps(span, old),
                "ring space {old:?} reused before a grace period"
            );
        }
        let live_here = self
            .vips
            .values()
            .filter_map(|id| self.services.get(id))
            .filter(|s| overlaps(span, (s.ring_offset, s.table_size)))
            .count();
        assert!(live_here <= 1, "a ring written over two live rings");
        self.write(format!("ring {offset}"))?;
        for (i, s) in slots.iter().enumerate() {
            self.rings.insert(offset + i as u32, *s);
        }
        Ok(())
    }
    fn reset_service_counters(&mut self, _: u32) -> Result<()> {
        self.write("reset service counters".into()).map(|_| {
            self.log.pop();
        })
    }
    fn reset_backend_counters(&mut self, _: u32) -> Result<()> {
        self.write("reset backend counters".into()).map(|_| {
            self.log.pop();
        })
    }
    fn allow_prefixes(&self) -> Result<Vec<(u32, IpNet)>> {
        Ok(self.allow.iter().copied().collect())
    }
    fn insert_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.write(format!("allow {service_id} {net}"))?;
        self.allow.insert((service_id, *net));
        Ok(())
    }
    fn remove_allow(&mut self, service_id: u32, net: &IpNet) -> Result<()> {
        self.write(format!("remove allow {service_id} {net}"))?;
        self.allow.remove(&(service_id, *net));
        Ok(())
    }
    fn grace_period(&mut self) -> Result<()> {
        self.write("grace".into())?;
        self.graces += 1;
        self.flipped.clear();
        self.replaced_rings.clear();
        Ok(())
    }
}
