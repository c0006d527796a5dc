//! The soak, run by `cargo xtask soak [--minutes N] [--report F]` (not by `cargo xtask
//! test`): XLB_SOAK_MINUTES (default 10) and XLB_SOAK_REPORT (default target/soak.md). It
//! fails when a request failed outside the documented windows, or the agent's RSS or fds
//! grew; the report (tests/src/soak/report.rs) says which and when.
use xlb_tests::soak::{Options, run};

#[test]
#[ignore = "long: run by cargo xtask soak"]
fn soak() {
    let minutes = std::env::var("XLB_SOAK_MINUTES")
        .ok()
        .map(|m| m.parse().expect("XLB_SOAK_MINUTES: a number of minutes"))
        .unwrap_or(10);
    let report = std::env::var_os("XLB_SOAK_REPORT")
        .map(Into::into)
        .unwrap_or_else(|| "../target/soak.md".into());
    let verdict = run(&Options { minutes, report });
    assert!(
        verdict.passed,
        "soak failed: {}",
        verdict.reasons.join("; ")
    );
}
