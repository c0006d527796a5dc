//! Backend sources besides the static config: Docker containers (docker.rs) and Swarm
//! tasks, both read through their labels (labels.rs). Each source publishes complete
//! snapshots; `Sources::desired` merges them with the config into the desired state.
pub mod docker;
pub mod labels;
pub mod swarm;

use std::future::Future;

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{Config, DockerConfig},
    state::DesiredState,
};
use labels::LabelError;

/// A watcher task and the snapshots it publishes.
struct Watch<T> {
    rx: watch::Receiver<Option<T>>,
    task: JoinHandle<()>,
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T> Watch<T> {
    fn start<F>(run: impl FnOnce(watch::Sender<Option<T>>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        Self {
            rx,
            task: tokio::spawn(run(tx)),
        }
    }

    async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The Docker sources of one `[docker]` section: local containers and Swarm tasks.
struct DockerSources {
    config: DockerConfig,
    containers: Watch<Vec<labels::ContainerInfo>>,
    swarm: Watch<Vec<swarm::SwarmTask>>,
}

/// The running dynamic sources of one config.
#[derive(Default)]
pub struct Sources {
    docker: Option<DockerSources>,
}

impl Sources {
    /// Starts, restarts or stops the watchers to match the config's `[docker]` section.
    pub fn configure(&mut self, config: &Config) {
        if self.docker.as_ref().map(|d| &d.config) == config.docker.as_ref() {
            return;
        }
        self.docker = config.docker.clone().map(|config| DockerSources {
            containers: Watch::start(|tx| docker::watch_containers(config.clone(), tx)),
            swarm: Watch::start(|tx| swarm::watch_swarm(config.clone(), tx)),
            config,
        });
    }

    /// True once every source has reported at least once.
    pub fn ready(&self) -> bool {
        self.docker
            .as_ref()
            .is_none_or(|d| d.containers.rx.borrow().is_some() && d.swarm.rx.borrow().is_some())
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
    }

    /// The config's services with their static and discovered backends, and the label
    /// errors of what was skipped.
    pub fn desired(&self, config: &Config) -> (DesiredState, Vec<LabelError>) {
        let mut desired = DesiredState::from_config(config);
        let mut errors = Vec::new();
        if let Some(d) = &self.docker {
            let prefix = &d.config.label_prefix;
            if let Some(containers) = d.containers.rx.borrow().as_ref() {
                errors.extend(desired.add_containers(containers, prefix));
            }
            if let Some(tasks) = d.swarm.rx.borrow().as_ref() {
                errors.extend(desired.add_tasks(tasks, prefix));
            }
        }
        (desired, errors)
    }
}
