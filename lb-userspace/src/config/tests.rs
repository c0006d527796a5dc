use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("xlb.toml"), text)
}

fn errors(text: &str) -> Vec<String> {
    parse(text)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

const MINIMAL: &str = r#"
[agent]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "10.99.100.1"
port = 80
"#;

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../../examples/xlb.toml");
    let config = parse(text).unwrap();
    assert_eq!(config.services.len(), 1);
    let web = &config.services[0];
    assert_eq!(web.backends.len(), 3);
    assert_eq!(web.backends[1].weight, 100, "weight defaults to 100");
    assert_eq!(web.health.kind, HealthKind::Http);
    assert_eq!(web.health.timeout, Duration::from_millis(500));
    assert_eq!(
        config.api_listen(),
        ApiListen::Tcp("127.0.0.1:9900".parse().unwrap())
    );
}

#[test]
fn defaults_fill_a_minimal_config() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.agent.pin_path, PathBuf::from("/sys/fs/bpf/xlb"));
    assert_eq!(config.agent.xdp_mode, XdpMode::Auto);
    let web = &config.services[0];
    assert_eq!(
        (web.protocol, web.mode, web.table_size),
        (Protocol::Tcp, Mode::Nat, 65537)
    );
}

#[test]
fn unknown_field_names_line_and_field() {
    let text = format!("{MINIMAL}tabel_size = 7\n");
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("xlb.toml:9: service[0].tabel_size: unknown field `tabel_size`"),
        "{errs:?}"
    );
}

#[test]
fn wrong_type_names_line_and_field() {
    let text = MINIMAL.replace("port = 80", "port = \"http\"");
    let errs = errors(&text);
    assert!(
        errs[0].starts_with("xlb.toml:8: service[0].port: "),
        "{errs:?}"
    );
}

#[test]
fn bad_enum_value_is_rejected() {
    let text = format!("{MINIMAL}protocol = \"sctp\"\n");
    let errs = errors(&text);
    assert!(
        errs[0].starts_with("xlb.toml:9: service[0].protocol: unknown variant `sctp`"),
        "{errs:?}"
    );
}

#[test]
fn table_size_must_be_prime() {
    let text = format!("{MINIMAL}table_size = 65536\n");
    assert_eq!(
        errors(&text),
        ["xlb.toml:9: service[0].table_size: 65536 must be a prime in 3..=2097143"]
    );
    let text = format!("{MINIMAL}table_size = 2097169\n");
    assert!(errors(&text)[0].contains("2097169 must be a prime in 3..=2097143"));
    let text = format!("{MINIMAL}table_size = 2097143\n");
    assert_eq!(parse(&text).unwrap().services[0].table_size, 2_097_143);
}

#[test]
fn large_tables_must_fit_the_ring_space() {
    // Each service needs two rings; 2097143 slots take 32 of the 1024 blocks at most.
    let service = |i: usize| {
        format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.99.100.{i}\"\nport = 80\ntable_size = 2097143\n"
        )
    };
    let head = "[agent]\ninterfaces = [\"eth0\"]\n";
    let fits: String = (1..=16).map(service).collect();
    assert!(parse(&format!("{head}{fits}")).is_ok());
    let too_many: String = (1..=17).map(service).collect();
    let errs = errors(&format!("{head}{too_many}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("xlb.toml:87: service[16].table_size: the services' tables need more"),
        "{errs:?}"
    );
}

