use std::collections::BTreeMap;

use bollard::errors::Error as DockerError;

use super::{inspect::is_gone, *};

fn info(id: &str, stopping: bool) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        name: id.into(),
        labels: BTreeMap::new(),
        networks: Vec::new(),
        exposed: Vec::new(),
        health: None,
        stopping,
        created: None,
    }
}

fn running(id: &str) -> Running {
    Running {
        info: info(id, false),
        stop_signal: SIGTERM,
    }
}

/// (id, stopping) of each tracked container.
fn summary(t: &Tracked) -> Vec<(&str, bool)> {
    t.containers
        .values()
        .map(|c| (c.id.as_str(), c.stopping))
        .collect()
}

fn no_attributes() -> HashMap<String, String> {
    HashMap::new()
}

fn signal(n: &str) -> HashMap<String, String> {
    HashMap::from([("signal".to_string(), n.to_string())])
}

#[test]
fn events_map_to_what_they_mean_for_a_backend() {
    for (action, effect) in [
        ("start", Effect::Refresh),
        ("health_status: healthy", Effect::Refresh),
        ("health_status: unhealthy", Effect::Refresh),
        ("kill", Effect::Stopping),
        ("die", Effect::Remove),
        ("destroy", Effect::Remove),
        ("pause", Effect::Remove),
        ("exec_start: sh", Effect::Ignore),
        ("attach", Effect::Ignore),
    ] {
        assert_eq!(
            Effect::of(action, &no_attributes(), SIGTERM),
            effect,
            "{action}"
        );
    }
}

#[test]
fn only_the_stop_signal_or_sigkill_drains_a_container() {
    // Docker writes the signal's number.
    for (sig, stop_signal, effect) in [
        ("15", SIGTERM, Effect::Stopping),
        ("9", SIGTERM, Effect::Stopping),
        ("1", SIGTERM, Effect::Ignore),
        ("10", SIGTERM, Effect::Ignore),
        ("12", SIGTERM, Effect::Ignore),
        // nginx's image stops with SIGQUIT: TERM is not its stop.
        ("3", libc::SIGQUIT, Effect::Stopping),
        ("15", libc::SIGQUIT, Effect::Ignore),
        ("9", libc::SIGQUIT, Effect::Stopping),
        ("SIGHUP", SIGTERM, Effect::Ignore),
        ("SIGTERM", SIGTERM, Effect::Stopping),
        ("not a signal", SIGTERM, Effect::Ignore),
    ] {
        assert_eq!(
            Effect::of("kill", &signal(sig), stop_signal),
            effect,
            "signal {sig}, stop signal {stop_signal}"
        );
    }
}

#[test]
fn a_kill_event_is_judged_by_that_containers_stop_signal() {
    let mut t = Tracked::default();
    t.update(
        "nginx",
        Lookup::Running(Running {
            info: info("nginx", false),
            stop_signal: libc::SIGQUIT,
        }),
    );
    assert_eq!(t.stop_signal("nginx"), libc::SIGQUIT);
    assert_eq!(t.stop_signal("unknown"), SIGTERM, "the default");
}

#[test]
fn signals_parse_as_docker_writes_them() {
    for (text, n) in [
        ("15", Some(15)),
        ("SIGTERM", Some(15)),
        ("TERM", Some(15)),
        ("sigusr1", Some(libc::SIGUSR1)),
        ("SIGQUIT", Some(libc::SIGQUIT)),
        ("SIGRTMIN+3", Some(37)),
        ("RTMAX-1", Some(63)),
        ("0", None),
        ("99", None),
        ("SIGNOPE", None),
        ("", None),
    ] {
        assert_eq!(parse_signal(text), n, "{text:?}");
    }
}

#[test]
fn only_a_404_says_a_container_is_gone() {
    let status = |status_code| DockerError::DockerResponseServerError {
        status_code,
        message: "x".into(),
    };
    assert!(is_gone(&status(404)));
    assert!(!is_gone(&status(500)));
    assert!(!is_gone(&status(503)));
    assert!(!is_gone(&DockerError::RequestTimeoutError));
}

#[test]
fn an_inspection_without_an_answer_keeps_the_backend_as_it_was() {
    let mut t = Tracked::default();
    t.update("a", Lookup::Running(running("a")));
    t.update("b", Lookup::Running(running("b")));
    assert!(t.mark_stopping("b"));
    t.update("a", Lookup::Unknown("500 Internal Server Error".into()));
    t.update("b", Lookup::Unknown("timeout".into()));
    // A new container that does not answer is not made up.
    t.update("new", Lookup::Unknown("timeout".into()));
    assert_eq!(summary(&t), [("a", false), ("b", true)]);
    let unresolved: Vec<&str> = t.unresolved.keys().map(String::as_str).collect();
    assert_eq!(unresolved, ["a", "b", "new"]);
    assert!(t.retry_at.is_some(), "asked again");

    // The answers, when they come, count.
    t.update("a", Lookup::Running(running("a")));
    t.update("b", Lookup::NotRunning);
    t.update("new", Lookup::Running(running("new")));
    assert_eq!(summary(&t), [("a", false), ("new", false)]);
    assert!(t.unresolved.is_empty());
}

#[test]
fn a_resync_keeps_stopping_containers_draining_and_drops_vanished_ones() {
    let mut t = Tracked::default();
    for id in ["a", "b", "gone"] {
        t.update(id, Lookup::Running(running(id)));
    }
    t.mark_stopping("a");
    let listed = Listed {
        running: ["a", "b", "new"]
            .into_iter()
            .map(|id| (id.to_string(), running(id)))
            .collect(),
        unknown: BTreeMap::new(),
    };
    t.resync(listed);
    assert_eq!(summary(&t), [("a", true), ("b", false), ("new", false)]);
}

#[test]
fn a_resync_keeps_listed_containers_that_did_not_answer() {
    let mut t = Tracked::default();
    for id in ["a", "b"] {
        t.update(id, Lookup::Running(running(id)));
    }
    t.mark_stopping("b");
    let listed = Listed {
        running: BTreeMap::new(),
        unknown: [("a", "500"), ("b", "timeout"), ("new", "500")]
            .into_iter()
            .map(|(id, e)| (id.to_string(), e.to_string()))
            .collect(),
    };
    t.resync(listed);
    assert_eq!(summary(&t), [("a", false), ("b", true)]);
    assert_eq!(t.unresolved.len(), 3);
    // Unresolved but not listed any more: it stopped.
    t.resync(Listed::default());
    assert!(t.containers.is_empty() && t.unresolved.is_empty());
}

#[test]
fn a_new_session_starts_from_the_last_snapshot() {
    let t = Tracked::from_snapshot(&[info("a", true), info("b", false)]);
    assert_eq!(summary(&t), [("a", true), ("b", false)]);
}
