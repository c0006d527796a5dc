use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{
    BACKEND_ALIVE, BACKEND_IN_USE, SERVICE_GUE, addr_words,
    sizes::{MAX_RING_SIZE, RING_BLOCK, RING_BLOCKS, RING_SLOTS},
};

use super::{fake::FakeMaps, *};
use crate::{
    config::{HealthConfig, Mode, Protocol},
    state::{BackendSpec, Source},
};

struct Dead(Vec<Endpoint>);

impl Liveness for Dead {
    fn is_alive(&self, _: &str, endpoint: &Endpoint) -> bool {
        !self.0.contains(endpoint)
    }
}

fn ep(last: u8) -> Endpoint {
    Endpoint {
        addr: IpAddr::from([10, 99, 2, last]),
        port: 8080,
    }
}

fn service(name: &str, vip_last: u8, backends: &[(u8, u32)]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: IpAddr::from([10, 99, 100, vip_last]),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        snat: Vec::new(),
        gue: false,
        hash: Default::default(),
        icmp_echo: true,
        allow: Vec::new(),
        table_size: 101,
        health: HealthConfig::default(),
        backends: backends
            .iter()
            .map(|&(last, weight)| {
                let spec = BackendSpec {
                    weight,
                    source: Source::Static,
                    health: Default::default(),
                    bridge: None,
                    delivery: Default::default(),
                };
                (ep(last), spec)
            })
            .collect(),
    }
}

fn state(services: Vec<ServiceSpec>) -> DesiredState {
    DesiredState {
        services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
        ..DesiredState::default()
    }
}

/// The log without grace periods.
fn map_writes(maps: &FakeMaps) -> Vec<&str> {
    maps.log
        .iter()
        .map(String::as_str)
        .filter(|l| *l != "grace")
        .collect()
}

fn ids_in(ring: &[u32]) -> BTreeSet<u32> {
    ring.iter().copied().collect()
}

#[test]
fn new_service_gets_a_full_ring_and_a_vip() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let web = service("web", 1, &[(11, 100), (12, 100), (13, 100)]);
    let changes = rec
        .apply(&mut maps, &state(vec![web.clone()]), &AllAlive)
        .unwrap();
    assert_eq!(
        (
            changes.services_added,
            changes.backends_added,
            changes.rings_written
        ),
        (1, 3, 1)
    );
    let key = vip_key(&web);
    assert_eq!(maps.svc(&key).table_size, 101);
    assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0, 1, 2]));
    assert_eq!(maps.vip_addrs.len(), 1);
    // Backends are written before the ring, the ring before the service flips to it, and
    // the service before the VIP leads to it.
    let at = |what: &str| maps.log.iter().position(|l| l.starts_with(what)).unwrap();
    let backends_before_ring = maps.log[..at("ring")]
        .iter()
        .filter(|l| l.starts_with("backend"))
        .count();
    assert_eq!(backends_before_ring, 3, "{:?}", maps.log);
    assert!(at("ring") < at("service") && at("service") < at("vip"));
}

