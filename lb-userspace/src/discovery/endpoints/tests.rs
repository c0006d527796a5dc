use std::path::Path;

use super::*;
use crate::{config::Config, discovery::labels::NetworkInfo};

fn config() -> Config {
    let text = r#"
[agent]
interfaces = ["eth0"]
[docker]
[[service]]
name = "web"
vip = "10.99.100.1"
port = 80
  [[service.backend]]
  address = "10.99.2.11"
  port = 8080
[[service]]
name = "dns"
vip = "10.99.100.1"
port = 53
protocol = "udp"
"#;
    Config::parse(Path::new("xlb.toml"), text).unwrap()
}

fn container(name: &str, labels: &[(&str, &str)], health: Option<&str>) -> ContainerInfo {
    ContainerInfo {
        id: format!("{name}0123456789abcdef"),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        networks: vec![NetworkInfo {
            name: "bridge".into(),
            ip: Some(format!("172.17.0.{}", name.len()).parse().unwrap()),
            bridge: Some("docker0".into()),
        }],
        exposed: vec![(8080, Protocol::Tcp), (5353, Protocol::Udp)],
        health: health.map(str::to_string),
        stopping: false,
    }
}

#[test]
fn containers_join_the_services_their_labels_name() {
    let mut desired = DesiredState::from_config(&config());
    let errors = add_containers(
        &mut desired,
        &[
            container("a", &[("xlb.service", "web"), ("xlb.weight", "50")], None),
            container("bb", &[("xlb.service", "dns")], Some("healthy")),
            container("ccc", &[], None),
        ],
        "xlb",
    );
    assert!(errors.is_empty(), "{errors:?}");
    let web = &desired.services["web"];
    assert_eq!(
        web.backends.len(),
        2,
        "the static backend and the container"
    );
    let a = &web.backends[&"172.17.0.1:8080".parse().unwrap()];
    assert_eq!((a.weight, &a.source), (50, &Source::Docker("a".into())));
    assert_eq!(a.bridge.as_deref(), Some("docker0"));
    let dns = &desired.services["dns"];
    assert!(
        dns.backends
            .contains_key(&"172.17.0.2:5353".parse().unwrap()),
        "UDP picks the UDP port"
    );
}

#[test]
fn bad_labels_skip_only_their_container() {
    let mut desired = DesiredState::from_config(&config());
    let errors = add_containers(
        &mut desired,
        &[
            container("good", &[("xlb.service", "web")], None),
            container("typo", &[("xlb.service", "web"), ("xlb.prot", "80")], None),
            container("claim", &[("xlb.service", "admin")], None),
        ],
        "xlb",
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "container typo (typo01234567): label xlb.prot: unknown label (a typo?)",
            "container claim (claim0123456): label xlb.service: `admin` is not a service in the config",
        ]
    );
    assert_eq!(desired.services["web"].backends.len(), 2);
}

#[test]
fn a_container_with_a_healthcheck_joins_only_when_healthy() {
    for (health, joins) in [
        (Some("starting"), false),
        (Some("unhealthy"), false),
        (Some("healthy"), true),
        (None, true),
    ] {
        let mut desired = DesiredState::from_config(&config());
        add_containers(
            &mut desired,
            &[container("a", &[("xlb.service", "web")], health)],
            "xlb",
        );
        assert_eq!(
            desired.services["web"].backends.len() == 2,
            joins,
            "{health:?}"
        );
    }
}

fn task(
    id: &str,
    labels: &[(&str, &str)],
    published: &[(u16, u16)],
    networks: &[(&str, &str)],
) -> SwarmTask {
    SwarmTask {
        id: id.into(),
        service: "websvc".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        node_addr: Some("10.98.0.2".parse().unwrap()),
        draining: false,
        published: published
            .iter()
            .map(|(t, p)| (*t, *p, "tcp".to_string()))
            .collect(),
        networks: networks
            .iter()
            .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
            .collect(),
    }
}

#[test]
fn swarm_tasks_join_by_published_port_or_network_address() {
    let mut desired = DesiredState::from_config(&config());
    let errors = add_tasks(
        &mut desired,
        &[
            task("t1", &[("xlb.service", "web")], &[(8080, 30001)], &[]),
            task(
                "t2",
                &[
                    ("xlb.service", "web"),
                    ("xlb.port", "8080"),
                    ("xlb.network", "app"),
                ],
                &[],
                &[("app", "10.0.1.7"), ("db", "10.0.2.7")],
            ),
            task("t3", &[("xlb.service", "web")], &[], &[("app", "10.0.1.8")]),
            task(
                "t4",
                &[("xlb.service", "web")],
                &[(8080, 30002), (9000, 30003)],
                &[],
            ),
        ],
        "xlb",
    );
    let web = &desired.services["web"];
    assert!(
        web.backends
            .contains_key(&"10.98.0.2:30001".parse().unwrap()),
        "node address : published port"
    );
    assert!(
        web.backends.contains_key(&"10.0.1.7:8080".parse().unwrap()),
        "task address on the named network"
    );
    assert_eq!(
        web.backends[&"10.98.0.2:30001".parse().unwrap()].source,
        Source::Swarm("t1".into())
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "swarm service websvc: label xlb.port: required: the service publishes no port in host mode",
            "swarm service websvc: label xlb.port: required: ports 8080, 9000 are published",
        ]
    );
}

#[test]
fn stopping_containers_and_shutting_down_tasks_drain() {
    let mut desired = DesiredState::from_config(&config());
    let mut stopping = container("a", &[("xlb.service", "web")], None);
    stopping.stopping = true;
    let mut draining = task("t1", &[("xlb.service", "web")], &[(8080, 30001)], &[]);
    draining.draining = true;
    add_containers(&mut desired, &[stopping], "xlb");
    add_tasks(&mut desired, &[draining], "xlb");
    let weight = |source: Source| {
        let backends = &desired.services["web"].backends;
        backends
            .values()
            .find(|b| b.source == source)
            .map(|b| b.weight)
    };
    assert_eq!(weight(Source::Static), Some(100));
    assert_eq!(weight(Source::Docker("a".into())), Some(0));
    assert_eq!(weight(Source::Swarm("t1".into())), Some(0));
}
