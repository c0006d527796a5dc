//! Failures in the middle of an apply: at every single write, the maps stay valid for packets
//! and agree with the bookkeeping, and the next apply finishes the job.
use super::*;
use crate::reconcile::plan::backend_value;
use crate::state::Delivery;

/// Panics unless the maps are what packets may safely read and what the reconciler thinks
/// they are.
fn assert_consistent(rec: &Reconciler, maps: &FakeMaps, what: &str) {
    // Safety for packets: every VIP leads to its own slot, every ring slot to an in-use
    // backend of that service.
    for (key, id) in &maps.vips {
        let svc = maps.services[id];
        assert_eq!(
            (svc.vip, svc.id),
            (*key, *id),
            "{what}: VIP -> foreign slot"
        );
        for backend_id in maps.ring(svc.ring_offset, svc.table_size) {
            let b = maps.backends.get(&backend_id).copied().unwrap_or_default();
            assert!(
                b.flags & BACKEND_IN_USE != 0 && b.service_id == *id,
                "{what}: service {id}'s ring names backend {backend_id} ({b:?})"
            );
        }
    }
    // Agreement.
    let mut known = BTreeSet::new();
    for (key, svc) in &rec.services {
        assert_eq!(maps.vips.contains_key(key), svc.in_vips, "{what}: in_vips");
        if svc.written {
            assert_eq!(
                maps.services[&svc.value.id], svc.value,
                "{what}: service value"
            );
        }
        if let Some(input) = &svc.ring_input {
            let ring = maps.ring(svc.value.ring_offset, svc.value.table_size);
            assert_eq!(ring, input.build(), "{what}: ring differs from its record");
        }
        for (endpoint, b) in &svc.backends {
            let want = backend_value(endpoint, svc.value.id, b.alive, &b.delivery);
            assert_eq!(maps.backends[&b.id], want, "{what}: backend {endpoint}");
            known.insert(b.id);
        }
    }
    // The allow trie holds what the bookkeeping says, and nothing of unknown ids.
    for svc in rec.services.values() {
        let held: BTreeSet<_> = maps
            .allow
            .iter()
            .filter(|(id, _)| *id == svc.value.id)
            .map(|(_, net)| *net)
            .collect();
        assert_eq!(held, svc.allow, "{what}: allow entries of {}", svc.name);
    }
    for (id, net) in &maps.allow {
        assert!(
            rec.services.values().any(|s| s.value.id == *id)
                || rec.stale_allow.contains(&(*id, *net)),
            "{what}: allow entry {id} {net} of no service"
        );
    }
    known.extend(rec.orphans.iter().copied());
    for (id, _) in maps.backends_in_use().unwrap() {
        assert!(
            known.contains(&id),
            "{what}: backend {id} in the map, unknown"
        );
    }
}

/// Each service's ring as endpoints (ids differ between runs; the ring does not).
fn rings_by_endpoint(rec: &Reconciler, maps: &FakeMaps) -> BTreeMap<String, Vec<Endpoint>> {
    rec.services
        .iter()
        .filter(|(key, _)| maps.vips.contains_key(key))
        .map(|(key, svc)| {
            let by_id: BTreeMap<u32, Endpoint> =
                svc.backends.iter().map(|(e, b)| (b.id, *e)).collect();
            let ring = maps.active_ring(key).iter().map(|id| by_id[id]).collect();
            (svc.name.clone(), ring)
        })
        .collect()
}

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// No packet may see a service's list narrower than both its old and its new one (an
/// empty list lets everyone in): with the flag on, the trie holds their common prefixes.
/// (Exact for these lists, whose prefixes do not nest.)
fn assert_allow_never_narrower(rec: &Reconciler, maps: &FakeMaps, what: &str) {
    let (old, new) = (before(), after());
    for svc in rec.services.values() {
        let value = maps
            .services
            .get(&svc.value.id)
            .copied()
            .unwrap_or_default();
        if value.flags & lb_common::SERVICE_ALLOW == 0 {
            continue;
        }
        let list = |s: &DesiredState| s.services.get(&svc.name).map(|s| s.allow.clone());
        let floor: BTreeSet<_> = match (list(&old), list(&new)) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => {
                a.into_iter().filter(|n| b.contains(n)).collect()
            }
            (Some(a), Some(b)) => a.into_iter().chain(b).collect(),
            // A service on its way out lost its VIP first: no new packet finds it.
            (_, None) => continue,
            (None, Some(b)) => b.into_iter().collect(),
        };
        for net in floor {
            assert!(
                maps.allow.contains(&(svc.value.id, net)),
                "{what}: {} has its flag without {net}",
                svc.name
            );
        }
    }
}

