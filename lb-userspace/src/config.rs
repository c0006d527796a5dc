//! The TOML config (`xlb.toml`): typed sections, defaults, and validation whose errors name
//! the file, the line and the field. Nothing downstream sees an unvalidated config.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::sizes::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_SIZE};
use serde::{Deserialize, Serialize};

mod claims;
mod locate;
mod modes;
mod validate;

pub use claims::{ClaimLimits, DEFAULT_MAX_WEIGHT, unusable_backend};
pub use validate::{is_prime, parse_allow};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    pub docker: Option<DockerConfig>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `agent.control` unless the config says otherwise.
pub const DEFAULT_CONTROL: &str = "unix:/run/xlb/control.sock";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Front NICs the XDP program attaches to.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Where the read-only API listens: `IP:PORT`, or `unix:/path/to.sock`.
    pub api: String,
    /// `api` may be a non-loopback address (anyone who reaches it reads status and metrics).
    pub api_public: bool,
    /// The unix socket for drain, undrain and reload: `unix:/path` (or `/path`).
    pub control: String,
    /// A group whose members may use the control socket (mode 0660); none: root only (0600).
    pub control_group: Option<String>,
    /// A file holding a bearer token that also allows control requests on `api`.
    pub control_token_file: Option<PathBuf>,
    pub pin_path: PathBuf,
    /// Kernel routing table where each VIP with a backend up gets a /32 route, for a
    /// routing daemon (BIRD, FRR) to announce (announce.rs). None: announce nothing.
    pub announce_table: Option<u32>,
    /// Flows tracked (the established-flow table's entries; layout.rs sizes the others
    /// from it).
    pub flow_table_size: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            api: "127.0.0.1:9900".into(),
            api_public: false,
            control: DEFAULT_CONTROL.into(),
            control_group: None,
            control_token_file: None,
            pin_path: "/sys/fs/bpf/xlb".into(),
            announce_table: None,
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Per interface by its device kind (loader/automode.rs): the TC balancer on a veth
    /// when every service is nat, skb mode on a bridge, else driver mode (skb if the driver
    /// has none, with a warning).
    Auto,
    Driver,
    Skb,
    /// The balancer at TC ingress instead of XDP: faster on veth fronts, where XDP copies
    /// many skbs and defers them to NAPI.
    Tc,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    pub endpoint: String,
    pub label_prefix: String,
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub swarm_poll_interval: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            endpoint: "unix:///var/run/docker.sock".into(),
            label_prefix: "xlb".into(),
            resync_interval: Duration::from_secs(30),
            swarm_poll_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: Vips,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// fullnat: LB source addresses.
    #[serde(default)]
    pub snat: Vec<IpAddr>,
    /// dsr: encapsulation.
    pub encap: Option<Encap>,
    /// What picks a new flow's backend: the 5-tuple, or the client address (affinity).
    #[serde(default)]
    pub hash: HashMode,
    /// The LB answers echo requests (ping) to the VIP.
    #[serde(default = "yes")]
    pub icmp_echo: bool,
    /// Source ranges (CIDRs of the VIPs' families) that may reach the service; empty:
    /// everyone.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub health: HealthConfig,
    /// What container and Swarm labels may claim in this service.
    #[serde(default, skip_serializing_if = "ClaimLimits::is_default")]
    pub docker: ClaimLimits,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// The `allow` list, each range once (validated: entries that do not parse are left out).
    pub fn allow_nets(&self) -> Vec<ipnet::IpNet> {
        let nets: std::collections::BTreeSet<_> = self
            .allow
            .iter()
            .filter_map(|s| parse_allow(s).ok())
            .collect();
        nets.into_iter().collect()
    }
}

fn yes() -> bool {
    true
}

/// `vip`: one address, or one of each family (a dual-stack service: each VIP balances the
/// backends of its family). Written as a string or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vips(Vec<IpAddr>);

/// The suffix of the IPv6 half of a dual-stack service: no name a user writes has a dot, so
/// `web.v6` is never taken by another service.
pub const V6_HALF_SUFFIX: &str = ".v6";

