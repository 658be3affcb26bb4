//! The load benchmark: the release edge (full default policy, 10,000 banned addresses) and
//! Kamailio 5.6 as an equivalent stateless proxy (`bench/kamailio-proxy.cfg`: sanity, scanner
//! User-Agent drop, a 10,000-entry htable ban lookup, pike) side by side in one run, each between
//! the same SIPp UAC in front and SIPp UAS (`bench_uas.xml`) behind, on loopback.
//!
//! For each workload (`options`: OPTIONS–200; `register`: REGISTER–200 over 1,000 users; `call`:
//! INVITE–200–ACK–BYE–200), transport (UDP, TCP) and offered rate, runs are interleaved (edge,
//! Kamailio, edge, …) so both see the same machine. A third relay runs beside them: the bare
//! `floor_relay` (no parsing, no filter; over UDP one `recv` and one `send` per datagram, over TCP
//! one `read` and one `write` per chunk, each way), the floor that any relay costs and adds on
//! this host. Each reports:
//! - the proxy's CPU (user+system of all its threads and processes, from /proc) per completed
//!   transaction or call, with the user/system split, and the ratio edge/Kamailio;
//! - round-trip percentiles of an OPTIONS probe (200/s, from its own address, µs clock) sent
//!   through the proxy during the load, next to the same load and probe sent to the UAS directly,
//!   so the latency a proxy adds is p(proxy) − p(direct);
//! - over UDP, the edge's own delay per datagram (its `udp_delay_seconds` histogram over the run:
//!   every datagram, from the kernel's receive timestamp to the send of what the edge made of it,
//!   p99 interpolated within a bucket): what the edge adds to every message between its arrival
//!   in the kernel and its leaving, where the probe samples 200 a second. On a host shared with
//!   SIPp most of it is the wait for a core.
//! - with a loopback capture (at half the maximum, or in every run with `SW_BENCH_CAPTURE=1`;
//!   over TCP the messages are framed from the reassembled streams): each message's transit
//!   through the proxy, and the response time of every transaction at the UAC through the proxy
//!   and straight to the UAS, so that the p99 a proxy adds end to end is p99(proxy) − p99(direct)
//!   over all the load's transactions, not the probe's few; and how long the UAS took to answer
//!   (its request in to its response out), the rest of each response time: on this host the
//!   slowest transactions at the UAC spent nearly all of it there (SIPp's own scheduling), not in
//!   the proxy, which is why the proxy's transit is the figure for what it adds;
//! - for the edge, how many of its UDP receive threads did a tenth or more of their CPU in each run
//!   (the kernel's flow hash, or the edge's steering, decides which sockets the two flows reach);
//! - the load generator's own state: the SIPp UAC's and UAS's time on a CPU and runnable but
//!   waiting for one, per transaction (scheduler statistics), and each CPU's idle share and the
//!   share the hypervisor took (steal). When the load's CPU has no idle left, its processes queue
//!   for it and every latency figure measures that queue, whichever relay is in front;
//! - failed transactions.
//!
//! With `SW_BENCH_MAX=1` it then looks for each proxy's maximum rate with under 0.1% failures:
//! rates rise in steps of `SW_BENCH_MAX_STEP` (default 2,500/s) until a run fails more than 0.1% or
//! cannot keep up (its wall time exceeds the offered duration by 20%), and reports the last rate
//! that passed; then, at half of it, `SW_BENCH_RUNS` rounds of the proxy, the floor relay and the
//! straight line, interleaved, with every figure above as a median (min–max) over the rounds.
//!
//! `cargo build --release --workspace --bins && cargo bench -p sipwarden-tests --bench sip_load`
//! Environment: `SW_BENCH_WORKLOADS` (default `options,register,call`), `SW_BENCH_TRANSPORTS`
//! (default `udp,tcp`), `SW_BENCH_RATES` (default `2000,5000`), `SW_BENCH_SECONDS` (default 10),
//! `SW_BENCH_RUNS` (default 3), `SW_BENCH_MAX`, `SW_BENCH_MAX_STEP`, `SW_BENCH_CAPTURE`, and
//! `SW_BENCH_PIN=LOAD:PROXY` (taskset CPU lists such as `0:1`) to run SIPp, tcpdump and the probe
//! on LOAD and each proxy on PROXY, as where a proxy does not share its cores with its load, and
//! with it `SW_BENCH_SHIELD=1` to keep the rest of the machine (other processes, unbound kernel
//! threads) off PROXY for the run, as `isolcpus` or tuned's cpu-partitioning profile would
//! (needs root; every task moved is put back at the end); `SW_BENCH_UAS=floor` puts the light
//! `floor_uas` (`tests/src/bin`) behind the proxies instead of SIPp's UAS: the same answers at a
//! quarter of the CPU, so that on two vCPUs the load keeps headroom at half the maximum;
//! `SW_BENCH_CC=cubic` (as root) sets the kernel's TCP congestion control for the run and puts it
//! back at the end (this host's BBR paces every TCP sender, which lengthens each burst's tail).

