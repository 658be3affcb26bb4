//! The flood benchmark: a banned source sends SIP datagrams at the release edge as fast as a
//! loopback sender can (`SW_FLOOD_SENDERS` threads, default 1, each a `send_to` loop of one
//! SIPVicious-style OPTIONS from 127.0.0.66, which the edge's ban list holds beside the 10,000 of
//! the load benchmark) while SIPp offers a legitimate OPTIONS load through the edge to a SIPp UAS.
//!
//! Each run measures the legitimate load twice, without and then with the flood, and reports:
//! - datagrams sent by the flooder, dropped by the edge's gate (its `outcome="dropped"` counter)
//!   and lost in the kernel before the edge read them (sent − dropped);
//! - the edge's CPU per dropped datagram: (CPU with flood − CPU without) / dropped, so the
//!   legitimate load's own cost is taken out;
//! - everything a banned datagram costs the host, the sender's own work included, as two upper
//!   bounds on the cost of its drop: the flooder threads' CPU per datagram (their `send_to`, and the
//!   loopback delivery and kernel drop each runs inline as its own softirq work), and the whole
//!   host's extra busy time per datagram (every CPU's wall time less its idle, with the flood less
//!   without);
//! - the legitimate load's failures and the round-trip percentiles of the latency probe, with and
//!   without the flood.
//!
//! With the kernel shield on (the default) the flooder is moved into the BPF socket filter within a
//! second and its datagrams stop reaching the edge: "dropped by the edge" then counts only the
//! gate's drops before that, and the rest is dropped by the kernel on the sender's side of
//! loopback, outside the edge's CPU. `SW_FLOOD_SHIELD=0` measures the gate alone.
//!
//! `cargo build --release --workspace --bins && cargo bench -p sipwarden-tests --bench flood`
//! Environment: `SW_FLOOD_RATE` (legitimate OPTIONS/s, default 1000), `SW_BENCH_SECONDS` (default
//! 10), `SW_BENCH_RUNS` (default 3), `SW_FLOOD_SENDERS` (default 1), `SW_FLOOD_SHIELD`.

use sipwarden_tests::bench::*;
use sipwarden_tests::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FLOODER_IP: &str = "127.0.0.66";

