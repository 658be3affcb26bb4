//! `sipwardenctl`: the command line over the controller's REST admin API — bans, registrations,
//! audit and cluster membership, as tables or `--json`. The token comes from `--token` or
//! `SIPWARDEN_TOKEN`, the server from `--server` or `SIPWARDEN_SERVER`.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "sipwardenctl",
    version,
    about = "Manage a sipwarden controller cluster"
)]
struct Cli {
    /// Controller REST address.
    #[arg(
        long,
        env = "SIPWARDEN_SERVER",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    server: String,
    /// Bearer token.
    #[arg(long, env = "SIPWARDEN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bans.
    #[command(subcommand)]
    Ban(BanCmd),
    /// Registrations.
    #[command(subcommand)]
    Reg(RegCmd),
    /// The audit trail, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Debug, Subcommand)]
enum BanCmd {
    /// Ban a target: `ip 192.0.2.7`, `cidr 203.0.113.0/24`, `aor sip:1001@pbx`, `user_agent sipcli`.
    Add {
        #[arg(value_parser = ["ip", "cidr", "aor", "user_agent"])]
        kind: String,
        value: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Seconds; permanent when absent.
        #[arg(long)]
        ttl: Option<i64>,
        #[arg(long)]
        site: Option<String>,
    },
    /// Remove bans by id, or by target with `--target kind:value`.
    Rm {
        ids: Vec<String>,
        #[arg(long)]
        target: Vec<String>,
    },
    /// List bans.
    List {
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        contains: Option<String>,
        #[arg(long)]
        source: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow pages to the end.
        #[arg(long)]
        all: bool,
        /// Linearizable read.
        #[arg(long)]
        consistent: bool,
    },
    /// One ban.
    Get { id: String },
    /// Import bans from a file (`-` for stdin).
    Import {
        file: String,
        #[arg(long, default_value = "plain", value_parser = ["json", "plain", "apiban"])]
        format: String,
        #[arg(long)]
        ttl: Option<i64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Export every ban.
    Export {
        #[arg(long, default_value = "json", value_parser = ["json", "plain", "apiban"])]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum RegCmd {
    List {
        #[arg(long)]
        contains: Option<String>,
    },
    Get {
        aor: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    Status,
    /// Add a controller: `cluster add 4 10.0.0.4:7400`.
    Add {
        id: u64,
        address: String,
    },
    Remove {
        id: u64,
    },
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// Percent-encodes a query or path value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}"))
            .unwrap_or_default();
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.unwrap_or_default()),
        }
        .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        if status >= 400 {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {msg}");
        }
        Ok(text)
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let text = self.call(method, path, body.map(|b| b.to_string()))?;
        serde_json::from_str(&text).context("the server's answer is not JSON")
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ban_rows(bans: &[Value]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "ID".into(),
        "TARGET".into(),
        "SOURCE".into(),
        "EXPIRES (unix ms)".into(),
        "BY".into(),
        "REASON".into(),
    ]];
    for b in bans {
        let source = match (b["source"]["kind"].as_str(), b["source"]["name"].as_str()) {
            (Some(k), Some(n)) => format!("{k}:{n}"),
            (Some(k), None) => k.to_string(),
            _ => "-".into(),
        };
        rows.push(vec![
            s(&b["id"]),
            format!("{}:{}", s(&b["target"]["type"]), s(&b["target"]["value"])),
            source,
            s(&b["expires_unix_ms"]),
            s(&b["created_by"]),
            s(&b["reason"]),
        ]);
    }
    rows
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |v| v.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("sipwardenctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let c = Client {
        agent,
        base: cli.server.clone(),
        token: cli.token.clone(),
    };
    let out = |v: &Value, table: &dyn Fn(&Value)| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v);
        }
    };
    match cli.cmd {
        Cmd::Ban(BanCmd::Add {
            kind,
            value,
            reason,
            ttl,
            site,
        }) => {
            let mut body = json!({"target": {"type": kind, "value": value}, "reason": reason});
            if let Some(t) = ttl {
                body["ttl_s"] = json!(t);
            }
            if let Some(site) = site {
                body["site"] = json!(site);
            }
            let v = c.json("POST", "/api/v1/bans", Some(body))?;
            out(&v, &|v| print_table(&ban_rows(std::slice::from_ref(v))));
        }
        Cmd::Ban(BanCmd::Rm { ids, target }) => {
            let mut targets = Vec::new();
            for t in &target {
                let (k, v) = t
                    .split_once(':')
                    .context("--target is kind:value, e.g. ip:192.0.2.7")?;
                targets.push(json!({"type": k, "value": v}));
            }
            if ids.is_empty() && targets.is_empty() {
                bail!("give ban ids or --target kind:value");
            }
            let v = c.json(
                "POST",
                "/api/v1/bans:remove",
                Some(json!({"ids": ids, "targets": targets})),
            )?;
            out(&v, &|v| {
                let n = v["bans"].as_array().map_or(0, Vec::len);
                println!("removed {n} ban(s)");
            });
        }
        Cmd::Ban(BanCmd::List {
            kind,
            contains,
            source,
            limit,
            all,
            consistent,
        }) => {
            let mut q = format!("limit={limit}&consistent={consistent}");
            for (k, v) in [("type", kind), ("contains", contains), ("source", source)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", enc(&v)));
                }
            }
            let mut bans: Vec<Value> = Vec::new();
            let mut page: Option<String> = None;
            loop {
                let path = match &page {
                    Some(p) => format!("/api/v1/bans?{q}&page_token={}", enc(p)),
                    None => format!("/api/v1/bans?{q}"),
                };
                let v = c.json("GET", &path, None)?;
                bans.extend(v["bans"].as_array().cloned().unwrap_or_default());
                page = v["next_page_token"].as_str().map(str::to_string);
                if !all || page.is_none() {
                    break;
                }
            }
            let v = json!({"bans": bans});
            out(&v, &|v| {
                print_table(&ban_rows(v["bans"].as_array().map_or(&[], |a| a)))
            });
        }
        Cmd::Ban(BanCmd::Get { id }) => {
            let v = c.json("GET", &format!("/api/v1/bans/{}", enc(&id)), None)?;
            out(&v, &|v| print_table(&ban_rows(std::slice::from_ref(v))));
        }
        Cmd::Ban(BanCmd::Import {
            file,
            format,
            ttl,
            reason,
        }) => {
            let body = if file == "-" {
                let mut b = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut b)?;
                b
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let mut q = format!("format={format}");
            if let Some(t) = ttl {
                q.push_str(&format!("&ttl_s={t}"));
            }
            if let Some(r) = reason {
                q.push_str(&format!("&reason={}", enc(&r)));
            }
            let text = c.call("POST", &format!("/api/v1/bans:import?{q}"), Some(body))?;
            let v: Value = serde_json::from_str(&text)?;
            out(&v, &|v| println!("imported {}", s(&v["imported"])));
        }
        Cmd::Ban(BanCmd::Export { format }) => {
            print!(
                "{}",
                c.call("GET", &format!("/api/v1/bans:export?format={format}"), None)?
            );
        }
        Cmd::Reg(RegCmd::List { contains }) => {
            let path = match contains {
                Some(x) => format!("/api/v1/registrations?contains={}", enc(&x)),
                None => "/api/v1/registrations".into(),
            };
            let v = c.json("GET", &path, None)?;
            out(&v, &|v| print_bindings(v));
        }
        Cmd::Reg(RegCmd::Get { aor }) => {
            let v = c.json("GET", &format!("/api/v1/registrations/{}", enc(&aor)), None)?;
            out(&v, &|v| print_bindings(v));
        }
        Cmd::Audit { limit } => {
            let v = c.json("GET", &format!("/api/v1/audit?limit={limit}"), None)?;
            out(&v, &|v| {
                let mut rows = vec![vec![
                    "REV".into(),
                    "AT (unix ms)".into(),
                    "WHO".into(),
                    "ACTION".into(),
                    "DETAIL".into(),
                ]];
                for a in v.as_array().map_or(&[][..], |a| a) {
                    rows.push(vec![
                        s(&a["revision"]),
                        s(&a["at_unix_ms"]),
                        s(&a["who"]),
                        s(&a["action"]),
                        s(&a["detail"]),
                    ]);
                }
                print_table(&rows);
            });
        }
        Cmd::Cluster(cmd) => {
            let v = match cmd {
                ClusterCmd::Status => c.json("GET", "/api/v1/cluster", None)?,
                ClusterCmd::Add { id, address } => c.json(
                    "POST",
                    "/api/v1/cluster/members",
                    Some(json!({"id": id, "address": address})),
                )?,
                ClusterCmd::Remove { id } => {
                    c.json("DELETE", &format!("/api/v1/cluster/members/{id}"), None)?
                }
            };
            out(&v, &|v| {
                let rows = vec![
                    vec!["NODE".into(), s(&v["id"])],
                    vec!["ROLE".into(), s(&v["role"])],
                    vec!["LEADER".into(), s(&v["leader"])],
                    vec!["TERM".into(), s(&v["term"])],
                    vec!["COMMIT".into(), s(&v["commit"])],
                    vec!["APPLIED".into(), s(&v["applied"])],
                    vec!["VOTERS".into(), s(&v["voters"])],
                ];
                print_table(&rows);
            });
        }
    }
    Ok(())
}

fn print_bindings(v: &Value) {
    let mut rows = vec![vec![
        "AOR".into(),
        "CONTACT".into(),
        "SOURCE".into(),
        "TRANSPORT".into(),
        "EDGE".into(),
        "SITE".into(),
        "EXPIRES (unix ms)".into(),
        "USER-AGENT".into(),
    ]];
    for b in v.as_array().map_or(&[][..], |a| a) {
        rows.push(vec![
            s(&b["aor"]),
            s(&b["contact"]),
            s(&b["source"]),
            s(&b["transport"]),
            s(&b["edge_id"]),
            s(&b["site"]),
            s(&b["expires_unix_ms"]),
            s(&b["user_agent"]),
        ]);
    }
    print_table(&rows);
}
