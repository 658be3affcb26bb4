//! The load benchmarks' rig (`benches/sip_load.rs`, `benches/flood.rs`): the proxies under test
//! (the release edge with the default policy and 10,000 bans; Kamailio with
//! `bench/kamailio-proxy.cfg`), SIPp as UAC and UAS, CPU from /proc, a latency probe with a
//! microsecond clock, and a loopback capture for each message's transit ([`crate::capture`]).

use crate::capture::{
    answer_timeline, messages, response_times, sorted_ms, transit, transit_timeline, Behind,
    Capture, Packets, Timed, Transit,
};
use crate::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const UAS_IP: &str = "127.0.0.101";
pub const PROXY_IP: &str = "127.0.0.102";
pub const UAC_IP: &str = "127.0.0.103";
/// The latency probe's address (over UDP), apart from the UAC's so that a capture tells them apart.
pub const PROBE_IP: &str = "127.0.0.104";

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ; 100 on Linux).
pub const HZ: f64 = 100.0;

/// A `/proc/…/stat` line's command name and the fields after it (`fields[1]` is the parent pid,
/// `fields[11]` and `fields[12]` the user and system ticks).
fn stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    Some((
        &stat[open + 1..close],
        stat.get(close + 2..)?.split_whitespace().collect(),
    ))
}

/// A field of [`stat_fields`] as a number (0 when missing or malformed).
fn stat_num<T: std::str::FromStr + Default>(fields: &[&str], i: usize) -> T {
    fields
        .get(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

/// (user, system) ticks of `pid` and every descendant.
pub fn cpu_ticks(root: u32) -> (u64, u64) {
    let mut stats: Vec<(u32, u32, u64, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, f)) = stat_fields(&stat) else {
            continue;
        };
        stats.push((pid, stat_num(&f, 1), stat_num(&f, 11), stat_num(&f, 12)));
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
        .fold((0, 0), |(u, s), x| (u + x.2, s + x.3))
}

/// Restricts every thread of this process to the CPUs in `cpus` (a `taskset` list such as `1` or
/// `0,2-3`); the threads and processes it starts from then on inherit it. Panics when `taskset`
/// refuses (an unknown CPU): a benchmark asked to pin must not run unpinned.
pub fn pin_self(cpus: &str) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux)");
    assert!(status.success(), "taskset -c {cpus} refused");
}

/// The CPUs of a `taskset` list such as `1` or `0,2-3`.
pub fn cpu_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) else {
            panic!("{list:?} is not a CPU list (such as 1 or 0,2-3)");
        };
        out.extend(a..=b);
    }
    out
}

/// The proxy's CPUs kept for the proxy while it is alive (`SW_BENCH_SHIELD=1`): every other task
/// on the machine whose affinity allows a proxy CPU and some other CPU — other processes and their
/// threads, unbound kernel threads such as `kdamond` — is confined to the others, and put back when
/// the shield drops (at the end of the run or on a panic; a killed benchmark leaves them confined).
/// Tasks confined to the proxy CPUs (the proxies) or off them (the load, this process) are left as
/// they are, and so are kernel threads the kernel will not move (unbound workqueue workers; they
/// are counted). This is what a latency-sensitive deployment does with `isolcpus`
/// or tuned's cpu-partitioning profile; on this host, without it, the machine's own agent (pid 1's
/// threads, nice −10) and DAMON's `kdamond` took the proxy's vCPU for 1–4 ms several times a
/// second, whichever proxy ran there.
pub struct Shield {
    moved: Vec<(nix::unistd::Pid, nix::sched::CpuSet)>,
    pub stayed: usize,
}

impl Shield {
    pub fn raise(proxy: &str) -> Shield {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        let proxy = cpu_list(proxy);
        let mut shield = Shield {
            moved: Vec::new(),
            stayed: 0,
        };
        let tasks = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|p| {
                std::fs::read_dir(p.path().join("task"))
                    .into_iter()
                    .flatten()
            })
            .flatten();
        for task in tasks {
            let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let pid = nix::unistd::Pid::from_raw(tid);
            let Ok(old) = sched_getaffinity(pid) else {
                continue;
            };
            let allowed: Vec<usize> = (0..CpuSet::count())
                .filter(|&c| old.is_set(c).unwrap_or(false))
                .collect();
            let on_proxy = allowed.iter().any(|c| proxy.contains(c));
            let elsewhere: Vec<usize> = allowed
                .iter()
                .copied()
                .filter(|c| !proxy.contains(c))
                .collect();
            if !on_proxy || elsewhere.is_empty() {
                continue;
            }
            let mut new = CpuSet::new();
            for c in elsewhere {
                let _ = new.set(c);
            }
            match sched_setaffinity(pid, &new) {
                Ok(()) => shield.moved.push((pid, old)),
                Err(_) => shield.stayed += 1,
            }
        }
        shield
    }

    /// Tasks moved off the proxy CPUs.
    pub fn moved(&self) -> usize {
        self.moved.len()
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        for (pid, old) in &self.moved {
            // A task that has ended since is gone; nothing to put back.
            let _ = nix::sched::sched_setaffinity(*pid, old);
        }
    }
}

