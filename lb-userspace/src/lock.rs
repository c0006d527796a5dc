//! One agent per pin path: `xlb run` holds an exclusive flock(2) on the pin directory for
//! as long as it runs, taken before it touches any map, program or link. The kernel drops
//! the lock when the process dies, SIGKILL included, so a crashed agent leaves none behind.
//! `xlb detach` takes the same lock, so it does not pull the data path from under an agent.
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// The pin path is held by another process.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by a running agent{}", pin_path.display(), holder(*pid))]
pub struct Held {
    pub pin_path: PathBuf,
    /// The holder's PID, when /proc/locks tells it.
    pub pid: Option<u32>,
}

fn holder(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
}

/// The exclusive lock on a pin path; released on drop or when the process ends.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

impl PinLock {
    /// Creates the pin directory if needed (on a BPF filesystem) and locks it, without
    /// waiting: an error that downcasts to [`Held`] if another process has it.
    pub fn acquire(pin_path: &Path) -> Result<PinLock> {
        crate::bpffs::ensure(pin_path)?;
        Self::try_existing(pin_path)
    }

    /// Locks an existing pin directory, without waiting.
    pub fn try_existing(pin_path: &Path) -> Result<PinLock> {
        // std opens with O_CLOEXEC: the `ip` commands the agent runs do not inherit the lock.
        let dir = File::open(pin_path)
            .with_context(|| format!("opening the pin directory {}", pin_path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Held {
                    pin_path: pin_path.into(),
                    pid: holder_pid(&dir),
                }
                .into());
            }
            return Err(e).with_context(|| format!("locking {}", pin_path.display()));
        }
        Ok(PinLock { _dir: dir })
    }
}

/// The PID /proc/locks names for a flock on this file (the kernel keeps no other record).
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    find_holder(
        &text,
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino(),
    )
}

/// Parses lines like `1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF`; waiters (`1: ->
/// FLOCK ...`) are skipped.
fn find_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, device, ..] = fields.as_slice() else {
            return None;
        };
        let mut parts = device.split(':');
        let maj = u32::from_str_radix(parts.next()?, 16).ok()?;
        let min = u32::from_str_radix(parts.next()?, 16).ok()?;
        let i: u64 = parts.next()?.parse().ok()?;
        ((maj, min, i) == (major, minor, ino))
            .then(|| pid.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 10 00:2a:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:2a:77 0 EOF\n";
        assert_eq!(find_holder(locks, 0, 0x2a, 77), Some(4242));
        assert_eq!(find_holder(locks, 0, 0x2a, 78), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("xlb-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinLock::try_existing(&dir).expect("first lock");
        let err = PinLock::try_existing(&dir).expect_err("second lock");
        let held = err.downcast_ref::<Held>().expect("Held");
        assert_eq!(held.pid, Some(std::process::id()));
        assert!(err.to_string().contains(&dir.display().to_string()));
        drop(first);
        PinLock::try_existing(&dir).expect("free again");
        std::fs::remove_dir(&dir).unwrap();
    }
}
