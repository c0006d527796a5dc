//! The flow tables from the agent's side: reading them (status, tests), and the sweep that
//! removes what the data path only marks: closed flows after their linger, idle flows after
//! their timeout, and reply mappings whose flow is gone. It also measures each table's
//! occupancy and estimates its evictions.
//!
//! The data path inserts a flow before its reply mapping and, when it promotes a flow, into
//! the main table before it deletes the embryonic entry. So the sweep reads the reply tables
//! first and the flow tables after (embryonic, then main): a reply mapping whose flow it does
//! not find then is really an orphan.
use std::{
    collections::HashSet,
    hash::{BuildHasher as _, RandomState},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    FLOW_FIN_CLIENT, FLOW_FIN_SERVER, Flow, FlowKey, FlowTable, PROTO_UDP, RevNat, SnatRev,
    TableCounters,
    sizes::{
        CLOSED_LINGER_NS, EMBRYONIC_IDLE_NS, HALF_CLOSED_IDLE_NS, TCP_IDLE_NS, UDP_IDLE_TIMEOUT_NS,
    },
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        CONNTRACK, CONNTRACK_NEW, REV_NAT, REV_NAT_NEW, SNAT_REV, SNAT_REV_NEW, TABLE_STATS,
    },
    replyendpoints::ReplyEndpoints,
};

/// Index in `TABLE_STATS` of the agent's own removals from `table` (the data path counts
/// in the first `FlowTable::COUNT` entries and never touches these).
fn agent_slot(table: FlowTable) -> u32 {
    FlowTable::COUNT + table as u32
}

/// One table as the last sweep found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStatus {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    /// Entries the data path could not insert.
    pub insert_failures: u64,
    /// Entries the kernel dropped to make room (inserted, not removed, not there).
    pub evictions: u64,
    /// Entries removed by the sweeps (closed, idle, orphaned).
    pub expired: u64,
}

pub struct FlowTables {
    flows: HashMap<MapData, FlowKey, Flow>,
    flows_new: HashMap<MapData, FlowKey, Flow>,
    rev_nat: HashMap<MapData, FlowKey, RevNat>,
    rev_nat_new: HashMap<MapData, FlowKey, RevNat>,
    snat: HashMap<MapData, FlowKey, SnatRev>,
    snat_new: HashMap<MapData, FlowKey, SnatRev>,
    stats: PerCpuArray<MapData, TableCounters>,
    /// Reply mappings the last sweep found without their flow (see `sweep`).
    suspects: HashSet<FlowKey>,
}