/// A kernel setting (a `/proc/sys` file) changed for the benchmark and put back when dropped (at
/// the end of the run or on a panic; a killed benchmark leaves it changed). `SW_BENCH_CC` sets
/// `net.ipv4.tcp_congestion_control` with it: this host's BBR paces every TCP sender, which
/// held the tail of each burst back 0.4–0.7 ms through the bare relay (see ARCHITECTURE.md).
pub struct Setting {
    path: PathBuf,
    old: String,
}

impl Setting {
    /// Writes `value` to `path`, keeping what was there.
    pub fn set(path: impl Into<PathBuf>, value: &str) -> std::io::Result<Setting> {
        let path = path.into();
        let old = std::fs::read_to_string(&path)?;
        std::fs::write(&path, value)?;
        Ok(Setting { path, old })
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim_end());
    }
}

/// (thread id, user + system ticks) of each thread of `pid` whose name starts with `prefix`.
pub fn thread_ticks(pid: u32, prefix: &str) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, f)) = stat_fields(&stat) else {
            continue;
        };
        if name.starts_with(prefix) {
            out.push((tid, stat_num::<u64>(&f, 11) + stat_num::<u64>(&f, 12)));
        }
    }
    out
}

/// The scheduler's account of `pid` summed over its threads (`/proc/PID/task/*/schedstat`): ns on
/// a CPU, ns runnable but waiting for one, and times it was put on one. Exact, where `stat`'s
/// ticks are sampled; the wait is what the rest of its CPU's load cost it.
pub fn sched_totals(pid: u32) -> Sched {
    let mut total = Sched::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(t) = schedstat(&entry.path().join("schedstat")) {
            total.run_ns += t.run_ns;
            total.wait_ns += t.wait_ns;
            total.slices += t.slices;
        }
    }
    total
}

/// One task's scheduler account from its `schedstat` file (`/proc/PID/task/TID/schedstat`, or
/// `/proc/thread-self/schedstat` for the calling thread); `None` when it cannot be read.
pub fn schedstat(path: &Path) -> Option<Sched> {
    let line = std::fs::read_to_string(path).ok()?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match f[..] {
        [run_ns, wait_ns, slices] => Some(Sched {
            run_ns,
            wait_ns,
            slices,
        }),
        _ => None,
    }
}

/// Each CPU's idle and stolen ticks from `/proc/stat`, in CPU order.
pub fn cpu_times() -> Vec<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            CpuTimes {
                idle: at(3) + at(4),
                steal: at(7),
            }
        })
        .collect()
}

/// One CPU's ticks idle (I/O wait included) and stolen (the hypervisor ran something else while
/// this vCPU had work). The busy fields are not kept: on a tickless kernel they are sampled by a
/// tick that stops whenever the CPU idles, so on a CPU that wakes thousands of times a second
/// they miss most of its running (on this host user+system+irq+softirq+idle+steal summed to 75–87%
/// of the wall time under load), while idle is measured at each idle entry and exit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub idle: u64,
    pub steal: u64,
}

/// Each CPU's idle and stolen shares (%) of the `wall` time between two [`cpu_times`] readings.
pub fn cpu_shares(before: &[CpuTimes], after: &[CpuTimes], wall: Duration) -> Vec<(f64, f64)> {
    let all = (wall.as_secs_f64() * HZ).max(1.0);
    let share = |ticks: u64| (100.0 * ticks as f64 / all).min(100.0);
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            (
                share(a.idle.saturating_sub(b.idle)),
                share(a.steal.saturating_sub(b.steal)),
            )
        })
        .collect()
}

/// See [`sched_totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sched {
    pub run_ns: u64,
    pub wait_ns: u64,
    pub slices: u64,
}

impl Sched {
    /// What happened between `earlier` and `self` (a restarted process counts from zero).
    pub fn since(self, earlier: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            slices: self.slices.saturating_sub(earlier.slices),
        }
    }
}

