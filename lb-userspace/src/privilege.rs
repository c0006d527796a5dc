//! What the agent needs of the kernel's capabilities (docs/security.md, "Privilege"),
//! checked before anything is loaded or touched, so that a start without them fails with
//! the reason instead of an EPERM from deep inside the loader.
use anyhow::{Result, bail};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// (capability, name, what for). CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as
/// the kernel lets it.
const NEEDED: &[(u32, &str, &str)] = &[
    (CAP_BPF, "CAP_BPF", "BPF maps and programs"),
    (
        CAP_PERFMON,
        "CAP_PERFMON",
        "the verifier accepts the data path's pointer arithmetic only with it",
    ),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN", "XDP and TC attach, netlink"),
];

/// The effective capability set of this process (`CapEff` of /proc/self/status).
fn effective() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let Some(hex) = status.lines().find_map(|l| l.strip_prefix("CapEff:")) else {
        bail!("/proc/self/status has no CapEff line");
    };
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// The capabilities of [`NEEDED`] missing from `effective`, with what each is for.
pub fn missing_from(effective: u64) -> Vec<String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    NEEDED
        .iter()
        .filter(|(cap, ..)| {
            let stand_in = *cap != CAP_NET_ADMIN && has(CAP_SYS_ADMIN);
            !has(*cap) && !stand_in
        })
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect()
}

/// Fails, naming each missing capability, unless this process may load and attach the
/// data path.
pub fn check() -> Result<()> {
    let missing = missing_from(effective()?);
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; run as root, or grant them as deploy/xlb.service does \
             (docs/security.md, \"Privilege\")",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        let all = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_from(all).is_empty());
        assert!(missing_from(u64::MAX).is_empty());
        let missing = missing_from(1 << CAP_NET_ADMIN).join(", ");
        assert!(
            missing.contains("CAP_BPF") && missing.contains("CAP_PERFMON"),
            "{missing}"
        );
        // CAP_SYS_ADMIN covers BPF and PERFMON, not NET_ADMIN.
        let missing = missing_from(1 << CAP_SYS_ADMIN);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].starts_with("CAP_NET_ADMIN"));
        assert!(missing_from(0).len() == 3);
    }
}
