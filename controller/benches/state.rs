//! Criterion benchmarks of the replicated state's reads that run per watcher per applied change:
//! `changes_since` (what a watching edge is sent) with the change window full (100,000 changes)
//! and the edge one change behind, and the leader's once-a-second `next_expiry` with 100,000 bans
//! and bindings, beside the walk of every ban and binding it replaced.
//! `cargo bench -p sipwarden-controller --bench state`.

use criterion::{criterion_group, criterion_main, Criterion};
use sipwarden_controller::state::{Command, NewBan, Op, StateMachine};
use sipwarden_shared::ban::{BanSource, BanTarget, Binding};
use std::hint::black_box;

const T0: u64 = 1_800_000_000_000;

fn cmd(at: u64, op: Op) -> Command {
    Command {
        at_unix_ms: at,
        who: "bench".into(),
        op,
    }
}

/// 50,000 bans and 50,000 bindings, each its own command: the change window full.
fn full() -> StateMachine {
    let mut s = StateMachine::new();
    for i in 0..50_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
        let ban = NewBan {
            target: BanTarget::parse("ip", &ip).expect("an address"),
            reason: "bench".into(),
            source: BanSource::AutoRule("scanner".into()),
            expires_unix_ms: Some(T0 + 3_600_000 + u64::from(i)),
            site: None,
        };
        s.apply(&cmd(T0, Op::AddBans(vec![ban])));
        let binding = Binding {
            aor: format!("sip:{i}@example.com"),
            contact: format!("sip:{i}@{ip}:5060"),
            source: format!("{ip}:5060"),
            transport: "udp".into(),
            edge_id: "e1".into(),
            flow_token: "sw1x".into(),
            expires_unix_ms: T0 + 3_600_000 + u64::from(i),
            user_agent: "ua".into(),
            site: "s1".into(),
        };
        s.apply(&cmd(T0, Op::PutBindings(vec![binding])));
    }
    s
}

fn reads(c: &mut Criterion) {
    let s = full();
    let mut g = c.benchmark_group("state_100k_changes");
    let behind = s.revision() - 1;
    g.bench_function("changes_since_one_behind", |b| {
        b.iter(|| s.changes_since(black_box(behind)))
    });
    g.bench_function("next_expiry", |b| b.iter(|| black_box(&s).next_expiry()));
    // What `next_expiry` was before the expiry index: a walk of every ban and binding.
    g.bench_function("next_expiry_by_walk", |b| {
        b.iter(|| {
            let s = black_box(&s);
            let bans = s.bans().filter_map(|b| b.expires_unix_ms);
            bans.chain(s.bindings().map(|b| b.expires_unix_ms)).min()
        })
    });
    g.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
