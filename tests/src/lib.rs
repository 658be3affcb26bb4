//! The end-to-end rig: start the real `sipwarden-edge` binary and real SIP peers (SIPp) on
//! loopback, wait for them on readiness (bound sockets, `/readyz`), and kill them on drop.
//!
//! A missing tool is a failure that names the Debian package to install, never a silent skip.
//!
//! [`mmdb`] writes small MaxMind databases for GeoIP tests; [`kamailio`] runs a registrar with
//! digest auth; [`sipvicious`] runs the attacker; [`controller`] runs `sipwarden-controller`
//! processes.

pub mod bench;
pub mod capture;
pub mod controller;
pub mod kamailio;
pub mod mmdb;
pub mod otlp;
pub mod pki;
pub mod redis;
pub mod sipvicious;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (where `Cargo.toml` and `target/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The SIPp scenario files shipped in `tests/scenarios`.
pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

/// A built binary of this workspace, from the same profile as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// The path of `tool`, or a panic that names the Debian package providing it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    if let Some(p) = find_tool(tool) {
        return p;
    }
    panic!("`{tool}` is not installed: install the Debian package `{package}` (apt-get install {package}); the README's test command does this");
}

/// The path of `tool` on `PATH` or in `/usr/sbin`, if installed.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// A `200 OK` to `request` (a whole message as text) as a minimal UAS would send it: its Via,
/// From, To, Call-ID and CSeq lines, in order, and no body.
pub fn ok_for(request: &str) -> String {
    let mut ok = String::from("SIP/2.0 200 OK\r\n");
    for l in request.lines().filter(|l| {
        ["Via: ", "From: ", "To: ", "Call-ID: ", "CSeq: "]
            .iter()
            .any(|k| l.starts_with(k))
    }) {
        ok.push_str(l);
        ok.push_str("\r\n");
    }
    ok.push_str("Content-Length: 0\r\n\r\n");
    ok
}

/// A child process killed (and reaped) on drop; with [`Proc::spawn_group`], its whole process
/// group (servers that fork workers, which outlive a killed parent).
pub struct Proc {
    pub child: std::process::Child,
    pub name: String,
    group: bool,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.into(),
            group: false,
        }
    }

    /// As [`Proc::spawn`], in a process group of its own that is killed whole on drop (Kamailio's
    /// TCP workers survive a SIGKILL of the main process).
    pub fn spawn_group(name: &str, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut p = Proc::spawn(name, cmd.process_group(0));
        p.group = true;
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.pid())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on `ip` right now, never handed out before in this process.
pub fn free_port(ip: &str) -> u16 {
    // Ports handed out in this process: the kernel may give the same ephemeral port to two tests
    // asking moments apart, and the second to bind it would fail.
    static GIVEN: std::sync::Mutex<Vec<(String, u16)>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let u = UdpSocket::bind((ip, 0)).expect("bind udp");
        let port = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind((ip, port)).is_err() {
            continue;
        }
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.iter().any(|(i, p)| i == ip && *p == port) {
            continue;
        }
        given.push((ip.to_string(), port));
        return port;
    }
    panic!("no free port on {ip}");
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether some process has bound `port` on UDP (`udp`) or listens on TCP (`tcp`), from /proc.
pub fn port_bound(proto: &str, port: u16) -> bool {
    let hex = format!(":{port:04X}");
    ["", "6"].iter().any(|v| {
        std::fs::read_to_string(format!("/proc/net/{proto}{v}")).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&hex) && (proto == "udp" || f[3] == "0A")
            })
        })
    })
}

/// A plain HTTP/1.1 GET; `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, None, None)
}

/// One HTTP/1.1 request (`Connection: close`) with an optional bearer token and JSON body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of a metric sample line that starts with `prefix` (name and labels), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A running `sipwarden-edge` with its own directory and ports.
pub struct EdgeProc {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub ip: String,
    pub sip_port: u16,
    pub http: SocketAddr,
    env: Vec<(String, String)>,
}

/// Starts `sipwarden-edge` on `dir/edge.toml`, logging (appended) to `dir/edge.log`.
fn spawn_edge(dir: &Path, env: &[(String, String)]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("edge.log"))
        .expect("log file");
    Proc::spawn(
        "sipwarden-edge",
        Command::new(workspace_bin("sipwarden-edge"))
            .arg("--config")
            .arg(dir.join("edge.toml"))
            .env("RUST_LOG", "info,sipwarden_edge=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("dup"))
            .stderr(log),
    )
}

impl EdgeProc {
    /// Starts an edge on `ip` (UDP and TCP on one free port) with `extra` TOML appended (backends,
    /// health, …) and waits until `/readyz` answers 200.
    pub fn start(ip: &str, extra: &str) -> EdgeProc {
        Self::start_with_env(ip, extra, &[])
    }

