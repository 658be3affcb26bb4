//! Criterion benchmarks of `filters::Windows`, the bounded per-key window maps of the brute-force,
//! enumeration, flood and toll-fraud filters, full at their default cap of 100,000 live entries:
//! what a message from a key already held costs, what one from a new key costs (a spray from many
//! sources, which spoofed UDP makes free, keeps the map full and every key new), and the
//! once-a-second sweep when nothing is due. `cargo bench -p sipwarden-edge --bench windows`.

use criterion::{criterion_group, criterion_main, Criterion};
use sipwarden_edge::filters::{Stamped, Windows};
use std::hint::black_box;

const CAP: u64 = 100_000;
const WINDOW_MS: u64 = 60_000;
const NOW: u64 = 1_000_000;

struct Entry {
    start_ms: u64,
    n: u64,
}

impl Stamped for Entry {
    fn stamp(&self) -> u64 {
        self.start_ms
    }
}

fn full() -> Windows<u64, Entry> {
    let w = Windows::with_capacity(CAP as usize);
    for k in 0..CAP {
        w.with(
            &k,
            || Entry {
                start_ms: NOW + k / 1_000,
                n: 0,
            },
            |e| e.n += 1,
        );
    }
    w
}

fn windows(c: &mut Criterion) {
    let mut g = c.benchmark_group("windows_full_at_100k");
    let w = full();
    let now = NOW + CAP / 1_000;
    let mut k = 0u64;
    g.bench_function("a_key_it_holds", |b| {
        b.iter(|| {
            k = (k + 7_919) % CAP;
            w.with(
                black_box(&k),
                || Entry {
                    start_ms: now,
                    n: 0,
                },
                |e| e.n += 1,
            )
        })
    });
    let w = full();
    let mut next = CAP;
    g.bench_function("a_new_key", |b| {
        b.iter(|| {
            next += 1;
            w.with(
                black_box(&next),
                || Entry {
                    start_ms: now,
                    n: 0,
                },
                |e| e.n += 1,
            )
        })
    });
    let w = full();
    g.bench_function("sweep_with_nothing_due", |b| {
        b.iter(|| w.expire(black_box(now), WINDOW_MS))
    });
    g.finish();
}

criterion_group!(benches, windows);
criterion_main!(benches);