/// The name of the IPv6 half of the dual-stack service `name`.
pub fn v6_half_name(name: &str) -> String {
    format!("{name}{V6_HALF_SUFFIX}")
}

impl Vips {
    pub fn one(addr: IpAddr) -> Self {
        Self(vec![addr])
    }

    /// A dual-stack pair: the caller gives one address of each family.
    pub fn dual(v4: IpAddr, v6: IpAddr) -> Self {
        debug_assert!(v4.is_ipv4() && v6.is_ipv6());
        Self(vec![v4, v6])
    }

    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn has_v6(&self) -> bool {
        self.0.iter().any(IpAddr::is_ipv6)
    }

    /// A VIP of the family of `addr` (the one its backends of that family serve).
    pub fn of_family(&self, addr: IpAddr) -> Option<IpAddr> {
        self.iter().find(|v| v.is_ipv4() == addr.is_ipv4())
    }
}

impl From<IpAddr> for Vips {
    fn from(addr: IpAddr) -> Self {
        Self::one(addr)
    }
}

impl Serialize for Vips {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            all => all.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Vips {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let parse = |v: &toml::Value| match v {
            toml::Value::String(text) => text
                .parse::<IpAddr>()
                .map_err(|_| D::Error::custom(format!("`{text}` is not an IP address"))),
            _ => Err(D::Error::custom("expected an IP address")),
        };
        let addrs = match toml::Value::deserialize(d)? {
            toml::Value::Array(list) => list.iter().map(parse).collect::<Result<Vec<_>, _>>()?,
            one => vec![parse(&one)?],
        };
        match addrs.as_slice() {
            [_] => {}
            [a, b] if a.is_ipv4() != b.is_ipv4() => {}
            [] => return Err(D::Error::custom("lists no address")),
            _ => {
                return Err(D::Error::custom(
                    "one or two addresses, one of each family (a dual-stack service: \
                     [\"IPv4\", \"IPv6\"]); two VIPs of one family are two services",
                ));
            }
        }
        Ok(Self(addrs))
    }
}

impl ServiceConfig {
    /// The services this one is in the data path: one per VIP, each with its name (the IPv6
    /// half of a dual-stack service is `NAME.v6`) and the backends of its family.
    pub fn halves(&self) -> impl Iterator<Item = (String, IpAddr)> + '_ {
        let dual = self.vip.len() > 1;
        self.vip.iter().map(move |vip| {
            let name = if dual && vip.is_ipv6() {
                v6_half_name(&self.name)
            } else {
                self.name.clone()
            };
            (name, vip)
        })
    }
}

fn default_table_size() -> u32 {
    DEFAULT_RING_SIZE
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Nat,
    Fullnat,
    Dsr,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Fullnat => "fullnat",
            Mode::Dsr => "dsr",
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Mode::Nat => lb_common::MODE_NAT,
            Mode::Fullnat => lb_common::MODE_FULLNAT,
            Mode::Dsr => lb_common::MODE_DSR,
        }
    }
}

/// `hash`: what the Maglev ring is indexed by for a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    /// The 5-tuple: each connection on its own.
    #[default]
    Flow,
    /// The client address (with the VIP and protocol): all of a client's flows go to one
    /// backend, on every LB node with the same config.
    Source,
}

impl HashMode {
    pub const fn name(self) -> &'static str {
        match self {
            HashMode::Flow => "flow",
            HashMode::Source => "source",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    Ipip,
    Gue,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(rename = "type")]
    pub kind: HealthKind,
    /// HTTP path.
    pub path: String,
    /// HTTP status that counts as healthy.
    pub expect_status: u16,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
    /// Port to probe, when the health endpoint is not the service port.
    pub port: Option<u16>,
    /// Interval while a backend is changing state (up with failures, or down with
    /// successes), as HAProxy's `fastinter`. Default: `interval`.
    #[serde(with = "humantime_serde")]
    pub fastinter: Option<Duration>,
    /// Interval while a backend is down, as HAProxy's `downinter`. Default: `interval`.
    #[serde(with = "humantime_serde")]
    pub downinter: Option<Duration>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::Tcp,
            path: "/".into(),
            expect_status: 200,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            port: None,
            fastinter: None,
            downinter: None,
        }
    }
}

