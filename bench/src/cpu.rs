//! CPU time: the whole system's from /proc/stat, one process's from /proc/PID/stat, and
//! pinning with sched_setaffinity / taskset.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Busy and total ticks per CPU.
#[derive(Debug, Clone)]
pub struct Sample {
    /// (busy, total) ticks for each CPU, in /proc/stat order.
    cpus: Vec<(u64, u64)>,
}

/// What happened between two samples.
#[derive(Debug, Clone)]
pub struct Usage {
    /// CPU time spent outside idle and iowait on all CPUs, in µs.
    pub busy_us: f64,
    /// Busy share of each CPU, 0..=1.
    pub per_cpu: Vec<f64>,
}

pub fn sample() -> Result<Sample> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut cpus = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        // The aggregate line is "cpu  ..."; per-CPU lines are "cpuN ...".
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest is already in user).
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        cpus.push((total - idle, total));
    }
    if cpus.is_empty() {
        bail!("no per-CPU lines in /proc/stat");
    }
    Ok(Sample { cpus })
}

pub fn usage(before: &Sample, after: &Sample) -> Usage {
    let tick = tick_us();
    let mut busy = 0;
    let mut per_cpu = Vec::new();
    for ((b0, t0), (b1, t1)) in before.cpus.iter().zip(&after.cpus) {
        busy += b1 - b0;
        per_cpu.push(if t1 > t0 {
            (b1 - b0) as f64 / (t1 - t0) as f64
        } else {
            0.0
        });
    }
    Usage {
        busy_us: busy as f64 * tick,
        per_cpu,
    }
}

/// Microseconds per clock tick (USER_HZ).
pub fn tick_us() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e6 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// User + system ticks of a process (all its threads), or None if it is gone.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Pins every thread of a running process (one we started) to `cpu`.
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -a -cp {cpu} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// CPU ticks of every process on the machine, to tell our load from other people's.
#[derive(Debug, Clone, Default)]
pub struct Processes {
    /// pid -> (ppid, user + system ticks, is a kernel thread)
    all: std::collections::HashMap<u32, (u32, u64, bool)>,
}

/// PF_KTHREAD in /proc/PID/stat's flags.
const PF_KTHREAD: u64 = 0x0020_0000;

pub fn processes() -> Processes {
    let mut all = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Processes { all };
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // After ')': state(0) ppid(1) ... flags(6) ... utime(11) stime(12).
        all.insert(
            pid,
            (num(1) as u32, num(11) + num(12), num(6) & PF_KTHREAD != 0),
        );
    }
    Processes { all }
}

/// CPU time (µs) that user processes outside our own process tree used between the two
/// snapshots: other work on the machine that competed with the benchmark. Kernel threads
/// (ksoftirqd does our packets' softirq work under load) count as ours.
pub fn foreign_us(before: &Processes, after: &Processes) -> f64 {
    let me = std::process::id();
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match after.all.get(&pid).or_else(|| before.all.get(&pid)) {
                Some((ppid, _, _)) if *ppid != 0 && *ppid != pid => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let mut ticks = 0;
    for (pid, (_, t, kthread)) in &after.all {
        if *kthread || ours(*pid) {
            continue;
        }
        let start = before.all.get(pid).map_or(0, |(_, b, _)| *b);
        ticks += t.saturating_sub(start);
    }
    ticks as f64 * tick_us()
}
