//! The test images: the static (musl) test backend, built once, in an image `FROM scratch`
//! saved to a tarball under `target/xlb-test-image/` and loaded into every daemon.
use std::{
    collections::hash_map::DefaultHasher,
    fs::File,
    hash::{Hash as _, Hasher as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use super::{Daemon, HEALTH_IMAGE, IMAGE, run_bounded};

const MUSL: &str = "x86_64-unknown-linux-musl";

const DOCKERFILE: &str = r#"FROM scratch
COPY xlb-test-backend /xlb-test-backend
ENTRYPOINT ["/xlb-test-backend", "--http", "0.0.0.0:8080", "--tcp", "0.0.0.0:9000", "--udp", "0.0.0.0:8080", "--linger", "2000"]
"#;

// Scratch has no shell: HEALTHCHECK must be the exec form, with the backend's own probe mode.
const DOCKERFILE_HEALTH: &str = r#"FROM xlb-test-backend:latest
HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD ["/xlb-test-backend", "--probe", "127.0.0.1:8080"]
"#;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Newest modification time of the test backend's sources.
fn backend_sources_mtime() -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(Some(m));
            }
        }
    }
    let mut newest = None;
    walk(&workspace_root().join("test-backend"), &mut newest);
    newest
}

/// The static (musl) test backend that goes into the image:
/// `cargo build --release -p test-backend --target x86_64-unknown-linux-musl` (`cargo xtask
/// setup` adds the target), run at most once per test process, and only when the binary is
/// missing or older than a file under test-backend/ (a nested cargo may wait a long time for
/// the target dir's lock while another build runs). `XLB_TEST_BACKEND_MUSL=PATH` uses PATH.
pub fn backend_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("XLB_TEST_BACKEND_MUSL") {
            return PathBuf::from(path);
        }
        let bin = target_dir().join(MUSL).join("release/xlb-test-backend");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_some() && built >= backend_sources_mtime() {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run_bounded(
            Command::new(cargo).current_dir(workspace_root()).args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "test-backend",
                "--target",
                MUSL,
            ]),
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| {
            panic!("building the static test backend (rustup target add {MUSL}?): {e}")
        });
        bin
    })
}

/// Hash of everything that goes into the images: the binary and the Dockerfiles.
fn image_hash() -> u64 {
    let bin = backend_binary();
    let bytes = std::fs::read(bin).unwrap_or_else(|e| panic!("reading {}: {e}", bin.display()));
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    DOCKERFILE.hash(&mut h);
    DOCKERFILE_HEALTH.hash(&mut h);
    h.finish()
}

/// Gives `daemon` both test images: loads the cached tarball, or builds the images in this
/// daemon (`DOCKER_BUILDKIT=0 docker build` from a temp context) and saves the tarball for
/// the next daemons. Serialised within the process and, with flock, across processes.
pub(super) fn provide_images(daemon: &Daemon) {
    static LOCK: Mutex<()> = Mutex::new(());
    let started = Instant::now();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = target_dir().join("xlb-test-image");
    std::fs::create_dir_all(&cache).expect("image cache dir");
    let lock = File::create(cache.join("lock")).expect("image cache lock");
    // SAFETY: flock on a file we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!("flock: {}", std::io::Error::last_os_error());
    }
    let name = format!("xlb-test-backend-{:016x}.tar", image_hash());
    let tarball = cache.join(&name);
    if tarball.exists() {
        drop(lock);
        drop(guard);
        daemon.docker(&["load", "-q", "-i", tarball.to_str().expect("utf-8")]);
        eprintln!("[{}] images loaded in {:?}", daemon.name, started.elapsed());
        return;
    }
    let ctx = daemon.dir.join("image-context");
    std::fs::create_dir_all(&ctx).expect("image context");
    std::fs::copy(backend_binary(), ctx.join("xlb-test-backend")).expect("copy backend");
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    std::fs::write(ctx.join("Dockerfile.health"), DOCKERFILE_HEALTH).expect("Dockerfile");
    let ctx_s = ctx.to_str().expect("utf-8");
    daemon.docker(&["build", "-q", "-t", IMAGE, ctx_s]);
    let health = ctx.join("Dockerfile.health");
    daemon.docker(&[
        "build",
        "-q",
        "-f",
        health.to_str().expect("utf-8"),
        "-t",
        HEALTH_IMAGE,
        ctx_s,
    ]);
    let tmp = cache.join(format!("{name}.tmp"));
    daemon.docker(&[
        "save",
        "-o",
        tmp.to_str().expect("utf-8"),
        IMAGE,
        HEALTH_IMAGE,
    ]);
    for entry in std::fs::read_dir(&cache).expect("read cache").flatten() {
        let old = entry.file_name().to_string_lossy().into_owned();
        if old.starts_with("xlb-test-backend-") && old.ends_with(".tar") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    std::fs::rename(&tmp, &tarball).expect("rename tarball");
    let _ = std::fs::remove_dir_all(&ctx);
    eprintln!(
        "[{}] images built and saved in {:?}",
        daemon.name,
        started.elapsed()
    );
}