#[test]
fn every_problem_is_listed_with_its_line() {
    let text = r#"
[agent]
interfaces = []
api = "localhost"

[[service]]
name = "Web!"
vip = "10.99.100.1"
port = 80
encap = "gue"

  [service.health]
  rise = 0

  [[service.backend]]
  address = "10.99.2.11"
  port = 8080
  weight = 70000

  [[service.backend]]
  address = "10.99.2.11"
  port = 8080

[[service]]
name = "web2"
vip = "10.99.100.1"
port = 80
"#;
    let errs = errors(text);
    let expected = [
        "xlb.toml:3: agent.interfaces: at least one interface is required",
        "xlb.toml:4: agent.api: `localhost` is neither IP:PORT nor unix:/path",
        "xlb.toml:7: service[0].name: `Web!`: use 1-63 of a-z, 0-9, '-', '_'",
        "xlb.toml:10: service[0].encap: only mode \"dsr\" uses encap",
        "xlb.toml:13: service[0].health.rise: must be at least 1",
        "xlb.toml:18: service[0].backend[0].weight: 70000 is above the maximum 65535",
        "xlb.toml:21: service[0].backend[1].address: 10.99.2.11:8080 is listed twice",
        "xlb.toml:26: service[1].vip: 10.99.100.1:80/tcp is used by another service",
    ];
    assert_eq!(errs, expected);
}

#[test]
fn missing_required_field_points_at_its_table() {
    let text = MINIMAL.replace("port = 80\n", "");
    let errs = errors(&text);
    assert!(
        errs[0].starts_with("xlb.toml:5: service[0]: missing field `port`"),
        "{errs:?}"
    );
}

#[test]
fn unix_api_socket_is_accepted() {
    let text = MINIMAL.replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\"]\napi = \"unix:/run/xlb.sock\"",
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.api_listen(), ApiListen::Unix("/run/xlb.sock".into()));
}

#[test]
fn control_defaults_to_a_root_only_socket() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(
        config.control_path(),
        PathBuf::from("/run/xlb/control.sock")
    );
    assert_eq!(config.agent.control_group, None);
    assert_eq!(config.agent.control_token_file, None);
    let text = MINIMAL.replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\"]\ncontrol = \"/tmp/c.sock\"\ncontrol_group = \"xlb\"",
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.control_path(), PathBuf::from("/tmp/c.sock"));
    assert_eq!(config.agent.control_group.as_deref(), Some("xlb"));
}

#[test]
fn bad_control_settings_name_line_and_field() {
    let text = MINIMAL.replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\"]\ncontrol = \"unix:run/c.sock\"\ncontrol_token_file = \"token\"",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("xlb.toml:4: agent.control: "),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("xlb.toml:5: agent.control_token_file: must be an absolute path"),
        "{errs:?}"
    );
}

#[test]
fn a_public_api_must_be_asked_for() {
    let public = MINIMAL.replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\"]\napi = \"0.0.0.0:9900\"",
    );
    let errs = errors(&public);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("xlb.toml:4: agent.api: 0.0.0.0:9900 is not a loopback address")
            && errs[0].contains("api_public = true"),
        "{errs:?}"
    );
    let asked = public.replace("api = ", "api_public = true\napi = ");
    assert!(parse(&asked).is_ok());
    for local in ["127.0.0.2:9900", "[::1]:9900"] {
        let text = public.replace("0.0.0.0:9900", local);
        assert!(parse(&text).is_ok(), "{local}");
    }
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(65537));
}

#[test]
fn backend_health_overrides_merge_and_are_validated() {
    let text = format!(
        "{MINIMAL}  [service.health]\n  type = \"http\"\n  path = \"/healthz\"\n  port = 8081\n\
         \n  [[service.backend]]\n  address = \"10.99.2.11\"\n  port = 8080\n\
         \n  [[service.backend]]\n  address = \"10.99.2.12\"\n  port = 8080\n\
         \n    [service.backend.health]\n    type = \"tcp\"\n    port = 9000\n    fall = 5\n"
    );
    let config = parse(&text).unwrap();
    let svc = &config.services[0];
    let plain = svc.health.with(&svc.backends[0].health);
    assert_eq!(
        (plain.kind, plain.path.as_str(), plain.port),
        (HealthKind::Http, "/healthz", Some(8081))
    );
    let special = svc.health.with(&svc.backends[1].health);
    assert_eq!(
        (special.kind, special.port, special.fall),
        (HealthKind::Tcp, Some(9000), 5)
    );
    assert_eq!(special.path, "/healthz", "unset fields keep the service's");

    let bad = text.replace("fall = 5", "fall = 0\n    interval = \"1ms\"");
    assert_eq!(
        errors(&bad),
        [
            "xlb.toml:26: service[0].backend[1].health.interval: must be at least 10ms",
            "xlb.toml:25: service[0].backend[1].health.fall: must be at least 1",
        ]
    );
}

