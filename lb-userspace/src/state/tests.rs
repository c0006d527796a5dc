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
    // The same endpoint again replaces the backend: the latest word wins.
    desired.add_backend("web", endpoint, backend(Source::Swarm("t1".into())));
    assert_eq!(
        desired.services["web"].backends[&endpoint].source,
        Source::Swarm("t1".into())
    );
}
