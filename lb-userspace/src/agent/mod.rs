//! `xlb run`: loads and attaches the data path, applies the config, health-checks backends,
//! serves the API, and reloads on SIGHUP or `xlb reload`. On SIGTERM/SIGINT it exits and
//! leaves everything pinned, so forwarding goes on until a new agent adopts it (or
//! `xlb detach` removes it). This loop decides every write to the maps; the applier thread
//! makes them, in the loop's order.
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
    announce::Announcer,
    api::{self, Command},
    applier::Applier,
    bridgeport,
    config::{Config, Mode},
    datapath::Datapath,
    discovery::{self, Sources, labels::LabelError},
    events::{EventLog, Kind},
    health::{HealthMonitor, HealthView, Key, NetProber, State},
    layout::Layout,
    loader,
    reconcile::{Reconciler, Snapshot},
    snatports,
    state::{DesiredState, Endpoint, ServiceSpec},
    status::Applied,
};

mod announcement;
mod apply;
mod delivery;
mod reload;

use self::apply::Waiter;

/// How often the host's neighbour and bridge tables are read for local backends' veths when
/// their changes cannot be watched...
const VETH_POLL: Duration = Duration::from_secs(1);
/// ...and when they are: only in case a change went unnoticed.
const VETH_POLL_WATCHED: Duration = Duration::from_secs(30);

/// How often an apply that left services behind is tried again.
const APPLY_RETRY: Duration = Duration::from_secs(2);

/// (a backend's `bridge` key, its address) -> the local bridge it is on and its veth;
/// absent: routed by the kernel.
type Veths = BTreeMap<(Option<String>, IpAddr), delivery::Local>;

