//! Backend sources besides the static config: Docker containers (docker.rs) and Swarm
//! tasks, both read through their labels (labels.rs). Each source publishes complete
//! snapshots; `Sources::desired` merges them with the config into the desired state.
pub mod docker;
pub mod labels;

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{Config, DockerConfig},
    state::DesiredState,
};
use labels::LabelError;

struct DockerWatch {
    config: DockerConfig,
    rx: watch::Receiver<docker::Containers>,
    task: JoinHandle<()>,
}

impl Drop for DockerWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running dynamic sources of one config.
#[derive(Default)]
pub struct Sources {
    docker: Option<DockerWatch>,
}

impl Sources {
    /// Starts, restarts or stops the watchers to match the config's `[docker]` section.
    pub fn configure(&mut self, config: &Config) {
        if self.docker.as_ref().map(|d| &d.config) == config.docker.as_ref() {
            return;
        }
        self.docker = config.docker.clone().map(|config| {
            let (tx, rx) = watch::channel(None);
            let task = tokio::spawn(docker::watch_containers(config.clone(), tx));
            DockerWatch { config, rx, task }
        });
    }

    /// True once every source has reported at least once.
    pub fn ready(&self) -> bool {
        self.docker.as_ref().is_none_or(|d| d.rx.borrow().is_some())
    }

    /// Resolves when a source has news (never, without sources).
    pub async fn changed(&mut self) {
        match &mut self.docker {
            Some(d) => {
                if d.rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The config's services with their static and discovered backends, and the label
    /// errors of the containers that were skipped.
    pub fn desired(&self, config: &Config) -> (DesiredState, Vec<LabelError>) {
        let mut desired = DesiredState::from_config(config);
        let mut errors = Vec::new();
        if let (Some(watch), Some(docker)) = (&self.docker, &config.docker)
            && let Some(containers) = watch.rx.borrow().as_ref()
        {
            errors = desired.add_containers(containers, &docker.label_prefix);
        }
        (desired, errors)
    }
}
