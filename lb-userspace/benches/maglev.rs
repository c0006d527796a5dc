//! Maglev table build time for the default M = 65537 with 10, 100 and 1000 equal-weight
//! backends, and for the largest table with 100 (`cargo bench -p lb-userspace --bench
//! maglev`; `cargo xtask bench` runs it and reports the medians from
//! target/criterion/maglev_build{,_M}/N/new/estimates.json).
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb_common::sizes::{DEFAULT_RING_SIZE, MAX_RING_SIZE};
use xlb::maglev::{MaglevBackend, build_table};

/// The same keys as xlb-bench's moved-fraction measurement ("10.99.x.y:8080").
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.99.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn backends(keys: &[String]) -> Vec<MaglevBackend<'_>> {
    keys.iter()
        .map(|key| MaglevBackend { key, weight: 100 })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10, 100, 1000] {
        let keys = keys(n);
        group.bench_with_input(
            BenchmarkId::from_parameter(n),
            &backends(&keys),
            |b, backends| {
                b.iter(|| build_table(black_box(backends), black_box(DEFAULT_RING_SIZE)));
            },
        );
    }
    group.finish();

    // About 30 times the work of the default table: fewer samples.
    let mut group = c.benchmark_group(format!("maglev_build_{MAX_RING_SIZE}"));
    group.sample_size(10);
    let keys = keys(100);
    group.bench_with_input(
        BenchmarkId::from_parameter(100),
        &backends(&keys),
        |b, backends| {
            b.iter(|| build_table(black_box(backends), black_box(MAX_RING_SIZE)));
        },
    );
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