/// How many threads did a tenth or more of the CPU between two [`thread_ticks`] readings.
pub fn threads_carrying(before: &[(u32, u64)], after: &[(u32, u64)]) -> usize {
    let used: Vec<u64> = after
        .iter()
        .map(|&(tid, t)| {
            let t0 = before.iter().find(|b| b.0 == tid).map_or(0, |b| b.1);
            t.saturating_sub(t0)
        })
        .collect();
    let total: u64 = used.iter().sum();
    used.iter()
        .filter(|&&u| total > 0 && u * 10 >= total)
        .count()
}

/// 10,000 banned addresses (10.1.x.y), the same set Kamailio's htable holds.
pub fn banned_networks() -> String {
    let list: Vec<String> = (0..10_000)
        .map(|i| format!("\"10.1.{}.{}/32\"", i / 250, i % 250))
        .collect();
    list.join(", ")
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    Options,
    Register,
    Call,
}

impl Workload {
    pub fn parse(s: &str) -> Option<Workload> {
        match s {
            "options" => Some(Workload::Options),
            "register" => Some(Workload::Register),
            "call" => Some(Workload::Call),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Options => "OPTIONS",
            Workload::Register => "REGISTER",
            Workload::Call => "INVITE call",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::Call => "call",
            _ => "transaction",
        }
    }

    pub fn scenario(self) -> PathBuf {
        scenario(match self {
            Workload::Options => "bench_options.xml",
            Workload::Register => "bench_register.xml",
            Workload::Call => "bench_call.xml",
        })
    }
}

/// The edge with the default policy, 10,000 bans, `uas` as its backend over `transport`. Limits
/// that key on the one SIPp address or account (flood, request rates, calls per account) are
/// raised above the offered load, as Kamailio's pike is.
pub fn start_edge(uas: &str, transport: &str) -> EdgeProc {
    start_edge_with(uas, transport, &[], &[])
}

/// As [`start_edge`], with `more` banned besides the 10,000 and `SIPWARDEN_*` overrides in `env`.
pub fn start_edge_with(
    uas: &str,
    transport: &str,
    more: &[&str],
    env: &[(&str, &str)],
) -> EdgeProc {
    let mut bans = banned_networks();
    for b in more {
        bans.push_str(&format!(", \"{b}\""));
    }
    EdgeProc::start_with_env(
        PROXY_IP,
        &format!(
            "[[backends]]\naddress = \"{uas}\"\ntransport = \"{transport}\"\n\n\
[policy.bans]\nnetworks = [{}]\n\n\
[policy.flood]\nrate_per_s = 1000000\nburst = 1000000\n\n\
[policy.rate.options]\nper_source_per_min = 100000000\nper_aor_per_min = 0\n\n\
[policy.rate.register]\nper_source_per_min = 100000000\nper_aor_per_min = 100000000\n\n\
[policy.rate.invite]\nper_source_per_min = 100000000\nper_aor_per_min = 100000000\n\n\
[policy.tollfraud]\ncalls_per_min = 100000000\nconcurrent_calls = 1000000\n\n\
[log]\nformat = \"text\"\n",
            bans
        ),
        env,
    )
}

pub fn start_kamailio(dir: &Path, port: u16, uas: &str, transport: &str) -> Proc {
    let kamailio = require_tool("kamailio", "kamailio");
    let cfg = std::fs::read_to_string(workspace_root().join("bench/kamailio-proxy.cfg"))
        .expect("bench/kamailio-proxy.cfg")
        .replace("@IP@", PROXY_IP)
        .replace("@PORT@", &port.to_string())
        .replace("@UAS@", uas)
        .replace("@TRANSPORT@", transport)
        .replace("@PIKE@", "65000");
    let path = dir.join(format!("kamailio-{transport}.cfg"));
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(dir.join(format!("kamailio-{transport}.log"))).unwrap();
    let p = Proc::spawn_group(
        "kamailio",
        Command::new(kamailio)
            .args(["-DD", "-E", "-x", "tlsf", "-m", "256", "-M", "16"])
            // The UDP receive buffer probed up to 4 MB, as the edge sets its own (Kamailio's
            // probe stops at 256 KB by default).
            .args(["-b", SOCKET_BUFFER, "-f"])
            .arg(&path)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log)),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_bound("udp", port)
            && port_bound("tcp", port)),
        "kamailio did not start"
    );
    p
}

/// The bare relay (`floor_relay`, the binary at `bin`) over `transport` on the proxy address's
/// `port` in front of `uas`: the floor under any proxy on this host.
pub fn start_relay(bin: &Path, port: u16, uas: &str, transport: &str) -> Proc {
    start_floor_tool(
        "floor relay",
        bin,
        transport,
        port,
        &[format!("{PROXY_IP}:{port}"), uas.to_string()],
    )
}

