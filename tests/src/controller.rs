//! `sipwarden-controller` processes on loopback: config written per node, readiness by `/readyz`,
//! the REST API with the test tokens, SIGKILL and restart on the same data directory.

use crate::{free_port, http_request, wait_until, workspace_bin, Proc};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Tokens every test cluster accepts.
pub const VIEWER: &str = "viewer-token-0001";
pub const OPERATOR: &str = "operator-token-0001";
pub const ADMIN: &str = "admin-token-0001";
const SECRET: &str = "cluster-peer-secret-0001";
/// The secret edges present to the test controllers.
pub const EDGE_SECRET: &str = "edge-secret-for-tests-0001";

fn sha(t: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(t.as_bytes()))
}

/// One controller process.
pub struct ControllerProc {
    pub id: u64,
    pub proc: Option<Proc>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

/// A node's place in a cluster: id and addresses, chosen before anything starts.
#[derive(Clone)]
pub struct Seat {
    pub id: u64,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Seat {
    pub fn new(id: u64) -> Seat {
        let ip = "127.0.0.1";
        Seat {
            id,
            grpc: format!("{ip}:{}", free_port(ip)).parse().expect("addr"),
            http: format!("{ip}:{}", free_port(ip)).parse().expect("addr"),
        }
    }

    pub fn peer(&self) -> String {
        format!("{}={}", self.id, self.grpc)
    }
}

impl ControllerProc {
    /// Writes the config of `seat` in `root/n<id>` (members `peers`, `join` for a late member)
    /// and starts it.
    pub fn start(
        root: &Path,
        seat: &Seat,
        peers: &[Seat],
        join: bool,
        snapshot_every: u64,
    ) -> ControllerProc {
        Self::start_with(root, seat, peers, join, snapshot_every, "")
    }

    /// As [`ControllerProc::start`], with `extra` TOML appended (`[counters]`, …).
    pub fn start_with(
        root: &Path,
        seat: &Seat,
        peers: &[Seat],
        join: bool,
        snapshot_every: u64,
        extra: &str,
    ) -> ControllerProc {
        Self::start_env(root, seat, peers, join, snapshot_every, extra, &[])
    }

    /// As [`ControllerProc::start_with`], with variables in the process environment.
    pub fn start_env(
        root: &Path,
        seat: &Seat,
        peers: &[Seat],
        join: bool,
        snapshot_every: u64,
        extra: &str,
        env: &[(&str, &str)],
    ) -> ControllerProc {
        let dir = root.join(format!("n{}", seat.id));
        std::fs::create_dir_all(&dir).expect("dir");
        let peers: Vec<String> = peers.iter().map(|p| format!("\"{}\"", p.peer())).collect();
        let toml = format!(
            r#"[node]
id = {id}
data_dir = "{data}"

[cluster]
peers = [{peers}]
join = {join}
peer_secret = "{SECRET}"
tick_ms = 50
election_ticks = 10
heartbeat_ticks = 2
snapshot_every = {snapshot_every}

[grpc]
listen = "{grpc}"

[edges]
secret = "{EDGE_SECRET}"

[http]
listen = "{http}"

[[auth.tokens]]
name = "viewer"
role = "viewer"
sha256 = "{v}"

[[auth.tokens]]
name = "operator"
role = "operator"
sha256 = "{o}"

[[auth.tokens]]
name = "admin"
role = "admin"
sha256 = "{a}"

{extra}
"#,
            id = seat.id,
            data = dir.join("data").display(),
            peers = peers.join(", "),
            grpc = seat.grpc,
            http = seat.http,
            v = sha(VIEWER),
            o = sha(OPERATOR),
            a = sha(ADMIN),
        );
        std::fs::write(dir.join("controller.toml"), toml).expect("config");
        let mut c = ControllerProc {
            id: seat.id,
            proc: None,
            grpc: seat.grpc,
            http: seat.http,
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.spawn();
        c
    }

    /// A single-node cluster (id 1) in `root/n1`.
    pub fn single(root: &Path) -> ControllerProc {
        let seat = Seat::new(1);
        ControllerProc::start(root, &seat, std::slice::from_ref(&seat), false, 10_000)
    }

    /// Runs `sipwardenctl args` against this node's REST API with `token`.
    pub fn ctl(&self, token: &str, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("sipwardenctl"))
            .args(["--server", &format!("http://{}", self.http)])
            .args(args)
            .env("SIPWARDEN_TOKEN", token)
            .output()
            .expect("run sipwardenctl")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller.log"))
            .expect("log");
        self.proc = Some(Proc::spawn(
            "sipwarden-controller",
            Command::new(workspace_bin("sipwarden-controller"))
                .arg("--config")
                .arg(self.dir.join("controller.toml"))
                .env("RUST_LOG", "info")
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(log.try_clone().expect("dup"))
                .stderr(log),
        ));
        let http = self.http;
        assert!(
            wait_until(Duration::from_secs(15), || http_request(
                http, "GET", "/healthz", None, None
            )
            .is_some_and(|(s, _)| s == 200)),
            "controller {} did not start; log:\n{}",
            self.id,
            self.log()
        );
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal("KILL");
            drop(p);
        }
    }

