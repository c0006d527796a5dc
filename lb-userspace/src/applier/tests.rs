use std::{
    net::IpAddr,
    sync::mpsc::{Receiver, Sender, channel},
    time::Duration,
};

use lb_common::{Backend, Service, VipAddrKey, VipKey};

use super::*;
use crate::{
    config::{HealthConfig, Mode, Protocol},
    reconcile::{AllAlive, fake::FakeMaps},
    state::{BackendSpec, Endpoint, ServiceSpec, Source},
};

/// Bounds every wait, so that a broken applier fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

/// Fake maps whose first ring write (the end of the first Maglev build) waits for the test.
struct Gated {
    maps: FakeMaps,
    entered: Sender<()>,
    release: Option<Receiver<()>>,
}

impl Maps for Gated {
    fn vips(&self) -> Result<Vec<(VipKey, u32)>> {
        self.maps.vips()
    }
    fn insert_vip(&mut self, key: &VipKey, service_id: u32) -> Result<()> {
        self.maps.insert_vip(key, service_id)
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.maps.remove_vip(key)
    }
    fn service(&self, id: u32) -> Result<Service> {
        self.maps.service(id)
    }
    fn set_service(&mut self, id: u32, service: &Service) -> Result<()> {
        self.maps.set_service(id, service)
    }
    fn vip_addrs(&self) -> Result<Vec<(VipAddrKey, u32)>> {
        self.maps.vip_addrs()
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey, flags: u32) -> Result<()> {
        self.maps.set_vip_addr(key, flags)
    }
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.maps.remove_vip_addr(key)
    }
    fn backends_in_use(&self) -> Result<Vec<(u32, Backend)>> {
        self.maps.backends_in_use()
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps.set_backend(id, backend)
    }
    fn ring(&self, offset: u32, len: u32) -> Vec<u32> {
        self.maps.ring(offset, len)
    }
    fn write_ring(&mut self, offset: u32, slots: &[u32]) -> Result<()> {
        if let Some(release) = self.release.take() {
            let _ = self.entered.send(());
            let _ = release.recv_timeout(PATIENCE);
        }
        self.maps.write_ring(offset, slots)
    }
    fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        self.maps.reset_service_counters(id)
    }
    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        self.maps.reset_backend_counters(id)
    }
    fn allow_prefixes(&self) -> Result<Vec<(u32, ipnet::IpNet)>> {
        self.maps.allow_prefixes()
    }
    fn insert_allow(&mut self, id: u32, net: &ipnet::IpNet) -> Result<()> {
        self.maps.insert_allow(id, net)
    }
    fn remove_allow(&mut self, id: u32, net: &ipnet::IpNet) -> Result<()> {
        self.maps.remove_allow(id, net)
    }
    fn grace_period(&mut self) -> Result<()> {
        self.maps.grace_period()
    }
}

/// Service `web` with backends 10.99.2.1.. (`backends` of them).
fn web(backends: u8) -> DesiredState {
    let spec = ServiceSpec {
        name: "web".into(),
        vip: IpAddr::from([10, 99, 100, 1]),
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
        backends: (1..=backends)
            .map(|last| {
                let endpoint = Endpoint {
                    addr: IpAddr::from([10, 99, 2, last]),
                    port: 8080,
                };
                let spec = BackendSpec {
                    weight: 100,
                    source: Source::Static,
                    health: Default::default(),
                    bridge: None,
                    delivery: Default::default(),
                };
                (endpoint, spec)
            })
            .collect(),
    };
    DesiredState {
        services: [(spec.name.clone(), spec)].into(),
        ..DesiredState::default()
    }
}

fn backends(outcome: &Outcome) -> usize {
    outcome
        .snapshot
        .services
        .iter()
        .map(|s| s.backends.len())
        .sum()
}

#[tokio::test]
async fn the_submitter_goes_on_while_an_apply_runs_and_queued_requests_coalesce() {
    let (entered_tx, entered) = channel();
    let (release, release_rx) = channel();
    let maps = Gated {
        maps: FakeMaps::default(),
        entered: entered_tx,
        release: Some(release_rx),
    };
    let reconciler = Reconciler::adopt(&maps).unwrap();
    let mut applier = Applier::spawn(reconciler, maps).unwrap();

    assert_eq!(applier.submit(web(1), AllAlive).unwrap(), 1);
    entered
        .recv_timeout(PATIENCE)
        .expect("the first apply reaches its ring write");
    // The first apply is stuck in its build; the loop's side still submits, and learns
    // that nothing is done yet.
    assert_eq!(applier.submit(web(2), AllAlive).unwrap(), 2);
    assert_eq!(applier.submit(web(3), AllAlive).unwrap(), 3);
    assert!(applier.busy());
    assert!(
        applier.outcomes.try_recv().is_err(),
        "no outcome while the apply is held"
    );

    release.send(()).unwrap();
    let first = tokio::time::timeout(PATIENCE, applier.outcome())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.seq, backends(&first)), (1, 1));
    first.result.unwrap();
    // Requests 2 and 3 queued during the first apply: one apply, of the newest.
    let second = tokio::time::timeout(PATIENCE, applier.outcome())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.seq, backends(&second)), (3, 3));
    assert!(!applier.busy());
    applier.stop();
    assert!(
        applier.outcomes.try_recv().is_err(),
        "request 2 was not applied on its own"
    );
}

#[tokio::test]
async fn stop_finishes_the_queued_apply() {
    let maps = FakeMaps::default();
    let reconciler = Reconciler::adopt(&maps).unwrap();
    let mut applier = Applier::spawn(reconciler, maps).unwrap();
    applier.submit(web(2), AllAlive).unwrap();
    applier.stop();
    let outcome = applier.outcome().await.unwrap();
    assert_eq!((outcome.seq, backends(&outcome)), (1, 2));
    assert!(applier.submit(web(1), AllAlive).is_err());
}
