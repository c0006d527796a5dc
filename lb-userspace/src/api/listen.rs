//! The unix sockets the agent listens on. Whatever is at the path is checked first: a stale
//! socket (no one listens) is replaced, anything else stays and the agent does not start.
//! The control socket gets its mode and group before it gets its name, so no one else can
//! connect in between.
use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use tokio::net::UnixListener;

/// Binds the read API's socket at `path`.
pub fn api(path: &Path) -> Result<UnixListener> {
    make_room(path)?;
    UnixListener::bind(path).with_context(|| format!("binding the API to {}", path.display()))
}

/// Binds the control socket at `path`: mode 0600, or 0660 with `group`. Creates its
/// directory (0755) if missing.
pub fn control(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let what = || format!("the control socket {}", path.display());
    let gid = group.map(group_id).transpose().with_context(what)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
            .with_context(what)?;
    }
    make_room(path).with_context(what)?;
    let temp = temp_name(path);
    make_room(&temp).with_context(what)?;
    let listener = UnixListener::bind(&temp)
        .with_context(|| format!("binding {}", temp.display()))
        .with_context(what)?;
    let placed = (|| {
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        fs::set_permissions(&temp, fs::Permissions::from_mode(mode))?;
        if gid.is_some() {
            std::os::unix::fs::chown(&temp, None, gid)?;
        }
        // Atomic: the name points at a stale socket, or at this one.
        fs::rename(&temp, path)
    })();
    if let Err(e) = placed {
        let _ = fs::remove_file(&temp);
        return Err(e).with_context(what);
    }
    Ok(listener)
}

/// `.NAME.PID` next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// Nothing at `path`, or a socket no one listens on (removed): else an error, and what is
/// there stays.
fn make_room(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket: not removing it (move it away, or set another path)",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{}: a process listens on this socket already (another xlb agent?)",
            path.display()
        );
    }
    fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))
}

/// The id of group `name`.
fn group_id(name: &str) -> Result<u32> {
    let cname = CString::new(name).with_context(|| format!("group `{name}`"))?;
    let mut buf = vec![0 as libc::c_char; 1 << 16];
    // SAFETY: a plain C struct, filled in by getgrnam_r.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the type and size getgrnam_r expects.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc))
            .with_context(|| format!("looking up group `{name}`"));
    }
    if found.is_null() {
        bail!("agent.control_group: no group `{name}` on this host");
    }
    Ok(group.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-listen-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn control_socket_is_private_and_its_directory_made() {
        let dir = scratch("private");
        let path = dir.join("run/control.sock");
        let _listener = control(&path, None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let parent = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(
            parent.permissions().mode() & 0o022,
            0,
            "not writable by others"
        );
        assert!(!temp_name(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = scratch("stale");
        let path = dir.join("control.sock");
        let live = control(&path, None).unwrap();
        let err = control(&path, None).unwrap_err();
        assert!(
            format!("{err:#}").contains("listens on this socket"),
            "{err:#}"
        );
        drop(live);
        control(&path, None).expect("a stale socket is replaced");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_stays() {
        let dir = scratch("file");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        fs::write(&path, "keep me").unwrap();
        for err in [control(&path, None).unwrap_err(), api(&path).unwrap_err()] {
            assert!(format!("{err:#}").contains("is not a socket"), "{err:#}");
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groups_are_looked_up() {
        assert_eq!(group_id("root").unwrap(), 0);
        let err = group_id("no-such-group-xlb").unwrap_err();
        assert!(format!("{err:#}").contains("no group"), "{err:#}");
    }
}
