//! Property tests of the config parser (issue 6, "Fuzzing"): no text makes `Config::parse`
//! panic (arbitrary text, TOML-shaped token soup, mutations of examples/xlb.toml); every
//! error is one line of the form `FILE[:LINE]: FIELD: REASON` (`FILE[:LINE]: REASON` when no
//! field is known) whose line lies within the text; and a valid config written back as TOML
//! parses to an equal config. This covers what a cargo-fuzz target of the parser would, and
//! runs (and shrinks) in `cargo test`.
use std::{collections::HashSet, net::Ipv4Addr};

use proptest::{collection::vec, option, prelude::*, sample::select};

use super::*;

const FILE: &str = "fuzz.toml";
const EXAMPLE: &str = include_str!("../../../examples/xlb.toml");

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new(FILE), text)
}

/// A field path: dotted segments (`service[1].backend[0].weight`), none empty, where a key
/// may be quoted as in TOML. One line, and no `: ` outside quotes: nothing that makes
/// `FILE:LINE: FIELD: REASON` ambiguous.
fn field_is_a_path(field: &str) -> bool {
    let mut quote = None;
    let mut segment = 0;
    let mut colon = false;
    for c in field.chars() {
        match (quote, c) {
            (_, '\n') => return false,
            (None, ' ') if colon => return false,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '.') if segment == 0 => return false,
            (None, '.') => {
                segment = 0;
                colon = false;
                continue;
            }
            (None, _) => {}
        }
        colon = quote.is_none() && c == ':';
        segment += 1;
    }
    quote.is_none() && segment > 0
}

/// Every error is located in `text` and printed as documented, one line each.
fn check_errors(text: &str, errors: &ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!errors.0.is_empty(), "an Err without errors");
    let lines = text.matches('\n').count() + 1;
    for e in &errors.0 {
        let shown = e.to_string();
        prop_assert_eq!(&e.file, Path::new(FILE), "{}", shown);
        if let Some(line) = e.line {
            prop_assert!(
                (1..=lines).contains(&line),
                "line {} of a {}-line text: {}",
                line,
                lines,
                shown
            );
        }
        prop_assert!(!e.reason.trim().is_empty(), "no reason: {}", shown);
        prop_assert!(
            !e.reason.contains('\n'),
            "a reason over several lines: {:?}",
            shown
        );
        prop_assert!(
            e.field.is_empty() || field_is_a_path(&e.field),
            "field {:?} is not a field path: {:?}",
            e.field,
            shown
        );
        let line = e.line.map(|l| format!(":{l}")).unwrap_or_default();
        let field = if e.field.is_empty() {
            String::new()
        } else {
            format!(" {}:", e.field)
        };
        prop_assert_eq!(&shown, &format!("{FILE}{line}:{field} {}", e.reason));
    }
    prop_assert_eq!(errors.to_string().lines().count(), errors.0.len());
    Ok(())
}

/// What every parse must satisfy: errors as documented, and a config that parses writes
/// back as TOML that parses to the same config.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    match parse(text) {
        Err(errors) => check_errors(text, &errors),
        Ok(config) => round_trip(&config),
    }
}

fn round_trip(config: &Config) -> Result<(), TestCaseError> {
    let text = toml::to_string(config)
        .map_err(|e| TestCaseError::fail(format!("serializing {config:?}: {e}")))?;
    match parse(&text) {
        Ok(back) => prop_assert_eq!(&back, config, "written as:\n{}", text),
        Err(e) => prop_assert!(false, "written as:\n{}\nit does not parse:\n{}", text, e),
    }
    Ok(())
}

const HEADERS: &[&str] = &[
    "[agent]",
    "[docker]",
    "[[service]]",
    "[service.health]",
    "[[service.backend]]",
    "[service.backend.health]",
    "[service]",
    "[[agent]]",
    "[service.backend]",
    "[unknown]",
];

const KEYS: &[&str] = &[
    "interfaces",
    "xdp_mode",
    "api",
    "api_public",
    "control",
    "control_group",
    "control_token_file",
    "pin_path",
    "endpoint",
    "label_prefix",
    "resync_interval",
    "swarm_poll_interval",
    "name",
    "vip",
    "port",
    "protocol",
    "mode",
    "table_size",
    "snat",
    "encap",
    "health",
    "type",
    "path",
    "expect_status",
    "interval",
    "timeout",
    "rise",
    "fall",
    "fastinter",
    "downinter",
    "address",
    "weight",
    "backend",
    "service",
    "agent.api",
    "health.rise",
    "\"quoted key\"",
    "\"new\\nline\"",
    "'odd: key'",
    "tabel_size",
];