/// Starts one of the benchmark's own tools (`tests/src/bin`: `floor_relay`, `floor_uas`), with
/// `--tcp` over TCP before `args`, and waits for it to listen on `port`.
fn start_floor_tool(what: &str, bin: &Path, transport: &str, port: u16, args: &[String]) -> Proc {
    let mut cmd = Command::new(bin);
    if transport == "tcp" {
        cmd.arg("--tcp");
    }
    let p = Proc::spawn(what, cmd.args(args).stdout(Stdio::null()));
    assert!(
        wait_until(Duration::from_secs(10), || port_bound(transport, port)),
        "{what} did not start"
    );
    p
}

/// The socket buffers SIPp is given (`-buff_size`, bytes; the kernel caps it at
/// `net.core.rmem_max`/`wmem_max`), and the size Kamailio's UDP receive buffer may grow to
/// (`-b`), as the edge sets its own. SIPp's own default is 64 KB: at 12,500 calls/s on one vCPU
/// the UAS's receive queue overflowed whenever SIPp waited for its core, 100,000–150,000
/// datagrams a run whichever proxy was in front (Kamailio's run failed 1.7% of calls, the edge's
/// 0.05%), so the maximum measured SIPp's buffer, not the proxy. A PBX's socket has the system
/// default (208 KB here) or more.
pub const SOCKET_BUFFER: &str = "4194304";

/// SIPp as the UAS (no message trace: it would cost more than the proxy).
pub fn start_uas(dir: &Path, port: u16, transport: &str) -> Proc {
    let sipp = require_tool("sipp", "sip-tester");
    let p = Proc::spawn(
        "sipp uas",
        Command::new(sipp)
            .current_dir(dir)
            .arg("-sf")
            .arg(scenario("bench_uas.xml"))
            .args(["-i", UAS_IP, "-p", &port.to_string()])
            .args(["-t", if transport == "tcp" { "t1" } else { "u1" }])
            .args(["-nostdin", "-deadcall_wait", "0", "-max_socket", "1000"])
            .args(["-buff_size", SOCKET_BUFFER])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_bound(transport, port)),
        "sipp uas did not start"
    );
    p
}

/// The light UAS (`floor_uas`, `tests/src/bin`) in SIPp's place behind the proxies: the same
/// answers at a fraction of the CPU, so that the load generator keeps headroom.
pub fn start_floor_uas(bin: &Path, port: u16, transport: &str) -> Proc {
    start_floor_tool(
        "floor uas",
        bin,
        transport,
        port,
        &[format!("{UAS_IP}:{port}")],
    )
}

/// What one SIPp run did.
pub struct Run {
    pub ok: u64,
    pub failed: u64,
    pub wall: Duration,
    /// Response times of the latency probe during the run, ms, sorted.
    pub rtts: Vec<f64>,
    /// The proxy's (user, system) CPU seconds over the run, when a proxy was measured.
    pub cpu: Option<(f64, f64)>,
    /// For the edge over UDP: its own delay histogram over the run, (upper bound in seconds,
    /// cumulative datagrams) — every datagram, from the kernel's receipt to the send.
    pub edge_delay: Vec<(f64, u64)>,
    /// When asked for, through a proxy: each message's transit through it in a loopback capture
    /// of a few seconds of the run.
    pub transit: Option<Transit>,
    /// From the same capture: the response time of each of the UAC's transactions, ms, sorted
    /// (through the proxy, or straight to the UAS).
    pub response: Vec<f64>,
    /// From the same capture: how long the UAS took to answer each request it was sent, ms,
    /// sorted.
    pub answer: Vec<f64>,
    /// From the same capture: the latency probe's response times on the wire, ms, sorted (its
    /// round trips less its own thread's waits on the load's CPU).
    pub probe_response: Vec<f64>,
    /// The share of the capture during which the UAS was behind ([`Behind`], answers later than
    /// [`UAS_LATE_MS`]).
    pub uas_behind: Option<f64>,
    /// The SIPp UAC's address.
    pub uac: SocketAddr,
    /// For the edge: how many of its UDP receive threads did a tenth or more of their CPU.
    pub receive_threads: Option<usize>,
    /// The SIPp UAS's scheduling over the run, when its pid was given: what the traffic each
    /// proxy hands it costs the PBX behind.
    pub uas: Option<Sched>,
    /// The SIPp UAC's scheduling over its life (the run and its start).
    pub uac_sched: Option<Sched>,
    /// Each CPU's idle and stolen shares over the run, %.
    pub cpus: Vec<(f64, f64)>,
}

