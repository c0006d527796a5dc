//! Pin paths that cannot hurt the host, and attachments that never vanish silently: a bpffs
//! is mounted only on an empty pin directory (never over one that holds files), `xlb
//! detach` deletes nothing that is not a pin, and under `ip netns exec` (a private mount
//! namespace whose bpffs dies with the command) `xlb decap` and `xlb run` refuse instead
//! of reporting an attachment that is gone a moment later. Run as root.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    netns::{Netns, unique_prefix},
    process::{Proc, binary, wait_for},
    topology::Topology,
};

const VIP: &str = "10.99.100.1";

/// A scratch directory "lib" under the test's directory, holding a file, as /var/lib does.
fn full_directory(dir: &Path) -> PathBuf {
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).expect("lib");
    std::fs::write(lib.join("keep"), "kept").expect("keep");
    lib
}

fn read_keep(lib: &Path) -> String {
    std::fs::read_to_string(lib.join("keep")).unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// On drop (also on panic), unmounts a bpffs left on these paths: one the agent mounted
/// on the pin directory if the test failed before detach, or one today's code mounted
/// over the parent.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for path in &self.0 {
            for _ in 0..4 {
                if !xlb::bpffs::is_bpffs(path).unwrap_or(false) {
                    break;
                }
                let _ = Command::new("umount").arg("-l").arg(path).status();
            }
        }
    }
}

#[test]
fn a_pin_path_below_a_directory_with_files_mounts_only_on_its_own_directory() {
    let topo = Topology::without_servers(1);
    let lib = full_directory(&topo.dir);
    let pin = lib.join("xlb");
    let _unmount = Unmount(vec![pin.clone(), lib.clone()]);
    let config = topo.config(pin.to_str().unwrap(), &[&topo.backends[0]]);
    let mut agent = Agent::start(&topo, &config);
    agent.pin_path = pin.clone();
    let hidden = read_keep(&lib);
    let (lib_bpffs, pin_bpffs) = (
        xlb::bpffs::is_bpffs(&lib).unwrap(),
        xlb::bpffs::is_bpffs(&pin).unwrap(),
    );
    agent.stop();
    agent.detach();
    let after = (read_keep(&lib), pin.exists());
    assert_eq!(hidden, "kept", "the directory's files were hidden");
    assert!(!lib_bpffs, "a bpffs was mounted over {}", lib.display());
    assert!(pin_bpffs, "the pin directory is not on a bpffs");
    assert_eq!(
        after,
        ("kept".into(), false),
        "after detach: the file stays, the pin directory goes"
    );
}

#[test]
fn a_pin_path_that_holds_files_is_refused_and_kept() {
    let topo = Topology::without_servers(1);
    let lib = full_directory(&topo.dir);
    let _unmount = Unmount(vec![lib.clone(), topo.dir.clone()]);
    let config = topo.config(lib.to_str().unwrap(), &[&topo.backends[0]]);
    let path = topo.dir.join("xlb.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", topo.lb.path()))
        .arg("--")
        .arg(binary("xlb"))
        .args(["run", "--config"])
        .arg(&path);
    let mut proc = Proc::spawn("xlb", cmd, topo.dir.join("xlb.log"));
    let status = proc.wait_exit(Duration::from_secs(10));
    let out = proc.log_text();
    drop(proc);
    let kept = read_keep(&lib);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent started on {}:\n{out}",
        lib.display()
    );
    assert!(out.contains("not an empty directory"), "{out}");
    assert_eq!(kept, "kept", "{out}");
}

#[test]
fn detach_deletes_no_regular_file_off_a_bpffs() {
    let dir = std::env::temp_dir().join(format!("xlb-test-{}-fake-pins", unique_prefix()));
    let files = [
        "XLB_SERVICES_V1",
        "notes.txt",
        "links/xdp_eth0",
        "programs/xlb_xdp",
    ];
    for name in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "data").unwrap();
    }
    let pin = dir.to_str().unwrap();
    let runs = [
        vec!["detach", "--pin-path", pin],
        vec!["detach", "--pin-path", pin, "--force"],
        vec!["decap", "--detach", "--pin-path", pin],
    ];
    let mut outcomes = Vec::new();
    for args in runs {
        let out = Command::new(binary("xlb")).args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        outcomes.push((args.join(" "), out.status.success(), text));
    }
    let left: Vec<bool> = files.iter().map(|f| dir.join(f).is_file()).collect();
    let _ = std::fs::remove_dir_all(&dir);
    for (args, ok, text) in &outcomes {
        assert!(!ok, "xlb {args} succeeded on a path off bpffs");
        assert!(
            text.contains("not on a BPF filesystem"),
            "xlb {args}: {text}"
        );
    }
    assert_eq!(left, [true; 4], "files deleted: {files:?} {outcomes:?}");
}

