//! What the xlb modes need besides the agent: its config for each mode, and dsr's backend
//! side (`xlb decap` in every backend namespace).
use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Result, bail};
use xlb_tests::{
    agent::XDP_MODE_AS_WRITTEN,
    process::binary,
    topology::{FRONT, VIP},
};

use crate::{
    modes::Mode,
    testbed::{HTTP_PORT, Testbed, UDP_PORT},
};

/// The agent's config for an xlb mode: VIP:80/tcp and VIP:9000/udp to every backend.
pub fn config(mode: Mode, pin_path: &str, backends: &[Ipv4Addr]) -> String {
    // fullnat's replies come back to the LB's address on br0: the program must see them there.
    let interfaces = if mode == Mode::XlbFullnat {
        format!("\"{FRONT}\", \"br0\"")
    } else {
        format!("\"{FRONT}\"")
    };
    // The test harness sets xdp_mode = "driver" on a config without one, unless told not to.
    let mut config = format!(
        "{XDP_MODE_AS_WRITTEN}[agent]\ninterfaces = [{interfaces}]\npin_path = \"{pin_path}\"\n"
    );
    // The tuned rows choose their attach mode; the default config leaves it to `auto`.
    match mode {
        Mode::XlbTc => config += "xdp_mode = \"tc\"\n",
        Mode::Xlb => config += "xdp_mode = \"driver\"\n",
        _ => {}
    }
    // The default config (and the diagnostic that measures it) names no bridge: the agent
    // finds br0 by the backends' route. The tuned rows name it.
    let (forwarding, bridge) = match mode {
        Mode::XlbFullnat => ("fullnat", ""),
        Mode::XlbDsr => ("dsr", ""),
        Mode::XlbDefault | Mode::XdpPass => ("nat", ""),
        _ => ("nat", "bridge = \"br0\"\n"),
    };
    // Backends listen on the VIP's ports, which dsr requires (it does not rewrite ports).
    for (name, port, proto) in [("web", HTTP_PORT, "tcp"), ("udp", UDP_PORT, "udp")] {
        config += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\n\
             protocol = \"{proto}\"\nmode = \"{forwarding}\"\ntable_size = 65537\n\
             [service.health]\ntype = \"none\"\n"
        );
        for addr in backends {
            config +=
                &format!("[[service.backend]]\naddress = \"{addr}\"\nport = {port}\n{bridge}");
        }
    }
    config
}

/// `xlb decap` attached in every backend namespace (dsr); detached on drop, which also
/// takes the VIP off the backends' lo.
pub struct Decap {
    /// (namespace path, pin path) of each attachment made so far.
    attached: Vec<(String, String)>,
}

impl Decap {
    pub fn attach(bed: &Testbed) -> Result<Decap> {
        let mut decap = Decap {
            attached: Vec::new(),
        };
        for b in &bed.topo.backends {
            let pins = pin_path(&bed.topo.prefix, &b.name);
            let ns = b.ns.path();
            decap.attached.push((ns.clone(), pins.clone()));
            let out = xlb_in(&ns, &xlb_tests::remote::decap_args(&pins))?;
            if !out.contains("decapsulating for") {
                bail!("xlb decap in {}: {out}", b.name);
            }
        }
        Ok(decap)
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        for (ns, pins) in self.attached.drain(..) {
            if let Err(e) = xlb_in(&ns, &["decap", "--detach", "--pin-path", &pins]) {
                eprintln!("xlb-bench: {e:#}");
            }
        }
    }
}

/// The decap pin directory of a backend (unique per testbed, like the agent's).
pub fn pin_path(prefix: &str, backend: &str) -> String {
    format!("/sys/fs/bpf/xlb-bench-{prefix}-{backend}-decap")
}

/// Fails if any backend still has decap pinned or the VIP on its lo.
pub fn check_decap_detached(bed: &Testbed) -> Result<()> {
    for b in &bed.topo.backends {
        let pins = pin_path(&bed.topo.prefix, &b.name);
        if Path::new(&pins).exists() {
            bail!("{pins} still exists");
        }
        if b.ns.ip(&["addr", "show", "dev", "lo"]).contains(VIP) {
            bail!("{} still has {VIP} on lo", b.name);
        }
    }
    Ok(())
}

/// Runs `xlb ARGS` in the namespace at `ns` (nsenter: the mounts stay ours, so bpffs too).
fn xlb_in(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .arg("--")
        .arg(binary("xlb"))
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("xlb {} in {ns}: {text}", args.join(" "));
    }
    Ok(text)
}