/// Offers `rate` scenarios/s of `w` for `seconds` through `target` over `transport`.
pub fn load(
    dir: &Path,
    target: &str,
    w: Workload,
    transport: &str,
    rate: u32,
    seconds: u32,
) -> Run {
    let sipp = require_tool("sipp", "sip-tester");
    let calls = rate * seconds;
    let work = tempfile::tempdir_in(dir).unwrap();
    let users = work.path().join("users.csv");
    let mut csv = String::from("SEQUENTIAL\n");
    for u in 0..1000 {
        csv.push_str(&format!("{};\n", 2000 + u));
    }
    std::fs::write(&users, csv).unwrap();
    let stats = work.path().join("screen.txt");
    let uac = SocketAddr::new(UAC_IP.parse().unwrap(), free_port(UAC_IP));
    let started = Instant::now();
    let child = Command::new(sipp)
        .current_dir(work.path())
        .arg(target)
        .arg("-sf")
        .arg(w.scenario())
        .arg("-inf")
        .arg(&users)
        .args(["-i", UAC_IP, "-p", &uac.port().to_string()])
        .args(["-t", if transport == "tcp" { "t1" } else { "u1" }])
        .args(["-s", "probe", "-r", &rate.to_string()])
        .args(["-m", &calls.to_string(), "-l", "20000"])
        .args(["-recv_timeout", "5000", "-deadcall_wait", "0"])
        .args(["-buff_size", SOCKET_BUFFER])
        .args(["-timeout", &format!("{}s", seconds * 3 + 10), "-nostdin"])
        .args(["-trace_screen", "-screen_file"])
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut uac_sched = None;
    if let Ok(mut child) = child {
        // Its scheduling is read once it has exited but before it is reaped (its /proc entry
        // stays until then).
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        if waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).is_ok() {
            uac_sched = Some(sched_totals(child.id()));
        }
        let _ = child.wait();
    }
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
    let _ = work.close();
    Run {
        ok: count("Successful call"),
        failed: count("Failed call"),
        wall,
        rtts: Vec::new(),
        cpu: None,
        edge_delay: Vec::new(),
        receive_threads: None,
        uas: None,
        uac_sched,
        cpus: Vec::new(),
        transit: None,
        response: Vec::new(),
        answer: Vec::new(),
        probe_response: Vec::new(),
        uas_behind: None,
        uac,
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of `v`: the middle value, or the mean of the two middle values of an even count
/// (two runs must not report their upper one).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median (min–max)` of `v`.
pub fn spread(v: &[f64]) -> String {
    spread_with(v, 1)
}

/// `median (min–max)` of `v` with `decimals` decimals.
pub fn spread_with(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let d = decimals;
    format!("{:.d$} ({min:.d$}–{max:.d$})", median(v))
}

/// One proxy (or none: straight to the UAS) under load.
pub struct Target {
    pub name: &'static str,
    pub pid: Option<u32>,
    pub addr: String,
    /// The edge's HTTP address, to read its own UDP delay histogram around a run.
    pub metrics: Option<SocketAddr>,
    /// For a proxy: the UAS it forwards to (a capture takes that traffic too).
    pub forwards_to: Option<SocketAddr>,
}

/// The edge's `udp_delay_seconds` histogram: (upper bound in seconds, cumulative count).
pub fn udp_delay_buckets(http: SocketAddr) -> Vec<(f64, u64)> {
    let Some((200, text)) = http_get(http, "/metrics") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("sipwarden_edge_udp_delay_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of a cumulative histogram, in seconds, interpolated within its bucket as
/// Prometheus' `histogram_quantile` does; `None` when empty or when it falls in the last,
/// unbounded bucket.
pub fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return None;
            }
            let share = (rank - below.1 as f64) / (count - below.1).max(1) as f64;
            return Some(below.0 + (le - below.0) * share);
        }
        below = (le, count);
    }
    None
}