#[test]
fn mode_settings_are_checked() {
    let dsr = format!(
        "{MINIMAL}mode = \"dsr\"\n[[service.backend]]\naddress = \"10.99.4.11\"\nport = 8080\n"
    );
    assert_eq!(
        errors(&dsr),
        [
            "xlb.toml:12: service[0].backend[0].port: 8080 differs from the service port 80: dsr does not rewrite ports"
        ]
    );
    let snat = format!("{MINIMAL}snat = [\"10.99.5.9\"]\n");
    assert_eq!(
        errors(&snat),
        ["xlb.toml:9: service[0].snat: only mode \"fullnat\" uses snat"]
    );
    let tc = format!("{MINIMAL}mode = \"fullnat\"\n")
        .replace("[agent]\n", "[agent]\nxdp_mode = \"tc\"\n");
    assert!(
        errors(&tc)[0].contains("fullnat needs an XDP attach mode"),
        "{:?}",
        errors(&tc)
    );
    let ok = format!("{MINIMAL}mode = \"fullnat\"\nsnat = [\"10.99.5.9\", \"10.99.5.10\"]\n");
    assert!(parse(&ok).is_ok());
}

#[test]
fn backend_addresses_that_cannot_be_backends_are_rejected_with_line_and_field() {
    let mut text = format!(
        "{MINIMAL}\n[[service]]\nname = \"dns\"\nvip = \"10.99.100.2\"\nport = 53\nprotocol = \"udp\"\n"
    );
    for address in [
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.5",
        "255.255.255.255",
        "10.99.100.2",
        "10.99.100.1",
        "10.99.2.11",
    ] {
        text.push_str(&format!(
            "  [[service.backend]]\n  address = \"{address}\"\n  port = 53\n"
        ));
    }
    assert_eq!(
        errors(&text),
        [
            "xlb.toml:16: service[1].backend[0].address: 127.0.0.1 is a loopback address, not a backend",
            "xlb.toml:19: service[1].backend[1].address: 0.0.0.0 is an unspecified address, not a backend",
            "xlb.toml:22: service[1].backend[2].address: 224.0.0.5 is a multicast address, not a backend",
            "xlb.toml:25: service[1].backend[3].address: 255.255.255.255 is the broadcast address, not a backend",
            "xlb.toml:28: service[1].backend[4].address: 10.99.100.2 is a VIP of this config, not a backend",
            "xlb.toml:31: service[1].backend[5].address: 10.99.100.1 is a VIP of this config, not a backend",
        ]
    );
}

#[test]
fn claim_limits_are_safe_by_default_and_validated() {
    let config = parse(MINIMAL).unwrap();
    let limits = &config.services[0].docker;
    assert_eq!(
        (limits.max_weight, limits.health_override),
        (100, false),
        "labels get at most the default weight and keep the service's health check"
    );
    assert!(limits.networks.is_empty() && limits.projects.is_empty());
    let text = format!(
        "{MINIMAL}[service.docker]\nmax_weight = 0\nnetworks = [\"\"]\nprojects = [\"shop\"]\n"
    );
    assert_eq!(
        errors(&text),
        [
            "xlb.toml:10: service[0].docker.max_weight: 0 must be in 1..=65535",
            "xlb.toml:11: service[0].docker.networks[0]: is empty",
        ]
    );
    let text = format!("{MINIMAL}[service.docker]\nmax_wieght = 10\n");
    assert!(errors(&text)[0].contains("unknown field `max_wieght`"));
}