/// Per-backend changes to the service's health check; unset fields keep the service's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthOverride {
    #[serde(rename = "type")]
    pub kind: Option<HealthKind>,
    pub path: Option<String>,
    pub expect_status: Option<u16>,
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub port: Option<u16>,
    #[serde(with = "humantime_serde")]
    pub fastinter: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub downinter: Option<Duration>,
}

impl HealthConfig {
    /// This check with a backend's overrides applied.
    pub fn with(&self, o: &HealthOverride) -> HealthConfig {
        HealthConfig {
            kind: o.kind.unwrap_or(self.kind),
            path: o.path.clone().unwrap_or_else(|| self.path.clone()),
            expect_status: o.expect_status.unwrap_or(self.expect_status),
            interval: o.interval.unwrap_or(self.interval),
            timeout: o.timeout.unwrap_or(self.timeout),
            rise: o.rise.unwrap_or(self.rise),
            fall: o.fall.unwrap_or(self.fall),
            port: o.port.or(self.port),
            fastinter: o.fastinter.or(self.fastinter),
            downinter: o.downinter.or(self.downinter),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
    Udp,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub health: HealthOverride,
    /// A bridge on this host the backend sits on (like a container's): packets are handed
    /// to it directly, never through the host's netfilter. Without it, a nat backend whose
    /// route goes out of a bridge of this host is delivered there all the same;
    /// [`BRIDGE_ROUTED`] opts out (the kernel routes).
    pub bridge: Option<String>,
}

impl Config {
    /// Every service is mode nat: `xdp_mode = "auto"` may put the TC balancer on a veth.
    pub fn nat_only(&self) -> bool {
        self.services.iter().all(|s| s.mode == Mode::Nat)
    }
}

/// `bridge = "none"`: the kernel routes to this backend, even if it is on a local bridge.
pub const BRIDGE_ROUTED: &str = "none";

fn default_weight() -> u32 {
    100
}

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ApiListen {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix socket path must be absolute"));
            }
            return Ok(ApiListen::Unix(path.into()));
        }
        s.parse()
            .map(ApiListen::Tcp)
            .map_err(|_| format!("`{s}` is neither IP:PORT nor unix:/path"))
    }
}

/// The path of a control socket, written `unix:/path` or `/path`.
pub fn parse_control(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unix:").unwrap_or(s);
    if !path.starts_with('/') {
        return Err(format!("`{s}`: must be unix:/absolute/path"));
    }
    Ok(path.into())
}

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `service[1].table_size`.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    /// Control characters from the user's text (a key or value quoted in the reason) are
    /// escaped, so every error stays on one line.
    fn new(file: &Path, line: Option<usize>, field: String, reason: String) -> Self {
        Self {
            file: file.into(),
            line,
            field: escape_controls(&field),
            reason: escape_controls(&reason),
        }
    }
}

fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every problem found in a config file (never just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                path,
                None,
                String::new(),
                format!("cannot read: {e}"),
            )])
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigErrors(vec![ConfigError::new(
                file,
                offset.map(|o| locate::line_of(text, o)),
                offset
                    .map(|o| locate::field_at(text, o))
                    .unwrap_or_default(),
                e.message().trim().to_string(),
            )])
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigErrors(
            problems
                .into_iter()
                .map(|(field, reason)| {
                    let line = locate::line_of_field(text, &field);
                    ConfigError::new(file, line, field, reason)
                })
                .collect(),
        ))
    }

    pub fn api_listen(&self) -> ApiListen {
        ApiListen::parse(&self.agent.api).expect("validated")
    }

    pub fn control_path(&self) -> PathBuf {
        parse_control(&self.agent.control).expect("validated")
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
