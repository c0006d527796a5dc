use std::path::Path;

use super::*;
use crate::{config::Config, discovery::labels::NetworkInfo};

/// A config with Docker on and `services` (TOML).
fn with_docker(services: &str) -> Config {
    let text = format!("[agent]\ninterfaces = [\"eth0\"]\n[docker]\n{services}");
    Config::parse(Path::new("xlb.toml"), &text).unwrap()
}

fn config() -> Config {
    with_docker(
        r#"
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
"#,
    )
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
            ip6: None,
            bridge: Some("docker0".into()),
        }],
        exposed: vec![(8080, Protocol::Tcp), (5353, Protocol::Udp)],
        health: health.map(str::to_string),
        stopping: false,
        created: None,
    }
}

#[test]
fn containers_join_the_services_their_labels_name() {
    let mut desired = DesiredState::from_config(&config());
    let errors = add_containers(
        &mut desired,
        &config(),
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
        &config(),
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
            "container claim (claim0123456): label xlb.service: `admin` is not a service in the config",
            "container typo (typo01234567): label xlb.prot: unknown label (a typo?)",
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
            &config(),
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
        created: None,
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
        &config(),
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

/// A v4 and a v6 service over the same port, for the dual-stack tests.
fn dual_stack_config() -> Config {
    with_docker(
        r#"
[[service]]
name = "web"
vip = "10.99.100.1"
port = 80
[[service]]
name = "web6"
vip = "fd99:100::1"
port = 80
"#,
    )
}

#[test]
fn a_container_joins_a_v6_service_by_its_global_ipv6_address() {
    let config = dual_stack_config();
    let mut dual = container(
        "dual",
        &[("xlb.service", "web6"), ("xlb.port", "8080")],
        None,
    );
    dual.networks[0].ip6 = Some("fd00:17::4".parse().unwrap());
    let mut v4_only = container(
        "v4only",
        &[("xlb.service", "web6"), ("xlb.port", "8080")],
        None,
    );
    v4_only.networks[0].ip6 = None;
    let mut for_v4 = dual.clone();
    for_v4.name = "dual4".into();
    for_v4.labels.insert("xlb.service".into(), "web".into());
    let mut desired = DesiredState::from_config(&config);
    let errors = add_containers(&mut desired, &config, &[dual, v4_only, for_v4], "xlb");
    let web6: Vec<String> = desired.services["web6"]
        .backends
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(web6, ["[fd00:17::4]:8080"]);
    let web: Vec<String> = desired.services["web"]
        .backends
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        web,
        ["172.17.0.4:8080"],
        "a v4 service takes the v4 address"
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        ["container v4only (v4only012345): label xlb.network: the container has no IPv6 address"]
    );
}

#[test]
fn a_task_on_a_dual_stack_network_joins_by_the_vips_family() {
    let config = dual_stack_config();
    let labels = |svc| [("xlb.service", svc), ("xlb.port", "8080")];
    let nets = [("app", "10.0.1.7"), ("app", "fd00:1::7")];
    let mut desired = DesiredState::from_config(&config);
    let errors = add_tasks(
        &mut desired,
        &config,
        &[
            task("t1", &labels("web"), &[], &nets),
            task("t2", &labels("web6"), &[], &nets),
        ],
        "xlb",
    );
    assert!(errors.is_empty(), "{errors:?}");
    let web: Vec<String> = desired.services["web"]
        .backends
        .keys()
        .map(ToString::to_string)
        .collect();
    let web6: Vec<String> = desired.services["web6"]
        .backends
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        (web.as_slice(), web6.as_slice()),
        (
            &["10.0.1.7:8080".to_string()][..],
            &["[fd00:1::7]:8080".to_string()][..]
        )
    );
}

/// One dual-stack service: `vip` lists an address of each family.
fn one_dual_stack_service() -> Config {
    with_docker(
        r#"
[[service]]
name = "web"
vip = ["10.99.100.1", "fd99:100::1"]
port = 80
"#,
    )
}

fn backends_of(desired: &DesiredState, name: &str) -> Vec<String> {
    let svc = &desired.services[name];
    svc.backends.keys().map(ToString::to_string).collect()
}