const VALUES: &[&str] = &[
    "\"eth0\"",
    "[\"eth0\"]",
    "[\"eth0\", \"eth1\"]",
    "[]",
    "[\"\"]",
    "[\"a/b\"]",
    "[\"waytoolonginterfacename\"]",
    "\"10.99.100.1\"",
    "\"10.99.2.11\"",
    "\"::1\"",
    "\"fd00::1\"",
    "\"not an address\"",
    "\"1s\"",
    "\"0s\"",
    "\"1ms\"",
    "\"500ms\"",
    "\"forever\"",
    "\"tcp\"",
    "\"udp\"",
    "\"sctp\"",
    "\"http\"",
    "\"none\"",
    "\"nat\"",
    "\"dsr\"",
    "\"fullnat\"",
    "\"ipip\"",
    "\"auto\"",
    "\"/\"",
    "\"healthz\"",
    "\"/sys/fs/bpf/xlb\"",
    "\"relative\"",
    "\"unix:/run/x.sock\"",
    "\"unix:run.sock\"",
    "\"127.0.0.1:9900\"",
    "\"[::1]:9900\"",
    "\"web\"",
    "\"Web!\"",
    "\"\"",
    "0",
    "1",
    "2",
    "80",
    "599",
    "600",
    "65535",
    "65536",
    "65537",
    "65539",
    "-1",
    "4294967296",
    "1.5",
    "nan",
    "true",
    "1979-05-27T07:32:00Z",
    "{}",
    "{ type = \"tcp\" }",
    "\"\\u00e9\"",
    "\"\\n\"",
    "\"\"\"multi\nline\"\"\"",
];

const TOKENS: &[&str] = &[
    "=", " ", "\n", "\"", "'", "[", "]", "[[", "]]", "{", "}", ",", ".", "#", "\\", "\r\n", "\t",
    "é", "\u{0}",
];

/// A line a config could have, or almost.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        select(HEADERS).prop_map(String::from),
        (select(KEYS), select(VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
        vec(
            prop_oneof![select(TOKENS), select(KEYS), select(VALUES)],
            0..6
        )
        .prop_map(|t| t.concat()),
    ]
}

/// Lines of key/value pairs and headers, often after a valid start.
fn soup() -> impl Strategy<Value = String> {
    let start = select(
        &[
            "",
            "[agent]\ninterfaces = [\"eth0\"]\n",
            "[agent]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"10.99.100.1\"\n\
         port = 80\n",
        ][..],
    );
    (start, vec(line(), 0..30)).prop_map(|(start, lines)| format!("{start}{}", lines.join("\n")))
}

#[derive(Debug, Clone)]
enum Edit {
    /// Removes characters from a position.
    Delete(usize, usize),
    Insert(usize, String),
    ReplaceLine(usize, String),
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let fragment = prop_oneof![
        select(TOKENS).prop_map(String::from),
        select(VALUES).prop_map(String::from),
        line(),
        "\\PC{0,8}",
    ];
    prop_oneof![
        (any::<usize>(), 1..20usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), fragment).prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), line()).prop_map(|(at, s)| Edit::ReplaceLine(at, s)),
        any::<usize>().prop_map(Edit::DeleteLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_string();
    for edit in edits {
        let chars: Vec<char> = text.chars().collect();
        let mut lines: Vec<String> = text.split('\n').map(String::from).collect();
        let n = lines.len();
        match edit {
            Edit::Delete(at, len) => {
                let at = at % (chars.len() + 1);
                let end = (at + len).min(chars.len());
                text = chars[..at].iter().chain(&chars[end..]).collect();
                continue;
            }
            Edit::Insert(at, s) => {
                let at = at % (chars.len() + 1);
                text = chars[..at]
                    .iter()
                    .chain(&s.chars().collect::<Vec<_>>())
                    .chain(&chars[at..])
                    .collect();
                continue;
            }
            Edit::ReplaceLine(at, s) => lines[at % n] = s.clone(),
            Edit::DeleteLine(at) => {
                lines.remove(at % n);
            }
            Edit::DuplicateLine(at) => {
                let copy = lines[at % n].clone();
                lines.insert(at % n, copy);
            }
            Edit::SwapLines(a, b) => lines.swap(a % n, b % n),
        }
        text = lines.join("\n");
    }
    text
}

// Valid configs, for the round trip.

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (10u64..100_000).prop_map(Duration::from_millis),
        (1u64..100_000).prop_map(Duration::from_secs),
        (10_000_000u64..100_000_000_000).prop_map(Duration::from_nanos),
    ]
}

/// Any characters but '/', ' ' and ':', at most 15 bytes: escaping gets exercised.
fn interface() -> impl Strategy<Value = String> {
    "[^/ :]{1,15}".prop_filter("at most 15 bytes", |s| s.len() <= 15)
}