/// An invalid config on which toml_edit (used to locate fields) panics: found by the config
/// fuzzer. It is an error with a line, not a crash.
#[test]
fn a_config_that_trips_toml_edit_is_an_error() {
    let text = String::from_utf8_lossy(include_bytes!("testdata/toml_edit_panic.toml"));
    let result = std::panic::catch_unwind(|| Config::parse(Path::new("x.toml"), &text));
    assert!(matches!(result, Ok(Err(_))), "parsed, or panicked");
}

#[test]
fn hash_is_flow_by_default_and_source_on_request() {
    assert_eq!(parse(MINIMAL).unwrap().services[0].hash, HashMode::Flow);
    let source = parse(&format!("{MINIMAL}hash = \"source\"\n")).unwrap();
    assert_eq!(source.services[0].hash, HashMode::Source);
    let errs = errors(&format!("{MINIMAL}hash = \"sticky\"\n"));
    assert!(
        errs[0].starts_with("xlb.toml:9: service[0].hash: unknown variant `sticky`"),
        "{errs:?}"
    );
}

#[test]
fn ipv6_services_take_every_mode_and_backends_of_their_family() {
    let v6 = MINIMAL.replace("10.99.100.1", "fd99:100::1");
    let ok = format!("{v6}  [[service.backend]]\n  address = \"fd99:2::11\"\n  port = 8080\n");
    assert!(parse(&ok).is_ok(), "{:?}", parse(&ok).err());
    let mixed = format!("{v6}  [[service.backend]]\n  address = \"10.99.2.11\"\n  port = 8080\n");
    assert_eq!(
        errors(&mixed),
        [
            "xlb.toml:10: service[0].backend[0].address: must be of the same IP family as the VIP \
             (a dual-stack service lists a VIP of each family)"
        ]
    );
    let dsr = v6.replace("port = 80\n", "port = 80\nmode = \"dsr\"\n");
    assert!(
        parse(&dsr).is_ok(),
        "dsr over IPv6: {:?}",
        parse(&dsr).err()
    );
    let fullnat = v6.replace(
        "port = 80\n",
        "port = 80\nmode = \"fullnat\"\nsnat = [\"fd99:3::1\"]\n",
    );
    assert!(parse(&fullnat).is_ok(), "{:?}", parse(&fullnat).err());
    for (snat, why) in [
        (
            "10.99.3.1",
            "10.99.3.1 is not of the VIP's IP family: no flow could use it",
        ),
        ("fe80::1", "fe80::1 is not a unicast IP address"),
        ("ff02::1", "ff02::1 is not a unicast IP address"),
    ] {
        let text = fullnat.replace("fd99:3::1", snat);
        assert_eq!(
            errors(&text),
            [format!("xlb.toml:10: service[0].snat: {why}")],
            "{snat}"
        );
    }
    let allow = v6.replace("port = 80\n", "port = 80\nallow = [\"10.0.0.0/8\"]\n");
    assert_eq!(
        errors(&allow),
        [
            "xlb.toml:9: service[0].allow[0]: `10.0.0.0/8` is not of the VIP's IP family: it \
             would match nothing"
        ]
    );
    let v6_allow = v6.replace(
        "port = 80\n",
        "port = 80\nallow = [\"fd99:1::/64\", \"fd00::7\"]\n",
    );
    let config = parse(&v6_allow).unwrap();
    let nets: Vec<String> = config.services[0]
        .allow_nets()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["fd00::7/128", "fd99:1::/64"]);
    let host_bits = v6.replace("port = 80\n", "port = 80\nallow = [\"fd99:1::1/64\"]\n");
    assert!(errors(&host_bits)[0].contains("has host bits set; the range is fd99:1::/64"));
}

