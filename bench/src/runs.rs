//! One measured run of a load through an active mode: the rate, the CPU it cost and the
//! per-backend split.
use std::time::Duration;

use anyhow::Result;

use crate::{
    cpu,
    load::{self, Load},
    modes::Active,
    report::Run,
    testbed::Testbed,
};

/// What a run cost in CPU: the machine's busy time, other users' share, the proxy's own.
struct CpuCost {
    busy_us: f64,
    per_cpu: Vec<f64>,
    foreign_us: f64,
    proxy_us: Option<f64>,
}

/// CPU counters taken at the start of a run.
struct CpuMeter {
    proxy: Option<u32>,
    proxy_ticks: Option<u64>,
    procs: cpu::Processes,
    sample: cpu::Sample,
}

impl CpuMeter {
    fn start(active: &Active<'_>) -> Result<CpuMeter> {
        let proxy = active.proxy_pid();
        let proxy_ticks = proxy.and_then(cpu::process_ticks);
        let procs = cpu::processes();
        Ok(CpuMeter {
            proxy,
            proxy_ticks,
            procs,
            sample: cpu::sample()?,
        })
    }

    fn stop(self) -> Result<CpuCost> {
        let after = cpu::sample()?;
        let procs_after = cpu::processes();
        let proxy_after = self.proxy.and_then(cpu::process_ticks);
        let usage = cpu::usage(&self.sample, &after);
        Ok(CpuCost {
            busy_us: usage.busy_us,
            per_cpu: usage.per_cpu,
            foreign_us: cpu::foreign_us(&self.procs, &procs_after),
            proxy_us: self
                .proxy_ticks
                .zip(proxy_after)
                .map(|(a, b)| (b - a) as f64 * cpu::tick_us()),
        })
    }
}

pub fn wrk_run(
    wrk: &load::Wrk<'_>,
    bed: &Testbed,
    active: &Active<'_>,
    rep: u32,
    load: Load,
) -> Result<Run> {
    let targets = active.http_targets();
    let nginx_before = bed.nginx_requests()?;
    let meter = CpuMeter::start(active)?;
    let r = wrk.run(&targets, load == Load::Close)?;
    let cost = meter.stop()?;
    let nginx_after = bed.nginx_requests()?;
    Ok(Run {
        rep,
        load,
        mode: active.mode,
        rate: r.rate,
        seconds: r.seconds,
        count: r.requests,
        p50_us: Some(r.p50_us),
        p99_us: Some(r.p99_us),
        cpu_busy_us: cost.busy_us,
        cpu_util: cost.per_cpu,
        foreign_cpu_us: cost.foreign_us,
        proxy_cpu_us: cost.proxy_us,
        per_backend: nginx_after
            .iter()
            .zip(&nginx_before)
            .map(|(a, b)| a - b)
            .collect(),
        errors: r.errors,
        sent: None,
    })
}

/// Removes the backends' UDP counters when dropped.
struct UdpCounters<'a>(&'a Testbed);

impl Drop for UdpCounters<'_> {
    fn drop(&mut self) {
        self.0.remove_udp_counters();
    }
}

pub fn udp_run(
    bed: &Testbed,
    active: &Active<'_>,
    rep: u32,
    seconds: u64,
    load_cpu: usize,
    flows: usize,
) -> Result<Run> {
    bed.add_udp_counters()?;
    let _counters = UdpCounters(bed);
    let targets = active.udp_targets();
    let counts_before = bed.udp_counts()?;
    let meter = CpuMeter::start(active)?;
    let sent = load::udp_flood(
        &bed.topo.client.path(),
        load_cpu,
        &targets,
        flows,
        Duration::from_secs(seconds),
        &crate::STOP,
    )?;
    let cost = meter.stop()?;
    // Datagrams still in queues arrive within this.
    std::thread::sleep(Duration::from_millis(200));
    let counts_after = bed.udp_counts()?;
    let per_backend: Vec<u64> = counts_after
        .iter()
        .zip(&counts_before)
        .map(|(a, b)| a - b)
        .collect();
    let delivered: u64 = per_backend.iter().sum();
    Ok(Run {
        rep,
        load: Load::Udp,
        mode: active.mode,
        rate: delivered as f64 / sent.seconds,
        seconds: sent.seconds,
        count: delivered,
        p50_us: None,
        p99_us: None,
        cpu_busy_us: cost.busy_us,
        cpu_util: cost.per_cpu,
        foreign_cpu_us: cost.foreign_us,
        proxy_cpu_us: cost.proxy_us,
        per_backend,
        errors: sent.packets.saturating_sub(delivered),
        sent: Some(sent.packets),
    })
}