fn before() -> DesiredState {
    let mut web = service("web", 1, &[(11, 100), (12, 100), (13, 100)]);
    web.mode = Mode::Fullnat;
    web.allow = nets(&["10.0.0.0/8", "192.0.2.0/24"]);
    let mut gone = service("gone", 3, &[(31, 100)]);
    gone.allow = nets(&["10.1.0.0/16"]);
    let mut plain = service("plain", 6, &[(61, 100)]);
    plain.allow = nets(&["10.6.0.0/16"]);
    let mut local = service("local", 4, &[(41, 100), (42, 100)]);
    local.backends.get_mut(&ep(41)).unwrap().delivery = Delivery {
        bridge: 7,
        veth: None,
    };
    state(vec![
        web,
        service("api", 2, &[(21, 100), (22, 100)]),
        gone,
        local,
        plain,
    ])
}

/// Every kind of change at once: backends added, removed, dead, revived, reweighted,
/// moved to another bridge, a table resized, a SNAT pool changed, a service added and one
/// removed, allow lists changed, given and taken away.
fn after() -> DesiredState {
    let mut web = service("web", 1, &[(11, 100), (13, 50), (14, 100), (15, 100)]);
    web.mode = Mode::Fullnat;
    web.allow = nets(&["10.0.0.0/8", "198.51.100.0/24"]);
    web.snat = vec![IpAddr::from([10, 99, 5, 9])];
    let mut api = service("api", 2, &[(21, 100), (22, 100), (23, 100)]);
    api.table_size = 211;
    api.allow = nets(&["10.2.0.0/16"]);
    let mut new = service("new", 5, &[(51, 100)]);
    new.allow = nets(&["10.5.0.0/16"]);
    let mut local = service("local", 4, &[(41, 100), (42, 100)]);
    local.backends.get_mut(&ep(41)).unwrap().delivery = Delivery {
        bridge: 8,
        veth: None,
    };
    let plain = service("plain", 6, &[(61, 100)]);
    state(vec![web, api, new, local, plain])
}

/// 22 is down before (and revives), 21 dies.
fn health_before() -> Dead {
    Dead(vec![ep(22)])
}

fn health_after() -> Dead {
    Dead(vec![ep(21)])
}

/// Maps and reconciler that applied `before()`.
fn applied_before() -> (FakeMaps, Reconciler) {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let changes = rec.apply(&mut maps, &before(), &health_before()).unwrap();
    assert!(changes.failed.is_empty(), "{changes:?}");
    (maps, rec)
}

#[test]
fn a_failure_at_any_write_leaves_maps_and_bookkeeping_agreeing() {
    let (mut clean_maps, mut clean) = applied_before();
    let start = clean_maps.writes;
    let clean_changes = clean
        .apply(&mut clean_maps, &after(), &health_after())
        .unwrap();
    assert!(clean_changes.failed.is_empty(), "{clean_changes:?}");
    let writes = clean_maps.writes - start;
    assert!(writes > 20, "the scenario exercises many writes ({writes})");
    let expected = rings_by_endpoint(&clean, &clean_maps);

    for k in 0..writes {
        let (mut maps, mut rec) = applied_before();
        maps.fail_at = Some(maps.writes + k);
        let what = format!("failure at write {k} of {writes}");
        let outcome = rec.apply(&mut maps, &after(), &health_after());
        let failed = match &outcome {
            Ok(changes) => !changes.failed.is_empty(),
            Err(_) => true,
        };
        assert!(failed, "{what}: the failure was not reported: {outcome:?}");
        assert_consistent(&rec, &maps, &what);
        assert_allow_never_narrower(&rec, &maps, &what);

        maps.fail_at = None;
        let changes = rec.apply(&mut maps, &after(), &health_after()).unwrap();
        assert!(
            changes.failed.is_empty(),
            "{what}: retry failed: {changes:?}"
        );
        assert_consistent(&rec, &maps, &format!("{what}, retried"));
        assert_eq!(rings_by_endpoint(&rec, &maps), expected, "{what}, retried");
        assert_eq!(maps.allow.len(), 4, "{what}, retried: {:?}", maps.allow);
        let settled = rec.apply(&mut maps, &after(), &health_after()).unwrap();
        assert_eq!(settled.rings_written, 0, "{what}: not settled");
    }
}

#[test]
fn running_out_of_backend_ids_fails_only_that_service() {
    let mut maps = FakeMaps::default();
    let mut rec = Reconciler::adopt(&maps).unwrap();
    rec.backend_ids = IdPool::new(4, &[]);
    let desired = state(vec![
        service("a", 1, &[(11, 100), (12, 100)]),
        service("b", 2, &[(21, 100), (22, 100), (23, 100)]),
        service("c", 3, &[(31, 100)]),
    ]);
    let changes = rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    assert_eq!(changes.failed.keys().collect::<Vec<_>>(), ["b"]);
    assert!(changes.failed["b"].contains("need ids"), "{changes:?}");
    assert_consistent(&rec, &maps, "ids exhausted");
    // The services before and after it in order are served.
    for (name, vip_last) in [("a", 1), ("c", 3)] {
        let key = vip_key(&service(name, vip_last, &[]));
        assert!(!maps.active_ring(&key).is_empty(), "{name}");
    }
    let b = vip_key(&service("b", 2, &[]));
    assert!(!maps.vips.contains_key(&b), "b is not half published");
    let view = rec.applied();
    let b_view = view.iter().find(|v| v.name == "b").unwrap();
    assert!(b_view.problem.as_deref().unwrap().contains("need ids"));
    assert!(b_view.backends.is_empty());

    // Once ids are free again, it applies.
    let fewer = state(vec![
        service("a", 1, &[(11, 100)]),
        service("b", 2, &[(21, 100), (22, 100)]),
        service("c", 3, &[(31, 100)]),
    ]);
    let changes = rec.apply(&mut maps, &fewer, &AllAlive).unwrap();
    // a's id is quarantined during this apply: b still waits.
    assert_eq!(changes.failed.keys().collect::<Vec<_>>(), ["b"]);
    let changes = rec.apply(&mut maps, &fewer, &AllAlive).unwrap();
    assert!(changes.failed.is_empty(), "{changes:?}");
    assert!(rec.problems().is_empty());
    assert_eq!(ids_in(&maps.active_ring(&b)).len(), 2);
    assert_consistent(&rec, &maps, "ids free again");
}

