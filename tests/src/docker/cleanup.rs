//! Undoing a daemon: its containers, its processes (by PID, pinned by pidfd), its cgroups;
//! and [`LeakCheck`], which proves afterwards that nothing of a harness is left.
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Daemon, DockerHost, run_bounded};
use crate::{netns::sh, process::wait_for};

impl Daemon {
    /// Removes every container (SIGKILL), stops dockerd then containerd by PID, kills what is
    /// left of this daemon (shims; the containers of a killed dockerd) by PID and removes its
    /// cgroups. Idempotent; Drop calls it.
    pub fn shutdown(&mut self) {
        if self.dockerd_running() {
            let ids = run_bounded(
                self.docker_command().args(["ps", "-aq"]),
                Duration::from_secs(20),
            )
            .unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut cmd = self.docker_command();
                cmd.args(["rm", "-f", "-v"]).args(&ids);
                if let Err(e) = run_bounded(&mut cmd, Duration::from_secs(30)) {
                    eprintln!("[{}] removing containers: {e}", self.name);
                }
            }
        }
        self.stop_dockerd(Duration::from_secs(20));
        if let Some(mut p) = self.containerd.take() {
            p.stop(Duration::from_secs(10));
        }
        self.kill_leftovers();
    }

    /// Directories of this daemon's cgroup parent, in every hierarchy.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_dirs(&self.cgroup_parent)
    }

    /// This daemon's private mount namespace, while it runs.
    pub fn mount_ns(&self) -> Option<&MountNs> {
        self.mount_ns.as_ref()
    }

    /// The cgroup parent of its containers (`/xlb-test-NAME`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// PIDs that belong to this daemon: in its cgroup parent (container processes) or in its
    /// private mount namespace (shims, docker-proxy, anything it started).
    fn leftover_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        fn walk(dir: &Path, pids: &mut Vec<i32>) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), pids);
                }
            }
        }
        for dir in self.cgroup_dirs() {
            walk(&dir, &mut pids);
        }
        if let Some(ns) = &self.mount_ns {
            pids.extend(ns.pids());
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn kill_leftovers(&mut self) {
        let clean = wait_for(Duration::from_secs(10), || {
            let pids = self.leftover_pids();
            for &pid in &pids {
                kill_if(pid, |pid| self.owns(pid));
            }
            pids.is_empty().then_some(())
        });
        if clean.is_none() {
            eprintln!(
                "[{}] processes left after shutdown: {:?}",
                self.name,
                self.leftover_pids()
            );
        }
        // Deepest first; a cgroup goes once its processes are gone.
        let mut dirs = Vec::new();
        fn collect(dir: &Path, dirs: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    collect(&e.path(), dirs);
                }
            }
            dirs.push(dir.to_path_buf());
        }
        for dir in self.cgroup_dirs() {
            collect(&dir, &mut dirs);
        }
        for dir in dirs {
            let gone = wait_for(Duration::from_secs(2), || {
                std::fs::remove_dir(&dir)
                    .ok()
                    .or((!dir.exists()).then_some(()))
            });
            if gone.is_none() {
                eprintln!("[{}] could not remove cgroup {}", self.name, dir.display());
            }
        }
        // Only now may the namespace go (and its inode number be reused).
        self.mount_ns = None;
    }

    /// Whether `pid` is in this daemon's mount namespace or cgroup parent.
    fn owns(&self, pid: i32) -> bool {
        self.mount_ns.as_ref().is_some_and(|ns| ns.contains(pid))
            || in_cgroup(pid, &self.cgroup_parent)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A mount namespace, pinned by an open file so that its identity (`mnt:[inode]`) stays
/// unique while we hold it: a freed namespace's inode number is soon reused by a new one
/// (another test's daemon), and comparing with a stale number would find, or kill, the wrong
/// processes.
#[derive(Debug)]
pub struct MountNs {
    /// `mnt:[N]`
    pub id: String,
    _pin: File,
}

impl MountNs {
    /// The mount namespace of process `pid`.
    pub fn of(pid: i32) -> std::io::Result<MountNs> {
        let path = format!("/proc/{pid}/ns/mnt");
        let pin = File::open(&path)?;
        let id = std::fs::read_link(&path)?.to_string_lossy().into_owned();
        // The process may have changed namespace between the two calls: check the pinned one.
        let pinned = std::fs::read_link(format!("/proc/self/fd/{}", pin.as_raw_fd()))?;
        if pinned.to_string_lossy() != id {
            return Err(std::io::Error::other("process changed mount namespace"));
        }
        Ok(MountNs { id, _pin: pin })
    }

    pub fn try_clone(&self) -> std::io::Result<MountNs> {
        Ok(MountNs {
            id: self.id.clone(),
            _pin: self._pin.try_clone()?,
        })
    }

    pub fn contains(&self, pid: i32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .is_ok_and(|m| m.to_string_lossy() == self.id)
    }

    /// PIDs of the processes in it.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
            .filter(|&pid| self.contains(pid))
            .collect()
    }
}

