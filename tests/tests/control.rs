//! Who may steer the agent: anyone on the host reads its status, but only root (or a member
//! of agent.control_group, or a holder of agent.control_token_file's token on the API) may
//! drain, undrain or reload. Same netns topology as nat.rs. Run as root.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    time::Duration,
};

use xlb_tests::{agent::Agent, client::tcp_name, topology::Topology};

/// The CLI as user nobody, group nogroup, no other groups.
const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid",
    "nobody",
    "--regid",
    "nogroup",
    "--clear-groups",
];

/// As nobody, in group daemon only (not nogroup).
const NOBODY_IN_DAEMON: &[&str] = &[
    "setpriv",
    "--reuid",
    "nobody",
    "--regid",
    "daemon",
    "--clear-groups",
];

const FIRST: &str = "10.99.2.11:8080";

fn start_with(agent_lines: &str) -> (Topology, Agent) {
    let topo = Topology::new(2);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "[agent]\n",
        &format!("[agent]\n{agent_lines}"),
        1,
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 2, Duration::from_secs(5));
    (topo, agent)
}

/// The backends that answer 40 new connections to the VIP.
fn names(topo: &Topology) -> BTreeSet<String> {
    let vip = topo.vip(80);
    topo.client.run(move || {
        (0..40)
            .map(|_| tcp_name(vip).expect("served"))
            .collect::<BTreeSet<_>>()
    })
}

fn both() -> BTreeSet<String> {
    ["be1".to_string(), "be2".to_string()].into()
}

/// One request to the TCP API inside the lb namespace: (status code, body).
fn raw(topo: &Topology, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n");
    if let Some(token) = token {
        request += &format!("Authorization: Bearer {token}\r\n");
    }
    request += "Content-Length: 0\r\n\r\n";
    topo.lb.run(move || {
        let api: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&api, Duration::from_secs(2)).expect("API");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        let code = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {answer:?}"));
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        (code, body.to_string())
    })
}

fn state(agent: &Agent, address: &str) -> String {
    agent
        .backends("web")
        .into_iter()
        .find(|(a, _)| a == address)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

#[test]
fn nobody_reads_the_status_but_cannot_drain_undrain_or_reload() {
    let (topo, agent) = start_with("");
    let (ok, out) = agent.cli_as(NOBODY, &["status"]);
    assert!(ok && out.contains("SERVICE web"), "status as nobody: {out}");
    let (ok, out) = agent.cli_as(NOBODY, &["status", "--json"]);
    assert!(ok && out.contains("\"services\""), "{out}");

    let control = agent.control.display().to_string();
    for args in [
        &["drain", "web", FIRST][..],
        &["undrain", "web", FIRST],
        &["reload"],
    ] {
        let (ok, out) = agent.cli_as(NOBODY, args);
        assert!(!ok, "xlb {args:?} as nobody worked: {out}");
        assert!(
            out.contains(&control) && out.contains("only root"),
            "the refusal names the socket and why: {out}"
        );
    }
    // The TCP API does not know who asks: it refuses every change, and says where to go.
    for path in [&format!("/backends/web/{FIRST}/drain")[..], "/reload"] {
        let (code, body) = raw(&topo, "POST", path, None);
        assert_eq!(code, 403, "POST {path}: {body}");
        assert!(body.contains(&control), "{body}");
        let (code, _) = raw(&topo, "POST", path, Some("guess"));
        assert_eq!(code, 403, "no token is configured: none works");
    }
    let (code, body) = raw(&topo, "POST", "/status", None);
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("control socket"), "{body}");

    assert_eq!(state(&agent, FIRST), "up");
    assert_eq!(names(&topo), both(), "both backends serve on");
    let log = agent.log_text();
    assert!(
        !log.contains("backend drained") && !log.contains("reloaded"),
        "{log}"
    );

    let meta = std::fs::symlink_metadata(&agent.control).expect("the control socket");
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid()),
        (0o600, 0),
        "root only"
    );
}

#[test]
fn root_drains_undrains_and_reloads_through_the_control_socket() {
    let (topo, agent) = start_with("");
    let (ok, out) = agent.cli(&["drain", "web", FIRST]);
    assert!(ok, "{out}");
    assert_eq!(state(&agent, FIRST), "drain");
    assert_eq!(names(&topo), ["be2".to_string()].into());
    let (ok, out) = agent.cli(&["undrain", "web", FIRST]);
    assert!(ok, "{out}");
    assert_eq!(state(&agent, FIRST), "up");
    let (ok, out) = agent.cli(&["reload"]);
    assert!(ok && out.contains("reloaded"), "{out}");
    // --control names the socket as well (XLB_CONTROL is the harness's default).
    let control = format!("unix:{}", agent.control.display());
    let (ok, out) = agent.cli(&["reload", "--control", &control]);
    assert!(ok, "{out}");
    assert_eq!(names(&topo), both());
}