impl FlowTables {
    pub fn from_maps(mut take: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            flows: HashMap::try_from(take(CONNTRACK)?)?,
            flows_new: HashMap::try_from(take(CONNTRACK_NEW)?)?,
            rev_nat: HashMap::try_from(take(REV_NAT)?)?,
            rev_nat_new: HashMap::try_from(take(REV_NAT_NEW)?)?,
            snat: HashMap::try_from(take(SNAT_REV)?)?,
            snat_new: HashMap::try_from(take(SNAT_REV_NEW)?)?,
            stats: PerCpuArray::try_from(take(TABLE_STATS)?)?,
            suspects: HashSet::new(),
        })
    }

    /// Opens the tables pinned under `pin_path`.
    pub fn open_pinned(pin_path: &Path) -> Result<Self> {
        Self::from_maps(|name| crate::datapath::pinned_map(pin_path, name))
    }

    /// Every tracked flow, established ones first.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        Ok(entries(&self.flows)?
            .into_iter()
            .chain(entries(&self.flows_new)?)
            .collect())
    }

    /// Flows of one generation: established (true) or new.
    pub fn flows_in(&self, established: bool) -> Result<Vec<(FlowKey, Flow)>> {
        entries(if established {
            &self.flows
        } else {
            &self.flows_new
        })
    }

    /// A flow's entry, main table first (true: established), as the data path looks it up.
    /// A lookup from user space does not mark an LRU entry used.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<(bool, Flow)>> {
        for (established, map) in [(true, &self.flows), (false, &self.flows_new)] {
            match map.get(key, 0) {
                Ok(flow) => return Ok(Some((established, flow))),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Every flow with its generation (true: established), read in batches, which neither
    /// marks LRU entries used nor costs two syscalls an entry.
    pub fn flows_batched(&self) -> Result<Vec<(bool, FlowKey, Flow)>> {
        let main = batch_entries(&self.flows)?
            .into_iter()
            .map(|(k, f)| (true, k, f));
        let new = batch_entries(&self.flows_new)?;
        Ok(main
            .chain(new.into_iter().map(|(k, f)| (false, k, f)))
            .collect())
    }

    /// Every nat reply mapping.
    pub fn rev_nat(&self) -> Result<Vec<(FlowKey, RevNat)>> {
        Ok(entries(&self.rev_nat)?
            .into_iter()
            .chain(entries(&self.rev_nat_new)?)
            .collect())
    }

    /// Every fullnat port reservation.
    pub fn snat(&self) -> Result<Vec<(FlowKey, SnatRev)>> {
        Ok(entries(&self.snat)?
            .into_iter()
            .chain(entries(&self.snat_new)?)
            .collect())
    }

    /// What the data path and the sweeps did to `table`, summed over CPUs: (data path,
    /// sweeps).
    fn counters(&self, table: FlowTable) -> Result<(TableCounters, u64)> {
        let mut ours = TableCounters::default();
        for c in self.stats.get(&(table as u32), 0)?.iter() {
            ours.add(c);
        }
        let swept = self
            .stats
            .get(&agent_slot(table), 0)?
            .iter()
            .map(|c| c.removed)
            .sum();
        Ok((ours, swept))
    }

    fn count_swept(&mut self, table: FlowTable, removed: u64) -> Result<()> {
        if removed == 0 {
            return Ok(());
        }
        let mut values: Vec<TableCounters> = self.stats.get(&agent_slot(table), 0)?.to_vec();
        values[0].removed += removed;
        self.stats.set(agent_slot(table), values.try_into()?, 0)?;
        Ok(())
    }

    /// Removes closed, idle and orphaned entries (`now` in the data path's clock,
    /// CLOCK_MONOTONIC); returns each table's state afterwards. Each table is read in chunks
    /// and the live flows kept as 32-bit hashes, so a sweep of millions of flows needs a few
    /// MiB. The flow tables are read first: a reply mapping whose flow this sweep removed goes
    /// at once; one whose flow it did not find may belong to a flow made after the flow
    /// tables were read, so it goes only when the next sweep finds it orphaned again.
    pub fn sweep(&mut self, now: u64) -> Result<Vec<TableStatus>> {
        let hasher = RandomState::new();
        let hash = |key: &FlowKey| hasher.hash_one(key) as u32;
        let mut alive: Vec<u32> = Vec::new();
        let mut gone: HashSet<u32> = HashSet::new();
        let mut removed = [0u64; FlowTable::COUNT as usize];
        let mut entries = [0u64; FlowTable::COUNT as usize];
        for (table, established) in [(FlowTable::FlowsNew, false), (FlowTable::Flows, true)] {
            let map = if established {
                &mut self.flows
            } else {
                &mut self.flows_new
            };
            for_each_chunk(map, |map, chunk| {
                for (key, flow) in chunk {
                    if expired(&key, &flow, established, now) {
                        if map.remove(&key).is_ok() {
                            removed[table as usize] += 1;
                            gone.insert(hash(&key));
                        }
                    } else {
                        alive.push(hash(&key));
                        entries[table as usize] += 1;
                    }
                }
            })?;
        }
        alive.sort_unstable();
        let forward_of = |reply: &FlowKey, client: [u32; 4], port: u16, vip, vip_port| FlowKey {
            src: client,
            dst: vip,
            src_port: port,
            dst_port: vip_port,
            proto: reply.proto,
            family: reply.family,
            _pad: 0,
        };
        let previous = std::mem::take(&mut self.suspects);
        let mut suspects = HashSet::new();
        // Whether to remove reply mapping `reply` of the flow `forward` now.
        let mut orphan = |reply: &FlowKey, forward: FlowKey| {
            let h = hash(&forward);
            if alive.binary_search(&h).is_ok() {
                return false;
            }
            if gone.contains(&h) || previous.contains(reply) {
                return true;
            }
            suspects.insert(*reply);
            false
        };
        for table in [FlowTable::RevNat, FlowTable::RevNatNew] {
            let map = if table == FlowTable::RevNat {
                &mut self.rev_nat
            } else {
                &mut self.rev_nat_new
            };
            for_each_chunk(map, |map, chunk| {
                for (reply, rev) in chunk {
                    let forward =
                        forward_of(&reply, reply.dst, reply.dst_port, rev.vip, rev.vip_port);
                    if orphan(&reply, forward) {
                        removed[table as usize] += u64::from(map.remove(&reply).is_ok());
                    } else {
                        entries[table as usize] += 1;
                    }
                }
            })?;
        }
        for table in [FlowTable::SnatRev, FlowTable::SnatRevNew] {
            let map = if table == FlowTable::SnatRev {
                &mut self.snat
            } else {
                &mut self.snat_new
            };
            for_each_chunk(map, |map, chunk| {
                for (reply, entry) in chunk {
                    let forward = forward_of(
                        &reply,
                        entry.client,
                        entry.client_port,
                        entry.vip,
                        entry.vip_port,
                    );
                    if orphan(&reply, forward) {
                        removed[table as usize] += u64::from(map.remove(&reply).is_ok());
                    } else {
                        entries[table as usize] += 1;
                    }
                }
            })?;
        }
        self.suspects = suspects;
        let mut out = Vec::new();
        for table in FlowTable::ALL {
            self.count_swept(table, removed[table as usize])?;
            let (ours, swept) = self.counters(table)?;
            let held = entries[table as usize];
            out.push(TableStatus {
                name: table.name().into(),
                entries: held,
                capacity: self.capacity(table)?,
                insert_failures: ours.failed,
                evictions: ours.added.saturating_sub(ours.removed + swept + held),
                expired: swept,
            });
        }
        Ok(out)
    }
}

/// How often the tables are swept: a closed flow leaves within its linger and this.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Sweeps the tables pinned under `pin_path` every SWEEP_INTERVAL on a thread of its own (a
/// sweep of full tables takes tens of milliseconds), publishing each table's state, until
/// the receiver is gone.
pub fn sweep_in_background(
    pin_path: &Path,
    out: tokio::sync::watch::Sender<Vec<TableStatus>>,
) -> Result<()> {
    let mut tables = FlowTables::open_pinned(pin_path)?;
    let mut endpoints = ReplyEndpoints::open_pinned(pin_path)?;
    std::thread::Builder::new()
        .name("xlb-sweep".into())
        .spawn(move || {
            let mut last_error = String::new();
            while !out.is_closed() {
                let swept = endpoints.sweep().and_then(|_| tables.sweep(monotonic_ns()));
                match swept {
                    Ok(status) => {
                        out.send_replace(status);
                        last_error.clear();
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        if error != last_error {
                            tracing::warn!(%error, "sweeping the flow tables");
                            last_error = error;
                        }
                    }
                }
                std::thread::sleep(SWEEP_INTERVAL);
            }
        })?;
    Ok(())
}

impl FlowTables {
    /// Entries `table` holds at most, as it was made (layout.rs).
    pub fn capacity(&self, table: FlowTable) -> Result<u64> {
        let map = match table {
            FlowTable::Flows => map_data(&self.flows),
            FlowTable::FlowsNew => map_data(&self.flows_new),
            FlowTable::RevNat => map_data(&self.rev_nat),
            FlowTable::RevNatNew => map_data(&self.rev_nat_new),
            FlowTable::SnatRev => map_data(&self.snat),
            FlowTable::SnatRevNew => map_data(&self.snat_new),
        };
        Ok(u64::from(map.info()?.max_entries()))
    }
}

fn map_data<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> &MapData {
    aya::maps::IterableMap::map(map)
}

/// Whether a flow entry is done: closed and lingered, half-closed and idle, or idle past
/// its protocol's timeout.
pub fn expired(key: &FlowKey, flow: &Flow, established: bool, now: u64) -> bool {
    let idle = now.saturating_sub(flow.last_seen_ns);
    let limit = if key.proto == PROTO_UDP {
        UDP_IDLE_TIMEOUT_NS
    } else if flow.is_closed() {
        CLOSED_LINGER_NS
    } else if flow.state & (FLOW_FIN_CLIENT | FLOW_FIN_SERVER) != 0 {
        HALF_CLOSED_IDLE_NS
    } else if !established {
        EMBRYONIC_IDLE_NS
    } else {
        TCP_IDLE_NS
    };
    idle > limit
}

/// The data path's clock (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC, coarse).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    Ok(map.iter().collect::<Result<_, _>>()?)
}

