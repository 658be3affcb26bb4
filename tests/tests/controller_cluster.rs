//! Real `sipwarden-controller` processes on loopback: a 3-node cluster takes 1,000 bans through
//! REST while its leader is SIGKILLed; every acknowledged ban survives on every node and the killed
//! node catches up; members are added and removed at run time and a late joiner gets a snapshot;
//! every endpoint refuses missing tokens, wrong roles and bad input without writing anything.

use sipwarden_tests::controller::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn cluster(
    root: &std::path::Path,
    n: u64,
    snapshot_every: u64,
) -> (Vec<Seat>, Vec<ControllerProc>) {
    let seats: Vec<Seat> = (1..=n).map(Seat::new).collect();
    let procs = seats
        .iter()
        .map(|s| ControllerProc::start(root, s, &seats, false, snapshot_every))
        .collect();
    (seats, procs)
}

fn ip(i: u32) -> String {
    std::net::Ipv4Addr::from(0x0A00_0000 + i).to_string()
}

/// Writes bans `range` to `node` with `sipwardenctl ban import` (a plain list); the targets
/// acknowledged (exit status 0).
fn write_cli(node: &ControllerProc, range: std::ops::Range<u32>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("list.txt");
    let list: Vec<String> = range.clone().map(ip).collect();
    std::fs::write(&file, list.join("\n")).unwrap();
    let file = file.display().to_string();
    let out = node.ctl(
        OPERATOR,
        &[
            "ban", "import", &file, "--format", "plain", "--ttl", "86400",
        ],
    );
    if out.status.success() {
        list
    } else {
        Vec::new()
    }
}

