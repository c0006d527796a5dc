//! Loads the embedded BPF object, attaches it, and pins programs, maps and links under the
//! pin path, so forwarding goes on while the agent is stopped. A new agent adopts what is
//! pinned: maps are reused as they are (conntrack included) and each pinned link gets the
//! new program by an atomic link update. `detach` removes everything.
use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp, links::PinnedLink},
};
use tracing::{info, warn};

use crate::{config::XdpMode, datapath::Datapath, layout::Layout};

mod attach;
pub mod automode;
pub mod resize;
pub(crate) use attach::attach_xdp;
pub use attach::{attach, attach_reply};

/// The BPF object built from lb-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub const XDP_PROGRAM: &str = "xlb_xdp";
/// Front NIC egress: reverse NAT of replies the kernel routed.
pub const TC_EGRESS_PROGRAM: &str = "xlb_tc_egress";
/// Front NIC ingress: delivers packets XDP marked for a local container to its bridge.
pub const TC_INGRESS_PROGRAM: &str = "xlb_tc_ingress";
/// Container bridge ingress: reverse NAT of replies and redirect out of the front NIC.
pub const TC_REPLY_PROGRAM: &str = "xlb_tc_reply";
/// Front NIC ingress, instead of XDP (`xdp_mode = "tc"`): the balancer itself.
pub const TC_BALANCE_PROGRAM: &str = "xlb_tc_balance";
const TC_PROGRAMS: [&str; 4] = [
    TC_EGRESS_PROGRAM,
    TC_INGRESS_PROGRAM,
    TC_REPLY_PROGRAM,
    TC_BALANCE_PROGRAM,
];

/// Where each kind of object is pinned below the pin path.
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.into() }
    }
    pub(crate) fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }
    pub(crate) fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub(crate) fn xdp_link(&self, interface: &str) -> PathBuf {
        self.links().join(format!("xdp_{interface}"))
    }
    fn tc_egress_link(&self, interface: &str) -> PathBuf {
        self.links().join(format!("tc_egress_{interface}"))
    }
    fn tc_ingress_link(&self, interface: &str) -> PathBuf {
        self.links().join(format!("tc_ingress_{interface}"))
    }
    fn tc_reply_link(&self, interface: &str) -> PathBuf {
        self.links().join(format!("{REPLY_LINK_PREFIX}{interface}"))
    }
    fn tc_balance_link(&self, interface: &str) -> PathBuf {
        self.links().join(format!("tc_balance_{interface}"))
    }
    /// The links a front interface has in this mode.
    fn front_links(&self, interface: &str, mode: XdpMode) -> Vec<PathBuf> {
        match mode {
            XdpMode::Tc => vec![
                self.tc_balance_link(interface),
                self.tc_egress_link(interface),
            ],
            _ => vec![
                self.xdp_link(interface),
                self.tc_egress_link(interface),
                self.tc_ingress_link(interface),
            ],
        }
    }
}

const REPLY_LINK_PREFIX: &str = "tc_reply_";
/// lb-ebpf/src/trace.rs: 0 removes the trace hooks from the loaded programs.
const TRACE_HOOKS_GLOBAL: &str = "XLB_TRACE_HOOKS";

/// How the XDP program ended up attached to one interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    /// "driver", "skb", "tc" (the balancer at TC ingress), or "unchanged" for an adopted
    /// XDP link whose mode rtnetlink did not tell.
    pub xdp_mode: String,
    /// True when an existing pinned link was taken over (agent restart or upgrade).
    pub adopted: bool,
}

/// Loads the object with every map pinned under (or reused from) the pin path, and pins the
/// programs. Nothing is attached yet. Maps made anew have the sizes the BPF object declares.
pub fn load(pin_path: &Path) -> Result<Ebpf> {
    load_sized(pin_path, &Layout::default())
}

/// `load`, with maps made anew sized by `sizes` (a map pinned already keeps its size).
pub fn load_sized(pin_path: &Path, sizes: &Layout) -> Result<Ebpf> {
    load_with(pin_path, sizes, true)
}

/// `load` with the trace hooks taken out at load time: the benchmark's baseline for what
/// tracing costs while no trace runs. Not for the agent (`xlb trace` would see nothing).
pub fn load_without_trace_hooks(pin_path: &Path) -> Result<Ebpf> {
    load_with(pin_path, &Layout::default(), false)
}