#[test]
fn a_dual_stack_service_is_two_in_the_data_path_each_with_the_backends_of_its_family() {
    let dual = MINIMAL.replace("\"10.99.100.1\"", "[\"10.99.100.1\", \"fd99:100::1\"]");
    let with_backends = format!(
        "{dual}  [[service.backend]]\n  address = \"10.99.2.11\"\n  port = 8080\n  \
         [[service.backend]]\n  address = \"fd99:2::11\"\n  port = 8080\n"
    );
    let config = parse(&with_backends).unwrap();
    let desired = crate::state::DesiredState::from_config(&config);
    let names: Vec<&str> = desired.services.keys().map(String::as_str).collect();
    assert_eq!(names, ["web", "web.v6"]);
    let backends = |name: &str| -> Vec<String> {
        let svc = &desired.services[name];
        svc.backends.keys().map(|e| e.to_string()).collect()
    };
    assert_eq!(backends("web"), ["10.99.2.11:8080"]);
    assert_eq!(backends("web.v6"), ["[fd99:2::11]:8080"]);
    assert_eq!(desired.services["web.v6"].vip.to_string(), "fd99:100::1");
    let halves: Vec<&str> = desired
        .halves_of("web")
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(halves, ["web", "web.v6"]);
    // Written back as it was read.
    let text = toml::to_string(&config).unwrap();
    assert_eq!(parse(&text).unwrap(), config);

    let same_family = MINIMAL.replace("\"10.99.100.1\"", "[\"10.99.100.1\", \"10.99.100.2\"]");
    let errs = errors(&same_family);
    assert!(
        errs[0].starts_with("xlb.toml:7: service[0].vip: one or two addresses, one of each family"),
        "{errs:?}"
    );
    let none = MINIMAL.replace("\"10.99.100.1\"", "[]");
    assert_eq!(
        errors(&none),
        ["xlb.toml:7: service[0].vip: lists no address"]
    );
    let three = MINIMAL.replace(
        "\"10.99.100.1\"",
        "[\"10.99.100.1\", \"fd99:100::1\", \"fd99:100::2\"]",
    );
    assert!(errors(&three)[0].contains("one or two addresses"));
    // The v6 half has the limits of a v6 service.
    let dsr = dual.replace("port = 80\n", "port = 80\nmode = \"dsr\"\n");
    assert!(
        parse(&dsr).is_ok(),
        "dual-stack dsr: {:?}",
        parse(&dsr).err()
    );
    // Each half's SNAT pool holds the addresses of its family.
    let fullnat = with_backends.replace(
        "port = 80\n",
        "port = 80\nmode = \"fullnat\"\nsnat = [\"fd99:3::1\", \"10.99.3.1\", \"fd99:3::2\"]\n",
    );
    let desired = crate::state::DesiredState::from_config(&parse(&fullnat).unwrap());
    let pool = |name: &str| -> Vec<String> {
        desired.services[name]
            .snat
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    assert_eq!(pool("web"), ["10.99.3.1"]);
    assert_eq!(pool("web.v6"), ["fd99:3::1", "fd99:3::2"]);
    // Each VIP takes the allow ranges of its family, and must get some.
    let allow = dual.replace("port = 80\n", "port = 80\nallow = [\"10.0.0.0/8\"]\n");
    assert_eq!(
        errors(&allow),
        [
            "xlb.toml:9: service[0].allow: lists no range of fd99:100::1's family: list one \
             for each VIP of a dual-stack service (`::/0` or `0.0.0.0/0` for everyone)"
        ]
    );
    let both = dual.replace(
        "port = 80\n",
        "port = 80\nallow = [\"10.0.0.0/8\", \"fd99:1::/64\"]\n",
    );
    let desired = crate::state::DesiredState::from_config(&parse(&both).unwrap());
    let allow_of = |name: &str| -> Vec<String> {
        desired.services[name]
            .allow
            .iter()
            .map(|n| n.to_string())
            .collect()
    };
    assert_eq!(allow_of("web"), ["10.0.0.0/8"]);
    assert_eq!(allow_of("web.v6"), ["fd99:1::/64"]);
    // A VIP of a dual-stack service is taken for every other service.
    let taken = format!("{dual}\n[[service]]\nname = \"api\"\nvip = \"fd99:100::1\"\nport = 80\n");
    assert!(errors(&taken)[0].contains("[fd99:100::1]:80/tcp is used by another service"));
}
