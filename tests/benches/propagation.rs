//! Ban propagation, measured on real processes: three controllers and two edges (two sites) on
//! loopback. 1,000 bans are added one at a time through the REST API; for each, the time from the
//! API's acknowledgement until each edge drops a datagram from that address at its gate. Then
//! 100,000 bans are imported in bulk and the CPU time each edge spends applying them is read from
//! /proc. Prints medians, p99 and maxima.
//!
//! Build the binaries in the same profile, then run:
//! `cargo build --release --workspace --bins && cargo bench -p sipwarden-tests --bench propagation`

use sipwarden_tests::controller::*;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const PBX_IP: &str = "127.0.0.81";
const BANS: usize = 1_000;
const BULK: usize = 100_000;

fn ban_ip(i: usize) -> String {
    format!("127.1.{}.{}", i / 250, i % 250 + 1)
}

fn drops(e: &EdgeProc) -> f64 {
    e.events("ban", "drop")
}

/// user + system CPU of `pid`, from /proc (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let root = tempfile::tempdir().unwrap();
    let (seats, ctls) = cluster(root.path(), 3, "");
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let extra = format!(
        "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}",
        edge_link(&seats)
    );
    let edges: Vec<EdgeProc> = [("127.0.0.2", "a"), ("127.0.0.3", "b")]
        .iter()
        .map(|(ip, id)| {
            EdgeProc::start_with_env(
                ip,
                &extra,
                &[("SIPWARDEN_EDGE__ID", id), ("SIPWARDEN_EDGE__SITE", id)],
            )
        })
        .collect();
    for e in &edges {
        assert!(wait_until(Duration::from_secs(10), || e.connected()));
    }
    let api = &ctls[0];

    // 1. One ban at a time: acknowledgement → first gate drop at each edge.
    let mut lat: Vec<Vec<Duration>> = (0..2).map(|_| Vec::with_capacity(BANS)).collect();
    let mut n = 0u32;
    let started = Instant::now();
    for i in 0..BANS {
        let ip = ban_ip(i);
        let sock = UdpSocket::bind(format!("{ip}:0")).unwrap();
        let before: Vec<f64> = edges.iter().map(drops).collect();
        let body = format!(r#"{{"target":{{"type":"ip","value":"{ip}"}},"reason":"bench"}}"#);
        let (status, _) = api
            .request("POST", "/api/v1/bans", Some(OPERATOR), Some(&body))
            .expect("API answers");
        assert_eq!(status, 201);
        let acked = Instant::now();
        let mut done = [false; 2];
        while !done.iter().all(|d| *d) {
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "ban {i} not enforced"
            );
            for (k, e) in edges.iter().enumerate() {
                if done[k] {
                    continue;
                }
                n += 1;
                let msg = format!(
                    "OPTIONS sip:x@{a} SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKpb{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:x@{a}>;tag={n}\r\nTo: <sip:x@{a}>\r\nCall-ID: pb{n}\r\n\
CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
                    a = e.addr(),
                    l = sock.local_addr().unwrap()
                );
                sock.send_to(msg.as_bytes(), e.addr()).unwrap();
                if drops(e) > before[k] {
                    done[k] = true;
                    lat[k].push(acked.elapsed());
                }
            }
        }
    }
    let elapsed = started.elapsed();
    println!("ban propagation, {BANS} bans added one at a time (API acknowledgement → first gate drop; includes the ~1 ms probe and metrics scrape):");
    let mut all: Vec<Duration> = Vec::new();
    for (k, l) in lat.iter_mut().enumerate() {
        l.sort();
        all.extend(l.iter().copied());
        println!(
            "  edge {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            edges[k].ip,
            percentile(l, 0.5).as_secs_f64() * 1e3,
            percentile(l, 0.99).as_secs_f64() * 1e3,
            l.last().unwrap().as_secs_f64() * 1e3
        );
    }
    all.sort();
    println!(
        "  both: p50 {:.1} ms, p99 {:.1} ms ({} samples, {:.1} s)",
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.len(),
        elapsed.as_secs_f64()
    );

    // 2. 100,000 bans in bulk: the CPU each edge spends applying the deltas.
    let cpu0: Vec<Duration> = edges.iter().map(|e| cpu_time(e.proc.pid())).collect();
    let t0 = Instant::now();
    for chunk in 0..BULK / 10_000 {
        let bans: Vec<String> = (0..10_000)
            .map(|j| {
                let k = chunk * 10_000 + j;
                format!(
                    r#"{{"target":{{"type":"ip","value":"10.{}.{}.{}"}},"reason":"bulk"}}"#,
                    k / 65_536,
                    (k / 256) % 256,
                    k % 256
                )
            })
            .collect();
        let body = format!(r#"{{"bans":[{}]}}"#, bans.join(","));
        let (status, b) = api
            .request("POST", "/api/v1/bans:bulk", Some(OPERATOR), Some(&body))
            .expect("API answers");
        assert_eq!(status, 201, "{b}");
    }
    let acked = t0.elapsed();
    for e in &edges {
        assert!(
            wait_until(Duration::from_secs(120), || e.bans_active("cluster")
                >= (BANS + BULK) as f64),
            "edge {} applied the bulk bans",
            e.ip
        );
    }
    let applied = t0.elapsed();
    println!(
        "{BULK} bans in 10 bulk requests: acknowledged in {:.2} s, at both edges after {:.2} s",
        acked.as_secs_f64(),
        applied.as_secs_f64()
    );
    for (k, e) in edges.iter().enumerate() {
        let cpu = cpu_time(e.proc.pid()) - cpu0[k];
        println!(
            "  edge {}: {:.0} ms CPU for {BULK} deltas = {:.2} µs per delta (user+sys from /proc, 10 ms ticks)",
            e.ip,
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / BULK as f64
        );
    }
}