    /// Starts again on the same config and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Option<(u16, String)> {
        http_request(self.http, method, path, token, body)
    }

    /// `GET /api/v1/cluster` as JSON.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (s, b) = self.request("GET", "/api/v1/cluster", Some(VIEWER), None)?;
        (s == 200).then(|| serde_json::from_str(&b).ok()).flatten()
    }

    /// Every registration this node holds, as `sipwardenctl reg list --json` prints them.
    pub fn registrations(&self) -> Vec<serde_json::Value> {
        let out = self.ctl(VIEWER, &["--json", "reg", "list"]);
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Every ban this node holds (a linearizable read when `consistent`).
    pub fn bans(&self, consistent: bool) -> Option<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..100 {
            let mut path = format!("/api/v1/bans?limit=10000&consistent={consistent}");
            if let Some(t) = &token {
                path.push_str(&format!("&page_token={t}"));
            }
            let (s, b) = self.request("GET", &path, Some(VIEWER), None)?;
            if s != 200 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            out.extend(v["bans"].as_array()?.iter().cloned());
            match v["next_page_token"].as_str() {
                Some(t) => token = Some(t.to_string()),
                None => return Some(out),
            }
        }
        None
    }
}

/// `n` controllers (ids 1..=n) in `root`, each with `extra` TOML, once they agree on a leader.
pub fn cluster(root: &Path, n: u64, extra: &str) -> (Vec<Seat>, Vec<ControllerProc>) {
    cluster_env(root, n, extra, &[])
}

/// As [`cluster`], with variables in each controller's environment.
pub fn cluster_env(
    root: &Path,
    n: u64,
    extra: &str,
    env: &[(&str, &str)],
) -> (Vec<Seat>, Vec<ControllerProc>) {
    let seats: Vec<Seat> = (1..=n).map(Seat::new).collect();
    let ctls: Vec<ControllerProc> = seats
        .iter()
        .map(|s| ControllerProc::start_env(root, s, &seats, false, 10_000, extra, env))
        .collect();
    let refs: Vec<&ControllerProc> = ctls.iter().collect();
    agreed_leader(&refs, Duration::from_secs(15)).expect("a leader");
    (seats, ctls)
}

/// The `[controller]` TOML of an edge using every seat's gRPC address.
pub fn edge_link(seats: &[Seat]) -> String {
    let endpoints: Vec<String> = seats.iter().map(|s| format!("\"{}\"", s.grpc)).collect();
    format!(
        "[controller]\nendpoints = [{}]\nsecret = \"{EDGE_SECRET}\"\nreconnect_max_ms = 500\n",
        endpoints.join(", ")
    )
}

/// The leader all `nodes` report, within `limit` — one of `nodes` (not a killed node they still
/// remember).
pub fn agreed_leader(nodes: &[&ControllerProc], limit: Duration) -> Option<u64> {
    let mut leader = None;
    wait_until(limit, || {
        let ls: Vec<u64> = nodes
            .iter()
            .filter_map(|n| n.status()?["leader"].as_u64())
            .collect();
        let ok = ls.len() == nodes.len()
            && ls[0] != 0
            && ls.iter().all(|l| *l == ls[0])
            && nodes.iter().any(|n| n.id == ls[0]);
        if ok {
            leader = Some(ls[0]);
        }
        ok
    });
    leader
}
