//! Criterion benchmarks of `filters::Windows`, the bounded per-key window maps of the brute-force,
//! enumeration, flood and toll-fraud filters, full at their default cap of 100,000 live entries:
//! what a message from a key already held costs, what one from a new key costs (a spray from many
//! sources, which spoofed UDP makes free, keeps the map full and every key new), and the
//! once-a-second sweep when nothing is due; and the REGISTERs in flight (`registered::Bindings`)
//! full at their cap of 50,000: a new one, and an answer matched to one; and the cluster-wide
//! limits' counts at 200,000 keys.
//! `cargo bench -p sipwarden-edge --bench windows`.

use criterion::{criterion_group, criterion_main, Criterion};
use sipwarden_edge::filters::registered::{Bindings, Pending};
use sipwarden_edge::filters::tollfraud::Calls;
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

fn asked(at_ms: u64) -> Pending {
    Pending {
        contacts: vec!["sip:2000@198.51.100.7:5060".into()],
        removing: false,
        user_agent: "Yealink SIP-T46S".into(),
        at_ms,
    }
}

fn pending(c: &mut Criterion) {
    let mut g = c.benchmark_group("registers_in_flight_full_at_50k");
    let full = || {
        let b = Bindings::default();
        for i in 0..Bindings::MAX_PENDING as u64 {
            b.pending(&format!("{i}@198.51.100.7"), 1, asked(NOW + i / 1_000));
        }
        b
    };
    let now = NOW + Bindings::MAX_PENDING as u64 / 1_000;
    let b = full();
    let mut next = Bindings::MAX_PENDING as u64;
    g.bench_function("a_new_register", |bench| {
        bench.iter(|| {
            next += 1;
            b.pending(black_box(&format!("{next}@198.51.100.7")), 1, asked(now))
        })
    });
    let b = full();
    let mut i = 0u64;
    g.bench_function("an_answer_and_its_next_register", |bench| {
        bench.iter(|| {
            i = (i + 7_919) % Bindings::MAX_PENDING as u64;
            let call_id = format!("{i}@198.51.100.7");
            let p = b.answered(black_box(&call_id), 1);
            b.pending(&call_id, 1, p.unwrap_or_else(|| asked(now)));
        })
    });
    g.finish();
}

/// The registrations' once-a-second sweep with 100,000 phones registered (each its own address,
/// half also known from the cluster) and nothing due: how long it holds the lock every INVITE's
/// registered-source check takes.
fn registrations(c: &mut Criterion) {
    let mut g = c.benchmark_group("registrations_100k");
    let b = Bindings::default();
    let later = NOW + 3_600_000;
    for i in 0..100_000u32 {
        let ip = std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        b.set(ip, format!("sip:{i}@example.com"), later, NOW);
        if i % 2 == 0 {
            let contact = format!("sip:{i}@10.0.0.1:5060");
            b.put_cluster(&format!("sip:{i}@example.com"), &contact, ip, later, NOW);
        }
    }
    g.bench_function("sweep_with_nothing_due", |bench| {
        bench.iter(|| b.expire(black_box(NOW + 1_000)))
    });
    g.finish();
}

/// The toll-fraud call table's once-a-second sweep (calls whose BYE was lost) with 50,000 calls up
/// and none older than the limit, and a call's start and end beside it.
fn calls(c: &mut Criterion) {
    let mut g = c.benchmark_group("calls_up_50k");
    let calls = Calls::default();
    for i in 0..50_000u64 {
        calls.start(
            &format!("{i}@pbx"),
            format!("acct{}", i % 500),
            NOW + i / 100,
        );
    }
    let now = NOW + 1_000;
    g.bench_function("sweep_with_nothing_due", |bench| {
        bench.iter(|| calls.expire(black_box(now), 4 * 3_600_000))
    });
    let mut i = 50_000u64;
    g.bench_function("a_call_up_and_down", |bench| {
        bench.iter(|| {
            i += 1;
            let id = format!("{i}@pbx");
            calls.start(black_box(&id), "acct7".to_string(), now);
            calls.end(&id);
        })
    });
    g.finish();
}

/// The cluster-wide limits' counts (`limits::ClusterCounters`) with 100,000 keys known (the
/// totals the last answer gave) and 100,000 counted since, all in the current window: an answer
/// to a push with nothing ended (every push, a few times a second), and a request counted.
fn cluster_counts(c: &mut Criterion) {
    use sipwarden_edge::filters::limits::ClusterCounters;
    use sipwarden_proto::v1 as pb;
    let mut g = c.benchmark_group("cluster_counts_200k");
    let def = pb::LimitDef {
        name: "per-source".into(),
        key: "source".into(),
        methods: vec!["INVITE".into()],
        max: u64::MAX,
        window_s: 60,
        action: "reject".into(),
        ban_ttl_s: 0,
    };
    let counters = ClusterCounters::default();
    counters.set_limits(1, vec![def.clone()]);
    for i in 0..100_000u64 {
        counters.hit(&def, &format!("k{i}"), NOW);
    }
    let sums: Vec<pb::CounterSum> = counters
        .take()
        .into_iter()
        .map(|d| pb::CounterSum {
            limit: d.limit,
            key: d.key,
            window: d.window,
            total: d.count,
        })
        .collect();
    counters.learned(&sums, &[], NOW);
    for i in 100_000..200_000u64 {
        counters.hit(&def, &format!("k{i}"), NOW);
    }
    g.bench_function("an_answer_with_nothing_ended", |bench| {
        bench.iter(|| counters.learned(&[], &[], black_box(NOW)))
    });
    g.bench_function("a_request_counted", |bench| {
        bench.iter(|| counters.hit(&def, black_box("k150000"), NOW))
    });
    g.finish();
}

criterion_group!(
    benches,
    windows,
    pending,
    registrations,
    calls,
    cluster_counts
);
criterion_main!(benches);
