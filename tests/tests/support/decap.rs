//! The decap program loaded on its own under BPF_PROG_TEST_RUN (modes.rs, decap_v6.rs).
#![allow(dead_code)] // each test file uses a part
use std::net::IpAddr;

use aya::{EbpfLoader, maps::PerCpuArray, programs::Xdp};
use lb_common::DecapCounter;
use xlb_tests::testrun::xdp_once;

/// The stats map of the decap object (its name carries the layout version).
pub const STATS: &str = "XLB_DECAP_STATS_V3";

/// The decap program loaded on its own, serving `vips`.
pub struct Decap {
    ebpf: aya::Ebpf,
    pin: std::path::PathBuf,
}

impl Decap {
    /// Accepting encapsulated packets from any source (no `--from`).
    pub fn new(vips: &[IpAddr]) -> Decap {
        Decap::from(vips, &[])
    }

    /// Accepting them only from `sources`, as `xlb decap --from` does.
    pub fn from(vips: &[IpAddr], sources: &[ipnet::IpNet]) -> Decap {
        let pin = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/xlb-test-{}-decap",
            xlb_tests::netns::unique_prefix()
        ));
        std::fs::create_dir_all(&pin).expect("pin dir");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin)
            .load(xlb::decap::DECAP_OBJECT)
            .expect("load decap");
        let prog: &mut Xdp = ebpf.program_mut("xlb_decap").unwrap().try_into().unwrap();
        prog.load().expect("verify decap");
        xlb::decap::set_vips(&mut ebpf, vips).expect("VIPs");
        xlb::decap::set_sources(&mut ebpf, sources).expect("sources");
        Decap { ebpf, pin }
    }

    /// A decap counter summed over CPUs.
    pub fn counter(&self, counter: DecapCounter) -> u64 {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(STATS).unwrap()).unwrap();
        map.get(&(counter as u32), 0).unwrap().iter().sum()
    }

    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program("xlb_decap").unwrap().try_into().unwrap();
        let out = xdp_once(prog, "xlb_decap", input);
        (out.action, out.data)
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}
