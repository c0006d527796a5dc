//! Maglev table build time for the default M = 65537 with 10, 100 and 1000 equal-weight
//! backends, and for the largest table with 100 (`cargo bench -p lb-userspace --bench
//! maglev`; `cargo xtask bench` runs it and reports the medians from
//! target/criterion/maglev_build{,_M}/N/new/estimates.json). `maglev_build_skewed` times
//! very unequal weights, and weights of 1/32 of the largest, where `fill` (maglev/fill.rs)
//! switches from visiting a backend every round to a heap.
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

fn backends<'a>(keys: &'a [String], weight: impl Fn(usize) -> u32) -> Vec<MaglevBackend<'a>> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| MaglevBackend {
            key,
            weight: weight(i),
        })
        .collect()
}

/// One backend with the largest weight a label can ask for, the rest at `w`.
fn heavy_and(w: u32) -> impl Fn(usize) -> u32 {
    move |i| if i == 0 { 65535 } else { w }
}

/// 100 weights spread evenly over 1..=65535.
fn spread(i: usize) -> u32 {
    1 + (i as u32) * 65534 / 99
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10, 100, 1000] {
        let keys = keys(n);
        group.bench_with_input(
            BenchmarkId::from_parameter(n),
            &backends(&keys, |_| 100),
            |b, backends| {
                b.iter(|| build_table(black_box(backends), black_box(DEFAULT_RING_SIZE)));
            },
        );
    }
    group.finish();

    // About 30 times the work of the default table: fewer samples.
    let mut group = c.benchmark_group(format!("maglev_build_{MAX_RING_SIZE}"));
    group.sample_size(10);
    let keys100 = keys(100);
    group.bench_with_input(
        BenchmarkId::from_parameter(100),
        &backends(&keys100, |_| 100),
        |b, backends| {
            b.iter(|| build_table(black_box(backends), black_box(MAX_RING_SIZE)));
        },
    );
    group.finish();

    let mut group = c.benchmark_group("maglev_build_skewed");
    group.sample_size(10);
    let keys1000 = keys(1000);
    let (default, largest) = (DEFAULT_RING_SIZE, MAX_RING_SIZE);
    let cases = [
        ("65535+99x1", default, backends(&keys100, heavy_and(1))),
        ("65535+999x1", default, backends(&keys1000, heavy_and(1))),
        ("spread100", default, backends(&keys100, spread)),
        (
            "65535+999x2047",
            default,
            backends(&keys1000, heavy_and(2047)),
        ),
        (
            "65535+999x2048",
            default,
            backends(&keys1000, heavy_and(2048)),
        ),
        ("65535+99x1_M", largest, backends(&keys100, heavy_and(1))),
    ];
    for (name, m, backends) in &cases {
        group.bench_with_input(
            BenchmarkId::from_parameter(name),
            backends,
            |b, backends| {
                b.iter(|| build_table(black_box(backends), black_box(*m)));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