/// Datagrams the edge dropped so far (all `outcome="dropped"` message counters).
fn dropped(edge: &EdgeProc) -> f64 {
    edge.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("sipwarden_edge_messages_total{") && l.contains("outcome=\"dropped\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The calling thread's time on a CPU so far, ns (the scheduler's exact account). With no IRQ time
/// accounting in the kernel, the softirq work a thread runs inline counts as its own: on loopback,
/// a sender's `send_to` also delivers the datagram to the receiving socket, where the shield's
/// filter drops it.
fn thread_cpu_ns() -> u64 {
    schedstat(std::path::Path::new("/proc/thread-self/schedstat")).map_or(0, |s| s.run_ns)
}

/// The CPU seconds the whole host was busy over a run (every CPU's wall time less its idle).
fn host_busy(r: &Run) -> f64 {
    r.cpus
        .iter()
        .map(|&(idle, _)| (100.0 - idle) / 100.0 * r.wall.as_secs_f64())
        .sum()
}

/// Sends one scanner OPTIONS to `target` in a loop until `stop` (bounded to ten minutes); counts
/// what the kernel accepted into `sent` and the thread's CPU time into `cpu_ns`.
fn flood(
    target: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    cpu_ns: Arc<AtomicU64>,
) {
    let sock = std::net::UdpSocket::bind((FLOODER_IP, 0)).expect("flooder socket");
    let local = sock.local_addr().unwrap();
    let msg = format!(
        "OPTIONS sip:100@{target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch=z9hG4bK-flood;rport\r\n\
Max-Forwards: 70\r\nTo: \"sipvicious\"<sip:100@1.1.1.1>\r\n\
From: \"sipvicious\"<sip:100@1.1.1.1>;tag=flood\r\n\
User-Agent: friendly-scanner\r\nCall-ID: flood\r\nCSeq: 1 OPTIONS\r\n\
Accept: application/sdp\r\nContent-Length: 0\r\n\r\n"
    );
    let started = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
        for _ in 0..256 {
            if sock.send_to(msg.as_bytes(), target).is_ok() {
                n += 1;
            }
        }
    }
    sent.fetch_add(n, Ordering::Relaxed);
    cpu_ns.fetch_add(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
}

fn main() {
    let rate = env_num("SW_FLOOD_RATE", 1000);
    let seconds = env_num("SW_BENCH_SECONDS", 10);
    let runs = env_num("SW_BENCH_RUNS", 3);
    let senders = env_num("SW_FLOOD_SENDERS", 1).max(1);
    let root = tempfile::tempdir().unwrap();
    let uas_port = free_port(UAS_IP);
    let _uas = start_uas(root.path(), uas_port, "udp");
    let uas = format!("{UAS_IP}:{uas_port}");
    let shield = std::env::var("SW_FLOOD_SHIELD").map_or(true, |v| v != "0");
    let edge = start_edge_with(
        &uas,
        "udp",
        &[&format!("{FLOODER_IP}/32")],
        &[(
            "SIPWARDEN_UDP__SHIELD_PPS",
            if shield { "1000" } else { "0" },
        )],
    );
    let target = Target {
        name: "edge",
        pid: Some(edge.proc.pid()),
        addr: edge.addr(),
        metrics: None,
        forwards_to: None,
    };
    let cpu = |r: &Run| r.cpu.map_or(0.0, |(u, s)| u + s);
    println!(
        "Flood from a banned address ({senders} sender thread(s)) during {rate} legitimate OPTIONS/s over UDP, {seconds} s per run, kernel shield {}:",
        if shield { "on" } else { "off" }
    );
    let (mut per_drop_ns, mut drop_rate, mut lost_share) = (Vec::new(), Vec::new(), Vec::new());
    let (mut per_sent_ns, mut flooder_ns, mut host_ns) = (Vec::new(), Vec::new(), Vec::new());
    let legitimate = || {
        measure(
            root.path(),
            &target,
            Workload::Options,
            "udp",
            rate,
            seconds,
            Watch::default(),
        )
    };
    for run in 1..=runs {
        let calm = legitimate();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flooder_cpu = Arc::new(AtomicU64::new(0));
        let before = dropped(&edge);
        let flooders: Vec<_> = (0..senders)
            .map(|_| {
                let t = edge.addr().parse().unwrap();
                let (stop, sent, cpu_ns) = (stop.clone(), sent.clone(), flooder_cpu.clone());
                std::thread::spawn(move || flood(t, stop, sent, cpu_ns))
            })
            .collect();
        let stormy = legitimate();
        stop.store(true, Ordering::Relaxed);
        for f in flooders {
            let _ = f.join();
        }
        // The last datagrams in the socket buffer drain within moments.
        std::thread::sleep(Duration::from_millis(200));
        let drops = dropped(&edge) - before;
        let sent = sent.load(Ordering::Relaxed) as f64;
        let wall = stormy.wall.as_secs_f64();
        let extra_cpu =
            cpu(&stormy) - cpu(&calm) * stormy.wall.as_secs_f64() / calm.wall.as_secs_f64();
        let ns = extra_cpu * 1e9 / drops.max(1.0);
        let ns_sent = extra_cpu * 1e9 / sent.max(1.0);
        // Everything a banned datagram costs this host, the flooder's own send included: an upper
        // bound on the cost of dropping it.
        let own_ns = flooder_cpu.load(Ordering::Relaxed) as f64 / sent.max(1.0);
        let host_extra = host_busy(&stormy) - host_busy(&calm) * wall / calm.wall.as_secs_f64();
        let all_ns = host_extra * 1e9 / sent.max(1.0);
        flooder_ns.push(own_ns);
        host_ns.push(all_ns);
        // With the shield on, the gate drops only the first second's datagrams: too few to divide by.
        if drops >= 10_000.0 {
            per_drop_ns.push(ns);
        }
        per_sent_ns.push(ns_sent);
        drop_rate.push(drops / wall);
        lost_share.push(100.0 * (sent - drops).max(0.0) / sent.max(1.0));
        let per_drop = if drops >= 10_000.0 {
            format!("{ns:.0} ns")
        } else {
            "— (too few gate drops to divide by)".to_string()
        };
        println!(
            "  run {run}: sent {:.0}/s, the edge's gate dropped {:.0}/s ({:.1}% dropped in the kernel: shield or full buffer); edge CPU {:.2} s without, {:.2} s with the flood → {per_drop} per datagram the gate dropped, {ns_sent:.0} ns per datagram sent{}",
            sent / wall,
            drops / wall,
            100.0 * (sent - drops).max(0.0) / sent.max(1.0),
            cpu(&calm),
            cpu(&stormy),
            if ns_sent < 0.0 {
                " (negative: the difference is below the machine's noise)"
            } else {
                ""
            },
        );
        println!(
            "    the flooder's own CPU {own_ns:.0} ns per datagram (its send, and the loopback delivery and the kernel's drop it runs inline); the whole host's extra CPU {all_ns:.0} ns per datagram sent"
        );
        println!(
            "    legitimate load: without flood p50 {:.3} ms, p99 {:.3} ms, {} ok, {} failed; with flood p50 {:.3} ms, p99 {:.3} ms, {} ok, {} failed",
            percentile(&calm.rtts, 0.5),
            percentile(&calm.rtts, 0.99),
            calm.ok,
            calm.failed,
            percentile(&stormy.rtts, 0.5),
            percentile(&stormy.rtts, 0.99),
            stormy.ok,
            stormy.failed,
        );
    }
    println!(
        "  over runs, median (min–max): {} ns per datagram the gate dropped, {} ns per datagram sent; the flooder's own CPU {} ns and the whole host's {} ns per datagram sent; {:.0} gate drops/s, {:.1}% dropped in the kernel",
        spread(&per_drop_ns),
        spread(&per_sent_ns),
        spread(&flooder_ns),
        spread(&host_ns),
        median(&drop_rate),
        median(&lost_share)
    );
}