fn load_with(pin_path: &Path, sizes: &Layout, trace_hooks: bool) -> Result<Ebpf> {
    crate::bpffs::ensure(pin_path)?;
    let layout = PinLayout::new(pin_path);
    fs::create_dir_all(layout.programs()).context("creating the pin directory")?;
    fs::create_dir_all(layout.links()).context("creating the pin directory")?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_path);
    for (name, entries) in sizes.max_entries() {
        loader.map_max_entries(name, entries);
    }
    // A read-only global: the verifier knows its value and drops the code it guards.
    let hooks = u8::from(trace_hooks);
    loader.override_global(TRACE_HOOKS_GLOBAL, &hooks, true);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the BPF object (are you root?)")?;

    remove_stale_maps(pin_path)?;
    let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?.try_into()?;
    xdp.load().context("verifying the XDP program")?;
    repin(layout.programs().join(XDP_PROGRAM), |p| xdp.pin(p))?;
    for name in TC_PROGRAMS {
        let tc: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
        tc.load().with_context(|| format!("verifying {name}"))?;
        repin(layout.programs().join(name), |p| tc.pin(p))?;
    }
    Ok(ebpf)
}

/// Unpins maps of an older layout (another `_Vn` name) that an earlier agent left: this
/// object does not use them, and the programs that still do hold their own references.
fn remove_stale_maps(pin_path: &Path) -> Result<()> {
    for entry in fs::read_dir(pin_path).context("reading the pin directory")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("XLB_")
            && !crate::datapath::ALL_MAPS.contains(&name.as_str())
            && entry.file_type()?.is_file()
        {
            info!(map = %name, "removing the pin of a map this version does not use");
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Takes the maps out of a loaded object.
pub fn datapath(ebpf: &mut Ebpf) -> Result<Datapath> {
    Datapath::from_maps(|name| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("the BPF object has no map {name}"))
    })
}

fn pinned_links(layout: &PinLayout) -> Result<Vec<PathBuf>> {
    match fs::read_dir(layout.links()) {
        Ok(dir) => Ok(dir.filter_map(|e| e.ok().map(|e| e.path())).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Removing the last reference to a link detaches it.
fn unpin_link(path: &Path) -> Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(link) => drop(link.unpin()?),
        // A link whose interface vanished can still be unlinked as a file.
        Err(_) => fs::remove_file(path)?,
    }
    Ok(())
}

/// What `detach` removed.
#[derive(Debug, Default)]
pub struct Detached {
    pub links: usize,
    pub pins: usize,
}

/// Detaches every pinned link and removes every pin below the pin path, then the directory.
/// Refuses a pin path that is not on a BPF filesystem, and removes nothing but pins: a
/// regular file elsewhere (a pin path that points at /var/lib, say) is never touched.
pub fn detach(pin_path: &Path) -> Result<Detached> {
    let layout = PinLayout::new(pin_path);
    let mut report = Detached::default();
    if fs::symlink_metadata(pin_path).is_err() {
        return Ok(report);
    }
    crate::bpffs::require(pin_path)?;
    for dir in [layout.links(), layout.programs()] {
        if dir.exists() {
            crate::bpffs::require(&dir)?;
        }
    }
    // Before the tables go: the next agent must not hand out ports still in TIME_WAIT.
    if let Err(e) = crate::snatheld::save(pin_path) {
        warn!("could not keep the fullnat ports still held for the next agent: {e:#}");
    }
    for link in pinned_links(&layout)? {
        crate::bpffs::require(&link)?;
        unpin_link(&link)?;
        report.links += 1;
    }
    for dir in [layout.links(), layout.programs(), layout.root.clone()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            let preloaded = dir == layout.root
                && crate::bpffs::PRELOADED
                    .iter()
                    .any(|p| path.file_name() == Some(p.as_ref()));
            // Pins are regular files on the bpffs; anything else (a symlink, a directory
            // of someone else's, the kernel's own files at a bpffs root) stays.
            if !preloaded && fs::symlink_metadata(&path)?.file_type().is_file() {
                crate::bpffs::require(&path)?;
                fs::remove_file(&path)?;
                report.pins += 1;
            }
        }
        if dir == layout.root {
            crate::bpffs::remove_pin_dir(&dir)?;
        } else {
            fs::remove_dir(&dir).or_else(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
    }
    Ok(report)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("the BPF object has no program {name}"))
}

/// Pins a program, replacing an older pin (a new agent version brings a new program).
pub(crate) fn repin(
    path: PathBuf,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<()> {
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    pin(&path).with_context(|| format!("pinning {}", path.display()))
}