use sipwarden_tests::bench::*;
use sipwarden_tests::*;
use std::path::Path;

/// Figures of one target at one rate over several runs.
#[derive(Default)]
struct Figures {
    per_unit_us: Vec<f64>,
    user_share: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    /// The edge's own p99 delay per UDP datagram (kernel receipt to send), ms, per run.
    own_p99_ms: Vec<f64>,
    /// From loopback captures: p99 transit per message and per transaction, ms, per run.
    transit_msg_p99_ms: Vec<f64>,
    transit_txn_p99_ms: Vec<f64>,
    /// From the same captures: p99 response time at the UAC, ms, per run.
    response_p99_ms: Vec<f64>,
    /// And p99 of the UAS's own time to answer, ms, per run.
    answer_p99_ms: Vec<f64>,
    /// And p99 of the probe's response times on the wire, ms, per run.
    probe_wire_p99_ms: Vec<f64>,
    /// p99 transit per transaction while the UAS kept up, ms, and the percentage of the capture
    /// it was behind, per run.
    kept_up_txn_p99_ms: Vec<f64>,
    uas_behind_pct: Vec<f64>,
    /// The edge's UDP receive threads that did a tenth or more of their CPU, per run.
    receive_threads: Vec<usize>,
    /// The SIPp UAS per transaction or call, per run: µs on its CPU, µs runnable but waiting for
    /// it, and times it was put on it.
    uas_run_us: Vec<f64>,
    uas_wait_us: Vec<f64>,
    uas_slices: Vec<f64>,
    /// The same of the SIPp UAC.
    uac_run_us: Vec<f64>,
    uac_wait_us: Vec<f64>,
    /// Each CPU's idle and stolen shares, %, per run.
    cpus: Vec<Vec<(f64, f64)>>,
    ok: u64,
    failed: u64,
}

fn record(f: &mut Figures, run: Run) {
    f.ok += run.ok;
    f.failed += run.failed;
    f.receive_threads.extend(run.receive_threads);
    if let Some((user, sys)) = run.cpu.filter(|_| run.ok > 0) {
        f.per_unit_us.push((user + sys) * 1e6 / run.ok as f64);
        f.user_share.push(100.0 * user / (user + sys).max(1e-9));
    }
    f.cpus.push(run.cpus);
    let per = |v: u64| v as f64 / run.ok.max(1) as f64;
    if let Some(s) = run.uas.filter(|_| run.ok > 0) {
        f.uas_run_us.push(per(s.run_ns) / 1e3);
        f.uas_wait_us.push(per(s.wait_ns) / 1e3);
        f.uas_slices.push(per(s.slices));
    }
    if let Some(s) = run.uac_sched.filter(|_| run.ok > 0) {
        f.uac_run_us.push(per(s.run_ns) / 1e3);
        f.uac_wait_us.push(per(s.wait_ns) / 1e3);
    }
    if let Some(p99) = bucket_quantile(&run.edge_delay, 0.99) {
        f.own_p99_ms.push(p99 * 1e3);
    }
    if let Some(t) = run.transit.as_ref().filter(|t| !t.transactions.is_empty()) {
        f.transit_msg_p99_ms.push(percentile(&t.messages, 0.99));
        f.transit_txn_p99_ms.push(percentile(&t.transactions, 0.99));
        if !t.kept_up_transactions.is_empty() {
            f.kept_up_txn_p99_ms
                .push(percentile(&t.kept_up_transactions, 0.99));
        }
    }
    if let Some(share) = run.uas_behind {
        f.uas_behind_pct.push(100.0 * share);
    }
    if !run.response.is_empty() {
        f.response_p99_ms.push(percentile(&run.response, 0.99));
    }
    if !run.probe_response.is_empty() {
        f.probe_wire_p99_ms
            .push(percentile(&run.probe_response, 0.99));
    }
    if !run.answer.is_empty() {
        f.answer_p99_ms.push(percentile(&run.answer, 0.99));
    }
    if !run.rtts.is_empty() {
        f.p50_ms.push(percentile(&run.rtts, 0.50));
        f.p99_ms.push(percentile(&run.rtts, 0.99));
    }
}