struct Agent {
    config_path: PathBuf,
    config: Config,
    ebpf: Ebpf,
    /// Owns the reconciler and the maps; the loop submits applies and takes in outcomes.
    applier: Applier<HealthView>,
    /// The reconciler's state after the last apply.
    reconciled: Snapshot,
    /// Commands waiting for an apply: (its number, the reply).
    waiting: Vec<(u64, Waiter)>,
    health: HealthMonitor,
    desired: DesiredState,
    /// Backends drained through the API; kept across reloads.
    drained: BTreeSet<Key>,
    /// Backends (un)drained by an apply not done yet: that apply.
    drain_applies: BTreeMap<Key, u64>,
    /// Interfaces the reply program is attached to: local backends' bridges, and the
    /// host-side veths of those whose veth is known (replies then skip the bridge).
    reply_interfaces: BTreeSet<String>,
    /// Those the newest queued apply delivers to.
    reply_wanted: BTreeSet<String>,
    /// Local backends' veths as last applied, to notice when the host's tables change.
    veths: Veths,
    /// Label errors already logged (each is logged once, while it lasts).
    label_errors: BTreeSet<LabelError>,
    applied: watch::Sender<Arc<Applied>>,
    attachments: Vec<loader::Attachment>,
    announcer: Option<Announcer>,
    /// What changed, for the API (`GET /events`, the status page).
    events: EventLog,
    /// Each service's problem as last recorded in `events`.
    problems_seen: BTreeMap<String, String>,
    /// fullnat's ports on the host's address are kept from the host's own connections.
    snat_ports_reserved: bool,
}

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let pin_path = config.agent.pin_path.clone();
    crate::privilege::check().context("not starting")?;
    // Before anything is loaded: a second agent on this pin path changes nothing.
    let _lock = crate::lock::PinLock::acquire(&pin_path).context("not starting")?;
    // Also before anything is loaded: a socket path that is taken stops the agent here.
    let listeners = api::Listeners::bind(&config.agent)
        .await
        .context("not starting")?;
    let layout = Layout::for_config(&config);
    // Flow tables of another size are made anew, their flows moved (resize.rs)...
    let resize = loader::resize::prepare(&pin_path, &layout)?;
    if let Some(pinned) = Layout::of_pins(&pin_path)?
        && !pinned.short_of(&layout).is_empty()
    {
        // ...the other maps are reused as they are.
        warn!(
            short = ?pinned.short_of(&layout),
            "these pinned maps keep their sizes, smaller than the config's; `xlb detach` and \
             a start make them anew (without the flows)"
        );
    }
    let mut ebpf = loader::load_sized(&pin_path, &layout)?;
    // Before any new program is attached (the first apply moves the reply links).
    resize.copy()?;
    // Also before: the ports an earlier agent's flows left in their backends' TIME_WAIT.
    if let Err(e) = crate::snatheld::restore(&pin_path) {
        warn!("could not restore the fullnat ports the last agent held: {e:#}");
    }
    let datapath = loader::datapath(&mut ebpf)?;
    let reconciler = Reconciler::adopt(&datapath)?;
    let reconciled = reconciler.snapshot();
    // Fail static without waiting for Docker: the pinned backends that the config does not
    // declare stay until every source has answered; the rest starts at once.
    let declared = DesiredState::from_config(&config);
    let mut sources = Sources::default();
    sources.configure(&config);
    sources.keep_until_ready(discovery::unclaimed(&declared, |svc| {
        reconciler.pinned_backends(svc)
    }));
    let (health_tx, mut health_changes) = mpsc::unbounded_channel();
    let (applied_tx, applied_rx) = watch::channel(Arc::new(Applied::default()));
    let events = EventLog::default();
    let mut agent = Agent {
        config_path: config_path.into(),
        desired: DesiredState::from_config(&config),
        config,
        ebpf,
        applier: Applier::spawn(reconciler, datapath)?,
        reconciled,
        waiting: Vec::new(),
        health: HealthMonitor::new(Arc::new(NetProber), health_tx).with_events(events.clone()),
        drained: BTreeSet::new(),
        drain_applies: BTreeMap::new(),
        reply_interfaces: BTreeSet::new(),
        reply_wanted: BTreeSet::new(),
        veths: Veths::new(),
        label_errors: BTreeSet::new(),
        applied: applied_tx,
        attachments: Vec::new(),
        announcer: None,
        events: events.clone(),
        problems_seen: BTreeMap::new(),
        snat_ports_reserved: false,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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
    let first = agent.apply()?;
    agent.wait_for(first).await?;
    resize.copy()?; // what came meanwhile
    agent.attachments = loader::attach(
        &mut agent.ebpf,
        &pin_path,
        &agent.config.agent.interfaces,
        agent.config.agent.xdp_mode,
        agent.config.nat_only(),
    )?;
    for a in &agent.attachments {
        info!(interface = %a.interface, xdp_mode = %a.xdp_mode, adopted = a.adopted, "attached");
    }
    // The old programs are gone from every link: what they added meanwhile moves too.
    resize.finish()?;
    agent.announcer = agent.config.agent.announce_table.map(Announcer::new);
    agent.publish();

    // A trace a crashed agent left on stops here.
    crate::trace::reset(&pin_path)?;
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
        events,
        pin_path: pin_path.clone(),
    };
    let _servers = listeners.serve(api);

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
            outcome = agent.applier.outcome() => {
                let Some(outcome) = outcome else { bail!("the applier thread is gone") };
                let _ = agent.finish(outcome);
            }
            // Not while an apply is queued: it tries again already.
            _ = retry.tick(), if !agent.reconciled.problems.is_empty() && !agent.applier.busy() => {
                if let Err(e) = agent.apply() {
                    error!("applying again: {e:#}");
                }
            }
            _ = veth_poll.tick() => agent.refresh_veths(),
            Some(()) = host_changes.recv() => agent.refresh_veths(),
            _ = hup.recv() => {
                if let Err(e) = agent.reload(&mut sources).await {
                    error!("{e}");
                }
            }
            _ = sources.changed() => {
                agent.rebuild(&sources);
                agent.sync_health(State::Pending);
                if let Err(e) = agent.apply() {
                    error!("applying discovered backends: {e:#}");
                }
            }
            Some(_) = health_changes.recv() => {
                // Several backends may change at once: one apply for all of them.
                while health_changes.try_recv().is_ok() {}
                if let Err(e) = agent.apply() {
                    error!("applying health changes: {e:#}");
                }
            }
            Some(cmd) = commands.recv() => agent.command(cmd, &mut sources).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // An apply under way finishes: the maps are left as it leaves them.
    agent.applier.stop();
    agent.withdraw_all();
    info!("stopping; programs, maps and links stay pinned (`xlb detach` removes them)");
    Ok(())
}

