//! `xlb reload` and SIGHUP: the config is read again and applied; an invalid one changes
//! nothing.
use anyhow::{Context as _, Result};
use tracing::{error, info, warn};

use super::Agent;
use crate::{config::Config, discovery::Sources, health::State, loader};

impl Agent {
    /// Re-reads the config and queues its apply; an invalid one changes nothing. `reply`
    /// gets what the reload did once it is applied, or why it was not.
    pub(super) fn reload(
        &mut self,
        sources: &mut Sources,
        reply: impl FnOnce(Result<String, String>) + 'static,
    ) {
        let seq = match self.reload_config(sources) {
            Ok(seq) => seq,
            Err(e) => {
                let e = format!("{e:#}");
                error!("reload rejected, the running state is kept:\n{e}");
                return reply(Err(e));
            }
        };
        let path = self.config_path.clone();
        let waiter = move |result: &Result<_>| match result {
            Ok(changes) => {
                let msg = format!("reloaded {}: {changes:?}", path.display());
                info!("{msg}");
                reply(Ok(msg));
            }
            Err(e) => reply(Err(format!("{e:#}"))),
        };
        self.after(seq, Box::new(waiter));
    }

    /// Takes in the new config; the number of the apply that makes it effective.
    fn reload_config(&mut self, sources: &mut Sources) -> Result<u64> {
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
        self.apply()
    }
}
