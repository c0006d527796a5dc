//! fullnat's SNAT ports across a detach. A port whose flow closed is kept from new flows for
//! SNAT_CLOSED_REUSE_NS, because the backend holds the old 4-tuple in TIME_WAIT: a new SYN
//! on it draws the old ACK about half the time (timestamps differ per connection), and the
//! client's handshake stalls or fails. The record of those ports lives in the SNAT tables,
//! which `xlb detach` unpins; so detach writes the ports still held to a file outside the
//! bpffs, and the next agent puts them back into its new tables before its programs attach.
//! A restart that keeps the pins needs none of this: the tables survive it.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, SNAT_CLOSING, SNAT_REPLIED, SnatRev, sizes::SNAT_CLOSED_REUSE_NS};
use tracing::info;

use crate::{
    datapath::{SNAT_REV, SNAT_REV_NEW},
    flowtables::{batch_entries, monotonic_ns},
};

const DIR: &str = "/run/xlb/snat-held";
const MAGIC: &[u8; 8] = b"xlbsnat1";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
const BOOT_ID_LEN: usize = 36;
const RECORD: usize = size_of::<FlowKey>() + size_of::<SnatRev>();

/// A port reservation: the reply key (backend -> SNAT address:port) and its record.
pub type Held = (FlowKey, SnatRev);
/// The boot a file's clock readings belong to.
pub type BootId = [u8; BOOT_ID_LEN];

/// The file for the agent of `pin_path` (one per pin path: two agents never share it).
pub fn held_path(pin_path: &Path) -> PathBuf {
    let name: String = pin_path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new(DIR).join(name)
}

/// The reservations a new flow must not take yet, each marked closing: its flow is gone with
/// the old tables, and its port is held only while the backend may still hold the 4-tuple.
pub fn still_held(entries: Vec<Held>, now: u64) -> Vec<Held> {
    entries
        .into_iter()
        .filter(|(_, rev)| now.saturating_sub(rev.last_seen_ns) < SNAT_CLOSED_REUSE_NS)
        .map(|(key, mut rev)| {
            rev.state |= SNAT_CLOSING | SNAT_REPLIED;
            (key, rev)
        })
        .collect()
}

fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: Pod types are plain bytes without padding invariants.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: any bytes are a valid Pod value; the length is checked.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// The file's bytes: magic, the boot the clock belongs to, then the records.
pub fn encode(boot: &BootId, entries: &[Held]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + BOOT_ID_LEN + entries.len() * RECORD);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(boot);
    for (key, rev) in entries {
        out.extend_from_slice(bytes_of(key));
        out.extend_from_slice(bytes_of(rev));
    }
    out
}

/// `encode`'s input back; None for a file of another format or cut short.
pub fn decode(bytes: &[u8]) -> Option<(BootId, Vec<Held>)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (boot, records) = rest.split_at_checked(BOOT_ID_LEN)?;
    if !records.len().is_multiple_of(RECORD) {
        return None;
    }
    let entries = records
        .chunks_exact(RECORD)
        .map(|r| {
            let (key, rev) = r.split_at(size_of::<FlowKey>());
            (read_pod(key), read_pod(rev))
        })
        .collect();
    Some((boot.try_into().ok()?, entries))
}

fn boot_id() -> Result<BootId> {
    let text = fs::read_to_string(BOOT_ID).with_context(|| format!("reading {BOOT_ID}"))?;
    match text.trim().as_bytes().try_into() {
        Ok(id) => Ok(id),
        Err(_) => bail!("{BOOT_ID}: not a boot id"),
    }
}

fn snat_table(pin: &Path) -> Result<HashMap<MapData, FlowKey, SnatRev>> {
    let map = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    Ok(HashMap::try_from(Map::LruHashMap(map))?)
}

/// Before `pin_path`'s tables go: writes the ports still held to `file`. Returns how many.
pub fn save_to(file: &Path, pin_path: &Path) -> Result<usize> {
    let mut entries = Vec::new();
    for name in [SNAT_REV, SNAT_REV_NEW] {
        let pin = pin_path.join(name);
        if pin.exists() {
            entries.extend(batch_entries(&snat_table(&pin)?)?);
        }
    }
    let held = still_held(entries, monotonic_ns());
    if held.is_empty() {
        return Ok(0);
    }
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Root's alone: it names recent clients, and what it holds steers the next agent.
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    out.set_permissions(fs::Permissions::from_mode(0o600))?;
    out.write_all(&encode(&boot_id()?, &held))
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(held.len())
}

