//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`) inside a
//! test's namespace: the DOM of a page after its scripts ran, or a screenshot. Each run has
//! its own profile directory, its own process group (ended by its id if it overruns), and
//! a bounded time.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long one run may take (it starts a browser).
const LIMIT: Duration = Duration::from_secs(60);
/// Virtual time the page's scripts get before the DOM is taken.
const SCRIPT_TIME_MS: u32 = 4000;

pub struct Browser {
    ns_path: String,
    profile: PathBuf,
}

impl Browser {
    /// Runs in `ns`, keeping its profile under `dir`.
    pub fn new(ns: &Netns, dir: &Path) -> Browser {
        Browser {
            ns_path: ns.path(),
            profile: dir.join("chromium"),
        }
    }

    /// The DOM of `url` once its scripts had their time.
    pub fn dump_dom(&self, url: &str) -> String {
        self.run(&["--dump-dom", url])
    }

    /// Saves a screenshot of `url` (after its scripts ran) as PNG at `path`.
    pub fn screenshot(&self, url: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.run(&[
            &format!("--screenshot={}", path.display()),
            "--window-size=1280,1500",
            url,
        ]);
        let png = std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {path:?}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{path:?} is not a PNG");
    }

    fn run(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path))
            .args([
                "--",
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
            ])
            // Root has no sandbox; nothing here is on the network but the agent.
            .args([
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
            ])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .arg(format!("--virtual-time-budget={SCRIPT_TIME_MS}"))
            .args(args)
            .env("HOME", &self.profile)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let child = cmd
            .spawn()
            .expect("chromium runs (cargo xtask setup installs it)");
        let pid = child.id() as i32;
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = loop {
            if let Ok(out) = rx.recv_timeout(Duration::from_millis(200)) {
                break out.expect("chromium's output");
            }
            if started.elapsed() > LIMIT {
                // SAFETY: ends the process group this run started, by its id.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                panic!("chromium did not finish within {LIMIT:?}");
            }
        };
        // Helpers it left behind, if any, go with their group.
        // SAFETY: as above; the group is this run's.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "chromium failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }
}