fn agent() -> impl Strategy<Value = AgentConfig> {
    // (api, whether it binds beyond loopback).
    let api = prop_oneof![
        (any::<IpAddr>(), any::<u16>())
            .prop_map(|(ip, port)| (SocketAddr::new(ip, port).to_string(), !ip.is_loopback())),
        "/[^\n]{0,20}".prop_map(|p| (format!("unix:{p}"), false)),
    ];
    let control = (
        "/[^\n]{0,20}",
        any::<bool>(),
        option::of("[a-z_][a-z0-9_-]{0,15}"),
        option::of("/[a-z0-9/._-]{0,20}"),
    );
    (
        vec(interface(), 1..4),
        select(&[XdpMode::Auto, XdpMode::Driver, XdpMode::Skb][..]),
        (api, any::<bool>()),
        "/[a-z0-9/._-]{0,20}",
        option::of(1u32..253),
        control,
    )
        .prop_map(
            |(interfaces, xdp_mode, ((api, public), asked), pin, announce_table, control)| {
                let (control, prefixed, control_group, token) = control;
                AgentConfig {
                    interfaces,
                    xdp_mode,
                    api,
                    api_public: public || asked,
                    control: if prefixed {
                        format!("unix:{control}")
                    } else {
                        control
                    },
                    control_group,
                    control_token_file: token.map(PathBuf::from),
                    pin_path: PathBuf::from(pin),
                    announce_table,
                    ..AgentConfig::default()
                }
            },
        )
}

fn docker() -> impl Strategy<Value = DockerConfig> {
    (".{0,30}", ".{0,10}", duration(), duration()).prop_map(
        |(endpoint, label_prefix, resync_interval, swarm_poll_interval)| DockerConfig {
            endpoint,
            label_prefix,
            resync_interval,
            swarm_poll_interval,
        },
    )
}

const KINDS: &[HealthKind] = &[
    HealthKind::Tcp,
    HealthKind::Http,
    HealthKind::Udp,
    HealthKind::None,
];

fn health() -> impl Strategy<Value = HealthConfig> {
    (
        select(KINDS),
        "/.{0,20}",
        100u16..=599,
        duration(),
        duration(),
        1u32..10,
        1u32..10,
        option::of(1u16..),
        option::of(duration()),
        option::of(duration()),
    )
        .prop_map(
            |(kind, path, expect_status, interval, timeout, rise, fall, port, fast, down)| {
                HealthConfig {
                    kind,
                    path,
                    expect_status,
                    interval,
                    timeout,
                    rise,
                    fall,
                    port,
                    fastinter: fast,
                    downinter: down,
                }
            },
        )
}

fn health_override() -> impl Strategy<Value = HealthOverride> {
    (
        option::of(select(KINDS)),
        option::of("/.{0,10}"),
        option::of(100u16..=599),
        option::of(duration()),
        option::of(duration()),
        option::of(1u32..10),
        option::of(1u32..10),
        option::of(1u16..),
        option::of(duration()),
        option::of(duration()),
    )
        .prop_map(
            |(kind, path, expect_status, interval, timeout, rise, fall, port, fast, down)| {
                HealthOverride {
                    kind,
                    path,
                    expect_status,
                    interval,
                    timeout,
                    rise,
                    fall,
                    port,
                    fastinter: fast,
                    downinter: down,
                }
            },
        )
}

fn backend() -> impl Strategy<Value = BackendConfig> {
    (
        any::<Ipv4Addr>(),
        1u16..,
        0u32..=65535,
        prop_oneof![Just(HealthOverride::default()), health_override()],
        option::of(interface()),
    )
        .prop_map(|(address, port, weight, health, bridge)| BackendConfig {
            address: address.into(),
            port,
            weight,
            health,
            bridge,
        })
}