/// OPTIONS sent every [`PROBE_EVERY`] to `target` over `transport` from an address of its own
/// until `stop`; returns the round-trip times in ms, sorted. SIPp's response-time trace counts
/// whole milliseconds, too coarse for a proxy's added latency, so the benchmark measures it here.
pub fn probe(target: SocketAddr, transport: &str, stop: Arc<AtomicBool>) -> Vec<f64> {
    use std::io::{Read, Write};
    let tcp = transport == "tcp";
    let udp_sock = (!tcp).then(|| {
        let s = std::net::UdpSocket::bind((PROBE_IP, 0)).expect("probe socket");
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        s
    });
    let mut tcp_sock = tcp.then(|| {
        // From the probe's own address, as over UDP, so that a capture tells it apart.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("probe socket");
        let from: SocketAddr = format!("{PROBE_IP}:0").parse().expect("probe address");
        s.bind(&from.into()).expect("probe bind");
        s.connect_timeout(&target.into(), Duration::from_secs(2))
            .expect("probe connection");
        let s: std::net::TcpStream = s.into();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        s
    });
    let local = match (&udp_sock, &tcp_sock) {
        (Some(u), _) => u.local_addr().unwrap(),
        (_, Some(t)) => t.local_addr().unwrap(),
        _ => unreachable!(),
    };
    let mut sent: std::collections::HashMap<u64, Instant> = Default::default();
    let mut rtts = Vec::new();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    let mut n = 0u64;
    // Bounded: the run it accompanies lasts at most a few minutes.
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
        if started.elapsed() >= PROBE_EVERY * n as u32 {
            n += 1;
            let msg = format!(
                "OPTIONS sip:probe@{target} SIP/2.0\r\n\
Via: SIP/2.0/{} {local};branch=z9hG4bKprobe{n};rport\r\n\
From: <sip:probe@{local}>;tag=p{n}\r\nTo: <sip:probe@{target}>\r\n\
Call-ID: probe-{n}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\
User-Agent: sipwarden-bench-probe\r\nContent-Length: 0\r\n\r\n",
                transport.to_uppercase()
            );
            sent.insert(n, Instant::now());
            let _ = match (&udp_sock, &mut tcp_sock) {
                (Some(u), _) => u.send_to(msg.as_bytes(), target).map(|_| ()),
                (_, Some(t)) => t.write_all(msg.as_bytes()),
                _ => Ok(()),
            };
        }
        let got = match (&udp_sock, &mut tcp_sock) {
            (Some(u), _) => u.recv(&mut buf),
            (_, Some(t)) => t.read(&mut buf),
            _ => Ok(0),
        };
        let Ok(len) = got else { continue };
        let at = Instant::now();
        pending.extend_from_slice(&buf[..len]);
        // Responses carry no body: each ends at its blank line.
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("Call-ID: probe-"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(t0) = id.and_then(|id| sent.remove(&id)) {
                if text.starts_with("SIP/2.0 200") {
                    rtts.push((at - t0).as_secs_f64() * 1e3);
                }
            }
        }
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rtts
}

/// How often the latency probe sends (200/s).
pub const PROBE_EVERY: Duration = Duration::from_millis(5);

/// What [`measure`] watches besides the proxy's CPU and the probe.
#[derive(Clone, Copy, Default)]
pub struct Watch {
    /// A loopback capture of a few seconds of the run.
    pub capture: bool,
    /// The UAS's process, whose scheduling over the run is taken (the UAC's always is).
    pub uas: Option<u32>,
}

/// One run of `w` at `rate` for `secs` through `t`, with the latency probe alongside, the proxy's
/// CPU, the scheduling of the SIPp UAC and of the UAS process in `watch`, each CPU's idle share
/// and, for the edge, its own delay histogram. With `watch.capture`, a loopback capture from the
/// run's second second for up to 3 s gives the UAC's response times and, through a proxy, each
/// message's transit (over TCP, messages are framed from the reassembled streams).
pub fn measure(
    dir: &Path,
    t: &Target,
    w: Workload,
    transport: &str,
    rate: u32,
    secs: u32,
    watch: Watch,
) -> Run {
    let Watch { capture, uas } = watch;
    let before = t.pid.map(cpu_ticks);
    let uas_before = uas.map(sched_totals);
    let cpus_before = cpu_times();
    let cpus_since = Instant::now();
    let delays_before = t.metrics.map(udp_delay_buckets);
    // The edge's receive threads (the only target with metrics), to tell how many took the load.
    let receivers_before = t
        .pid
        .filter(|_| t.metrics.is_some())
        .map(|p| thread_ticks(p, "udp-"));
    let stop = Arc::new(AtomicBool::new(false));
    let target: SocketAddr = t.addr.parse().unwrap();
    let prober = {
        let (transport, stop) = (transport.to_string(), stop.clone());
        std::thread::spawn(move || probe(target, &transport, stop))
    };
    let capturer = capture.then(|| {
        let (dir, stop) = (dir.to_path_buf(), stop.clone());
        let ports: Vec<u16> = std::iter::once(target)
            .chain(t.forwards_to)
            .map(|a| a.port())
            .collect();
        let span = Duration::from_secs(u64::from(secs.saturating_sub(2).clamp(1, 3)));
        std::thread::spawn(move || capture_window(&dir, &ports, span, &stop))
    });
    let mut run = load(dir, &t.addr, w, transport, rate, secs);
    stop.store(true, Ordering::Relaxed);
    run.rtts = prober.join().unwrap_or_default();
    if let Some((packets, dropped)) = capturer.and_then(|c| c.join().ok().flatten()) {
        let datagrams = messages(&packets);
        run.response = response_times(&datagrams, run.uac.ip(), target);
        if let Ok(probe) = PROBE_IP.parse() {
            run.probe_response = response_times(&datagrams, probe, target);
        }
        let answers = answer_timeline(&datagrams, t.forwards_to.unwrap_or(target));
        let behind = Behind::find(&answers, UAS_LATE_MS, UAS_CATCH_UP);
        if let (Some(first), Some(last)) = (datagrams.first(), datagrams.last()) {
            run.uas_behind = Some(behind.share(first.at_ns, last.at_ns));
        }
        run.answer = sorted_ms(&answers);
        if let Some(uas) = t.forwards_to {
            let mut through = transit(&datagrams, target, uas, &behind);
            through.dropped = dropped;
            run.transit = Some(through);
        }
        if let Ok(keep) = std::env::var("SW_BENCH_TIMELINES") {
            let name = format!("{}-{w:?}-{transport}-{rate}", t.name).to_lowercase();
            let transits = t
                .forwards_to
                .map(|uas| transit_timeline(&datagrams, target, uas));
            write_timelines(Path::new(&keep), &name, transits, &answers);
        }
    }
    if let (Some(http), Some(b0)) = (t.metrics, delays_before) {
        let b1 = udp_delay_buckets(http);
        run.edge_delay = b1
            .iter()
            .map(|&(le, n)| {
                let n0 = b0.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
                (le, n.saturating_sub(n0))
            })
            .collect();
    }
    if let (Some(pid), Some(r0)) = (t.pid, receivers_before) {
        run.receive_threads =
            Some(threads_carrying(&r0, &thread_ticks(pid, "udp-"))).filter(|&n| n > 0);
    }
    if let (Some(pid), Some((u0, s0))) = (t.pid, before) {
        let (u1, s1) = cpu_ticks(pid);
        run.cpu = Some(((u1 - u0) as f64 / HZ, (s1 - s0) as f64 / HZ));
    }
    if let (Some(pid), Some(s0)) = (uas, uas_before) {
        run.uas = Some(sched_totals(pid).since(s0));
    }
    run.cpus = cpu_shares(&cpus_before, &cpu_times(), cpus_since.elapsed());
    run
}