/// Puts the ports `file` holds back into `pin_path`'s SNAT table (entries there are kept:
/// they are newer), then removes the file. Records of another boot, whose clock they do not
/// share, or older than the hold, are skipped. Returns how many went in.
pub fn restore_from(file: &Path, pin_path: &Path) -> Result<usize> {
    let bytes = match fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let meta = fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
    // Only what this agent's user wrote, and no one else could change, steers its tables.
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } || meta.mode() & 0o022 != 0 {
        bail!(
            "{}: not written by this user alone; ignored",
            file.display()
        );
    }
    let Some((boot, entries)) = decode(&bytes) else {
        bail!("{}: not a file of held SNAT ports", file.display());
    };
    if boot != boot_id()? {
        return Ok(0);
    }
    const BPF_NOEXIST: u64 = 1;
    let mut table = snat_table(&pin_path.join(SNAT_REV))?;
    let mut restored = 0;
    for (key, rev) in still_held(entries, monotonic_ns()) {
        if table.insert(key, rev, BPF_NOEXIST).is_ok() {
            restored += 1;
        }
    }
    Ok(restored)
}

/// `save_to` the agent's file (`xlb detach`).
pub fn save(pin_path: &Path) -> Result<usize> {
    let saved = save_to(&held_path(pin_path), pin_path)?;
    if saved > 0 {
        info!(
            ports = saved,
            "fullnat ports still in their backends' TIME_WAIT kept for the next agent"
        );
    }
    Ok(saved)
}

/// `restore_from` the agent's file (a start whose SNAT tables are new).
pub fn restore(pin_path: &Path) -> Result<usize> {
    let restored = restore_from(&held_path(pin_path), pin_path)?;
    if restored > 0 {
        info!(
            ports = restored,
            "fullnat ports of the last agent held until their backends' TIME_WAIT ends"
        );
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, last_seen_ns: u64, state: u8) -> Held {
        let key = FlowKey {
            src: [0x0b04_630a, 0, 0, 0],
            dst: [0x0905_630a, 0, 0, 0],
            src_port: 8080u16.to_be(),
            dst_port: port.to_be(),
            proto: 6,
            family: 4,
            _pad: 0,
        };
        let rev = SnatRev {
            client: [0x0201_630a, 0, 0, 0],
            vip: [0x0164_630a, 0, 0, 0],
            client_port: 40000u16.to_be(),
            vip_port: 80u16.to_be(),
            service_id: 3,
            last_seen_ns,
            state,
            _pad: [0; 7],
        };
        (key, rev)
    }

    #[test]
    fn keeps_what_was_seen_within_the_hold_marked_closing() {
        let now = 100 * SNAT_CLOSED_REUSE_NS;
        let held = still_held(
            vec![
                entry(1, now - 1_000, 0),
                entry(2, now - SNAT_CLOSED_REUSE_NS - 1, SNAT_CLOSING),
                entry(3, now - SNAT_CLOSED_REUSE_NS / 2, SNAT_CLOSING),
            ],
            now,
        );
        let ports: Vec<u16> = held.iter().map(|(k, _)| u16::from_be(k.dst_port)).collect();
        assert_eq!(ports, [1, 3]);
        assert!(
            held.iter()
                .all(|(_, r)| r.state == SNAT_CLOSING | SNAT_REPLIED)
        );
    }

    #[test]
    fn the_file_round_trips_and_refuses_other_bytes() {
        let boot = *b"0123456789abcdef0123456789abcdef0123";
        let entries = vec![entry(1, 5, 0), entry(2, 6, SNAT_CLOSING)];
        let bytes = encode(&boot, &entries);
        let (back_boot, back) = decode(&bytes).expect("decodes");
        assert_eq!(back_boot, boot);
        assert_eq!(back.len(), 2);
        for ((k, r), (bk, br)) in entries.iter().zip(&back) {
            assert_eq!(bytes_of(k), bytes_of(bk));
            assert_eq!(bytes_of(r), bytes_of(br));
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_none(), "cut short");
        assert!(decode(b"something else entirely, long enough to pass").is_none());
    }

    #[test]
    fn a_file_others_could_write_is_refused_and_removed() {
        let file = std::env::temp_dir().join(format!("xlb-snatheld-{}", std::process::id()));
        fs::write(&file, encode(&boot_id().unwrap(), &[entry(1, 5, 0)])).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        let err = restore_from(&file, Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("ignored"), "{err:#}");
        assert!(!file.exists());
        // No file: nothing to restore, and no error.
        assert_eq!(restore_from(&file, Path::new("/nonexistent")).unwrap(), 0);
    }

    #[test]
    fn one_file_per_pin_path() {
        assert_ne!(
            held_path(Path::new("/sys/fs/bpf/xlb")),
            held_path(Path::new("/sys/fs/bpf/xlb2"))
        );
        assert!(held_path(Path::new("/sys/fs/bpf/xlb")).starts_with(DIR));
    }
}
