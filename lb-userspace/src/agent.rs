//! `xlb run`: loads and attaches the data path, applies the config, health-checks backends,
//! serves the API, and reloads on SIGHUP or `xlb reload`. On SIGTERM/SIGINT it exits and
//! leaves everything pinned, so forwarding goes on until a new agent adopts it (or
//! `xlb detach` removes it). This loop is the only writer of the maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{
        mpsc::{self, error::TrySendError},
        watch,
    },
};
use tracing::{error, info, warn};

use crate::{
    announce::{self, Announcer},
    api::{self, Command},
    bridgeport::{self, HostTables, VethPort, index_name},
    config::Config,
    datapath::Datapath,
    discovery::{self, Sources, labels::LabelError},
    health::{HealthMonitor, Key, NetProber, State},
    loader,
    reconcile::Reconciler,
    state::{Delivery, DesiredState, Endpoint},
    status::Applied,
};

/// How often the host's neighbour and bridge tables are read for local backends' veths when
/// their changes cannot be watched...
const VETH_POLL: Duration = Duration::from_secs(1);
/// ...and when they are: only in case a change went unnoticed.
const VETH_POLL_WATCHED: Duration = Duration::from_secs(30);

/// How often an apply that left services behind is tried again.
const APPLY_RETRY: Duration = Duration::from_secs(2);

/// (bridge, backend address) -> its host-side veth, if found.
type Veths = BTreeMap<(String, IpAddr), Option<VethPort>>;