/// Whether a run at `rate` for `secs` kept up with under 0.1% failures.
fn passed(run: &Run, rate: u32, secs: u32) -> bool {
    let total = run.ok + run.failed;
    total > 0
        && (run.failed as f64) < 0.001 * total as f64
        && run.ok as f64 >= 0.999 * (rate * secs) as f64
        && run.wall.as_secs_f64() <= secs as f64 * 1.2 + 1.0
}

fn main() {
    let workloads: Vec<Workload> = env_list("SW_BENCH_WORKLOADS", "options,register,call")
        .iter()
        .filter_map(|w| Workload::parse(w))
        .collect();
    let transports = env_list("SW_BENCH_TRANSPORTS", "udp,tcp");
    let rates: Vec<u32> = env_list("SW_BENCH_RATES", "2000,5000")
        .iter()
        .filter_map(|r| r.parse().ok())
        .collect();
    let seconds = env_num("SW_BENCH_SECONDS", 10);
    let runs = env_num("SW_BENCH_RUNS", 3) as usize;
    let find_max = std::env::var("SW_BENCH_MAX").is_ok_and(|v| v == "1");
    let step = env_num("SW_BENCH_MAX_STEP", 2500);
    // Captures cost the shared cores something, so the fixed-rate runs (whose CPU figures are the
    // point) take them only when asked; the runs at half the maximum (latency) unless told not to.
    let capture_env = std::env::var("SW_BENCH_CAPTURE").ok();
    let capture_fixed = capture_env.as_deref() == Some("1");
    let capture_half = capture_env.as_deref() != Some("0");
    // `SW_BENCH_PIN=LOAD:PROXY` (taskset CPU lists, e.g. `0:1`): SIPp, tcpdump and this process on
    // LOAD, each proxy on PROXY, as where a proxy has cores of its own rather than sharing them
    // with the load it carries.
    let pinning = std::env::var("SW_BENCH_PIN").ok().map(|v| {
        let (load, proxy) = v
            .split_once(':')
            .expect("SW_BENCH_PIN is LOAD:PROXY, two taskset CPU lists such as 0:1");
        (load.to_string(), proxy.to_string())
    });
    if let Some((load, _)) = &pinning {
        // Before any thread or child exists, so that all of them inherit it.
        pin_self(load);
    }
    // `SW_BENCH_SHIELD=1` (with SW_BENCH_PIN): the rest of the machine kept off the proxy's CPUs
    // until the end (see `Shield`).
    let shield = match (&pinning, std::env::var("SW_BENCH_SHIELD").as_deref()) {
        (Some((_, proxy)), Ok("1")) => Some(Shield::raise(proxy)),
        (None, Ok("1")) => {
            panic!("SW_BENCH_SHIELD=1 keeps the proxy's CPUs: it needs SW_BENCH_PIN")
        }
        _ => None,
    };
    // `SW_BENCH_CC=cubic` (as root): the kernel's TCP congestion control for every TCP socket the
    // run opens (SIPp's, the proxies', the UAS's), put back at the end (see `Setting`).
    let _cc = std::env::var("SW_BENCH_CC").ok().map(|cc| {
        let set = Setting::set("/proc/sys/net/ipv4/tcp_congestion_control", &cc)
            .unwrap_or_else(|e| panic!("SW_BENCH_CC={cc}: {e}"));
        println!("TCP congestion control for the run: {cc}");
        set
    });
    let root = tempfile::tempdir().unwrap();
    // `SW_BENCH_UAS=floor`: the light UAS behind the proxies instead of SIPp's (see `floor_uas`).
    let floor_uas = std::env::var("SW_BENCH_UAS").is_ok_and(|v| v == "floor");
    // SIPp's UAS is one thread for the whole benchmark; the light UAS's connection threads end
    // with their connections, and their scheduling with them.
    let uas_sched = !floor_uas;
    let start_uas = |dir: &Path, port: u16, transport: &str| {
        if floor_uas {
            start_floor_uas(Path::new(env!("CARGO_BIN_EXE_floor_uas")), port, transport)
        } else {
            start_uas(dir, port, transport)
        }
    };

    if let Some((load, proxy)) = &pinning {
        println!("load generators on CPUs {load}, each proxy on CPUs {proxy}");
    }
    if floor_uas {
        println!("UAS: the light floor_uas, not SIPp");
    }
    if let Some(s) = &shield {
        println!(
            "shield: {} other tasks moved off the proxy's CPUs for the run ({} kernel threads the kernel would not move stay)",
            s.moved(),
            s.stayed
        );
    }
    println!(
        "{seconds} s per run, {runs} runs per rate; CPU in µs per transaction or call, median (min–max) over runs (the user share is the kernel's tick-sampled split, indicative only; the total is exact); latency in ms at the UAC"
    );
    for transport in &transports {
        let transport = transport.as_str();
        let uas_port = free_port(UAS_IP);
        let mut uas_proc = start_uas(root.path(), uas_port, transport);
        let uas = format!("{UAS_IP}:{uas_port}");
        // The proxies start on their own CPUs, so that each sizes itself (the edge's UDP sockets,
        // its runtime's workers) by what it will have; the rest goes back to the load's.
        if let Some((_, proxy)) = &pinning {
            pin_self(proxy);
        }
        let edge = start_edge(&uas, transport);
        let kam_port = free_port(PROXY_IP);
        let mut kamailio = start_kamailio(root.path(), kam_port, &uas, transport);
        // The bare relay: what any relay costs and adds on this host.
        let relay_port = free_port(PROXY_IP);
        let relay = start_relay(
            Path::new(env!("CARGO_BIN_EXE_floor_relay")),
            relay_port,
            &uas,
            transport,
        );
        if let Some((load, _)) = &pinning {
            pin_self(load);
        }
        // The two proxies first, the straight line to the UAS last.
        let mut targets = vec![
            Target {
                name: "edge",
                pid: Some(edge.proc.pid()),
                addr: edge.addr(),
                metrics: Some(edge.http),
                forwards_to: uas.parse().ok(),
            },
            Target {
                name: "kamailio",
                pid: Some(kamailio.pid()),
                addr: format!("{PROXY_IP}:{kam_port}"),
                metrics: None,
                forwards_to: uas.parse().ok(),
            },
        ];
        targets.push(Target {
            name: "relay",
            pid: Some(relay.pid()),
            addr: format!("{PROXY_IP}:{relay_port}"),
            metrics: None,
            forwards_to: uas.parse().ok(),
        });
        targets.push(Target {
            name: "direct",
            pid: None,
            addr: uas.clone(),
            metrics: None,
            forwards_to: None,
        });
        // The registered-source rule lets only registered sources call: register the UAC's
        // address once (the call workload's INVITEs then come from a registered source).
        let _ = load(
            root.path(),
            &targets[0].addr,
            Workload::Register,
            transport,
            10,
            1,
        );
        for &w in &workloads {
            println!("\n{} over {}:", w.name(), transport.to_uppercase());
            for &rate in &rates {
                let mut figs: Vec<Figures> = targets.iter().map(|_| Figures::default()).collect();
                for _ in 0..runs {
                    for (k, t) in targets.iter().enumerate() {
                        let run = measure(
                            root.path(),
                            t,
                            w,
                            transport,
                            rate,
                            seconds,
                            Watch {
                                capture: capture_fixed,
                                uas: uas_sched.then(|| uas_proc.pid()),
                            },
                        );
                        record(&mut figs[k], run);
                    }
                }
                report(w, rate, &targets, &figs);
            }
            if find_max {
                for k in 0..2 {
                    let t = &targets[k];
                    let mut best = 0;
                    let mut rate = step;
                    let mut retried = false;
                    loop {
                        let run = load(root.path(), &t.addr, w, transport, rate, seconds);
                        if run.ok == 0 && run.failed == 0 && !retried {
                            // SIPp produced no result at all (it did not start, or its UAS peer
                            // had died): not a verdict on the proxy. Once more with a fresh UAS.
                            println!("  {}: {rate}/s gave no result; again", t.name);
                            retried = true;
                            drop(uas_proc);
                            uas_proc = start_uas(root.path(), uas_port, transport);
                            continue;
                        }
                        retried = false;
                        if !passed(&run, rate, seconds) {
                            println!(
                                "  {}: {rate}/s failed ({} ok, {} failed, {:.1} s)",
                                t.name,
                                run.ok,
                                run.failed,
                                run.wall.as_secs_f64()
                            );
                            break;
                        }
                        best = rate;
                        rate += step;
                    }
                    println!("  {}: maximum {best}/s with under 0.1% failures", t.name);
                    // The overload that ended the search may have killed the SIPp UAS (it did at
                    // 65,000 OPTIONS/s over TCP): what follows gets a fresh one on the same address.
                    drop(uas_proc);
                    uas_proc = start_uas(root.path(), uas_port, transport);
                    if targets[k].name == "kamailio" {
                        // Kamailio may not recover from it either (after 57,500 OPTIONS/s over
                        // TCP it failed every transaction that followed): a fresh one on the same
                        // address, on the proxy's CPUs. The edge recovers (0 failures after).
                        drop(kamailio);
                        if let Some((_, proxy)) = &pinning {
                            pin_self(proxy);
                        }
                        kamailio = start_kamailio(root.path(), kam_port, &uas, transport);
                        if let Some((load, _)) = &pinning {
                            pin_self(load);
                        }
                        targets[k].pid = Some(kamailio.pid());
                    }
                    let t = &targets[k];
                    let relay = targets.iter().find(|t| t.name == "relay").expect("relay");
                    let direct = targets.last().expect("direct");
                    if best >= 2 {
                        // At half the maximum, `runs` rounds interleaved as at the fixed rates:
                        // the proxy, the floor relay and the straight line to the UAS.
                        let half = best / 2;
                        let at_half: Vec<&Target> = vec![t, relay, direct];
                        let mut figs: Vec<Figures> =
                            at_half.iter().map(|_| Figures::default()).collect();
                        for _ in 0..runs {
                            for (k, t) in at_half.iter().enumerate() {
                                let run = measure(
                                    root.path(),
                                    t,
                                    w,
                                    transport,
                                    half,
                                    seconds,
                                    Watch {
                                        capture: capture_half,
                                        uas: uas_sched.then(|| uas_proc.pid()),
                                    },
                                );
                                record(&mut figs[k], run);
                            }
                        }
                        println!("  {} at {half}/s, half its maximum:", t.name);
                        for (t, f) in at_half.iter().zip(&figs) {
                            println!("    {}", target_line(t, f, w));
                        }
                        println!("    {}", added_line(&at_half, &figs));
                    }
                }
            }
        }
    }
}