#[test]
fn mode_settings_are_part_of_the_service_value() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let mut fullnat = service("web", 1, &[(11, 100)]);
    fullnat.mode = Mode::Fullnat;
    fullnat.snat = vec![IpAddr::from([10, 99, 5, 9])];
    let mut dsr = service("api", 2, &[(12, 100)]);
    dsr.mode = Mode::Dsr;
    dsr.gue = true;
    let mut shared = service("own", 3, &[(13, 100)]);
    shared.mode = Mode::Fullnat;
    rec.apply(
        &mut maps,
        &state(vec![fullnat.clone(), dsr.clone(), shared.clone()]),
        &AllAlive,
    )
    .unwrap();

    let web = maps.svc(&vip_key(&fullnat));
    assert_eq!(web.mode, lb_common::MODE_FULLNAT);
    let pool = web.snat;
    assert_eq!(pool.count, 1);
    assert_eq!(pool.addrs[0], addr_words(IpAddr::from([10, 99, 5, 9])).1);
    assert_eq!((pool.port_min, pool.port_max), SNAT_PORTS_OWN);
    // Without addresses of its own: the LB's address, below the kernel's ephemeral ports.
    let own = maps.svc(&vip_key(&shared)).snat;
    assert_eq!((own.count, own.port_min, own.port_max), (0, 1024, 32767));
    let api = maps.svc(&vip_key(&dsr));
    assert_eq!((api.mode, api.flags), (lb_common::MODE_DSR, SERVICE_GUE));
    // Unchanged settings are not written again.
    maps.log.clear();
    rec.apply(&mut maps, &state(vec![fullnat, dsr, shared]), &AllAlive)
        .unwrap();
    assert!(map_writes(&maps).is_empty(), "{:?}", maps.log);
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let desired = state(vec![service("web", 1, &[(11, 100), (12, 100)])]);
    rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    maps.log.clear();
    maps.ring_reads.set(0);
    let changes = rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert!(map_writes(&maps).is_empty(), "{:?}", maps.log);
    // Nor is the ring built and compared again: the same input gives the same ring.
    assert_eq!(maps.ring_reads.get(), 0);
}

#[test]
fn a_new_ring_goes_to_free_space_then_the_vip_flips() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let key = vip_key(&service("web", 1, &[]));
    let mut offsets = Vec::new();
    for backends in [&[(11, 100)][..], &[(11, 100), (12, 100)], &[(12, 100)]] {
        rec.apply(
            &mut maps,
            &state(vec![service("web", 1, backends)]),
            &AllAlive,
        )
        .unwrap();
        offsets.push(maps.svc(&key).ring_offset);
        if offsets.len() == 2 {
            // The old ring is intact: a packet that read the old VIP value is fine.
            assert_eq!(ids_in(&maps.ring(offsets[0], 101)), BTreeSet::from([0]));
            assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0, 1]));
        }
    }
    // One apply later nothing reads the first ring any more: its space is used again.
    assert_eq!(offsets, [0, RING_BLOCK, 0]);
}

#[test]
fn a_larger_table_gets_adjacent_blocks_and_the_old_ones_are_reused() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let small = service("web", 1, &[(11, 100), (12, 100)]);
    let mut large = small.clone();
    large.table_size = MAX_RING_SIZE;
    let key = vip_key(&small);
    rec.apply(&mut maps, &state(vec![small.clone()]), &AllAlive)
        .unwrap();
    assert_eq!(maps.svc(&key).ring_offset, 0);
    let changes = rec
        .apply(&mut maps, &state(vec![large]), &AllAlive)
        .unwrap();
    assert_eq!(changes.rings_written, 1);
    let value = maps.svc(&key);
    assert_eq!(value.table_size, MAX_RING_SIZE);
    assert!(value.ring_offset + MAX_RING_SIZE <= RING_SLOTS);
    assert_eq!(value.ring_offset % RING_BLOCK, 0);
    let ring = maps.active_ring(&key);
    let share = ring.iter().filter(|&&id| id == 0).count() as f64 / ring.len() as f64;
    assert!((0.49..=0.51).contains(&share), "{share}");
    rec.apply(&mut maps, &state(vec![small]), &AllAlive)
        .unwrap();
    assert_eq!(maps.svc(&key).table_size, 101);
    assert_eq!(
        maps.svc(&key).ring_offset,
        0,
        "the first block is free again"
    );
}

