//! Flow tables whose pinned size is not the config's (a restart with another
//! `flow_table_size`): made anew and the flows moved, make-before-break. Before the load,
//! the old table's pin is moved aside, so the load makes a table of the new size; its flows
//! are copied into the new one before the new programs are attached (the old programs still
//! use the old table until then), and once more after, for what they added meanwhile; then
//! the old table goes. A flow never misses its entry: the old programs read the old table
//! to the last packet, the new ones find every flow copied.
use std::{fs, path::Path, path::PathBuf};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{Flow, FlowKey, RevNat, SnatRev};
use tracing::info;

use crate::{
    datapath::{CONNTRACK, CONNTRACK_NEW, REV_NAT, REV_NAT_NEW, SNAT_REV, SNAT_REV_NEW},
    flowtables::batch_entries,
    layout::Layout,
};

const FLOW_TABLES: [&str; 6] = [
    CONNTRACK,
    CONNTRACK_NEW,
    REV_NAT,
    REV_NAT_NEW,
    SNAT_REV,
    SNAT_REV_NEW,
];

/// Where an old table waits while its flows move (not an `XLB_` name: the loader's cleanup
/// of old layouts leaves it alone).
fn aside(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join(format!("resizing_{name}"))
}

/// The flow tables being resized.
#[derive(Default)]
pub struct Resize {
    pin_path: PathBuf,
    tables: Vec<&'static str>,
}

/// Moves aside the pins of flow tables whose size differs from `layout`'s. A resize a
/// previous agent left unfinished is taken up again.
pub fn prepare(pin_path: &Path, layout: &Layout) -> Result<Resize> {
    let mut resize = Resize {
        pin_path: pin_path.into(),
        tables: Vec::new(),
    };
    for (name, wanted) in layout.max_entries() {
        if !FLOW_TABLES.contains(&name) {
            continue;
        }
        let old = aside(pin_path, name);
        if old.exists() {
            resize.tables.push(name);
            continue;
        }
        let pin = pin_path.join(name);
        if !pin.exists() {
            continue;
        }
        let map = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let have = map.info()?.max_entries();
        if have != wanted {
            info!(
                map = name,
                from = have,
                to = wanted,
                "resizing a flow table; its flows move"
            );
            // Pinned again, then unpinned (bpffs refuses a rename here, and names with a dot).
            map.pin(&old)
                .with_context(|| format!("pinning {} aside", pin.display()))?;
            fs::remove_file(&pin)?;
            resize.tables.push(name);
        }
    }
    Ok(resize)
}

impl Resize {
    /// Copies the flows of the old tables into the new ones (entries already there are
    /// kept: they are newer). Returns the entries copied.
    pub fn copy(&self) -> Result<usize> {
        let mut copied = 0;
        for &name in &self.tables {
            let old = MapData::from_pin(aside(&self.pin_path, name))?;
            let new = MapData::from_pin(self.pin_path.join(name))?;
            copied += match name {
                CONNTRACK | CONNTRACK_NEW => copy_table::<Flow>(old, new)?,
                REV_NAT | REV_NAT_NEW => copy_table::<RevNat>(old, new)?,
                _ => copy_table::<SnatRev>(old, new)?,
            };
        }
        Ok(copied)
    }

    /// After the new programs are attached: copies what the old ones added, and removes
    /// the old tables.
    pub fn finish(self) -> Result<usize> {
        let copied = self.copy()?;
        for &name in &self.tables {
            fs::remove_file(aside(&self.pin_path, name))?;
        }
        if !self.tables.is_empty() {
            info!(tables = ?self.tables, "flow tables resized");
        }
        Ok(copied)
    }
}

fn copy_table<V: aya::Pod>(old: MapData, new: MapData) -> Result<usize> {
    const BPF_NOEXIST: u64 = 1;
    let old: HashMap<MapData, FlowKey, V> = HashMap::try_from(aya::maps::Map::LruHashMap(old))?;
    let mut new: HashMap<MapData, FlowKey, V> = HashMap::try_from(aya::maps::Map::LruHashMap(new))?;
    let mut copied = 0;
    for (key, value) in batch_entries(&old)? {
        // EEXIST: the new programs have it already, newer.
        if new.insert(key, value, BPF_NOEXIST).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}
