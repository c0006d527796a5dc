use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn container(
    labels_: &[(&str, &str)],
    networks: &[(&str, &str)],
    exposed: &[u16],
) -> ContainerInfo {
    ContainerInfo {
        id: "3f2a1c9b0d1e77aa".into(),
        name: "web_3".into(),
        labels: labels(labels_),
        networks: networks
            .iter()
            .map(|(name, ip)| NetworkInfo {
                name: name.to_string(),
                ip: ip.parse().ok(),
                ip6: None,
                bridge: Some(format!("br-{name}")),
            })
            .collect(),
        exposed: exposed.iter().map(|p| (*p, Protocol::Tcp)).collect(),
        health: None,
        stopping: false,
        created: None,
    }
}

fn spec(c: &ContainerInfo) -> LabelSpec {
    parse(&c.owner(), &c.labels, "xlb").unwrap().unwrap()
}

#[test]
fn unlabelled_containers_are_not_ours() {
    let c = container(&[("com.example", "x")], &[("app", "172.18.0.2")], &[80]);
    assert_eq!(parse(&c.owner(), &c.labels, "xlb").unwrap(), None);
}

#[test]
fn every_label_is_parsed() {
    let c = container(
        &[
            ("xlb.service", "web"),
            ("xlb.port", "8080"),
            ("xlb.network", "app"),
            ("xlb.weight", "0"),
            ("xlb.health.type", "http"),
            ("xlb.health.path", "/healthz"),
            ("xlb.health.port", "9000"),
            ("xlb.health.interval", "250ms"),
            ("xlb.health.rise", "3"),
            ("other.label", "ignored"),
        ],
        &[],
        &[],
    );
    let s = spec(&c);
    assert_eq!(
        (s.service.as_str(), s.port, s.weight),
        ("web", Some(8080), Some(0))
    );
    assert_eq!(s.network.as_deref(), Some("app"));
    assert_eq!(s.health.kind, Some(HealthKind::Http));
    assert_eq!(s.health.path.as_deref(), Some("/healthz"));
    assert_eq!(s.health.port, Some(9000));
    assert_eq!(s.health.interval, Some(Duration::from_millis(250)));
    assert_eq!(s.health.rise, Some(3));
}

#[test]
fn a_bad_label_names_the_container_and_the_label() {
    for (label, value, reason) in [
        ("xlb.port", "http", "`http` is not a number in 1..=65535"),
        ("xlb.port", "0", "`0` is not a number in 1..=65535"),
        (
            "xlb.weight",
            "70000",
            "`70000` is not a number in 0..=65535",
        ),
        (
            "xlb.health.type",
            "icmp",
            "`icmp` is not one of tcp, http, udp, none",
        ),
        ("xlb.health.interval", "1ms", "`1ms` is shorter than 10ms"),
        (
            "xlb.health.path",
            "healthz",
            "`healthz` must start with '/'",
        ),
        ("xlb.wieght", "5", "unknown label (a typo?)"),
    ] {
        let c = container(&[("xlb.service", "web"), (label, value)], &[], &[]);
        let err = parse(&c.owner(), &c.labels, "xlb").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("container web_3 (3f2a1c9b0d1e): label {label}: {reason}")
        );
    }
}

#[test]
fn the_prefix_is_configurable() {
    let c = container(&[("lb.service", "web"), ("xlb.port", "nonsense")], &[], &[]);
    assert_eq!(
        parse(&c.owner(), &c.labels, "lb").unwrap().unwrap().service,
        "web"
    );
}

#[test]
fn one_network_and_one_exposed_port_need_no_labels() {
    let c = container(&[("xlb.service", "web")], &[("app", "172.18.0.2")], &[8080]);
    let t = c.target(&spec(&c), "xlb", Protocol::Tcp, false).unwrap();
    assert_eq!(
        t,
        ContainerTarget {
            network: "app".into(),
            ip: "172.18.0.2".parse().unwrap(),
            port: 8080,
            bridge: Some("br-app".into())
        }
    );
}

#[test]
fn several_networks_need_a_network_label_never_a_guess() {
    let nets = [("app", "172.18.0.2"), ("db", "172.19.0.2")];
    let c = container(&[("xlb.service", "web")], &nets, &[8080]);
    let err = c
        .target(&spec(&c), "xlb", Protocol::Tcp, false)
        .unwrap_err();
    assert_eq!(err.label, "xlb.network");
    assert_eq!(err.reason, "required: the container is on app, db");
    let c = container(
        &[("xlb.service", "web"), ("xlb.network", "db")],
        &nets,
        &[8080],
    );
    assert_eq!(
        c.target(&spec(&c), "xlb", Protocol::Tcp, false)
            .unwrap()
            .ip
            .to_string(),
        "172.19.0.2"
    );
    let c = container(
        &[("xlb.service", "web"), ("xlb.network", "cache")],
        &nets,
        &[8080],
    );
    let err = c
        .target(&spec(&c), "xlb", Protocol::Tcp, false)
        .unwrap_err();
    assert_eq!(err.reason, "not attached to `cache` (it is on: app, db)");
}

#[test]
fn several_or_no_exposed_ports_need_a_port_label() {
    let net = [("app", "172.18.0.2")];
    let c = container(&[("xlb.service", "web")], &net, &[8080, 9000]);
    let err = c
        .target(&spec(&c), "xlb", Protocol::Tcp, false)
        .unwrap_err();
    assert_eq!(
        (err.label.as_str(), err.reason.as_str()),
        ("xlb.port", "required: tcp ports 8080, 9000 exposed")
    );
    let c = container(&[("xlb.service", "web")], &net, &[]);
    assert_eq!(
        c.target(&spec(&c), "xlb", Protocol::Tcp, false)
            .unwrap_err()
            .reason,
        "required: no tcp port exposed"
    );
    // A UDP service only counts UDP ports.
    let c = container(&[("xlb.service", "dns")], &net, &[8080]);
    assert!(c.target(&spec(&c), "xlb", Protocol::Udp, false).is_err());
    let c = container(
        &[("xlb.service", "web"), ("xlb.port", "9000")],
        &net,
        &[8080, 9000],
    );
    assert_eq!(
        c.target(&spec(&c), "xlb", Protocol::Tcp, false)
            .unwrap()
            .port,
        9000
    );
}

#[test]
fn a_container_without_an_address_is_an_error() {
    let c = container(&[("xlb.service", "web")], &[("host", "")], &[8080]);
    assert_eq!(
        c.target(&spec(&c), "xlb", Protocol::Tcp, false)
            .unwrap_err()
            .reason,
        "the container has no IPv4 address"
    );
}

/// Found by `cargo xtask fuzz` (target labels): an id with a multi-byte character across
/// byte 12 made `owner` panic, slicing inside the character.
#[test]
fn owner_of_an_id_that_is_not_hex_does_not_panic() {
    let mut c = container(&[("xlb.service", "web")], &[("app", "172.18.0.2")], &[80]);
    c.id = "3f2a1c8be01\u{f5}e".into();
    assert_eq!(c.owner(), "container web_3 (3f2a1c8be01\u{f5})");
    c.id = "abc".into();
    assert_eq!(c.owner(), "container web_3 (abc)");
}
