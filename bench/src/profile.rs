//! The data path's own cost in real traffic: the kernel's per-program run counters
//! (BPF_ENABLE_STATS), read from xlb's pinned programs around an extra, unrecorded run of
//! each load. Stats cost two clock reads per program run, so the measured runs never have
//! them on. The stats stay enabled only while the fd we hold is open, so a crash cannot
//! leave them on.
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::load::Load;

/// One program's cost during one load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramCost {
    pub load: Load,
    pub program: String,
    /// Program runs (packets) per request, connection or delivered datagram.
    pub runs_per_unit: f64,
    /// Mean time per run, ns (the kernel's run_time_ns / run_cnt).
    pub ns_per_run: f64,
}

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Turns on run-time stats for every BPF program until the fd is dropped.
pub fn enable_stats() -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        kind: u32,
    }
    let mut attr = Attr {
        kind: BPF_STATS_RUN_TIME,
    };
    // SAFETY: BPF_ENABLE_STATS takes a u32 type; the kernel zero-extends the short attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &mut attr as *mut Attr as *mut libc::c_void,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
    }
    // SAFETY: a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// (run count, run time ns) of every program pinned under `pins`/programs.
pub fn snapshot(pins: &Path) -> Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    let dir = pins.join("programs");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let o = std::process::Command::new("bpftool")
            .args(["-j", "prog", "show", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool")?;
        let json: serde_json::Value = serde_json::from_slice(&o.stdout)
            .with_context(|| format!("bpftool prog show pinned {}", path.display()))?;
        out.push((
            name,
            json["run_cnt"].as_u64().unwrap_or(0),
            json["run_time_ns"].as_u64().unwrap_or(0),
        ));
    }
    out.sort();
    Ok(out)
}

/// Per-program costs between two snapshots, for `units` requests/connections/datagrams.
pub fn costs(
    load: Load,
    before: &[(String, u64, u64)],
    after: &[(String, u64, u64)],
    units: u64,
) -> Vec<ProgramCost> {
    after
        .iter()
        .filter_map(|(name, cnt, ns)| {
            let (_, c0, n0) = before.iter().find(|(b, _, _)| b == name)?;
            let runs = cnt.checked_sub(*c0)?;
            (runs > 0).then(|| ProgramCost {
                load,
                program: name.clone(),
                runs_per_unit: runs as f64 / units.max(1) as f64,
                ns_per_run: (ns - n0) as f64 / runs as f64,
            })
        })
        .collect()
}
