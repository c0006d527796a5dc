use std::{path::Path, time::Duration};

use tokio::sync::watch;

use super::{supervise::Report, *};

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
name = "api"
vip = "10.99.100.1"
port = 81
"#;
    Config::parse(Path::new("xlb.toml"), text).unwrap()
}

fn endpoint(s: &str) -> Endpoint {
    s.parse().unwrap()
}

/// A service's backends: (endpoint, source, bridge).
fn backends(desired: &DesiredState, service: &str) -> Vec<(String, Source, Option<String>)> {
    desired.services[service]
        .backends
        .iter()
        .map(|(e, b)| (e.to_string(), b.source.clone(), b.bridge.clone()))
        .collect()
}

/// The pinned data path of a previous agent: web had its static backend and a container
/// on `lo` (ifindex 1, standing in for a bridge); api had a routed Swarm task; a service
/// the config no longer has had one more.
fn pinned(svc: &ServiceSpec) -> Vec<(Endpoint, Delivery)> {
    let local = Delivery {
        bridge: 1,
        veth: None,
    };
    match svc.name.as_str() {
        "web" => vec![
            (endpoint("10.99.2.11:8080"), Delivery::default()),
            (endpoint("172.17.0.2:9000"), local),
        ],
        "api" => vec![(endpoint("10.98.0.5:30001"), Delivery::default())],
        _ => vec![(endpoint("10.0.0.1:1"), Delivery::default())],
    }
}

#[test]
fn unclaimed_backends_are_the_pinned_ones_the_config_does_not_declare() {
    let declared = DesiredState::from_config(&config());
    let kept = unclaimed(&declared, pinned);
    let web: Vec<(String, Option<String>)> = kept["web"]
        .iter()
        .map(|(e, b)| (e.to_string(), b.bridge.clone()))
        .collect();
    assert_eq!(
        web,
        [("172.17.0.2:9000".to_string(), Some("lo".to_string()))],
        "the static backend is the config's; the container keeps its bridge"
    );
    assert_eq!(kept["api"].len(), 1);
    assert_eq!(kept["api"][&endpoint("10.98.0.5:30001")].bridge, None);
    assert_eq!(kept.len(), 2);
    assert!(
        kept.values()
            .flatten()
            .all(|(_, b)| b.source == Source::Pinned)
    );
}

/// A watcher that publishes `value` after `delay`, then idles.
fn answers<T: Clone + Send + Sync + 'static>(
    board: &Board,
    name: &str,
    value: T,
    delay: Duration,
) -> Watch<T> {
    Watch::start(
        board.register(name),
        Backoff::default(),
        move |tx: watch::Sender<Option<T>>, report: Report| {
            let value = value.clone();
            async move {
                tokio::time::sleep(delay).await;
                report.connected(None);
                tx.send_replace(Some(value));
                std::future::pending::<()>().await;
            }
        },
    )
}

#[tokio::test(start_paused = true)]
async fn pinned_backends_are_kept_until_every_docker_source_has_answered() {
    let config = config();
    let board = Board::default();
    let mut sources = Sources {
        docker: Some(DockerSources {
            config: config.docker.clone().unwrap(),
            containers: answers(&board, "docker", Vec::new(), Duration::from_secs(1)),
            swarm: answers(&board, "swarm", Vec::new(), Duration::from_secs(2)),
        }),
        board,
        unclaimed: Unclaimed::new(),
    };
    sources.keep_until_ready(unclaimed(&DesiredState::from_config(&config), pinned));

    // Docker has not answered: the static backend serves, the container's stays.
    let (desired, _) = sources.desired(&config);
    assert_eq!(
        backends(&desired, "web"),
        [
            ("10.99.2.11:8080".into(), Source::Static, None),
            ("172.17.0.2:9000".into(), Source::Pinned, Some("lo".into())),
        ]
    );
    assert_eq!(backends(&desired, "api").len(), 1);

    // Containers answered (no container), Swarm not yet: still kept.
    sources.changed().await;
    assert!(!sources.ready());
    assert_eq!(backends(&sources.desired(&config).0, "web").len(), 2);

    // Both answered: only what they say, and it stays so.
    sources.changed().await;
    assert!(sources.ready());
    let (desired, _) = sources.desired(&config);
    assert_eq!(
        backends(&desired, "web"),
        [("10.99.2.11:8080".into(), Source::Static, None)]
    );
    assert!(backends(&desired, "api").is_empty());
    assert!(sources.unclaimed.is_empty());
    // Once answered, a later call keeps nothing.
    sources.keep_until_ready(unclaimed(&DesiredState::from_config(&config), pinned));
    assert!(sources.unclaimed.is_empty());
}

#[tokio::test]
async fn without_docker_nothing_is_kept() {
    let mut config = config();
    config.docker = None;
    let mut sources = Sources::default();
    sources.configure(&config);
    sources.keep_until_ready(unclaimed(&DesiredState::from_config(&config), pinned));
    let (desired, _) = sources.desired(&config);
    assert_eq!(backends(&desired, "web").len(), 1);
    assert!(sources.board().snapshot().is_empty());
}
