//! `xlb reload` and SIGHUP: the config is read again and applied; an invalid one changes
//! nothing.
use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::Agent;
use crate::{config::Config, discovery::Sources, health::State, loader};

impl Agent {
    /// Re-reads the config; an invalid one changes nothing.
    pub(super) fn reload(&mut self, sources: &mut Sources) -> Result<String> {
        let config = Config::load(&self.config_path)?;
        let agent = &config.agent;
        if agent.pin_path != self.config.agent.pin_path || agent.api != self.config.agent.api {
            warn!("agent.pin_path and agent.api changes take effect on restart only");
        }
        if agent.interfaces != self.config.agent.interfaces
            || agent.xdp_mode != self.config.agent.xdp_mode
        {
            self.attachments = loader::attach(
                &mut self.ebpf,
                &self.config.agent.pin_path,
                &agent.interfaces,
                agent.xdp_mode,
            )
            .context("attaching to the new interfaces")?;
        }
        if agent.announce_table != self.config.agent.announce_table {
            self.set_announce_table(agent.announce_table);
        }
        self.config = config;
        sources.configure(&self.config);
        self.rebuild(sources);
        self.drained.retain(|(svc, ep)| {
            self.desired
                .services
                .get(svc)
                .is_some_and(|s| s.backends.contains_key(ep))
        });
        // A backend new to this agent takes traffic after its first good probe.
        self.sync_health(State::Pending);
        let changes = self.apply()?;
        self.publish();
        let msg = format!("reloaded {}: {changes:?}", self.config_path.display());
        info!("{msg}");
        Ok(msg)
    }
}