/// Whether process `pid` is in cgroup `parent` or below it, in any hierarchy.
fn in_cgroup(pid: i32, parent: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines().any(|l| {
        l.splitn(3, ':').nth(2).is_some_and(|path| {
            path == parent
                || path
                    .strip_prefix(parent)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    })
}

/// SIGKILL to `pid` if `owned(pid)` holds, checked after a pidfd pins the process: a PID that
/// was recycled in between is never signalled.
fn kill_if(pid: i32, owned: impl Fn(i32) -> bool) {
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh fd that we own.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if owned(pid) {
        // SAFETY: signals exactly the process the pidfd refers to (or fails if it is gone).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Start time of a process (field 22 of /proc/PID/stat), to tell a recycled PID apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count from the closing parenthesis.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Directories of cgroup `parent` in every mounted hierarchy.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(rel))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// What a harness created, recorded before it drops, to check afterwards that nothing of it
/// is left: daemons (by PID), processes in their mount namespaces (shims, containers of a
/// killed dockerd), cgroups, network namespaces and the scratch directory.
#[derive(Debug, Default)]
pub struct LeakCheck {
    /// (PID, start time) of each dockerd and containerd.
    pids: Vec<(u32, Option<u64>)>,
    mount_namespaces: Vec<MountNs>,
    cgroup_parents: Vec<String>,
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl LeakCheck {
    pub fn add_daemon(&mut self, daemon: &Daemon) {
        self.pids
            .extend(daemon.pids().into_iter().map(|p| (p, start_time(p))));
        self.mount_namespaces
            .extend(daemon.mount_ns().map(|ns| ns.try_clone().expect("dup")));
        self.cgroup_parents.push(daemon.cgroup_parent().to_string());
    }

    pub fn of_host(host: &DockerHost) -> LeakCheck {
        let mut check = LeakCheck::default();
        check.add_daemon(&host.daemon);
        check.netns = vec![host.client.name.clone(), host.host.name.clone()];
        check.dirs = vec![host.dir.clone()];
        check
    }

    pub fn of_swarm(swarm: &crate::swarm::Swarm) -> LeakCheck {
        let mut check = LeakCheck::default();
        for node in &swarm.nodes {
            check.add_daemon(&node.daemon);
        }
        check.netns = swarm.netns_names();
        check.dirs = vec![swarm.dir.clone()];
        check
    }

    /// Panics with everything that is still there.
    pub fn assert_clean(&self) {
        let mut left = Vec::new();
        for &(pid, started) in &self.pids {
            if start_time(pid).is_some_and(|t| Some(t) == started) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                left.push(format!("{} {pid}", comm.unwrap_or_default().trim()));
            }
        }
        for ns in &self.mount_namespaces {
            let pids = ns.pids();
            if !pids.is_empty() {
                left.push(format!("processes in {}: {pids:?}", ns.id));
            }
        }
        for parent in &self.cgroup_parents {
            for dir in cgroup_dirs(parent) {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        let list = sh(&["ip", "netns", "list"]);
        for name in &self.netns {
            if list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
            {
                left.push(format!("netns {name}"));
            }
        }
        for dir in &self.dirs {
            if dir.exists() {
                left.push(format!("dir {}", dir.display()));
            }
        }
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}
