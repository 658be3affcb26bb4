//! Criterion benchmarks of the threat pipeline: the pre-parse gate over a ban set of 100,000
//! addresses and networks (a hit, a miss, an allowlisted source), and whole messages through
//! gate, parse, filters and proxy, and whole transactions (an OPTIONS and its 200; an INVITE call)
//! both ways through the service as the load benchmark drives them. Run with
//! `cargo bench -p sipwarden-edge`; for an instruction profile, run the bench binary under
//! `valgrind --tool=callgrind … --bench --profile-time 5 <name>`.

use criterion::{criterion_group, criterion_main, Criterion};
use sipwarden_edge::backend::Backends;
use sipwarden_edge::bans::{Ban, BanOrigin, BanStore, NEVER};
use sipwarden_edge::clock::Clock;
use sipwarden_edge::config::{self, EdgeConfig, Listener};
use sipwarden_edge::flow::FlowKeys;
use sipwarden_edge::metrics::Metrics;
use sipwarden_edge::policy::Policy;
use sipwarden_edge::proxy::{Action, Inbound, Proxy, Side};
use sipwarden_edge::service::Service;
use sipwarden_edge::sip::Transport;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

const EDGE: &str = "192.0.2.10:5060";
const PBX: &str = "198.51.100.5:5080";

/// 90,000 host bans (IPv4 and IPv6) and 10,000 networks over several prefix lengths.
fn ban_store() -> Arc<BanStore> {
    let store = Arc::new(BanStore::new(None, 200_000));
    let ban = |network: ipnet::IpNet| Ban {
        network,
        origin: BanOrigin::Auto,
        rule: "bench".into(),
        reason: "bench".into(),
        created_unix_ms: 0,
        expires_unix_ms: NEVER,
    };
    for i in 0..80_000u32 {
        let ip = Ipv4Addr::from(0x0A00_0000 + i * 3);
        store.ban(ban(ipnet::IpNet::from(IpAddr::V4(ip))));
    }
    for i in 0..10_000u128 {
        let ip = Ipv6Addr::from((0x2001_0db8u128 << 96) + i * 7);
        store.ban(ban(ipnet::IpNet::from(IpAddr::V6(ip))));
    }
    for i in 0..10_000u32 {
        let len = [20u8, 24, 28, 30][(i % 4) as usize];
        let base = Ipv4Addr::from(0x6400_0000 + (i << 12));
        store.ban(ban(ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(base, len).unwrap().trunc(),
        )));
    }
    store.apply(1);
    store
}

fn service(bans: Arc<BanStore>) -> Service {
    let mut policy = Policy::default();
    // Benchmarks send the same source many times: rate limits would turn it away.
    policy.flood.enabled = false;
    policy.rate.enabled = false;
    policy.allowlist.networks = vec!["203.0.113.0/24".parse().unwrap()];
    let cfg = EdgeConfig {
        listeners: vec![Listener {
            transport: Transport::Udp,
            address: EDGE.parse().unwrap(),
            ..Listener::default()
        }],
        backends: vec![config::Backend {
            address: PBX.parse().unwrap(),
            ..config::Backend::default()
        }],
        policy,
        ..EdgeConfig::default()
    };
    let bound: Vec<SocketAddr> = vec![EDGE.parse().unwrap()];
    let keys = FlowKeys::new(["bench-flow-key-0000001"]).unwrap();
    let proxy = Arc::new(Proxy::new(
        &cfg,
        &bound,
        keys,
        Arc::new(Backends::new(&cfg.backends)),
    ));
    Service::build(
        &cfg,
        proxy,
        bans,
        Clock::system(),
        Arc::new(Metrics::default()),
    )
    .unwrap()
    .0
}

fn gate(c: &mut Criterion) {
    let svc = service(ban_store());
    let fw = &svc.firewall;
    assert!(fw.state.bans.snapshot().len() >= 100_000);
    let mut g = c.benchmark_group("gate_100k_bans");
    let cases = [
        ("banned_host", "10.0.0.30:5060"),
        ("banned_network", "100.0.16.9:5060"),
        ("clean_v4", "198.51.100.77:5060"),
        ("clean_v6", "[2001:db9::1]:5060"),
        ("allowlisted", "203.0.113.9:5060"),
    ];
    for (name, src) in cases {
        let src: SocketAddr = src.parse().unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let meta = fw.meta(black_box(src), Transport::Udp, Side::Internet, 400);
                black_box(fw.gate(&meta))
            })
        });
    }
    g.finish();
}

