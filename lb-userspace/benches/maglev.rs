//! Maglev table build time for M = 65537 with 10, 100 and 1000 equal-weight backends
//! (`cargo bench -p lb-userspace --bench maglev`; `cargo xtask bench` runs it and reports
//! the medians from target/criterion/maglev_build/N/new/estimates.json).
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use xlb::maglev::{MaglevBackend, build_table};

const TABLE_SIZE: u32 = 65537;

/// The same keys as xlb-bench's moved-fraction measurement ("10.99.x.y:8080").
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.99.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10, 100, 1000] {
        let keys = keys(n);
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .map(|key| MaglevBackend { key, weight: 100 })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &backends, |b, backends| {
            b.iter(|| build_table(black_box(backends), black_box(TABLE_SIZE)));
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
