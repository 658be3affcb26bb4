//! CPU per SIP transaction: the release edge (full default policy, 10,000 banned addresses) and
//! Kamailio 5.6 as an equivalent stateless proxy (`bench/kamailio-proxy.cfg`: sanity, scanner
//! User-Agent drop, a 10,000-entry htable ban lookup, pike), measured side by side in one run
//! with the same SIPp UAC in front and SIPp UAS behind, on loopback. For each offered rate: the
//! proxy's user+system CPU (all its processes, from /proc) divided by the transactions SIPp
//! completed, and the ratio edge/Kamailio. Per-source limits (the edge's flood and rate rules,
//! Kamailio's pike) are raised above the offered load, since one SIPp address sends it all.
//!
//! `cargo build --release --workspace --bins && cargo bench -p sipwarden-tests --bench sip_load`
//! Environment: `SW_BENCH_RATES` (default `2000,5000`), `SW_BENCH_SECONDS`
//! (default 10), `SW_BENCH_RUNS` (default 3).

use sipwarden_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UAS_IP: &str = "127.0.0.101";
const PROXY_IP: &str = "127.0.0.102";
const UAC_IP: &str = "127.0.0.103";

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ; 100 on Linux).
const HZ: f64 = 100.0;

/// user+system ticks of `pid` and every descendant.
fn cpu_ticks(root: u32) -> u64 {
    let mut stats: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ppid = f[1].parse().unwrap_or(0);
        let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        stats.push((pid, ppid, ticks));
    }
    let mut family = vec![root];
    let mut i = 0;
    while i < family.len() {
        let p = family[i];
        family.extend(stats.iter().filter(|s| s.1 == p).map(|s| s.0));
        i += 1;
    }
    stats
        .iter()
        .filter(|s| family.contains(&s.0))
        .map(|s| s.2)
        .sum()
}

/// 10,000 banned addresses (10.1.x.y), the same set Kamailio's htable holds.
fn banned_networks() -> String {
    let list: Vec<String> = (0..10_000)
        .map(|i| format!("\"10.1.{}.{}/32\"", i / 250, i % 250))
        .collect();
    list.join(", ")
}

fn start_edge(uas: &str) -> EdgeProc {
    EdgeProc::start(
        PROXY_IP,
        &format!(
            "[[backends]]\naddress = \"{uas}\"\n\n\
[policy.bans]\nnetworks = [{}]\n\n\
[policy.flood]\nrate_per_s = 1000000\nburst = 1000000\n\n\
[policy.rate.options]\nper_source_per_min = 100000000\nper_aor_per_min = 0\n\n\
[log]\nformat = \"text\"\n",
            banned_networks()
        ),
    )
}

fn start_kamailio(dir: &Path, port: u16, uas: &str) -> Proc {
    let kamailio = require_tool("kamailio", "kamailio");
    let cfg = std::fs::read_to_string(workspace_root().join("bench/kamailio-proxy.cfg"))
        .expect("bench/kamailio-proxy.cfg")
        .replace("@IP@", PROXY_IP)
        .replace("@PORT@", &port.to_string())
        .replace("@UAS_HOST@", uas.split(':').next().unwrap_or(uas))
        .replace("@UAS_PORT@", uas.rsplit(':').next().unwrap_or("5060"))
        .replace("@PIKE@", "100000000");
    let path = dir.join("kamailio-proxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(dir.join("kamailio.log")).unwrap();
    let p = Proc::spawn(
        "kamailio",
        Command::new(kamailio)
            .args(["-DD", "-E", "-x", "tlsf", "-m", "256", "-M", "16", "-f"])
            .arg(&path)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log)),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_bound("udp", port)),
        "kamailio did not start"
    );
    p
}

/// Offers `rate` OPTIONS/s for `seconds` through `target`; returns (completed, failed, wall).
fn load(dir: &Path, target: &str, rate: u32, seconds: u32) -> (u64, u64, Duration) {
    let sipp = require_tool("sipp", "sip-tester");
    let calls = rate * seconds;
    let stats = dir.join(format!("uac-{rate}-{}.csv", std::process::id()));
    let started = Instant::now();
    let out = Command::new(sipp)
        .current_dir(dir)
        .arg(target)
        .arg("-sf")
        .arg(scenario("bench_options.xml"))
        .args([
            "-i",
            UAC_IP,
            "-p",
            &free_port(UAC_IP).to_string(),
            "-t",
            "u1",
        ])
        .args([
            "-s",
            "probe",
            "-r",
            &rate.to_string(),
            "-m",
            &calls.to_string(),
        ])
        .args([
            "-l",
            "20000",
            "-recv_timeout",
            "5000",
            "-deadcall_wait",
            "0",
        ])
        .args(["-timeout", &format!("{}s", seconds * 3 + 10), "-nostdin"])
        .args(["-trace_screen", "-screen_file"])
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("sipp");
    let wall = started.elapsed();
    let screen = std::fs::read_to_string(&stats).unwrap_or_default();
    let count = |label: &str| -> u64 {
        screen
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split('|').nth(2))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let ok = count("Successful call");
    let failed = count("Failed call");
    let _ = out;
    (ok, failed, wall)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rates: Vec<u32> = std::env::var("SW_BENCH_RATES")
        .unwrap_or_else(|_| "2000,5000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let seconds: u32 = std::env::var("SW_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runs: usize = std::env::var("SW_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let root = tempfile::tempdir().unwrap();
    let uas_port = free_port(UAS_IP);
    let _uas = SippServer::start_with(
        root.path(),
        "pbx.xml",
        UAS_IP,
        uas_port,
        "udp",
        &["-deadcall_wait", "0"],
    );
    let uas = format!("{UAS_IP}:{uas_port}");
    let edge = start_edge(&uas);
    let kam_port = free_port(PROXY_IP);
    let kamailio = start_kamailio(root.path(), kam_port, &uas);
    let targets: [(&str, u32, String); 2] = [
        ("edge", edge.proc.pid(), edge.addr()),
        ("kamailio", kamailio.pid(), format!("{PROXY_IP}:{kam_port}")),
    ];
    println!("OPTIONS over UDP, {seconds} s per run, {runs} runs per rate, µs of proxy CPU per transaction (median, min–max):");
    for rate in rates {
        let mut per_tx: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut failures = [0u64; 2];
        for _ in 0..runs {
            // Interleaved, so both see the same machine.
            for (k, (_, pid, addr)) in targets.iter().enumerate() {
                let before = cpu_ticks(*pid);
                let (ok, failed, _wall) = load(root.path(), addr, rate, seconds);
                let cpu = (cpu_ticks(*pid) - before) as f64 / HZ;
                failures[k] += failed;
                if ok > 0 {
                    per_tx[k].push(cpu * 1e6 / ok as f64);
                }
            }
        }
        let mut line = |k: usize| {
            let v = &mut per_tx[k];
            if v.is_empty() {
                return ("no completed transactions".to_string(), f64::NAN);
            }
            let (min, max) = (
                v.iter().cloned().fold(f64::MAX, f64::min),
                v.iter().cloned().fold(0.0, f64::max),
            );
            let m = median(v);
            (
                format!("{m:.1} µs ({min:.1}–{max:.1}), {} failed", failures[k]),
                m,
            )
        };
        let (e, em) = line(0);
        let (k, km) = line(1);
        println!(
            "  {rate}/s: edge {e}; kamailio {k}; edge/kamailio {:.2}",
            em / km
        );
    }
}