#[test]
fn freed_ids_and_ring_space_wait_for_a_grace_period() {
    let (mut maps, mut rec) = applied_before();
    let graces = maps.graces;
    let gone_id = maps.vips[&vip_key(&service("gone", 3, &[]))];
    rec.apply(&mut maps, &after(), &health_after()).unwrap();
    // One at the start (slots flipped by the previous apply), one before the clean-up.
    assert_eq!(maps.graces, graces + 2);
    let new_id = maps.vips[&vip_key(&service("new", 5, &[]))];
    assert_ne!(new_id, gone_id);
    // Backend slots cleared after the last grace period are not free yet.
    assert!(!rec.backend_ids.quarantined.is_empty());
    maps.log.clear();
    rec.apply(&mut maps, &after(), &health_after()).unwrap();
    assert_eq!(maps.log, ["grace"], "only the owed grace period");
    assert!(rec.backend_ids.quarantined.is_empty());
    let apply_again = rec.apply(&mut maps, &after(), &health_after()).unwrap();
    assert!(apply_again.is_empty());
    assert_eq!(maps.log, ["grace"], "nothing owed, nothing waited for");
}

#[test]
fn a_removed_services_id_is_not_reused_in_the_same_apply() {
    let (mut maps, mut rec) = applied_before();
    // Every id in use: the only one that can come free is the removed service's.
    let used: Vec<u32> = maps.vips.values().copied().collect();
    rec.service_ids = IdPool::new(used.len() as u32, &used);
    let gone_id = maps.vips[&vip_key(&service("gone", 3, &[]))];
    let changes = rec.apply(&mut maps, &after(), &health_after()).unwrap();
    assert!(
        changes.failed["new"].contains("no free service id"),
        "{changes:?}"
    );
    assert_consistent(&rec, &maps, "service ids exhausted");
    let changes = rec.apply(&mut maps, &after(), &health_after()).unwrap();
    assert!(changes.failed.is_empty(), "{changes:?}");
    assert_eq!(maps.vips[&vip_key(&service("new", 5, &[]))], gone_id);
}

#[test]
fn a_pinned_vip_naming_another_slot_is_dropped_not_followed() {
    let (mut maps, _) = applied_before();
    let api = vip_key(&service("api", 2, &[]));
    let web_id = maps.vips[&vip_key(&service("web", 1, &[]))];
    maps.vips.insert(api, web_id);
    let mut rec = Reconciler::adopt(&maps).unwrap();
    let changes = rec.apply(&mut maps, &before(), &health_before()).unwrap();
    assert!(changes.failed.is_empty(), "{changes:?}");
    assert_consistent(&rec, &maps, "after a stale VIP");
    assert_ne!(maps.vips[&api], web_id);
}

/// Allow entries pinned for an id no service holds (an agent stopped while removing a
/// service) are adopted as stale: the id is not handed out while they last, and the next
/// apply removes them, so a new service never inherits another's ranges.
#[test]
fn pinned_allow_entries_of_no_service_are_removed_before_the_id_is_reused() {
    let mut maps = FakeMaps::default();
    let net: ipnet::IpNet = "10.9.0.0/16".parse().unwrap();
    maps.allow.insert((0, net));
    let mut rec = Reconciler::adopt(&maps).unwrap();
    assert_eq!(rec.stale_allow, vec![(0, net)]);
    let mut web = service("web", 1, &[(11, 100)]);
    web.allow = nets(&["10.1.0.0/16"]);
    let desired = state(vec![web]);
    let changes = rec.apply(&mut maps, &desired, &AllAlive).unwrap();
    assert!(changes.failed.is_empty(), "{changes:?}");
    let id = maps.vips[&vip_key(&desired.services["web"])];
    assert_ne!(id, 0, "id 0 still had stale entries when web was added");
    assert_eq!(
        maps.allow,
        BTreeSet::from([(id, nets(&["10.1.0.0/16"])[0])])
    );
    assert!(rec.stale_allow.is_empty());
    assert_consistent(&rec, &maps, "after stale allow entries");
}