/// Posts bans `range` (single requests when `single`, else one bulk request) to `node`; the
/// targets acknowledged with 201.
fn write(node: &ControllerProc, range: std::ops::Range<u32>, single: bool) -> Vec<String> {
    if single {
        let mut acked = Vec::new();
        for i in range {
            let body = format!(
                r#"{{"target":{{"type":"ip","value":"{}"}},"reason":"load {i}"}}"#,
                ip(i)
            );
            if node
                .request("POST", "/api/v1/bans", Some(OPERATOR), Some(&body))
                .is_some_and(|(s, _)| s == 201)
            {
                acked.push(ip(i));
            }
        }
        return acked;
    }
    let bans: Vec<String> = range
        .clone()
        .map(|i| {
            format!(
                r#"{{"target":{{"type":"ip","value":"{}"}},"reason":"bulk {i}","ttl_s":86400}}"#,
                ip(i)
            )
        })
        .collect();
    let body = format!(r#"{{"bans":[{}]}}"#, bans.join(","));
    match node.request("POST", "/api/v1/bans:bulk", Some(OPERATOR), Some(&body)) {
        Some((201, _)) => range.map(ip).collect(),
        _ => Vec::new(),
    }
}

fn targets(node: &ControllerProc) -> HashSet<String> {
    node.bans(true)
        .unwrap_or_default()
        .iter()
        .filter_map(|b| b["target"]["value"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_leader_killed_mid_write_loses_no_acknowledged_ban() {
    let root = tempfile::tempdir().unwrap();
    let (_seats, mut nodes) = cluster(root.path(), 3, 200);
    let refs: Vec<&ControllerProc> = nodes.iter().collect();
    let leader = agreed_leader(&refs, Duration::from_secs(15)).expect("a leader");
    let li = (leader - 1) as usize;
    let follower = (li + 1) % 3;

    // 1,000 bans: REST bulk batches of 100, single REST requests and `sipwardenctl ban import`,
    // to the leader and to a follower.
    let mut acked: Vec<String> = Vec::new();
    acked.extend(write(&nodes[li], 0..100, false));
    acked.extend(write(&nodes[follower], 100..200, false));
    acked.extend(write(&nodes[follower], 200..300, true));
    assert_eq!(
        acked.len(),
        300,
        "all writes before the kill are acknowledged"
    );

    // Kill the leader while a writer is busy on a follower.
    let writer_node = nodes.remove(follower);
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for batch in 3..10u32 {
            let range = batch * 100..(batch + 1) * 100;
            let t0 = Instant::now();
            // Retry a batch that fails while the cluster elects a new leader (bounded).
            loop {
                let got = match batch % 3 {
                    0 => write(&writer_node, range.clone(), true),
                    1 => write_cli(&writer_node, range.clone()),
                    _ => write(&writer_node, range.clone(), false),
                };
                let whole = got.len() == 100;
                acked.extend(got);
                if whole || t0.elapsed() > Duration::from_secs(20) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        (writer_node, acked)
    });
    std::thread::sleep(Duration::from_millis(150));
    let killed_at = Instant::now();
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    nodes[li].kill();
    let (writer_node, more) = writer.join().unwrap();
    acked.extend(more);
    nodes.insert(follower.min(nodes.len()), writer_node);
    nodes.sort_by_key(|n| n.id);
    let survivors: Vec<&ControllerProc> = nodes.iter().filter(|n| n.id != leader).collect();
    let new_leader = agreed_leader(&survivors, Duration::from_secs(15)).expect("a new leader");
    println!(
        "new leader {new_leader} after the kill of {leader}; {} bans acknowledged in {:?}",
        acked.len(),
        killed_at.elapsed()
    );
    assert_ne!(new_leader, leader);
    let acked: HashSet<String> = acked.into_iter().collect();
    assert!(
        acked.len() >= 900,
        "most writes succeed across the failover: {}",
        acked.len()
    );
    for n in &survivors {
        let have = targets(n);
        let lost: Vec<&String> = acked.iter().filter(|t| !have.contains(*t)).collect();
        assert!(
            lost.is_empty(),
            "node {} lost {} acknowledged bans",
            n.id,
            lost.len()
        );
    }

    // The killed node comes back and catches up (from its log or a snapshot).
    let want = targets(survivors[0]).len();
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    nodes[li].restart();
    assert!(
        sipwarden_tests::wait_until(Duration::from_secs(20), || nodes[li]
            .bans(false)
            .is_some_and(|b| b.len() == want)),
        "the restarted node caught up"
    );
}

#[test]
fn members_join_and_leave_and_a_late_joiner_gets_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let (seats, nodes) = cluster(root.path(), 3, 50);
    let refs: Vec<&ControllerProc> = nodes.iter().collect();
    let leader = agreed_leader(&refs, Duration::from_secs(15)).expect("a leader");
    let l = &nodes[(leader - 1) as usize];
    let members = l.status().unwrap()["addresses"].as_array().unwrap().len();
    assert_eq!(members, 3, "status lists every member's address");
    for b in 0..2 {
        assert_eq!(write(l, b * 100..(b + 1) * 100, false).len(), 100);
    }
    // Single writes: one log entry each, enough for a snapshot every 50 entries.
    assert_eq!(write(l, 200..300, true).len(), 100);
    let snap = l.status().unwrap()["snapshot_index"].as_u64().unwrap();
    assert!(snap > 0, "the log was compacted");

    let seat4 = Seat::new(4);
    let mut all = seats.clone();
    all.push(seat4.clone());
    let n4 = ControllerProc::start(root.path(), &seat4, &all, true, 50);
    let body = format!(r#"{{"id":4,"address":"{}"}}"#, seat4.grpc);
    let (s, b) = l
        .request("POST", "/api/v1/cluster/members", Some(ADMIN), Some(&body))
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(
        sipwarden_tests::wait_until(Duration::from_secs(20), || n4
            .bans(false)
            .is_some_and(|b| b.len() == 300)),
        "the new member caught up; its log:\n{}\nleader log:\n{}",
        n4.log(),
        l.log()
    );
    let st = n4.status().unwrap();
    assert!(
        st["snapshot_index"].as_u64().unwrap() > 0,
        "it was sent a snapshot: {st}"
    );
    assert_eq!(st["voters"].as_array().unwrap().len(), 4);

    let (s, b) = l
        .request("DELETE", "/api/v1/cluster/members/4", Some(ADMIN), None)
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let voters = l.status().unwrap()["voters"].as_array().unwrap().len();
    assert_eq!(voters, 3);
    assert_eq!(
        write(l, 300..310, false).len(),
        10,
        "the three still commit"
    );
}

#[test]
fn every_endpoint_refuses_bad_tokens_roles_and_input_writing_nothing() {
    let root = tempfile::tempdir().unwrap();
    let n = ControllerProc::single(root.path());
    agreed_leader(&[&n], Duration::from_secs(10)).expect("leader");
    let ok_ban = r#"{"target":{"type":"ip","value":"192.0.2.1"},"reason":"x"}"#;
    let revision = |n: &ControllerProc| {
        let (_, b) = n
            .request("GET", "/api/v1/bans", Some(VIEWER), None)
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["revision"]
            .as_u64()
            .unwrap()
    };
    let routes: &[(&str, &str, Option<&str>, &str)] = &[
        ("GET", "/api/v1/bans", None, "viewer"),
        ("POST", "/api/v1/bans", Some(ok_ban), "operator"),
        (
            "POST",
            "/api/v1/bans:bulk",
            Some(r#"{"bans":[]}"#),
            "operator",
        ),
        (
            "POST",
            "/api/v1/bans:remove",
            Some(r#"{"ids":["b1"]}"#),
            "operator",
        ),
        ("GET", "/api/v1/bans/b1", None, "viewer"),
        ("DELETE", "/api/v1/bans/b1", None, "operator"),
        ("GET", "/api/v1/cluster", None, "viewer"),
        (
            "POST",
            "/api/v1/cluster/members",
            Some(r#"{"id":9,"address":"127.0.0.1:1"}"#),
            "admin",
        ),
        ("DELETE", "/api/v1/cluster/members/9", None, "admin"),
        ("GET", "/api/v1/audit", None, "viewer"),
    ];
    for (method, path, body, need) in routes {
        let (s, b) = n.request(method, path, None, *body).unwrap();
        assert_eq!(s, 401, "{method} {path} without a token: {b}");
        let (s, _) = n.request(method, path, Some("not-a-token"), *body).unwrap();
        assert_eq!(s, 401, "{method} {path} with a wrong token");
        let weaker = match *need {
            "operator" => Some(VIEWER),
            "admin" => Some(OPERATOR),
            _ => None,
        };
        if let Some(t) = weaker {
            let (s, b) = n.request(method, path, Some(t), *body).unwrap();
            assert_eq!(s, 403, "{method} {path} with a weaker role: {b}");
        }
    }
    assert_eq!(revision(&n), 0, "nothing was written by refused requests");

    let bad: &[(&str, &str, &str, &str)] = &[
        (
            "POST",
            "/api/v1/bans",
            r#"{"target":{"type":"cidr","value":"10.0.0.1/8"}}"#,
            "target.cidr",
        ),
        (
            "POST",
            "/api/v1/bans",
            r#"{"target":{"type":"ip","value":"10.0.0.300"}}"#,
            "target.ip",
        ),
        (
            "POST",
            "/api/v1/bans",
            r#"{"target":{"type":"ip","value":"10.0.0.3"},"ttl_s":-5}"#,
            "ttl_s",
        ),
        (
            "POST",
            "/api/v1/bans",
            r#"{"target":{"type":"ip","value":"10.0.0.3"},"colour":"red"}"#,
            "colour",
        ),
        (
            "POST",
            "/api/v1/bans",
            r#"{"target":{"type":"mac","value":"x"}}"#,
            "target.type",
        ),
        ("POST", "/api/v1/bans", r#"not json"#, "request body"),
        (
            "POST",
            "/api/v1/bans:bulk",
            r#"{"bans":[{"target":{"type":"ip","value":"10.0.0.4"}},{"target":{"type":"aor","value":"1001"}}]}"#,
            "bans[1].target.aor",
        ),
        ("POST", "/api/v1/bans:remove", r#"{}"#, "ids or targets"),
        ("GET", "/api/v1/bans?limit=0", "", "limit"),
        ("GET", "/api/v1/bans?type=mac", "", "type"),
        (
            "POST",
            "/api/v1/cluster/members",
            r#"{"id":0,"address":"127.0.0.1:1"}"#,
            "id",
        ),
        (
            "POST",
            "/api/v1/cluster/members",
            r#"{"id":5,"address":"nowhere"}"#,
            "address",
        ),
    ];
    for (method, path, body, field) in bad {
        let body = (!body.is_empty()).then_some(*body);
        let (s, b) = n.request(method, path, Some(ADMIN), body).unwrap();
        assert_eq!(s, 400, "{method} {path} {body:?}: {b}");
        assert!(
            b.contains(field),
            "{method} {path}: the message names {field}: {b}"
        );
    }
    assert_eq!(revision(&n), 0, "nothing was written by invalid requests");
    let (s, _) = n
        .request("GET", "/api/v1/bans/b77", Some(VIEWER), None)
        .unwrap();
    assert_eq!(s, 404);
    let (s, _) = n
        .request("DELETE", "/api/v1/bans/b77", Some(OPERATOR), None)
        .unwrap();
    assert_eq!(s, 404);
    let (s, b) = n
        .request("POST", "/api/v1/bans", Some(OPERATOR), Some(ok_ban))
        .unwrap();
    assert_eq!(s, 201, "{b}");
    assert_eq!(revision(&n), 1);
    let (_, audit) = n
        .request("GET", "/api/v1/audit", Some(VIEWER), None)
        .unwrap();
    assert!(audit.contains(r#""who":"operator""#), "{audit}");
}

/// `sipwardenctl` against a real controller: add, list (table and JSON), get, remove, audit,
/// cluster status; a wrong token fails with the server's message.
#[test]
fn sipwardenctl_drives_the_api() {
    let root = tempfile::tempdir().unwrap();
    let n = ControllerProc::single(root.path());
    let ctl = |token: &str, args: &[&str]| {
        let out = n.ctl(token, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = ctl(
        OPERATOR,
        &[
            "ban",
            "add",
            "cidr",
            "203.0.113.0/24",
            "--reason",
            "scanner net",
            "--ttl",
            "3600",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("cidr:203.0.113.0/24") && out.contains("scanner net"),
        "{out}"
    );
    let (ok, out, _) = ctl(VIEWER, &["--json", "ban", "list", "--all", "--consistent"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bans"].as_array().unwrap().len(), 1);
    let id = v["bans"][0]["id"].as_str().unwrap().to_string();
    let (ok, out, _) = ctl(VIEWER, &["ban", "get", &id]);
    assert!(ok && out.contains(&id), "{out}");
    let (ok, _, err) = ctl(VIEWER, &["ban", "rm", &id]);
    assert!(!ok && err.contains("403"), "a viewer cannot remove: {err}");
    let (ok, out, _) = ctl(OPERATOR, &["ban", "rm", &id]);
    assert!(ok && out.contains("removed 1"), "{out}");
    let (ok, out, _) = ctl(VIEWER, &["audit", "--limit", "5"]);
    assert!(
        ok && out.contains("ban.remove") && out.contains("operator"),
        "{out}"
    );
    let (ok, out, _) = ctl(VIEWER, &["cluster", "status"]);
    assert!(ok && out.contains("Leader"), "{out}");
    let (ok, _, err) = ctl("wrong", &["ban", "list"]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, _, err) = ctl(OPERATOR, &["ban", "add", "ip", "10.0.0.300"]);
    assert!(!ok && err.contains("target.ip"), "{err}");
}