#[test]
fn a_dual_stack_container_joins_both_vips_and_a_single_stack_one_its_family() {
    let config = one_dual_stack_service();
    let labels = [("xlb.service", "web"), ("xlb.port", "8080")];
    let mut dual = container("dual", &labels, None);
    dual.networks[0].ip6 = Some("fd00:17::4".parse().unwrap());
    let v4_only = container("v4only", &labels, None);
    let mut v6_only = container("v6only", &labels, None);
    v6_only.networks[0].ip = None;
    v6_only.networks[0].ip6 = Some("fd00:17::6".parse().unwrap());
    let mut no_address = container("none", &labels, None);
    no_address.networks[0].ip = None;
    let mut desired = DesiredState::from_config(&config);
    let errors = add_containers(
        &mut desired,
        &config,
        &[dual, v4_only, v6_only, no_address],
        "xlb",
    );
    assert_eq!(
        backends_of(&desired, "web"),
        ["172.17.0.4:8080", "172.17.0.6:8080"]
    );
    assert_eq!(
        backends_of(&desired, "web.v6"),
        ["[fd00:17::4]:8080", "[fd00:17::6]:8080"]
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        ["container none (none01234567): label xlb.network: the container has no IPv4 address"],
        "only a container that fits neither VIP is an error, and once"
    );
}

/// A label naming the v6 half (`web.v6`) directly meets the limits of `web`.
#[test]
fn the_v6_half_of_a_dual_stack_service_keeps_the_services_claim_limits() {
    let config = with_docker(
        r#"
[[service]]
name = "web"
vip = ["10.99.100.1", "fd99:100::1"]
port = 80
  [service.docker]
  max_weight = 50
"#,
    );
    let labels = [
        ("xlb.service", "web.v6"),
        ("xlb.port", "8080"),
        ("xlb.weight", "80"),
    ];
    let mut heavy = container("heavy", &labels, None);
    heavy.networks[0].ip6 = Some("fd00:17::5".parse().unwrap());
    let mut desired = DesiredState::from_config(&config);
    let errors = add_containers(&mut desired, &config, &[heavy], "xlb");
    assert!(desired.services["web.v6"].backends.is_empty());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].label, "xlb.weight", "{errors:?}");
}

#[test]
fn a_task_joins_each_vip_of_a_dual_stack_service_it_has_an_address_for() {
    let config = one_dual_stack_service();
    let labels = [("xlb.service", "web"), ("xlb.port", "8080")];
    let mut desired = DesiredState::from_config(&config);
    let errors = add_tasks(
        &mut desired,
        &config,
        &[
            task(
                "t1",
                &labels,
                &[],
                &[("app", "10.0.1.7"), ("app", "fd00:1::7")],
            ),
            task("t2", &labels, &[], &[("app", "10.0.1.8")]),
        ],
        "xlb",
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        backends_of(&desired, "web"),
        ["10.0.1.7:8080", "10.0.1.8:8080"]
    );
    assert_eq!(backends_of(&desired, "web.v6"), ["[fd00:1::7]:8080"]);
}

