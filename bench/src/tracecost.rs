//! What `xlb trace` costs the data path, on micro.rs's established-flow packet (`repeat`):
//! the normal object with no trace running, the same object loaded with the trace hooks
//! removed (`loader::load_without_trace_hooks`: the verifier drops that code), and the normal
//! object while a trace runs for other sources. The calls alternate between the cases, so a
//! drift of the machine hits all of them alike.
use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use aya::{
    maps::{Array, MapData},
    programs::Xdp,
};
use lb_common::trace::{TRACE_ANY_SERVICE, TraceFilter};
use serde::{Deserialize, Serialize};
use xlb::{
    datapath::{TRACE_FILTER, pinned_map},
    loader,
};

use crate::micro::{Instance, check_pass, instance, median, test_run};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceCost {
    /// The normal object, no trace running (what every packet pays).
    pub off_ns: f64,
    /// The object without trace hooks.
    pub removed_ns: f64,
    /// The normal object while a trace runs whose source filter this packet misses.
    pub other_source_ns: f64,
    /// JIT-compiled size of the XDP program, normal and without hooks (bytes): shows that
    /// the hooks were really removed.
    pub jited_bytes: u32,
    pub jited_bytes_removed: u32,
    pub calls: u32,
}

impl TraceCost {
    /// ns per packet that the hooks cost while no trace runs.
    pub fn off_overhead_ns(&self) -> f64 {
        self.off_ns - self.removed_ns
    }
}

fn jited_bytes(inst: &Instance) -> Result<u32> {
    let prog: &Xdp = inst
        .ebpf
        .program(loader::XDP_PROGRAM)
        .ok_or_else(|| anyhow::anyhow!("no XDP program"))?
        .try_into()?;
    Ok(prog.info()?.size_jitted())
}

fn set_filter(inst: &Instance, value: TraceFilter) -> Result<()> {
    let mut filter: Array<MapData, TraceFilter> =
        Array::try_from(pinned_map(&inst.pin_path, TRACE_FILTER)?)?;
    filter.set(0, value, 0)?;
    Ok(())
}

/// `packet` is an established flow of `main`'s loop service (also in the bare instance after
/// its first run).
pub fn measure(main: &Instance, packet: &[u8], repeat: u32, calls: u32) -> Result<TraceCost> {
    let bare = instance("xlb-bench-untraced", false)?;
    let (main_fd, bare_fd) = (main.xdp_fd()?, bare.xdp_fd()?);
    check_pass(test_run(bare_fd, packet, 1)?.0)?;
    let other = Ipv4Addr::new(10, 99, 9, 0);
    let trace_other = TraceFilter {
        enabled: 1,
        service_ids: [TRACE_ANY_SERVICE; 2],
        family: lb_common::FAMILY_V4.into(),
        src_addr: [u32::from_ne_bytes(other.octets()), 0, 0, 0],
        src_mask: [u32::from_ne_bytes([255, 255, 255, 0]), 0, 0, 0],
    };
    let (mut off, mut removed, mut traced) = (Vec::new(), Vec::new(), Vec::new());
    // More calls than the other cases: the differences are a few ns.
    for _ in 0..calls * 3 {
        for (fd, times) in [(main_fd, &mut off), (bare_fd, &mut removed)] {
            let (ret, ns) = test_run(fd, packet, repeat)?;
            check_pass(ret)?;
            times.push(f64::from(ns));
        }
        set_filter(main, trace_other)?;
        let result = test_run(main_fd, packet, repeat);
        set_filter(main, TraceFilter::default())?;
        let (ret, ns) = result?;
        check_pass(ret)?;
        traced.push(f64::from(ns));
    }
    let (jited, jited_removed) = (jited_bytes(main)?, jited_bytes(&bare)?);
    if jited_removed >= jited {
        bail!(
            "the object without trace hooks is not smaller ({jited_removed} vs {jited} bytes \
             JIT-compiled): the hooks were not removed"
        );
    }
    Ok(TraceCost {
        off_ns: median(&mut off),
        removed_ns: median(&mut removed),
        other_source_ns: median(&mut traced),
        jited_bytes: jited,
        jited_bytes_removed: jited_removed,
        calls: calls * 3,
    })
}
