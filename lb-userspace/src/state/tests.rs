use std::path::Path;

use super::*;

fn config() -> Config {
    let text = r#"
[agent]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.99.100.1"
port = 80
  [[service.backend]]
  address = "10.99.2.11"
  port = 8080
  weight = 50
"#;
    Config::parse(Path::new("xlb.toml"), text).unwrap()
}

fn backend(source: Source) -> BackendSpec {
    BackendSpec {
        weight: 100,
        source,
        health: HealthOverride::default(),
        bridge: None,
        delivery: Delivery::default(),
    }
}

#[test]
fn the_config_gives_the_services_and_their_static_backends() {
    let desired = DesiredState::from_config(&config());
    let web = &desired.services["web"];
    assert_eq!((web.port, web.protocol), (80, Protocol::Tcp));
    let b = &web.backends[&"10.99.2.11:8080".parse().unwrap()];
    assert_eq!((b.weight, &b.source), (50, &Source::Static));
}

#[test]
fn backends_join_only_declared_services() {
    let mut desired = DesiredState::from_config(&config());
    let endpoint: Endpoint = "172.17.0.2:80".parse().unwrap();
    assert!(desired.add_backend("web", endpoint, backend(Source::Docker("a".into()))));
    assert!(!desired.add_backend("admin", endpoint, backend(Source::Docker("b".into()))));
    assert_eq!(desired.services.len(), 1, "no service is made up");
    let web = &desired.services["web"].backends;
    assert_eq!(web.len(), 2);
    assert_eq!(web[&endpoint].source, Source::Docker("a".into()));
}

#[test]
fn an_endpoint_claimed_twice_stays_with_its_first_claim_and_is_a_conflict() {
    let mut desired = DesiredState::from_config(&config());
    let endpoint: Endpoint = "172.17.0.2:80".parse().unwrap();
    let fixed: Endpoint = "10.99.2.11:8080".parse().unwrap();
    desired.add_backend("web", endpoint, backend(Source::Docker("a".into())));
    desired.add_backend("web", endpoint, backend(Source::Swarm("t1".into())));
    desired.add_backend("web", fixed, backend(Source::Docker("b".into())));
    let web = &desired.services["web"].backends;
    assert_eq!(web[&endpoint].source, Source::Docker("a".into()));
    assert_eq!(
        (web[&fixed].source.clone(), web[&fixed].weight),
        (Source::Static, 50)
    );
    let shown: Vec<String> = desired.conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "service web: 172.17.0.2:80 is claimed by container a and by swarm task t1; container a keeps it",
            "service web: 10.99.2.11:8080 is claimed by the static config and by container b; the static config keeps it",
        ]
    );
}