/// Writes a run's capture as timelines into `dir` (`SW_BENCH_TIMELINES`): `NAME-N.transit.tsv`
/// (each message's arrival at the proxy, ns, its transit in ms, `req` or `resp`) for a proxy, and
/// `NAME-N.answer.tsv` (each request's arrival at the UAS, its answer time in ms), N counting the
/// runs of NAME: to see where in a run the slow transactions were and what else was slow then.
fn write_timelines(dir: &Path, name: &str, transits: Option<Vec<Timed>>, answers: &[Timed]) {
    let _ = std::fs::create_dir_all(dir);
    let n = (1..)
        .find(|n| !dir.join(format!("{name}-{n}.answer.tsv")).exists())
        .unwrap_or(0);
    let write = |kind: &str, timed: &[Timed]| {
        let text: String = timed
            .iter()
            .map(|t| {
                let what = if t.request { "req" } else { "resp" };
                format!("{}\t{:.4}\t{what}\n", t.at_ns, t.ms)
            })
            .collect();
        let path = dir.join(format!("{name}-{n}.{kind}.tsv"));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("could not write {}: {e}", path.display());
        }
    };
    if let Some(transits) = transits {
        write("transit", &transits);
    }
    write("answer", answers);
}

/// A UAS answer later than this (ms) puts the UAS behind: straight to SIPp's UAS, at half the
/// maximum rate, 99% of answers took under 3.5 ms.
pub const UAS_LATE_MS: f64 = 5.0;

/// How long after a late answer the UAS still counts as behind: the backlog it sends on catching
/// up takes a proxy about this long to pass on (5 ms: a few hundred messages).
pub const UAS_CATCH_UP: Duration = Duration::from_millis(5);

/// After the load's first second, a capture of `span` (cut short by `stop`) of UDP and TCP to and
/// from `ports`, read back, with the number of packets the kernel dropped on the way to tcpdump.
fn capture_window(
    dir: &Path,
    ports: &[u16],
    span: Duration,
    stop: &AtomicBool,
) -> Option<(Packets, u64)> {
    // Waits `d` unless the load ends first (then the capture ends too); whether it still runs.
    let wait = |d: Duration| !wait_until(d, || stop.load(Ordering::Relaxed));
    if !wait(Duration::from_secs(1)) {
        return None;
    }
    let cap = Capture::start(dir, ports)?;
    wait(span);
    Some(cap.finish())
}