#[test]
fn members_of_control_group_may_steer() {
    let (topo, agent) = start_with("control_group = \"nogroup\"\n");
    let meta = std::fs::symlink_metadata(&agent.control).expect("the control socket");
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, 65534),
        "0660, group nogroup"
    );
    let (ok, out) = agent.cli_as(NOBODY_IN_DAEMON, &["drain", "web", FIRST]);
    assert!(!ok, "not a member: {out}");
    assert_eq!(state(&agent, FIRST), "up");
    let (ok, out) = agent.cli_as(NOBODY, &["drain", "web", FIRST]);
    assert!(ok, "a member of nogroup: {out}");
    assert_eq!(state(&agent, FIRST), "drain");
    assert_eq!(names(&topo), ["be2".to_string()].into());
    let (ok, out) = agent.cli_as(NOBODY, &["undrain", "web", FIRST]);
    assert!(ok, "{out}");
    assert_eq!(names(&topo), both());
}

#[test]
fn a_bearer_token_allows_control_on_the_api() {
    let topo = Topology::new(2);
    let token = topo.dir.join("token");
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "[agent]\n",
        &format!("[agent]\ncontrol_token_file = \"{}\"\n", token.display()),
        1,
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 2, Duration::from_secs(5));
    let drain = format!("/backends/web/{FIRST}/drain");
    for wrong in [
        None,
        Some("0123456789abcdeg"),
        Some("0123456789abcdef0"),
        Some(""),
    ] {
        let (code, body) = raw(&topo, "POST", &drain, wrong);
        assert_eq!(code, 401, "token {wrong:?}: {body}");
    }
    assert_eq!(state(&agent, FIRST), "up");
    let (code, body) = raw(&topo, "POST", &drain, Some("0123456789abcdef"));
    assert_eq!((code, body.trim()), (200, "web 10.99.2.11:8080 drained"));
    assert_eq!(state(&agent, FIRST), "drain");
    assert_eq!(names(&topo), ["be2".to_string()].into());
    let (code, body) = raw(&topo, "POST", "/reload", Some("0123456789abcdef"));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let topo = Topology::new(1);
    let token = topo.dir.join("token");
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "[agent]\n",
        &format!("[agent]\ncontrol_token_file = \"{}\"\n", token.display()),
        1,
    );
    let out = Agent::start_refused(&topo, &config);
    assert!(out.contains("chmod o-rw"), "{out}");
    let _ = xlb::loader::detach(std::path::Path::new(&Agent::pin_path_for(&topo)));
}

#[test]
fn a_file_at_the_control_path_stays_and_the_agent_does_not_start() {
    let topo = Topology::new(1);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all);
    let path = topo.dir.join("control.sock");
    std::fs::write(&path, "not a socket").unwrap();
    let out = Agent::start_refused(&topo, &config);
    assert!(
        out.contains(&format!("{} exists and is not a socket", path.display())),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    // Refused before the data path was touched: nothing attached, nothing pinned.
    let pins = Agent::pin_path_for(&topo);
    let pinned: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pinned.is_empty(), "pinned: {pinned:?}");
    let _ = xlb::loader::detach(std::path::Path::new(&pins));

    // A stale socket, left by an agent that died, is replaced.
    std::fs::remove_file(&path).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let agent = Agent::start(&topo, &config);
    let (ok, out) = agent.cli(&["reload"]);
    assert!(ok, "{out}");
}

#[test]
fn xlb_check_wants_api_public_for_an_api_beyond_loopback() {
    let dir = std::env::temp_dir().join(format!("xlb-test-check-public-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xlb.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(xlb_tests::process::binary("xlb"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("xlb check");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let public = "[agent]\ninterfaces = [\"eth0\"]\napi = \"0.0.0.0:9900\"\n";
    let (ok, out) = check(public);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{}:3: agent.api: 0.0.0.0:9900 is not a loopback address",
            path.display()
        )) && out.contains("api_public = true"),
        "{out}"
    );
    let (ok, out) = check(&public.replace("[agent]\n", "[agent]\napi_public = true\n"));
    assert!(ok, "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
