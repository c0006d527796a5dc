//! Where pins may live. A pin keeps a program attached only while its BPF filesystem
//! lives, so the pin path must be on a bpffs that the host's init (PID 1) sees: one that
//! `ip netns exec` or a container mounted for this process alone dies with it, and takes
//! the programs along. A bpffs is mounted only on /sys/fs/bpf or on an empty (or missing)
//! pin directory, never over a directory that holds anything, and nothing is removed from
//! a path that is not on a bpffs.
use std::{
    ffi::CString,
    fs,
    io::{self, ErrorKind},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

/// statfs(2) f_type of a BPF filesystem.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The usual home of the host's bpffs; a bpffs may be mounted there even if it is not the
/// pin directory itself (it is an empty sysfs directory until then).
const SYS_FS_BPF: &str = "/sys/fs/bpf";
const INIT_MOUNTINFO: &str = "/proc/1/mountinfo";
/// Files the kernel puts at the root of every bpffs (its preloaded iterators): not pins,
/// and not removable.
pub const PRELOADED: [&str; 2] = ["maps.debug", "progs.debug"];

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "{}: not on a BPF filesystem and not an empty directory; mounting one there would hide \
         what it holds. Use a pin path below /sys/fs/bpf, or an empty or missing directory",
        .0.display()
    )]
    NotEmpty(PathBuf),
    #[error(
        "{}: the BPF filesystem there lives only in this process's mount namespace (`ip netns \
         exec` remounts /sys; a container may lack the host's /sys/fs/bpf), so the pins, and \
         the programs attached through them, would vanish when this command exits. Run it in \
         the host's mount namespace: `nsenter --net=/run/netns/NS xlb ...` instead of `ip netns \
         exec NS xlb ...`, or give the container the host's /sys/fs/bpf",
        .0.display()
    )]
    Private(PathBuf),
    #[error("{}: not on a BPF filesystem; refusing to remove anything there", .0.display())]
    NotBpffs(PathBuf),
}

/// Makes sure `pin_path` is a directory on a lasting BPF filesystem, mounting one on
/// /sys/fs/bpf or on the (empty) pin directory itself if needed. Refuses, before it changes
/// anything, a mount that would hide files or that would die with this process.
pub fn ensure(pin_path: &Path) -> Result<()> {
    let existing = pin_path
        .ancestors()
        .find(|p| fs::symlink_metadata(p).is_ok())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        require_lasting(existing)?;
        fs::create_dir_all(pin_path)
            .with_context(|| format!("creating the pin directory {}", pin_path.display()))?;
        return Ok(());
    }
    let target = if pin_path.starts_with(SYS_FS_BPF) {
        PathBuf::from(SYS_FS_BPF)
    } else {
        pin_path.to_path_buf()
    };
    match fs::read_dir(&target).map(|mut entries| entries.next().is_none()) {
        Ok(true) => {}
        Ok(false) => return Err(BpffsError::NotEmpty(target).into()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
    }
    // A mount made outside init's mount namespace is not seen by it, and ends with ours.
    if !in_init_mount_ns() {
        return Err(BpffsError::Private(target).into());
    }
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    // Two loaders at once (parallel tests, two agents) would stack two mounts, and the
    // second hides the pins made under the first: mount under a lock, and only if none is.
    let _guard = mount_lock()?;
    if !is_bpffs(&target)? {
        mount(&target)?;
        info!(path = %target.display(), "mounted a BPF filesystem");
    }
    fs::create_dir_all(pin_path)
        .with_context(|| format!("creating the pin directory {}", pin_path.display()))?;
    Ok(())
}

/// Fails unless `path` is on a BPF filesystem (statfs follows a symlink).
pub fn require(path: &Path) -> Result<()> {
    if is_bpffs(path)? {
        Ok(())
    } else {
        Err(BpffsError::NotBpffs(path.into()).into())
    }
}

pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs into a zeroed struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    // f_type is i64 on glibc and u64 on musl.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Removes the emptied pin directory. If a bpffs is mounted on it (one `ensure` mounted on
/// the pin directory itself), that is unmounted first; /sys/fs/bpf is left alone.
pub fn remove_pin_dir(root: &Path) -> Result<()> {
    let parent = root.parent().unwrap_or(Path::new("/"));
    let own_mount = match (fs::metadata(root), fs::metadata(parent)) {
        (Ok(r), Ok(p)) => r.dev() != p.dev(),
        (Err(e), _) if e.kind() == ErrorKind::NotFound => return Ok(()),
        (Err(e), _) | (_, Err(e)) => return Err(e.into()),
    };
    if own_mount {
        if root == Path::new(SYS_FS_BPF) {
            return Ok(());
        }
        let c = CString::new(root.as_os_str().as_encoded_bytes())?;
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("unmounting the BPF filesystem on {}", root.display()));
        }
        info!(path = %root.display(), "unmounted the BPF filesystem of the pin directory");
    }
    match fs::remove_dir(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        // Below the unmounted bpffs: the directory it was mounted on, if someone filled it.
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
            warn!(path = %root.display(), "the pin directory is not empty; leaving it");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", root.display())),
    }
}

/// Held while a bpffs is checked for and mounted; released when the file closes.
const MOUNT_LOCK: &str = "/run/xlb-bpffs-mount.lock";

/// None where /run cannot hold it (a bare container): then no other mounter shares it either.
fn mount_lock() -> Result<Option<fs::File>> {
    let file = match fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(MOUNT_LOCK)
    {
        Ok(file) => file,
        Err(e) => {
            warn!("cannot open {MOUNT_LOCK} ({e}); mounting without the lock");
            return Ok(None);
        }
    };
    // SAFETY: flock on a descriptor we own; it blocks until the other mounter is done.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("locking {MOUNT_LOCK}"));
    }
    Ok(Some(file))
}

fn mount(target: &Path) -> Result<()> {
    let c = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting a BPF filesystem on {}", target.display()));
    }
    Ok(())
}

/// Fails unless the bpffs holding `path` is also mounted in init's mount namespace: then
/// it outlives this process (the host's, or a container's for as long as it runs).
fn require_lasting(path: &Path) -> Result<()> {
    let dev = fs::metadata(path)?.dev();
    let wanted = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let Ok(init) = fs::read_to_string(INIT_MOUNTINFO) else {
        warn!("cannot read {INIT_MOUNTINFO}; assuming the BPF filesystem outlives this process");
        return Ok(());
    };
    let seen = init.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1));
        fields.get(2) == Some(&wanted.as_str()) && fstype == Some(&"bpf")
    });
    if seen {
        Ok(())
    } else {
        Err(BpffsError::Private(path.into()).into())
    }
}

/// Whether this process shares init's mount namespace. Mount IDs are unique system-wide
/// and a new namespace gets new ones, so ours are init's only in the same namespace
/// (readlink of /proc/1/ns/mnt needs ptrace rights that root may lack in a sandbox).
fn in_init_mount_ns() -> bool {
    let ids = |path: &str| -> Option<Vec<String>> {
        let text = fs::read_to_string(path).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect(),
        )
    };
    match (ids("/proc/self/mountinfo"), ids(INIT_MOUNTINFO)) {
        (Some(ours), Some(init)) => ours.first().is_some_and(|id| init.contains(id)),
        _ => {
            warn!("cannot read the mount tables; assuming this is the host's mount namespace");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_empty_directory_off_bpffs_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("xlb-bpffs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("keep"), "x").unwrap();
        let err = ensure(&dir).expect_err("mounted over a non-empty directory");
        assert!(
            matches!(err.downcast_ref(), Some(BpffsError::NotEmpty(_))),
            "{err:#}"
        );
        assert_eq!(fs::read_to_string(dir.join("keep")).unwrap(), "x");
        let err = require(&dir).expect_err("not a bpffs");
        assert!(err.to_string().contains("refusing to remove"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