/// `, {label} {median (min–max)} ms` of per-run figures, or "" when there are none.
fn ms_figure(label: &str, runs: &[f64]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    format!(", {label} {} ms", spread_with(runs, 3))
}

/// The figures of each target at one rate (the last target is the straight line to the UAS),
/// then the ratio edge/Kamailio and what each relay added to the direct p99.
fn report(w: Workload, rate: u32, targets: &[Target], figs: &[Figures]) {
    println!("  {rate}/s offered:");
    for (t, f) in targets.iter().zip(figs) {
        println!("    {}", target_line(t, f, w));
    }
    let ratio = median(&figs[0].per_unit_us) / median(&figs[1].per_unit_us);
    let targets: Vec<&Target> = targets.iter().collect();
    println!(
        "    edge/kamailio CPU {ratio:.2}; {}",
        added_line(&targets, figs)
    );
}

/// One target's figures over its runs: CPU (for a process), the probe's round trips, the edge's own
/// hold, transit and response times from captures, the edge's busy receive threads, the outcome.
fn target_line(t: &Target, f: &Figures, w: Workload) -> String {
    let cpu = if t.pid.is_some() {
        format!(
            "{} µs/{} ({:.0}% user), ",
            spread(&f.per_unit_us),
            w.unit(),
            median(&f.user_share)
        )
    } else {
        String::new()
    };
    let own = ms_figure("own delay per datagram p99", &f.own_p99_ms);
    let transit = ms_figure("transit p99 per message", &f.transit_msg_p99_ms)
        + &ms_figure("per transaction", &f.transit_txn_p99_ms)
        + &ms_figure("while the UAS kept up", &f.kept_up_txn_p99_ms);
    let behind = if f.uas_behind_pct.is_empty() {
        String::new()
    } else {
        format!(
            ", the UAS behind (answers over {UAS_LATE_MS} ms) {}% of the capture",
            spread_with(&f.uas_behind_pct, 0)
        )
    };
    let response = ms_figure("response p99 at the UAC (capture)", &f.response_p99_ms)
        + &ms_figure("the UAS's own answer p99", &f.answer_p99_ms)
        + &ms_figure("the probe's p99 on the wire", &f.probe_wire_p99_ms)
        + &behind;
    let mut load = String::new();
    if !f.uas_run_us.is_empty() {
        load += &format!(
            ", the UAS per {}: {} µs on its CPU, {} µs waiting for it, put on it {} times",
            w.unit(),
            spread(&f.uas_run_us),
            spread(&f.uas_wait_us),
            spread_with(&f.uas_slices, 2)
        );
    }
    if !f.uac_run_us.is_empty() {
        load += &format!(
            ", the UAC {} µs on its CPU, {} µs waiting",
            spread(&f.uac_run_us),
            spread(&f.uac_wait_us),
        );
    }
    let cpus = f.cpus.iter().map(Vec::len).min().unwrap_or(0);
    if cpus > 0 {
        let shares: Vec<String> = (0..cpus)
            .map(|c| {
                let idle: Vec<f64> = f.cpus.iter().map(|r| r[c].0).collect();
                let stolen: Vec<f64> = f.cpus.iter().map(|r| r[c].1).collect();
                format!(
                    "CPU {c} idle {}% stolen {}%",
                    spread_with(&idle, 0),
                    spread_with(&stolen, 1)
                )
            })
            .collect();
        load += &format!(", {}", shares.join(", "));
    }
    let receivers = if f.receive_threads.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = f.receive_threads.iter().map(|n| n.to_string()).collect();
        format!(", receive threads carrying the load {}", list.join("/"))
    };
    format!(
        "{:<8} {cpu}p50 {} ms, p99 {} ms{own}{transit}{response}{load}{receivers}, {} ok, {} failed",
        t.name,
        spread_with(&f.p50_ms, 3),
        spread_with(&f.p99_ms, 3),
        f.ok,
        f.failed
    )
}

/// What each relay (proxy or floor) added to the straight line's p99 (the last of `targets`),
/// median against median: by the probe, and by the capture where every run had one.
fn added_line(targets: &[&Target], figs: &[Figures]) -> String {
    let Some((direct, relays)) = figs.split_last() else {
        return String::new();
    };
    let added = |of: fn(&Figures) -> &Vec<f64>| -> String {
        let named: Vec<String> = targets
            .iter()
            .zip(relays)
            .map(|(t, f)| format!("{} {:.3} ms", t.name, median(of(f)) - median(of(direct))))
            .collect();
        named.join(", ")
    };
    let captured = if figs.iter().all(|f| !f.response_p99_ms.is_empty()) {
        format!(
            "; p99 added at the UAC (capture): {}",
            added(|f| &f.response_p99_ms)
        )
    } else {
        String::new()
    };
    format!("p99 added (probe): {}{captured}", added(|f| &f.p99_ms))
}