#[test]
fn stopping_containers_and_shutting_down_tasks_drain() {
    let mut desired = DesiredState::from_config(&config());
    let mut stopping = container("a", &[("xlb.service", "web")], None);
    stopping.stopping = true;
    let mut draining = task("t1", &[("xlb.service", "web")], &[(8080, 30001)], &[]);
    draining.draining = true;
    add_containers(&mut desired, &config(), &[stopping], "xlb");
    add_tasks(&mut desired, &config(), &[draining], "xlb");
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

/// `config()` with `[service.docker]` limits on `web`.
fn limited(limits: &str) -> Config {
    let text = format!(
        r#"
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
  [service.docker]
  {limits}
[[service]]
name = "dns"
vip = "10.99.100.2"
port = 53
protocol = "udp"
"#
    );
    Config::parse(Path::new("xlb.toml"), &text).unwrap()
}

/// The errors of adding `containers` under `config`, and the sources that joined `web`.
fn join(config: &Config, containers: &[ContainerInfo]) -> (Vec<String>, Vec<Source>) {
    let mut desired = DesiredState::from_config(config);
    let errors = add_containers(&mut desired, config, containers, "xlb");
    let joined = desired.services["web"]
        .backends
        .values()
        .map(|b| b.source.clone())
        .filter(|s| *s != Source::Static)
        .collect();
    (errors.iter().map(ToString::to_string).collect(), joined)
}

#[test]
fn a_label_cannot_ask_for_more_than_the_services_max_weight() {
    let greedy = || {
        container(
            "greedy",
            &[("xlb.service", "web"), ("xlb.weight", "65535")],
            None,
        )
    };
    let (errors, joined) = join(
        &config(),
        &[greedy(), container("ok", &[("xlb.service", "web")], None)],
    );
    assert_eq!(
        errors,
        [
            "container greedy (greedy012345): label xlb.weight: 65535 is above the max_weight 100 \
          of service web ([service.docker])"
        ]
    );
    assert_eq!(joined, [Source::Docker("ok".into())]);
    let (errors, joined) = join(&limited("max_weight = 65535"), &[greedy()]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(joined, [Source::Docker("greedy".into())]);
    // Without a weight label a container gets the default, within the limit.
    let mut desired = DesiredState::from_config(&limited("max_weight = 30"));
    let config = limited("max_weight = 30");
    add_containers(
        &mut desired,
        &config,
        &[container("ok", &[("xlb.service", "web")], None)],
        "xlb",
    );
    let weights: Vec<u32> = desired.services["web"]
        .backends
        .values()
        .map(|b| b.weight)
        .collect();
    assert_eq!(
        weights,
        [100, 30],
        "the static backend's, then the container's"
    );
}

#[test]
fn health_labels_need_the_services_health_override() {
    let none = || {
        container(
            "nocheck",
            &[("xlb.service", "web"), ("xlb.health.type", "none")],
            None,
        )
    };
    let port = || {
        container(
            "elsewhere",
            &[("xlb.service", "web"), ("xlb.health.port", "22")],
            None,
        )
    };
    let (errors, joined) = join(&config(), &[none(), port()]);
    assert_eq!(
        errors,
        [
            "container elsewhere (elsewhere012): label xlb.health.port: service web does not let \
             labels change its health check ([service.docker] health_override = false)",
            "container nocheck (nocheck01234): label xlb.health.type: service web does not let \
             labels change its health check ([service.docker] health_override = false)",
        ]
    );
    assert!(joined.is_empty());
    let (errors, joined) = join(&limited("health_override = true"), &[none()]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(joined, [Source::Docker("nocheck".into())]);
}

#[test]
fn only_the_services_networks_and_projects_may_join() {
    let mut in_project = container("app", &[("xlb.service", "web")], None);
    in_project
        .labels
        .insert("com.docker.compose.project".into(), "shop".into());
    let mut other_project = container("stray", &[("xlb.service", "web")], None);
    other_project
        .labels
        .insert("com.docker.compose.project".into(), "tools".into());
    let loose = container("loose", &[("xlb.service", "web")], None);
    let config = limited(r#"projects = ["shop"]"#);
    let (errors, joined) = join(&config, &[in_project.clone(), other_project, loose.clone()]);
    assert_eq!(
        errors,
        [
            "container loose (loose0123456): label com.docker.compose.project: no project is not \
             among the projects of service web (shop)",
            "container stray (stray0123456): label com.docker.compose.project: project `tools` is \
             not among the projects of service web (shop)",
        ]
    );
    assert_eq!(joined, [Source::Docker("app".into())]);
    let (errors, joined) = join(&limited(r#"networks = ["backend"]"#), &[loose]);
    assert_eq!(
        errors,
        [
            "container loose (loose0123456): label xlb.network: network `bridge` is not among the \
          networks of service web (backend)"
        ]
    );
    assert!(joined.is_empty());
    let (errors, _) = join(&limited(r#"networks = ["bridge"]"#), &[in_project]);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn container_addresses_that_cannot_be_backends_are_skipped() {
    let at = |name: &str, ip: &str| {
        let mut c = container(name, &[("xlb.service", "web")], None);
        c.networks[0].ip = Some(ip.parse().unwrap());
        c
    };
    let (errors, joined) = join(
        &limited(""),
        &[
            at("lo", "127.0.0.1"),
            at("any", "0.0.0.0"),
            at("multi", "224.0.0.5"),
            at("bcast", "255.255.255.255"),
            at("own", "10.99.100.1"),
            at("other", "10.99.100.2"),
            at("fine", "172.17.0.9"),
        ],
    );
    let reasons: Vec<&str> = errors
        .iter()
        .map(|e| e.split_once("label xlb.network: ").unwrap().1)
        .collect();
    assert_eq!(
        reasons,
        [
            "0.0.0.0 is an unspecified address, not a backend",
            "255.255.255.255 is the broadcast address, not a backend",
            "127.0.0.1 is a loopback address, not a backend",
            "224.0.0.5 is a multicast address, not a backend",
            "10.99.100.2 is a VIP of this config, not a backend",
            "10.99.100.1 is a VIP of this config, not a backend",
        ]
    );
    assert_eq!(joined, [Source::Docker("fine".into())]);
}

#[test]
fn an_address_claimed_twice_goes_to_the_static_config_then_the_oldest_container() {
    let config = config();
    let at = |name: &str, ip: &str, port: &str, age: u64| {
        let mut c = container(name, &[("xlb.service", "web"), ("xlb.port", port)], None);
        c.networks[0].ip = Some(ip.parse().unwrap());
        c.created = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 - age));
        c
    };
    // Listed newest first: the order of the list must not matter.
    let containers = [
        at("young", "172.17.0.9", "80", 10),
        at("old", "172.17.0.9", "80", 500),
        at("squatter", "10.99.2.11", "8080", 900),
    ];
    let mut desired = DesiredState::from_config(&config);
    let errors = add_containers(&mut desired, &config, &containers, "xlb");
    assert!(errors.is_empty(), "{errors:?}");
    let web = &desired.services["web"].backends;
    assert_eq!(
        web[&"172.17.0.9:80".parse().unwrap()].source,
        Source::Docker("old".into())
    );
    assert_eq!(
        web[&"10.99.2.11:8080".parse().unwrap()].source,
        Source::Static
    );
    let shown: Vec<String> = desired.conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "service web: 10.99.2.11:8080 is claimed by the static config and by container \
             squatter; the static config keeps it",
            "service web: 172.17.0.9:80 is claimed by container old and by container young; \
             container old keeps it",
        ]
    );
    // A task after the containers: it does not take the address either.
    let t = task(
        "t1",
        &[("xlb.service", "web"), ("xlb.port", "80")],
        &[],
        &[("app", "172.17.0.9")],
    );
    let mut older = task(
        "t9",
        &[("xlb.service", "web"), ("xlb.port", "81")],
        &[],
        &[("app", "172.17.0.9")],
    );
    older.created = Some(std::time::UNIX_EPOCH);
    let mut newer = older.clone();
    newer.id = "t2".into();
    newer.created = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5));
    add_tasks(&mut desired, &config, &[t, newer, older], "xlb");
    let refused: Vec<&Source> = desired.conflicts[2..].iter().map(|c| &c.refused).collect();
    assert_eq!(
        refused,
        [&Source::Swarm("t2".into()), &Source::Swarm("t1".into())],
        "the oldest task keeps 172.17.0.9:81 whatever its id; containers keep theirs"
    );
    assert_eq!(
        desired.services["web"].backends[&"172.17.0.9:81".parse().unwrap()].source,
        Source::Swarm("t9".into())
    );
}

#[test]
fn swarm_tasks_are_held_to_the_same_limits() {
    let config = limited(r#"networks = ["app"]"#);
    let mut desired = DesiredState::from_config(&config);
    let errors = add_tasks(
        &mut desired,
        &config,
        &[
            task(
                "t1",
                &[
                    ("xlb.service", "web"),
                    ("xlb.weight", "65535"),
                    ("xlb.port", "80"),
                ],
                &[],
                &[("app", "10.0.1.7")],
            ),
            task(
                "t2",
                &[
                    ("xlb.service", "web"),
                    ("xlb.health.type", "none"),
                    ("xlb.port", "80"),
                ],
                &[],
                &[("app", "10.0.1.8")],
            ),
            task("t3", &[("xlb.service", "web")], &[(8080, 30001)], &[]),
            task(
                "t4",
                &[("xlb.service", "web"), ("xlb.port", "80")],
                &[],
                &[("app", "10.0.1.9")],
            ),
        ],
        "xlb",
    );
    let labels: Vec<&str> = errors.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(labels, ["xlb.weight", "xlb.health.type", "xlb.network"]);
    assert!(
        errors[2]
            .reason
            .starts_with("a node's published port (no network)"),
        "{errors:?}"
    );
    let joined: Vec<&Source> = desired.services["web"]
        .backends
        .values()
        .map(|b| &b.source)
        .collect();
    assert_eq!(joined, [&Source::Swarm("t4".into()), &Source::Static]);
}