fn service() -> impl Strategy<Value = ServiceConfig> {
    (
        "[a-z0-9_-]{1,63}",
        (any::<Ipv4Addr>(), option::of(any::<u64>())),
        1u16..,
        select(&[Protocol::Tcp, Protocol::Udp][..]),
        select(&[3u32, 5, 7, 251, 4099, 65521, 65537, 1_048_573, 2_097_143][..]),
        (
            select(&[Mode::Nat, Mode::Fullnat, Mode::Dsr][..]),
            vec(any::<Ipv4Addr>(), 0..3),
            option::of(select(&[Encap::Ipip, Encap::Gue][..])),
        ),
        health(),
        vec(backend(), 0..5).prop_filter("backends listed once", |b| {
            let mut seen = HashSet::new();
            b.iter().all(|b| seen.insert((b.address, b.port)))
        }),
    )
        .prop_map(
            |(
                name,
                (vip, v6),
                port,
                protocol,
                table_size,
                (mode, snat, encap),
                health,
                mut backends,
            )| {
                // A dual-stack VIP where the v6 half can serve (mode nat).
                let vip = match v6.filter(|_| mode == Mode::Nat) {
                    Some(low) => {
                        let v6 = std::net::Ipv6Addr::from(0xfd99_u128 << 112 | low as u128);
                        Vips::dual(vip.into(), v6.into())
                    }
                    None => Vips::one(vip.into()),
                };
                // Only what the mode uses, as validation demands.
                let snat = match mode {
                    Mode::Fullnat => snat
                        .into_iter()
                        .filter(|a| {
                            !(a.is_unspecified()
                                || a.is_broadcast()
                                || a.is_multicast()
                                || a.is_loopback())
                        })
                        .map(IpAddr::from)
                        .collect(),
                    _ => Vec::new(),
                };
                let encap = encap.filter(|_| mode == Mode::Dsr);
                if mode == Mode::Dsr {
                    let mut seen = HashSet::new();
                    backends.retain(|b| seen.insert(b.address));
                    for b in &mut backends {
                        b.port = port;
                        b.bridge = None;
                    }
                }
                ServiceConfig {
                    name,
                    vip,
                    port,
                    protocol,
                    mode,
                    table_size,
                    snat,
                    encap,
                    hash: Default::default(),
                    icmp_echo: true,
                    allow: Vec::new(),
                    health,
                    docker: ClaimLimits::default(),
                    backends,
                }
            },
        )
}

fn config() -> impl Strategy<Value = Config> {
    (
        agent(),
        option::of(docker()),
        vec(service(), 0..4).prop_filter("names and VIPs unique", |s| {
            let mut names = HashSet::new();
            let mut vips = HashSet::new();
            s.iter().all(|s| {
                names.insert(s.name.clone())
                    && s.vip
                        .iter()
                        .all(|vip| vips.insert((vip, s.port, s.protocol)))
            })
        }),
    )
        .prop_map(|(agent, docker, mut services)| {
            // Only addresses that can be backends, as validation demands.
            let vips: Vec<IpAddr> = services.iter().flat_map(|s| s.vip.iter()).collect();
            for svc in &mut services {
                svc.backends
                    .retain(|b| unusable_backend(b.address, &vips).is_none());
            }
            Config {
                agent,
                docker,
                services,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}|(.|\n){0,200}") {
        check_parse(&text)?;
    }

    #[test]
    fn toml_shaped_soup_never_panics(text in soup()) {
        check_parse(&text)?;
    }

    #[test]
    fn mutated_example_never_panics(edits in vec(edit(), 1..6)) {
        let text = apply(EXAMPLE, &edits);
        check_parse(&text)?;
    }

    #[test]
    fn valid_configs_round_trip(config in config()) {
        prop_assert_eq!(config.problems(), Vec::<(String, String)>::new());
        round_trip(&config)?;
    }
}

#[test]
fn the_example_round_trips() {
    let config = parse(EXAMPLE).expect("the example is valid");
    round_trip(&config).expect("round trip");
}

#[test]
fn field_paths() {
    for good in [
        "agent.interfaces[0]",
        "service[1].backend[0].health.interval",
        "service",
        "agent.'odd: key'",
        "\"a.b\"",
        "service[0].quoted key",
    ] {
        assert!(field_is_a_path(good), "{good}");
    }
    for bad in [
        "",
        "agent.",
        ".x",
        "odd: key",
        "x.odd: key",
        "a\nb",
        "agent.'open",
    ] {
        assert!(!field_is_a_path(bad), "{bad}");
    }
}

/// User text echoed in an error (a quoted key, a string value) keeps the error on one line
/// with an unambiguous field: control characters are escaped, odd keys quoted.
#[test]
fn errors_echoing_odd_user_text_stay_on_one_line() {
    let service = "[agent]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\n\
                   vip = \"10.99.100.1\"\nport = 80\n";
    let mut bad = Vec::new();
    for text in [
        "\"new\\nline\" = 1\n".to_string(),
        "[agent]\n\"a\\nb\" = 1\n".into(),
        "'odd: key' = 1\n".into(),
        "[agent]\n'odd: key' = 1\n".into(),
        format!("{service}mode = \"\\nat\"\n"),
        format!("{service}protocol = \"\"\"u\ndp\"\"\"\n"),
        "[agent]\ninterfaces = [\"a\\nb/\"]\n".into(),
    ] {
        let errors = parse(&text).expect_err(&text);
        for e in &errors.0 {
            let shown = e.to_string();
            if !field_is_a_path(&e.field) || shown.contains('\n') {
                bad.push(format!("{text:?}\n  -> {shown:?}"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