fn register(n: u64) -> String {
    format!(
        "REGISTER sip:192.0.2.10 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.77:5060;branch=z9hG4bK{n};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:1001@192.0.2.10>;tag=a{n}\r\n\
To: <sip:1001@192.0.2.10>\r\n\
Call-ID: bench-{n}\r\n\
CSeq: 1 REGISTER\r\n\
Contact: <sip:1001@198.51.100.77:5060>\r\n\
User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
Expires: 3600\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn whole_message(c: &mut Criterion) {
    let svc = service(ban_store());
    let msg = register(1);
    let banned = b"OPTIONS sip:x SIP/2.0\r\n\r\n";
    let mut g = c.benchmark_group("message");
    let inbound = |bytes: &'static [u8], src: &str| Inbound {
        bytes,
        source: src.parse().unwrap(),
        transport: Transport::Udp,
        listener: 0,
    };
    let msg: &'static str = Box::leak(msg.into_boxed_str());
    g.bench_function("register_full_pipeline_and_proxy", |b| {
        let inb = inbound(msg.as_bytes(), "198.51.100.77:5060");
        b.iter(|| black_box(svc.handle(black_box(&inb))))
    });
    g.bench_function("register_proxy_only", |b| {
        let inb = inbound(msg.as_bytes(), "198.51.100.77:5060");
        b.iter(|| black_box(svc.proxy.handle(black_box(&inb))))
    });
    g.bench_function("banned_source_dropped", |b| {
        let inb = inbound(banned, "10.0.0.30:5060");
        b.iter(|| black_box(svc.handle(black_box(&inb))))
    });
    g.finish();
}

/// What the service sends for `bytes` from `src`: the forwarded or answered bytes.
fn through(svc: &Service, bytes: &[u8], src: &str) -> Vec<u8> {
    let inb = Inbound {
        bytes,
        source: src.parse().unwrap(),
        transport: Transport::Udp,
        listener: 0,
    };
    match svc.handle(&inb).decision.action {
        Action::Forward { bytes, .. } | Action::Reply(bytes) => bytes,
        Action::Drop => panic!("dropped: {}", String::from_utf8_lossy(inb.bytes)),
    }
}

/// The UAS's answer to the request `req` as it arrived: `code reason`, the Via stack, From, To
/// (with a tag), Call-ID and CSeq copied, as SIPp's `[last_*]` does.
fn answer(req: &[u8], code: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(req);
    let mut out = format!("SIP/2.0 {code}\r\n");
    for line in text.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "via" | "from" | "call-id" | "cseq" | "record-route" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            "to" if line.contains("tag=") => out.push_str(&format!("{line}\r\n")),
            "to" => out.push_str(&format!("{line};tag=uas1\r\n")),
            _ => {}
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out.into_bytes()
}

const UAC: &str = "198.51.100.77:5060";

fn options() -> &'static [u8] {
    b"OPTIONS sip:probe@192.0.2.10:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.77:5060;branch=z9hG4bK-1234-1-0;rport\r\n\
From: <sip:bench@198.51.100.77>;tag=1234b1\r\n\
To: <sip:probe@192.0.2.10:5060>\r\n\
Call-ID: 1-1234@198.51.100.77\r\n\
CSeq: 1 OPTIONS\r\n\
Max-Forwards: 70\r\n\
User-Agent: sipwarden-bench\r\n\
Content-Length: 0\r\n\r\n"
}

fn transactions(c: &mut Criterion) {
    let svc = service(ban_store());
    let mut g = c.benchmark_group("transaction");
    let req = options();
    let fwd = through(&svc, req, UAC);
    let resp = answer(&fwd, "200 OK");
    assert!(through(&svc, &resp, PBX).starts_with(b"SIP/2.0 200"));
    g.bench_function("options_request_and_200", |b| {
        b.iter(|| {
            black_box(through(&svc, black_box(req), UAC));
            black_box(through(&svc, black_box(&resp), PBX));
        })
    });
    g.finish();
}

/// The pieces every message goes through, alone: the header split and a Via read.
fn parsing(c: &mut Criterion) {
    use sipwarden_edge::proxy::via::ViaInfo;
    use sipwarden_edge::sip::Message;
    let mut g = c.benchmark_group("parse");
    g.bench_function("options_message", |b| {
        b.iter(|| black_box(Message::parse(black_box(options())).is_ok()))
    });
    let via = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKswq4h2k3l5m6n7p8r9s0t1v2w3x;rport=5060;received=198.51.100.77";
    g.bench_function("via_element", |b| {
        b.iter(|| black_box(ViaInfo::parse(black_box(via)).is_some()))
    });
    g.finish();
}

criterion_group!(benches, gate, whole_message, transactions, parsing);
criterion_main!(benches);