    /// As [`EdgeProc::start`], with `SIPWARDEN_*` overrides in the environment.
    pub fn start_with_env(ip: &str, extra: &str, env: &[(&str, &str)]) -> EdgeProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let sip_port = free_port(ip);
        let http_port = free_port("127.0.0.1");
        let toml = format!(
            r#"[edge]
id = "edge-test"
data_dir = "{data}"

[[listeners]]
transport = "udp"
address = "{ip}:{sip_port}"

[[listeners]]
transport = "tcp"
address = "{ip}:{sip_port}"

[http]
listen = "127.0.0.1:{http_port}"

[shutdown]
grace_ms = 2000

{extra}
"#,
            data = dir.path().join("data").display()
        );
        let cfg = dir.path().join("edge.toml");
        std::fs::write(&cfg, toml).expect("write config");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let proc = spawn_edge(dir.path(), &env);
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("addr");
        let mut edge = EdgeProc {
            proc,
            dir,
            ip: ip.into(),
            sip_port,
            http,
            env,
        };
        edge.wait_ready();
        edge
    }

    fn wait_ready(&mut self) {
        let http = self.http;
        let ready = wait_until(Duration::from_secs(15), || {
            http_get(http, "/readyz").is_some_and(|(s, _)| s == 200)
        });
        if !ready {
            panic!("edge did not become ready; log:\n{}", self.log());
        }
        assert!(self.proc.child.try_wait().expect("wait").is_none());
    }

    /// The config file the edge was started with (tests edit it to reload the policy).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("edge.toml")
    }

    /// Stops the edge with SIGTERM and starts it again on the same config and data directory.
    pub fn restart(&mut self) {
        self.proc.signal("TERM");
        assert!(
            self.proc.wait_exit(Duration::from_secs(10)).is_some(),
            "edge did not stop on SIGTERM"
        );
        self.proc = spawn_edge(self.dir.path(), &self.env);
        let sip = self.sip_port;
        assert!(
            wait_until(Duration::from_secs(10), || port_bound("udp", sip)),
            "edge did not bind its SIP port again"
        );
        self.wait_ready();
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.sip_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("edge.log")).unwrap_or_default()
    }

    /// `sipwarden_edge_security_events_total` for `rule` and `action` (not dry-run); 0 when absent.
    pub fn events(&self, rule: &str, action: &str) -> f64 {
        metric(
            &self.metrics(),
            &format!(
                "sipwarden_edge_security_events_total{{rule=\"{rule}\",action=\"{action}\",dry_run=\"false\"}}"
            ),
        )
        .unwrap_or(0.0)
    }

    /// The security events the edge logged so far (target `security`): the JSON text ending a
    /// text-format line, or the fields of a JSON-format line.
    pub fn security_events(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| {
                if let Some(at) = l.find("{\"time_unix_ms\"") {
                    return serde_json::from_str(&l[at..]).ok();
                }
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["target"] == "security").then_some(v)
            })
            .collect()
    }

    /// The bans the edge holds of `origin` (`auto`, `cluster`, `config`), 0 when not reported.
    pub fn bans_active(&self, origin: &str) -> f64 {
        metric(
            &self.metrics(),
            &format!("sipwarden_edge_bans_active{{origin=\"{origin}\"}}"),
        )
        .unwrap_or(0.0)
    }

    /// Whether the edge has a watch stream open to a controller.
    pub fn connected(&self) -> bool {
        metric(&self.metrics(), "sipwarden_edge_controller_connected") == Some(1.0)
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// SIPp's transport flag for `udp` / `tcp`.
fn sipp_transport(t: &str) -> &'static str {
    match t {
        "tcp" => "t1",
        _ => "u1",
    }
}

/// A SIPp process in server mode (a PBX), with its message trace in `dir`.
pub struct SippServer {
    pub proc: Proc,
    pub trace: PathBuf,
    pub port: u16,
}

impl SippServer {
    /// Starts `scenario` listening on `ip:port` over `transport` and waits until it is bound.
    pub fn start(
        dir: &Path,
        scenario_name: &str,
        ip: &str,
        port: u16,
        transport: &str,
    ) -> SippServer {
        Self::start_with(dir, scenario_name, ip, port, transport, &[])
    }

