//! Criterion benchmarks of the ban store (`bans::BanStore`) with a large ban list: what applying
//! one new ban costs (the batch the writer makes of a lone auto-ban or a cluster ban), what keeping
//! it on disk costs (a line in the journal) and what a whole origin replaced costs with the ban
//! file written whole (a cluster snapshot), and the lookup every message
//! makes at the pre-parse gate, for a banned and a clean address, with changes held beside the
//! list's base and without.
//! Beside it, what one account ban pushed by the cluster costs the edge (`cluster::apply` of the
//! watch event) with `SW_BENCH_BANS` / 10 account bans already held.
//! `cargo bench -p sipwarden-edge --bench bans`; `SW_BENCH_BANS` sets the list's size (default
//! 100,000).

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::IpNet;
use sipwarden_edge::bans::{Ban, BanOrigin, BanStore};
use sipwarden_edge::cluster;
use sipwarden_edge::pipeline::State;
use sipwarden_proto::v1 as pb;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const NOW: u64 = 1_000_000;

fn ban(n: u32) -> Ban {
    Ban {
        network: IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))),
        origin: BanOrigin::Auto,
        rule: "bruteforce".into(),
        reason: "401 threshold".into(),
        created_unix_ms: NOW,
        expires_unix_ms: NOW + 3_600_000 + u64::from(n),
    }
}

fn bans(c: &mut Criterion) {
    let size: u32 = std::env::var("SW_BENCH_BANS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BanStore::new(Some(dir.path().join("bans.json")), 1_000_000);
    for n in 0..size {
        store.ban(ban(n));
    }
    store.apply(NOW);
    store.save_if_dirty().expect("save");

    let mut g = c.benchmark_group(format!("ban_store_{size}"));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    // Each iteration bans a new address and takes back the one banned before, so the list keeps
    // its size.
    let mut next = size;
    g.bench_function("apply_one_ban", |b| {
        b.iter(|| {
            store.ban(ban(next));
            store.unban(IpNet::from(IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000 + next - size,
            ))));
            next += 1;
            store.apply(NOW)
        })
    });
    g.bench_function("apply_and_journal_one_ban", |b| {
        b.iter(|| {
            // A change that leaves the list as it was, kept by a line in the journal.
            store.ban(ban(next - 1));
            store.apply(NOW);
            store.save_if_dirty().expect("save")
        })
    });
    // The lookups: first with the changes the iterations above left beside the base, then after a
    // batch that folds them in (a replacement of every auto-ban by the same list).
    let banned = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + next - 1));
    let clean = IpAddr::V4(Ipv4Addr::from(0x0b00_0000));
    g.sample_size(50);
    g.measurement_time(Duration::from_secs(3));
    for (name, ip) in [("banned", banned), ("clean", clean)] {
        g.bench_function(format!("lookup_{name}_with_changes"), |b| {
            b.iter(|| store.lookup(std::hint::black_box(ip), NOW))
        });
    }
    store.replace(
        BanOrigin::Auto,
        (next - size..next).map(ban).collect::<Vec<_>>(),
    );
    store.apply(NOW);
    for (name, ip) in [("banned", banned), ("clean", clean)] {
        g.bench_function(format!("lookup_{name}_folded"), |b| {
            b.iter(|| store.lookup(std::hint::black_box(ip), NOW))
        });
    }
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("replace_all_and_rewrite_file", |b| {
        b.iter(|| {
            // A whole origin replaced (as by a cluster snapshot): the file is written whole.
            store.replace(
                BanOrigin::Auto,
                (next - size..next).map(ban).collect::<Vec<_>>(),
            );
            store.apply(NOW);
            store.save_if_dirty().expect("save")
        })
    });
    g.finish();
}

/// A cluster ban event on account `n`.
fn account_event(revision: u64, n: u64, removed: bool) -> pb::WatchEvent {
    let ban = pb::Ban {
        id: format!("a{n}"),
        target: Some(pb::BanTarget {
            target: Some(pb::ban_target::Target::Aor(format!("sip:{n}@pbx.example"))),
        }),
        reason: "compromised".into(),
        ..Default::default()
    };
    let kind = if removed {
        pb::watch_event::Kind::BanRemoved(ban)
    } else {
        pb::watch_event::Kind::BanPut(ban)
    };
    pb::WatchEvent {
        revision,
        kind: Some(kind),
    }
}

fn account_bans(c: &mut Criterion) {
    let size: u64 = std::env::var("SW_BENCH_BANS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100_000)
        / 10;
    let state = State::new(std::sync::Arc::new(BanStore::new(None, 1_000)));
    let snapshot = pb::WatchEvent {
        revision: 1,
        kind: Some(pb::watch_event::Kind::Snapshot(pb::StateSnapshot {
            bans: (0..size)
                .filter_map(|n| match account_event(1, n, false).kind {
                    Some(pb::watch_event::Kind::BanPut(b)) => Some(b),
                    _ => None,
                })
                .collect(),
            ..Default::default()
        })),
    };
    cluster::apply(&state, "s", NOW, &snapshot);
    let mut g = c.benchmark_group(format!("cluster_accounts_{size}"));
    g.sample_size(20);
    // Each iteration bans a new account and lifts the oldest, so the set keeps its size.
    let mut next = size;
    g.bench_function("put_one_and_remove_one", |b| {
        b.iter(|| {
            cluster::apply(&state, "s", NOW, &account_event(next, next, false));
            cluster::apply(&state, "s", NOW, &account_event(next, next - size, true));
            next += 1;
        })
    });
    g.finish();
}

criterion_group!(benches, bans, account_bans);
criterion_main!(benches);