/// Reads a hash map in chunks with BPF_MAP_LOOKUP_BATCH (as `batch_entries`), handing each
/// chunk to `each` with the map, which may remove entries of the chunk (their buckets are
/// behind the batch's position).
fn for_each_chunk<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    mut each: impl FnMut(&mut HashMap<MapData, K, V>, Vec<(K, V)>),
) -> Result<()> {
    let mut token = None;
    loop {
        let (chunk, next) = batch_chunk(map, token)?;
        each(map, chunk);
        match next {
            Some(next) => token = Some(next),
            None => return Ok(()),
        }
    }
}

/// Reads a whole hash map with BPF_MAP_LOOKUP_BATCH: a few syscalls instead of two per
/// entry, and without marking LRU entries used.
pub(crate) fn batch_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let (chunk, next) = batch_chunk(map, token)?;
        out.extend(chunk);
        match next {
            Some(next) => token = Some(next),
            None => return Ok(out),
        }
    }
}

/// Entries read by one batch call, and the token of the next.
type Chunk<K, V> = (Vec<(K, V)>, Option<u64>);

/// One BPF_MAP_LOOKUP_BATCH call from `token` (None: the start): the entries, and the token
/// of the next call (None: that was the last).
fn batch_chunk<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    token: Option<u64>,
) -> Result<Chunk<K, V>> {
    const CHUNK: usize = 4096;
    let fd = map_fd(map);
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    let mut current = [token.unwrap_or(0)];
    let mut next = [0u64; 1];
    let mut attr = BatchAttr {
        in_batch: if token.is_none() {
            0
        } else {
            current.as_mut_ptr() as u64
        },
        out_batch: next.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: CHUNK as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: BPF_MAP_LOOKUP_BATCH writes at most `count` keys and values into buffers of
    // that capacity, and a 4-byte token into `next`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    let err = std::io::Error::last_os_error();
    let done = rc != 0 && err.raw_os_error() == Some(libc::ENOENT);
    if rc != 0 && !done {
        return Err(err).context("reading a flow table (BPF_MAP_LOOKUP_BATCH)");
    }
    // SAFETY: the kernel filled `count` entries of each.
    unsafe {
        keys.set_len(attr.count as usize);
        values.set_len(attr.count as usize);
    }
    let chunk = keys.into_iter().zip(values).collect();
    Ok((chunk, (!done).then_some(next[0])))
}

fn map_fd<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> i32 {
    map_data(map).fd().as_fd().as_raw_fd()
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
