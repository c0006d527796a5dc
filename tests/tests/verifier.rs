//! The verifier's budget: the kernel walks at most 1M instructions of a program's paths,
//! and a program that needs more does not load at all. Each change to lb-ebpf moves the
//! count (library memset and memmove byte loops alone once took ~120k); this fails at 90%,
//! so a change that nears the limit is seen before one passes it. Needs root and BPF.
use std::net::SocketAddr;

use xlb_tests::testrun::*;

/// The kernel's limit (BPF_COMPLEXITY_LIMIT_INSNS).
const LIMIT: u32 = 1_000_000;

#[test]
fn every_program_leaves_the_verifier_a_tenth_of_its_budget() {
    let vip: SocketAddr = "10.99.100.1:80".parse().unwrap();
    let backend: SocketAddr = "10.99.2.11:8080".parse().unwrap();
    let dp = LoadedDatapath::new(&service_toml("web", vip, "tcp", &[(backend, 1)]));
    let counts = dp.verified_instructions();
    for (name, count) in &counts {
        println!(
            "{name}: {count} instructions verified ({:.0}% of {LIMIT})",
            f64::from(*count) * 100.0 / f64::from(LIMIT)
        );
    }
    let names: Vec<&str> = counts.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"xlb_xdp"), "{names:?}");
    for (name, count) in counts {
        assert!(
            count < LIMIT / 10 * 9,
            "{name} needs {count} of the verifier's {LIMIT} instructions: split a path into \
             a subprogram, or move work off it, before it stops loading"
        );
    }
}