impl Agent {
    async fn command(&mut self, cmd: Command, sources: &mut Sources) {
        match cmd {
            Command::Reload(reply) => {
                let result = self.reload(sources).await.map_err(|e| e.to_string());
                if let Err(e) = &result {
                    error!("{e}");
                }
                let _ = reply.send(result);
            }
            Command::Drain {
                service,
                backend,
                drain,
                reply,
            } => self.drain(service, backend, drain, reply),
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
        // Each conflict is logged once, while it lasts (status shows it throughout).
        for c in &desired.conflicts {
            if !self.desired.conflicts.contains(c) {
                error!("{c}");
            }
        }
        self.record_joins(&desired);
        self.desired = desired;
        self.reserve_snat_ports();
    }

    /// Once a fullnat service takes ports on the host's own address (before its first flow).
    fn reserve_snat_ports(&mut self) {
        let shared = |s: &ServiceSpec| s.mode == Mode::Fullnat && s.snat.is_empty();
        if self.snat_ports_reserved || !self.desired.services.values().any(shared) {
            return;
        }
        self.snat_ports_reserved = true;
        let span = crate::reconcile::SNAT_PORTS_SHARED;
        match snatports::reserve(span) {
            Ok(Some(((low, high), list))) => warn!(
                "the host's ephemeral ports ({low}-{high}) reach into fullnat's ({}-{}) on its \
                 own address: net.ipv4.ip_local_reserved_ports = {list}, so that its own \
                 connections never take a flow's port",
                span.0, span.1
            ),
            Ok(None) => {}
            Err(e) => warn!(
                "could not keep fullnat's ports ({}-{}) from the host's own connections: {e:#}",
                span.0, span.1
            ),
        }
    }

    /// Records the containers and Swarm tasks that joined or left a service.
    fn record_joins(&self, new: &DesiredState) {
        for m in crate::events::membership(&self.desired, new) {
            info!(service = %m.service, backend = %m.backend, "{}", m.message);
            self.events
                .record(m.kind, Some(&m.service), Some(&m.backend), m.message);
        }
    }

    /// Drains or undrains a backend; `reply` gets the answer once that is applied.
    fn drain(&mut self, service: String, backend: String, drain: bool, reply: api::Reply) {
        let verb = if drain { "drained" } else { "undrained" };
        let ((service, endpoint), seq) = match self.set_drained(service, backend, drain) {
            Ok((key, Some(seq))) => (key, seq),
            Ok((key, None)) => {
                let _ = reply.send(Ok(format!("{} {} {verb}", key.0, key.1)));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(format!("{e:#}")));
                return;
            }
        };
        let events = self.events.clone();
        let waiter = move |result: &Result<_>| {
            let _ = reply.send(match result {
                Ok(_) => {
                    info!(%service, backend = %endpoint, "backend {verb}");
                    let kind = if drain { Kind::Drain } else { Kind::Undrain };
                    let backend = endpoint.to_string();
                    let message = format!("backend {verb} through the control API");
                    events.record(kind, Some(&service), Some(&backend), message);
                    Ok(format!("{service} {endpoint} {verb}"))
                }
                Err(e) => Err(format!("{e:#}")),
            });
        };
        self.after(seq, Box::new(waiter));
    }

    /// Marks the backend (un)drained; the number of the apply that makes it so, unless that
    /// is done already.
    fn set_drained(
        &mut self,
        service: String,
        backend: String,
        drain: bool,
    ) -> Result<(Key, Option<u64>)> {
        let endpoint: Endpoint = backend.parse().map_err(anyhow::Error::msg)?;
        if self.desired.halves_of(&service).is_empty() {
            bail!("no service `{service}`");
        }
        // `web` also names the IPv6 half (`web.v6`) of a dual-stack service.
        let Some(svc) = self
            .desired
            .half_for(&service, endpoint.addr)
            .filter(|s| s.backends.contains_key(&endpoint))
        else {
            bail!("service `{service}` has no backend {endpoint}");
        };
        let key = (svc.name.clone(), endpoint);
        let changed = if drain {
            self.drained.insert(key.clone())
        } else {
            self.drained.remove(&key)
        };
        if changed {
            let seq = self.apply()?;
            self.drain_applies.insert(key.clone(), seq);
            return Ok((key, Some(seq)));
        }
        let pending = self.drain_applies.get(&key).copied();
        Ok((key, pending))
    }

    fn sync_health(&mut self, unknown: State) {
        let reconciled = &self.reconciled;
        let desired = &self.desired;
        self.health.sync(desired, |(svc, endpoint)| {
            match reconciled.pinned_alive(&desired.services[svc], endpoint) {
                Some(true) => State::Up,
                Some(false) => State::Down,
                None => unknown,
            }
        });
    }

    /// Shares the applied state with the API, and announces the VIPs that can serve.
    fn publish(&mut self) {
        let services = self.reconciled.services.clone();
        self.announce(&services);
        self.record_problems();
        self.applied.send_replace(Arc::new(Applied {
            desired: self.desired.clone(),
            services,
            attachments: self.attachments.clone(),
            drained: self.drained.clone(),
            problems: self.reconciled.problems.clone(),
        }));
    }
}

impl Agent {
    /// Records each service that got a problem (not applied, or no backend can take new
    /// flows), or lost it.
    fn record_problems(&mut self) {
        let mut now = BTreeMap::new();
        for name in self.desired.services.keys() {
            let view = self.reconciled.services.iter().find(|v| &v.name == name);
            let problem = match (self.reconciled.problems.get(name), view) {
                (Some(e), _) => Some(format!("not applied: {e}")),
                (None, Some(v)) if v.table_size == 0 => {
                    let down = v.backends.values().filter(|b| !b.alive).count();
                    Some(format!(
                        "no backend can take new flows ({} backends, {down} down)",
                        v.backends.len()
                    ))
                }
                _ => None,
            };
            if let Some(problem) = problem {
                now.insert(name.clone(), problem);
            }
        }
        for (name, problem) in &now {
            if self.problems_seen.get(name) != Some(problem) {
                self.events
                    .record(Kind::ServiceProblem, Some(name), None, problem.clone());
            }
        }
        for (name, was) in &self.problems_seen {
            if !now.contains_key(name) && self.desired.services.contains_key(name) {
                let message = format!("no problem any more (was: {was})");
                self.events
                    .record(Kind::ServiceOk, Some(name), None, message);
            }
        }
        self.problems_seen = now;
    }
}