/// A namespace with an interface "eth0" (a veth whose peer stays inside).
fn host() -> Netns {
    let ns = Netns::new(&format!("{}-h", unique_prefix()));
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "eth1", "up"]);
    ns
}

fn xdp_on_eth0(ns: &Netns) -> bool {
    ns.ip(&["-d", "link", "show", "eth0"]).contains("prog/xdp")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn decap_under_ip_netns_exec_refuses_instead_of_vanishing() {
    let ns = host();
    let pin = format!("/sys/fs/bpf/xlb-test-{}-decap", ns.name);
    let decap = [
        "decap",
        "--interface",
        "eth0",
        "--vip",
        VIP,
        "--pin-path",
        &pin,
    ];
    let (ok, out) = run(Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(binary("xlb"))
        .args(decap));
    // What the command said must hold once it is gone.
    std::thread::sleep(Duration::from_millis(300));
    let attached = xdp_on_eth0(&ns);
    let vip_on_lo = ns.ip(&["addr", "show", "dev", "lo"]).contains(VIP);
    if ok {
        assert!(
            attached,
            "it said it attached, and nothing is on eth0:\n{out}"
        );
    } else {
        assert!(out.contains("nsenter --net="), "no hint what to do:\n{out}");
        assert!(
            !attached && !vip_on_lo,
            "refused, but changed the host:\n{out}"
        );
    }
    assert!(!ok, "under ip netns exec the pins are private: {out}");

    // The way the hint says works, and stays, and --status warns about any source.
    let nsenter = format!("--net={}", ns.path());
    let (ok, out) = run(Command::new("nsenter")
        .args([nsenter.as_str(), "--"])
        .arg(binary("xlb"))
        .args(decap));
    let attached = wait_for(Duration::from_secs(2), || xdp_on_eth0(&ns).then_some(()));
    let (_, status) =
        run(Command::new(binary("xlb")).args(["decap", "--status", "--pin-path", &pin]));
    let (detached, gone) = run(Command::new("nsenter")
        .args([nsenter.as_str(), "--"])
        .arg(binary("xlb"))
        .args(["decap", "--detach", "--pin-path", &pin]));
    assert!(ok && attached.is_some(), "{out}");
    assert!(
        out.contains("warning") || out.contains("any source"),
        "{out}"
    );
    assert!(status.contains("from: any (warning"), "{status}");
    assert!(status.contains("refused_source"), "{status}");
    assert!(detached, "{gone}");
}

#[test]
fn decap_status_lists_the_accepted_sources() {
    let ns = host();
    let pin = format!("/sys/fs/bpf/xlb-test-{}-decap", ns.name);
    let nsenter = format!("--net={}", ns.path());
    let xlb = |args: &[&str]| {
        run(Command::new("nsenter")
            .args([nsenter.as_str(), "--"])
            .arg(binary("xlb"))
            .args(args))
    };
    let (ok, out) = xlb(&[
        "decap",
        "--interface",
        "eth0",
        "--vip",
        VIP,
        "--pin-path",
        &pin,
        "--from",
        "10.99.5.2",
        "--from",
        "10.99.6.0/24",
    ]);
    let (_, status) = xlb(&["decap", "--status", "--pin-path", &pin]);
    let (detached, gone) = xlb(&["decap", "--detach", "--pin-path", &pin]);
    assert!(ok, "{out}");
    assert!(!out.contains("any source"), "{out}");
    assert!(
        status.contains("from: 10.99.5.2/32, 10.99.6.0/24"),
        "{status}"
    );
    assert!(detached, "{gone}");
}

#[test]
fn the_agent_under_ip_netns_exec_refuses_to_start() {
    let topo = Topology::without_servers(1);
    let pin = Agent::pin_path_for(&topo);
    let path = topo.dir.join("xlb.toml");
    std::fs::write(&path, topo.config(&pin, &[&topo.backends[0]])).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.lb.name])
        .arg(binary("xlb"))
        .args(["run", "--config"])
        .arg(&path);
    let mut proc = Proc::spawn("xlb", cmd, topo.dir.join("xlb.log"));
    let status = proc.wait_exit(Duration::from_secs(10));
    let out = proc.log_text();
    drop(proc);
    let _ = xlb::loader::detach(Path::new(&pin));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent started in a private mount namespace:\n{out}"
    );
    assert!(out.contains("nsenter --net="), "{out}");
}