#[test]
fn without_adjacent_free_space_the_ring_is_rewritten_in_place() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let web = service("web", 1, &[(11, 100), (12, 100)]);
    let key = vip_key(&web);
    rec.apply(&mut maps, &state(vec![web]), &AllAlive).unwrap();
    let offset = maps.svc(&key).ring_offset;
    let full = || RingSpace::new((0..RING_BLOCKS).map(|b| (b * RING_BLOCK, 1)));

    // A backend leaves: the ring is rewritten where it is, and the backend's slot cleared a
    // grace period later, so every slot names a valid backend throughout.
    rec.rings = full();
    maps.log.clear();
    let one = service("web", 1, &[(11, 100)]);
    rec.apply(&mut maps, &state(vec![one.clone()]), &AllAlive)
        .unwrap();
    assert_eq!(
        maps.log,
        [
            "grace".into(),
            format!("ring {offset}"),
            "grace".into(),
            "backend 1 flags 0".into()
        ]
    );
    assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0]));

    // A larger table waits for room, and takes it once there is some.
    let mut large = one;
    large.table_size = MAX_RING_SIZE;
    rec.rings = full();
    rec.apply(&mut maps, &state(vec![large.clone()]), &AllAlive)
        .unwrap();
    assert_eq!(maps.svc(&key).table_size, 101);
    assert_eq!(maps.svc(&key).ring_offset, offset);
    rec.rings = RingSpace::new([(offset, 101)]);
    rec.apply(&mut maps, &state(vec![large]), &AllAlive)
        .unwrap();
    assert_eq!(maps.svc(&key).table_size, MAX_RING_SIZE);
}

#[test]
fn a_restarted_agent_writes_around_the_rings_in_use() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let web = service("web", 1, &[(11, 100)]);
    let api = service("api", 2, &[(21, 100)]);
    rec.apply(&mut maps, &state(vec![web.clone(), api.clone()]), &AllAlive)
        .unwrap();
    let in_use: BTreeSet<u32> = maps.services.values().map(|s| s.ring_offset).collect();
    assert_eq!(in_use, BTreeSet::from([0, RING_BLOCK]));

    let mut rec = Reconciler::adopt(&maps).unwrap();
    let mut web2 = service("web", 1, &[(11, 100), (12, 100)]);
    web2.table_size = 103;
    rec.apply(&mut maps, &state(vec![web2, api]), &AllAlive)
        .unwrap();
    let web_offset = maps.svc(&vip_key(&web)).ring_offset;
    assert_eq!(web_offset, 2 * RING_BLOCK, "blocks 0 and 1 hold live rings");
    assert_eq!(maps.svc(&vip_key(&web)).table_size, 103);
}

#[test]
fn removed_backend_leaves_the_ring_before_its_slot_is_cleared() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    rec.apply(
        &mut maps,
        &state(vec![service("web", 1, &[(11, 100), (12, 100)])]),
        &AllAlive,
    )
    .unwrap();
    maps.log.clear();
    let changes = rec
        .apply(
            &mut maps,
            &state(vec![service("web", 1, &[(11, 100)])]),
            &AllAlive,
        )
        .unwrap();
    assert_eq!(changes.backends_removed, 1);
    // A packet that read the old service value may still pick the backend from the old
    // ring until a grace period has passed.
    assert_eq!(
        maps.log,
        [
            "grace",
            "ring 65552",
            "service 0 -> ring 65552",
            "grace",
            "backend 1 flags 0"
        ]
    );
    // The freed id is handed out last, not next.
    rec.apply(
        &mut maps,
        &state(vec![service("web", 1, &[(11, 100), (13, 100)])]),
        &AllAlive,
    )
    .unwrap();
    let id_13 = rec.applied()[0].backends[&ep(13)].id;
    assert_eq!(id_13, 2);
}

#[test]
fn drained_backend_is_out_of_the_ring_but_keeps_its_flows() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let key = vip_key(&service("web", 1, &[]));
    rec.apply(
        &mut maps,
        &state(vec![service("web", 1, &[(11, 100), (12, 100)])]),
        &AllAlive,
    )
    .unwrap();
    rec.apply(
        &mut maps,
        &state(vec![service("web", 1, &[(11, 100), (12, 0)])]),
        &AllAlive,
    )
    .unwrap();
    assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0]));
    assert_eq!(maps.backends[&1].flags, BACKEND_IN_USE | BACKEND_ALIVE);
}

