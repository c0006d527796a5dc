//! `xlb run`: loads and attaches the data path, applies the config, serves the API, and
//! reloads on SIGHUP or `xlb reload`. On SIGTERM/SIGINT it exits and leaves everything pinned,
//! so forwarding goes on until a new agent adopts it (or `xlb detach` removes it).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Command},
    config::Config,
    datapath::Datapath,
    loader,
    reconcile::{AllAlive, Reconciler},
    state::DesiredState,
    status::Applied,
};

struct Agent {
    config_path: PathBuf,
    config: Config,
    ebpf: Ebpf,
    datapath: Datapath,
    reconciler: Reconciler,
    applied: watch::Sender<Arc<Applied>>,
    attachments: Vec<loader::Attachment>,
}

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let pin_path = config.agent.pin_path.clone();
    let mut ebpf = loader::load(&pin_path)?;
    let mut datapath = loader::datapath(&mut ebpf)?;
    let mut reconciler = Reconciler::adopt(&datapath)?;
    // Maps first, then links: a new data path is complete before it sees a packet.
    let desired = DesiredState::from_config(&config);
    let changes = reconciler.apply(&mut datapath, &desired, &AllAlive)?;
    info!(?changes, "applied the config");
    let attachments = loader::attach(
        &mut ebpf,
        &pin_path,
        &config.agent.interfaces,
        config.agent.xdp_mode,
    )?;
    for a in &attachments {
        info!(interface = %a.interface, xdp_mode = %a.xdp_mode, adopted = a.adopted, "attached");
    }

    let (applied_tx, applied_rx) = watch::channel(Arc::new(Applied::default()));
    let (commands_tx, mut commands) = mpsc::channel(8);
    let mut agent = Agent {
        config_path: config_path.into(),
        config,
        ebpf,
        datapath,
        reconciler,
        applied: applied_tx,
        attachments,
    };
    agent.publish(desired);
    let _api = api::serve(
        &agent.config.api_listen(),
        pin_path,
        applied_rx,
        commands_tx,
    )
    .await?;

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!("xlb is running");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = agent.reload() {
                    error!("reload rejected, the running state is kept:\n{e:#}");
                }
            }
            Some(cmd) = commands.recv() => match cmd {
                Command::Reload(reply) => {
                    let result = agent.reload().map_err(|e| format!("{e:#}"));
                    if let Err(e) = &result {
                        error!("reload rejected, the running state is kept:\n{e}");
                    }
                    let _ = reply.send(result);
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping; programs, maps and links stay pinned (`xlb detach` removes them)");
    Ok(())
}

impl Agent {
    /// Re-reads the config; an invalid one changes nothing.
    fn reload(&mut self) -> Result<String> {
        let config = Config::load(&self.config_path)?;
        if config.agent.pin_path != self.config.agent.pin_path
            || config.agent.api != self.config.agent.api
        {
            warn!("agent.pin_path and agent.api changes take effect on restart only");
        }
        if config.agent.interfaces != self.config.agent.interfaces
            || config.agent.xdp_mode != self.config.agent.xdp_mode
        {
            self.attachments = loader::attach(
                &mut self.ebpf,
                &self.config.agent.pin_path,
                &config.agent.interfaces,
                config.agent.xdp_mode,
            )
            .context("attaching to the new interfaces")?;
        }
        let desired = DesiredState::from_config(&config);
        let changes = self
            .reconciler
            .apply(&mut self.datapath, &desired, &AllAlive)?;
        self.config = config;
        self.publish(desired);
        let msg = format!("reloaded {}: {changes:?}", self.config_path.display());
        info!("{msg}");
        Ok(msg)
    }

    fn publish(&self, desired: DesiredState) {
        self.applied.send_replace(Arc::new(Applied {
            desired,
            services: self.reconciler.applied(),
            attachments: self.attachments.clone(),
        }));
    }
}