struct Agent {
    config_path: PathBuf,
    config: Config,
    ebpf: Ebpf,
    datapath: Datapath,
    reconciler: Reconciler,
    health: HealthMonitor,
    desired: DesiredState,
    /// Backends drained through the API; kept across reloads.
    drained: BTreeSet<Key>,
    /// Interfaces the reply program is attached to: local backends' bridges, and the
    /// host-side veths of those whose veth is known (replies then skip the bridge).
    reply_interfaces: BTreeSet<String>,
    /// Local backends' veths as last applied, to notice when the host's tables change.
    veths: Veths,
    /// Label errors already logged (each is logged once, while it lasts).
    label_errors: BTreeSet<LabelError>,
    applied: watch::Sender<Arc<Applied>>,
    attachments: Vec<loader::Attachment>,
    announcer: Option<Announcer>,
}

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let pin_path = config.agent.pin_path.clone();
    // Before anything is loaded: a second agent on this pin path changes nothing.
    let _lock = crate::lock::PinLock::acquire(&pin_path).context("not starting")?;
    let mut ebpf = loader::load(&pin_path)?;
    let datapath = loader::datapath(&mut ebpf)?;
    let reconciler = Reconciler::adopt(&datapath)?;
    let (health_tx, mut health_changes) = mpsc::unbounded_channel();
    let (applied_tx, applied_rx) = watch::channel(Arc::new(Applied::default()));
    let mut sources = Sources::default();
    sources.configure(&config);
    let mut agent = Agent {
        config_path: config_path.into(),
        desired: DesiredState::from_config(&config),
        config,
        ebpf,
        datapath,
        reconciler,
        health: HealthMonitor::new(Arc::new(NetProber), health_tx),
        drained: BTreeSet::new(),
        reply_interfaces: BTreeSet::new(),
        veths: Veths::new(),
        label_errors: BTreeSet::new(),
        applied: applied_tx,
        attachments: Vec::new(),
        announcer: None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Fail static without waiting for Docker: the pinned backends that the config does not
    // declare stay until every source has answered; the rest starts at once.
    let declared = DesiredState::from_config(&agent.config);
    sources.keep_until_ready(discovery::unclaimed(&declared, |svc| {
        agent.reconciler.pinned_backends(svc)
    }));
    agent.rebuild(&sources);
    // Backends start where the pinned data path left them; on a first start, up.
    agent.sync_health(State::Up);
    // Containers come and go, and their neighbour entries with them. Watching starts before
    // the first read of the tables, so that no change falls between the two.
    let (host_tx, mut host_changes) = mpsc::channel::<()>(1);
    let watching = bridgeport::watch(move || {
        // Full: a report is pending already, and it covers this change too.
        !matches!(host_tx.try_send(()), Err(TrySendError::Closed(_)))
    })
    .inspect_err(|e| {
        warn!("not watching links and neighbours ({e}); reading them every {VETH_POLL:?}")
    })
    .is_ok();
    // Maps first, then links: a new data path is complete before it sees a packet.
    agent.apply()?;
    agent.attachments = loader::attach(
        &mut agent.ebpf,
        &pin_path,
        &agent.config.agent.interfaces,
        agent.config.agent.xdp_mode,
    )?;
    for a in &agent.attachments {
        info!(interface = %a.interface, xdp_mode = %a.xdp_mode, adopted = a.adopted, "attached");
    }
    agent.announcer = agent.config.agent.announce_table.map(Announcer::new);
    agent.publish();

    let (tables_tx, tables_rx) = watch::channel(Vec::new());
    crate::flowtables::sweep_in_background(&pin_path, tables_tx)?;
    let (commands_tx, mut commands) = mpsc::channel(8);
    let api = api::Api {
        applied: applied_rx,
        datapath: Arc::new(Datapath::open_pinned(&pin_path)?),
        commands: commands_tx,
        probe_latency: agent.health.latency(),
        health: agent.health.reader(),
        flow_tables: tables_rx,
        discovery: sources.board(),
    };
    let _server = api::serve(&agent.config.api_listen(), api).await?;

    let mut hup = signal(SignalKind::hangup())?;
    let mut veth_poll = tokio::time::interval(if watching {
        VETH_POLL_WATCHED
    } else {
        VETH_POLL
    });
    // A service an apply could not finish is tried again, also when nothing else changes.
    let mut retry = tokio::time::interval(APPLY_RETRY);
    info!("xlb is running");
    loop {
        tokio::select! {
            _ = retry.tick(), if !agent.reconciler.problems().is_empty() => {
                if let Err(e) = agent.apply() {
                    error!("applying again: {e:#}");
                }
                agent.publish();
            }
            _ = veth_poll.tick() => agent.refresh_veths(),
            Some(()) = host_changes.recv() => agent.refresh_veths(),
            _ = hup.recv() => {
                if let Err(e) = agent.reload(&mut sources) {
                    error!("reload rejected, the running state is kept:\n{e:#}");
                }
            }
            _ = sources.changed() => {
                agent.rebuild(&sources);
                agent.sync_health(State::Pending);
                if let Err(e) = agent.apply() {
                    error!("applying discovered backends: {e:#}");
                }
                agent.publish();
            }
            Some(_) = health_changes.recv() => {
                // Several backends may change at once: one apply for all of them.
                while health_changes.try_recv().is_ok() {}
                if let Err(e) = agent.apply() {
                    error!("applying health changes: {e:#}");
                }
                agent.publish();
            }
            Some(cmd) = commands.recv() => agent.command(cmd, &mut sources),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some(announcer) = &mut agent.announcer {
        announcer.withdraw_all();
    }
    info!("stopping; programs, maps and links stay pinned (`xlb detach` removes them)");
    Ok(())
}

impl Agent {
    fn command(&mut self, cmd: Command, sources: &mut Sources) {
        match cmd {
            Command::Reload(reply) => {
                let result = self.reload(sources).map_err(|e| format!("{e:#}"));
                if let Err(e) = &result {
                    error!("reload rejected, the running state is kept:\n{e}");
                }
                let _ = reply.send(result);
            }
            Command::Drain {
                service,
                backend,
                drain,
                reply,
            } => {
                let _ = reply.send(
                    self.drain(service, backend, drain)
                        .map_err(|e| format!("{e:#}")),
                );
            }
        }
    }

    /// The desired state from the config and the sources; logs new label errors.
    fn rebuild(&mut self, sources: &Sources) {
        let (desired, errors) = sources.desired(&self.config);
        let errors: BTreeSet<LabelError> = errors.into_iter().collect();
        for e in errors.difference(&self.label_errors) {
            error!("{e}; this container is skipped");
        }
        self.label_errors = errors;
        self.desired = desired;
    }

    /// Re-reads the config; an invalid one changes nothing.
    fn reload(&mut self, sources: &mut Sources) -> Result<String> {
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
            if let Some(old) = &mut self.announcer {
                old.withdraw_all();
            }
            self.announcer = agent.announce_table.map(Announcer::new);
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

    fn drain(&mut self, service: String, backend: String, drain: bool) -> Result<String> {
        let endpoint: Endpoint = backend.parse().map_err(anyhow::Error::msg)?;
        let Some(svc) = self.desired.services.get(&service) else {
            bail!("no service `{service}`");
        };
        if !svc.backends.contains_key(&endpoint) {
            bail!("service `{service}` has no backend {endpoint}");
        }
        let key = (service, endpoint);
        let verb = if drain { "drained" } else { "undrained" };
        let changed = if drain {
            self.drained.insert(key.clone())
        } else {
            self.drained.remove(&key)
        };
        if changed {
            self.apply()?;
            self.publish();
            info!(service = %key.0, backend = %key.1, "backend {verb}");
        }
        Ok(format!("{} {} {verb}", key.0, key.1))
    }

    fn sync_health(&mut self, unknown: State) {
        let reconciler = &self.reconciler;
        let desired = &self.desired;
        self.health.sync(desired, |(svc, endpoint)| {
            match reconciler.pinned_alive(&desired.services[svc], endpoint) {
                Some(true) => State::Up,
                Some(false) => State::Down,
                None => unknown,
            }
        });
    }

    /// The desired state with drained backends at weight 0, applied with current health.
    /// Local bridges resolved to ifindexes. The reply program is attached to a bridge (and a
    /// veth) before any backend is delivered there, and detached only after none is.
    fn apply(&mut self) -> Result<crate::reconcile::Changes> {
        let veths = self.resolve_veths();
        self.apply_with(veths)
    }

    /// `apply` with local backends' veths already resolved.
    fn apply_with(&mut self, veths: Veths) -> Result<crate::reconcile::Changes> {
        let mut effective = self.desired.clone();
        let mut reply_interfaces = BTreeSet::new();
        for (name, svc) in &mut effective.services {
            for (endpoint, b) in &mut svc.backends {
                if self.drained.contains(&(name.clone(), *endpoint)) {
                    b.weight = 0;
                }
                let Some(bridge) = &b.bridge else { continue };
                b.delivery = Delivery {
                    bridge: ifindex(bridge),
                    veth: veths
                        .get(&(bridge.clone(), endpoint.addr))
                        .copied()
                        .flatten(),
                };
                if b.delivery.bridge == 0 {
                    warn!(service = %name, backend = %endpoint, %bridge, "no such bridge; the kernel routes to this backend");
                } else {
                    reply_interfaces.insert(bridge.clone());
                    let veth = b.delivery.veth.and_then(|v| index_name(v.ifindex));
                    reply_interfaces.extend(veth);
                }
            }
        }
        self.veths = veths;
        let pin_path = self.config.agent.pin_path.clone();
        let during: Vec<String> = reply_interfaces
            .union(&self.reply_interfaces)
            .cloned()
            .collect();
        if during.len() != self.reply_interfaces.len() {
            loader::attach_reply(&mut self.ebpf, &pin_path, &during)?;
        }
        let known = self.reconciler.problems().clone();
        let changes = self
            .reconciler
            .apply(&mut self.datapath, &effective, &self.health.view())?;
        if reply_interfaces != self.reply_interfaces || during.len() != reply_interfaces.len() {
            let after: Vec<String> = reply_interfaces.iter().cloned().collect();
            loader::attach_reply(&mut self.ebpf, &pin_path, &after)?;
            self.reply_interfaces = reply_interfaces;
        }
        for (service, e) in &changes.failed {
            if known.get(service) == Some(e) {
                continue;
            }
            error!(%service, "not applied, keeps its previous state (retried every {APPLY_RETRY:?}): {e}");
        }
        if !changes.is_empty() {
            info!(?changes, "applied");
        }
        Ok(changes)
    }

    /// Reads the host's tables again and applies what changed for local backends.
    fn refresh_veths(&mut self) {
        let veths = self.resolve_veths();
        if veths != self.veths {
            if let Err(e) = self.apply_with(veths) {
                error!("applying local delivery changes: {e:#}");
            }
            self.publish();
        }
    }

    /// Where each local backend's host-side veth is, as the host's tables say now.
    fn resolve_veths(&self) -> Veths {
        let local = || {
            self.desired.services.values().flat_map(|svc| {
                svc.backends
                    .iter()
                    .filter_map(|(endpoint, b)| Some((b.bridge.as_ref()?, endpoint.addr)))
            })
        };
        if local().next().is_none() {
            return Veths::new();
        }
        let tables = HostTables::read();
        local()
            .map(|(bridge, addr)| ((bridge.clone(), addr), tables.lookup(bridge, addr)))
            .collect()
    }

    /// Shares the applied state with the API, and announces the VIPs that can serve.
    fn publish(&mut self) {
        let services = self.reconciler.applied();
        if let Some(announcer) = &mut self.announcer {
            announcer.sync(&announce::serving_vips(&self.desired, &services));
        }
        self.applied.send_replace(Arc::new(Applied {
            desired: self.desired.clone(),
            services,
            attachments: self.attachments.clone(),
            drained: self.drained.clone(),
            problems: self.reconciler.problems().clone(),
        }));
    }
}

/// The interface's index; 0 if there is none of that name.
pub fn ifindex(interface: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(interface) else {
        return 0;
    };
    // SAFETY: a valid C string; if_nametoindex has no other preconditions.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}