#[test]
fn dead_backend_loses_alive_after_the_flip_and_comes_back() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let key = vip_key(&service("web", 1, &[]));
    let desired = state(vec![service("web", 1, &[(11, 100), (12, 100)])]);
    rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    maps.log.clear();
    rec.apply(&mut maps, &desired, &Dead(vec![ep(12)])).unwrap();
    assert_eq!(
        maps.log,
        [
            "grace",
            "ring 65552",
            "service 0 -> ring 65552",
            "grace",
            "backend 1 flags 1"
        ]
    );
    assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0]));
    maps.log.clear();
    rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    assert_eq!(
        map_writes(&maps)[0],
        "backend 1 flags 3",
        "revived before the ring points at it"
    );
    assert_eq!(ids_in(&maps.active_ring(&key)), BTreeSet::from([0, 1]));
}

#[test]
fn all_backends_down_leaves_an_empty_ring() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let key = vip_key(&service("web", 1, &[]));
    let desired = state(vec![service("web", 1, &[(11, 100)])]);
    rec.apply(&mut maps, &desired, &Dead(vec![ep(11)])).unwrap();
    assert_eq!(maps.svc(&key).table_size, 0);
}

#[test]
fn restarted_agent_adopts_ids_and_changes_nothing() {
    let mut maps = FakeMaps::default();
    let desired = state(vec![
        service("web", 1, &[(11, 100), (12, 100), (13, 50)]),
        service("api", 2, &[(21, 100)]),
    ]);
    let mut first = Reconciler::adopt(&maps).unwrap();
    first.apply(&mut maps, &desired, &AllAlive).unwrap();
    let before = first.applied();
    maps.log.clear();

    let mut second = Reconciler::adopt(&maps).unwrap();
    let changes = second.apply(&mut maps, &desired, &AllAlive).unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert!(map_writes(&maps).is_empty(), "{:?}", maps.log);
    let after = second.applied();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((b.id, &b.name), (a.id, &a.name));
        let ids = |v: &AppliedView| {
            v.backends
                .iter()
                .map(|(e, x)| (*e, x.id))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(b), ids(a));
    }
}

#[test]
fn adopted_state_without_config_is_removed() {
    let mut maps = FakeMaps::default();
    let mut first = Reconciler::adopt(&maps).unwrap();
    first
        .apply(
            &mut maps,
            &state(vec![service("web", 1, &[(11, 100)])]),
            &AllAlive,
        )
        .unwrap();
    let mut second = Reconciler::adopt(&maps).unwrap();
    let changes = second.apply(&mut maps, &state(vec![]), &AllAlive).unwrap();
    assert_eq!(changes.services_removed, 1);
    assert!(maps.vips.is_empty() && maps.vip_addrs.is_empty());
    assert!(maps.backends_in_use().unwrap().is_empty());
}

#[test]
fn changed_vip_replaces_only_that_service() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let api = service("api", 2, &[(21, 100)]);
    rec.apply(
        &mut maps,
        &state(vec![service("web", 1, &[(11, 100)]), api.clone()]),
        &AllAlive,
    )
    .unwrap();
    let api_before = maps.svc(&vip_key(&api));
    rec.apply(
        &mut maps,
        &state(vec![service("web", 3, &[(11, 100)]), api.clone()]),
        &AllAlive,
    )
    .unwrap();
    assert_eq!(
        maps.svc(&vip_key(&api)),
        api_before,
        "other services untouched"
    );
    assert!(!maps.vips.contains_key(&vip_key(&service("web", 1, &[]))));
    assert!(maps.vips.contains_key(&vip_key(&service("web", 3, &[]))));
    assert_eq!(maps.vip_addrs.len(), 2);
}

#[test]
fn changed_table_size_rebuilds_the_ring() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let mut web = service("web", 1, &[(11, 100), (12, 100)]);
    rec.apply(&mut maps, &state(vec![web.clone()]), &AllAlive)
        .unwrap();
    web.table_size = 13;
    rec.apply(&mut maps, &state(vec![web.clone()]), &AllAlive)
        .unwrap();
    assert_eq!(maps.active_ring(&vip_key(&web)).len(), 13);
}

mod faults;