    /// As [`SippServer::start`], with `extra` SIPp arguments.
    pub fn start_with(
        dir: &Path,
        scenario_name: &str,
        ip: &str,
        port: u16,
        transport: &str,
        extra: &[&str],
    ) -> SippServer {
        let sipp = require_tool("sipp", "sip-tester");
        let trace = dir.join(format!("pbx-{port}-msg.log"));
        let proc = Proc::spawn(
            "sipp server",
            Command::new(sipp)
                .current_dir(dir)
                .arg("-sf")
                .arg(scenario(scenario_name))
                .args([
                    "-i",
                    ip,
                    "-p",
                    &port.to_string(),
                    "-t",
                    sipp_transport(transport),
                ])
                .args(["-nostdin", "-trace_msg", "-message_file"])
                .arg(&trace)
                .args(extra)
                .args(["-trace_err", "-error_file"])
                .arg(dir.join(format!("pbx-{port}-err.log")))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let proto = if transport == "tcp" { "tcp" } else { "udp" };
        assert!(
            wait_until(Duration::from_secs(10), || port_bound(proto, port)),
            "SIPp server did not bind {proto} port {port}"
        );
        SippServer { proc, trace, port }
    }

    /// Every message this server received so far, as SIPp traced them.
    pub fn received_messages(&self) -> Vec<String> {
        received_blocks(&std::fs::read_to_string(&self.trace).unwrap_or_default())
    }

    /// How many requests of `method` this server has received so far.
    pub fn received(&self, method: &str) -> usize {
        let start = format!("{method} sip:");
        self.received_messages()
            .iter()
            .filter(|m| m.starts_with(&start))
            .count()
    }
}

/// The received messages in a SIPp `-trace_msg` file (sent ones are left out).
pub fn received_blocks(trace: &str) -> Vec<String> {
    trace
        .split("----------------------------------------------- ")
        .filter_map(|block| {
            let (head, msg) = block.split_once(" bytes :\n\n")?;
            head.contains("message received")
                .then(|| msg.trim_start().to_string())
        })
        .collect()
}

/// The result of one SIPp client run.
#[derive(Debug)]
pub struct SippRun {
    pub success: bool,
    pub errors: String,
    pub messages: String,
}

/// Runs SIPp as a client: `calls` calls of `scenario` from `ip:port` to `target`, at most
/// `limit` wall time. Success means every call completed (SIPp exit status 0).
#[allow(clippy::too_many_arguments)]
pub fn sipp_client(
    dir: &Path,
    scenario_name: &str,
    ip: &str,
    port: u16,
    transport: &str,
    target: &str,
    service: &str,
    calls: u32,
    limit: Duration,
) -> SippRun {
    sipp_client_args(
        dir,
        scenario_name,
        ip,
        port,
        transport,
        target,
        service,
        calls,
        limit,
        &[],
    )
}

/// As [`sipp_client`], with `extra` SIPp arguments (`-au`, `-ap`, `-r`, …; later ones win).
#[allow(clippy::too_many_arguments)]
pub fn sipp_client_args(
    dir: &Path,
    scenario_name: &str,
    ip: &str,
    port: u16,
    transport: &str,
    target: &str,
    service: &str,
    calls: u32,
    limit: Duration,
    extra: &[&str],
) -> SippRun {
    let sipp = require_tool("sipp", "sip-tester");
    let tag = format!("{scenario_name}-{port}");
    let err = dir.join(format!("{tag}-err.log"));
    let msg = dir.join(format!("{tag}-msg.log"));
    let _ = std::fs::remove_file(&err);
    let mut proc = Proc::spawn(
        "sipp client",
        Command::new(sipp)
            .current_dir(dir)
            .arg(target)
            .arg("-sf")
            .arg(scenario(scenario_name))
            .args([
                "-i",
                ip,
                "-p",
                &port.to_string(),
                "-t",
                sipp_transport(transport),
            ])
            .args(["-s", service, "-m", &calls.to_string(), "-r", "20"])
            .args([
                "-recv_timeout",
                "4000",
                "-timeout",
                &format!("{}s", limit.as_secs().max(1)),
            ])
            .args(["-timeout_error", "-nostdin", "-trace_err", "-error_file"])
            .arg(&err)
            .args(["-trace_msg", "-message_file"])
            .arg(&msg)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let status = proc.wait_exit(limit + Duration::from_secs(5));
    SippRun {
        success: status.is_some_and(|s| s.success()),
        errors: std::fs::read_to_string(&err).unwrap_or_default(),
        messages: std::fs::read_to_string(&msg).unwrap_or_default(),
    }
}

/// Sends an initial `method` request (user `from` to `2000`, Call-ID with `tag` and `n`) from `sock`
/// to `target` and returns the first final status answered within 3 s.
pub fn sip_status(
    sock: &std::net::UdpSocket,
    target: &str,
    method: &str,
    from: &str,
    tag: &str,
    n: u32,
) -> Option<u16> {
    let local = sock.local_addr().ok()?;
    let call_id = format!("{tag}-{n}-{local}");
    let msg = format!(
        "{method} sip:2000@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{tag}{n};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:{from}@{target}>;tag={tag}{n}\r\nTo: <sip:2000@{target}>\r\n\
Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:{from}@{local}>\r\n\
Content-Length: 0\r\n\r\n"
    );
    sock.send_to(msg.as_bytes(), target).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        if !text.contains(&call_id) {
            continue;
        }
        let code: u16 = text.get(8..11)?.parse().ok()?;
        if code >= 200 {
            return Some(code);
        }
    }
    None
}