pub fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn env_num(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::{
        bucket_quantile, cpu_list, cpu_shares, cpu_times, median, sched_totals, stat_fields,
        stat_num, threads_carrying, CpuTimes, Sched, Setting,
    };
    use std::time::Duration;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(median(&[1.0, 9.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        // 100 observations: 50 at most 1 ms, 90 at most 2 ms, all at most 4 ms.
        let b = [(0.001, 50), (0.002, 90), (0.004, 100), (f64::INFINITY, 100)];
        assert_eq!(bucket_quantile(&b, 0.5), Some(0.001));
        let p70 = bucket_quantile(&b, 0.7).unwrap();
        assert!((p70 - 0.0015).abs() < 1e-12, "{p70}");
        let p95 = bucket_quantile(&b, 0.95).unwrap();
        assert!((p95 - 0.003).abs() < 1e-12, "{p95}");
        // In the unbounded bucket, or nothing observed: no figure.
        assert_eq!(
            bucket_quantile(&[(0.001, 1), (f64::INFINITY, 2)], 0.99),
            None
        );
        assert_eq!(
            bucket_quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.99),
            None
        );
        assert_eq!(bucket_quantile(&[], 0.99), None);
    }

    #[test]
    fn sched_totals_count_this_process_and_what_it_did_since() {
        let me = std::process::id();
        let before = sched_totals(me);
        // Work enough to be seen (the account is in ns, updated as the thread runs).
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::thread::sleep(Duration::from_millis(2));
        let after = sched_totals(me);
        let d = after.since(before);
        assert!(d.run_ns > 0 && d.slices > 0, "{before:?} then {after:?}");
        // A restarted process (smaller totals) counts from zero, not from a wrapped number. (Not
        // `before.since(after)`: the other tests' threads end in between, and the totals are
        // summed over this process's live threads.)
        let restarted = Sched {
            run_ns: after.run_ns / 2,
            wait_ns: after.wait_ns / 2,
            slices: after.slices / 2,
        };
        assert_eq!(restarted.since(after), Sched::default());
    }

    #[test]
    fn cpu_shares_are_of_the_wall_time_per_cpu() {
        let t = |idle, steal| CpuTimes { idle, steal };
        let before = [t(100, 0), t(0, 0)];
        // One second is 100 ticks of wall time, whatever the busy ticks sampled.
        let second = Duration::from_secs(1);
        assert_eq!(
            cpu_shares(&before, &[t(170, 5), t(0, 0)], second),
            [(70.0, 5.0), (0.0, 0.0)]
        );
        // Ticks read a moment after the wall clock stopped are not more than all of it.
        assert_eq!(cpu_shares(&before, &[t(205, 0)], second), [(100.0, 0.0)]);
        let now = cpu_times();
        assert!(!now.is_empty() && now.len() == cpu_shares(&now, &now, second).len());
    }

    #[test]
    fn a_setting_is_put_back_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tcp_congestion_control");
        std::fs::write(&path, "bbr\n").unwrap();
        {
            let _cc = Setting::set(&path, "cubic").unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "cubic");
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "bbr");
        assert!(Setting::set(dir.path().join("absent"), "x").is_err());
    }

    #[test]
    fn cpu_lists_expand_ranges() {
        assert_eq!(cpu_list("1"), [1]);
        assert_eq!(cpu_list("0,2-4"), [0, 2, 3, 4]);
    }

    #[test]
    fn threads_carrying_counts_those_with_a_tenth_of_the_cpu() {
        let before = [(1, 100), (2, 50), (3, 7)];
        // 90 + 9 + 1 ticks of 100: only the first did a tenth or more.
        assert_eq!(threads_carrying(&before, &[(1, 190), (2, 59), (3, 8)]), 1);
        assert_eq!(threads_carrying(&before, &[(1, 150), (2, 100), (3, 7)]), 2);
        // A thread that appeared during the run counts from zero; no CPU at all carries nothing.
        assert_eq!(threads_carrying(&before, &[(1, 110), (4, 10)]), 2);
        assert_eq!(threads_carrying(&before, &before), 0);
    }

    #[test]
    fn stat_lines_split_after_the_command_name_even_with_parentheses_in_it() {
        let line = "42 (udp (0) x) S 7 42 42 0 -1 4194560 10 0 0 0 15 9 0 0 20 0 3";
        let (name, f) = stat_fields(line).unwrap();
        assert_eq!(name, "udp (0) x");
        assert_eq!(stat_num::<u32>(&f, 1), 7);
        assert_eq!((stat_num::<u64>(&f, 11), stat_num::<u64>(&f, 12)), (15, 9));
        assert_eq!(stat_num::<u64>(&f, 99), 0);
        assert!(stat_fields("no command name").is_none());
    }
}
