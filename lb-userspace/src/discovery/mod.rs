//! Backend sources besides the static config: Docker containers (docker.rs) and Swarm
//! tasks, both read through their labels (labels.rs) and made backends (endpoints.rs).
//! Each source publishes complete snapshots from a supervised watcher (supervise.rs);
//! `Sources::desired` merges them with the config into the desired state.
pub mod claims;
pub mod docker;
pub mod endpoints;
pub mod labels;
pub mod supervise;
pub mod swarm;

use std::collections::BTreeMap;

use crate::{
    bridgeport::index_name,
    config::{Config, DockerConfig},
    state::{BackendSpec, Delivery, DesiredState, Endpoint, ServiceSpec, Source},
};
use labels::LabelError;
use supervise::{Backoff, Board, Watch};

/// The weight of a kept pinned backend (its real one is the source's to say).
const KEPT_WEIGHT: u32 = 100;

/// The Docker sources of one `[docker]` section: local containers and Swarm tasks.
struct DockerSources {
    config: DockerConfig,
    containers: Watch<Vec<labels::ContainerInfo>>,
    swarm: Watch<Vec<swarm::SwarmTask>>,
}

/// Per service, backends a source may know but has not said yet.
pub type Unclaimed = BTreeMap<String, BTreeMap<Endpoint, BackendSpec>>;

/// The running dynamic sources of one config.
#[derive(Default)]
pub struct Sources {
    docker: Option<DockerSources>,
    board: Board,
    /// Kept until every source has answered once (see [`Sources::keep_until_ready`]).
    unclaimed: Unclaimed,
}

impl Sources {
    /// Starts, restarts or stops the watchers to match the config's `[docker]` section.
    pub fn configure(&mut self, config: &Config) {
        if self.docker.as_ref().map(|d| &d.config) == config.docker.as_ref() {
            return;
        }
        // What the old sources would have said is no guide to the new ones.
        self.unclaimed.clear();
        self.docker = None;
        self.board.remove("docker");
        self.board.remove("swarm");
        self.docker = config.docker.clone().map(|config| {
            let (c, s) = (config.clone(), config.clone());
            DockerSources {
                containers: Watch::start(
                    self.board.register("docker"),
                    Backoff::default(),
                    move |tx, report| docker::watch_containers(c.clone(), tx, report),
                ),
                swarm: Watch::start(
                    self.board.register("swarm"),
                    Backoff::default(),
                    move |tx, report| swarm::watch_swarm(s.clone(), tx, report),
                ),
                config,
            }
        });
    }

    /// Each source's state, for status and metrics.
    pub fn board(&self) -> Board {
        self.board.clone()
    }

    /// True once every source has reported at least once.
    pub fn ready(&self) -> bool {
        self.docker
            .as_ref()
            .is_none_or(|d| d.containers.rx.borrow().is_some() && d.swarm.rx.borrow().is_some())
    }

    /// Fail static after a restart: `unclaimed` (the pinned data path's backends that the
    /// config does not declare) stay in the desired state until every source has answered,
    /// so that backends only Docker knows are not dropped while it is away. Nothing waits
    /// for Docker meanwhile.
    pub fn keep_until_ready(&mut self, unclaimed: Unclaimed) {
        self.unclaimed = if self.ready() {
            Unclaimed::new()
        } else {
            unclaimed
        };
    }

    /// Resolves when a source has news (never, without sources).
    pub async fn changed(&mut self) {
        match &mut self.docker {
            Some(d) => tokio::select! {
                _ = d.containers.changed() => {}
                _ = d.swarm.changed() => {}
            },
            None => std::future::pending().await,
        }
        if self.ready() {
            self.unclaimed.clear();
        }
    }

    /// The config's services with their static and discovered backends, and the label
    /// errors of what was skipped.
    pub fn desired(&self, config: &Config) -> (DesiredState, Vec<LabelError>) {
        let mut desired = DesiredState::from_config(config);
        let mut errors = Vec::new();
        if let Some(d) = &self.docker {
            let prefix = &d.config.label_prefix;
            if let Some(containers) = d.containers.rx.borrow().as_ref() {
                errors.extend(endpoints::add_containers(
                    &mut desired,
                    config,
                    containers,
                    prefix,
                ));
            }
            if let Some(tasks) = d.swarm.rx.borrow().as_ref() {
                errors.extend(endpoints::add_tasks(&mut desired, config, tasks, prefix));
            }
        }
        if !self.ready() {
            for (name, backends) in &self.unclaimed {
                let Some(svc) = desired.services.get_mut(name) else {
                    continue;
                };
                for (endpoint, backend) in backends {
                    svc.backends
                        .entry(*endpoint)
                        .or_insert_with(|| backend.clone());
                }
            }
        }
        (desired, errors)
    }
}

/// The backends a pinned data path has (`pinned(service)`: endpoint and delivery) that
/// `declared` (the config's services) does not: kept, at their bridge, until the sources
/// answer. Weights are not pinned: they get [`KEPT_WEIGHT`].
pub fn unclaimed(
    declared: &DesiredState,
    pinned: impl Fn(&ServiceSpec) -> Vec<(Endpoint, Delivery)>,
) -> Unclaimed {
    let mut out = Unclaimed::new();
    for (name, svc) in &declared.services {
        let kept: BTreeMap<Endpoint, BackendSpec> = pinned(svc)
            .into_iter()
            .filter(|(endpoint, _)| !svc.backends.contains_key(endpoint))
            .map(|(endpoint, delivery)| {
                let bridge = (delivery.bridge != 0)
                    .then(|| index_name(delivery.bridge))
                    .flatten();
                let spec = BackendSpec {
                    weight: KEPT_WEIGHT,
                    source: Source::Pinned,
                    health: Default::default(),
                    bridge,
                    delivery: Delivery::default(),
                };
                (endpoint, spec)
            })
            .collect();
        if !kept.is_empty() {
            out.insert(name.clone(), kept);
        }
    }
    out
}

#[cfg(test)]
mod tests;
