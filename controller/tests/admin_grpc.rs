//! The gRPC Admin service of a real (in-process) single-node controller: every RPC refuses a
//! missing or wrong token (UNAUTHENTICATED) and a weaker role (PERMISSION_DENIED), invalid input
//! gets INVALID_ARGUMENT naming the field and writes nothing, and valid calls work end to end.

use sipwarden_controller::api::auth::hash_hex;
use sipwarden_controller::config::{ControllerConfig, Token};
use sipwarden_controller::server::Controller;
use sipwarden_proto::v1 as pb;
use sipwarden_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const VIEWER: &str = "grpc-viewer-token";
const OPERATOR: &str = "grpc-operator-token";
const ADMIN: &str = "grpc-admin-token";

async fn start() -> (Controller, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControllerConfig::default();
    cfg.node.data_dir = dir.path().to_path_buf();
    cfg.grpc.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.auth.tokens = [("viewer", VIEWER), ("operator", OPERATOR), ("admin", ADMIN)]
        .iter()
        .map(|(role, t)| Token {
            name: role.to_string(),
            role: role.to_string(),
            sha256: hash_hex(t),
        })
        .collect();
    (Controller::start(cfg).await.unwrap(), dir)
}

fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn ip(v: &str) -> pb::BanTarget {
    pb::BanTarget {
        target: Some(pb::ban_target::Target::Ip(v.into())),
    }
}

fn spec(t: pb::BanTarget) -> pb::BanSpec {
    pb::BanSpec {
        target: Some(t),
        reason: "grpc".into(),
        ..Default::default()
    }
}

/// Calls every RPC with `token` and returns the codes.
async fn codes(c: &mut AdminClient<Channel>, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let code =
        |r: Result<tonic::Response<_>, tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "AddBans",
            code(
                c.add_bans(req(
                    pb::AddBansRequest {
                        bans: vec![spec(ip("192.0.2.1"))],
                    },
                    token,
                ))
                .await
                .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "RemoveBans",
            code(
                c.remove_bans(req(
                    pb::RemoveBansRequest {
                        ids: vec!["b1".into()],
                        targets: vec![],
                    },
                    token,
                ))
                .await
                .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "ListBans",
            code(
                c.list_bans(req(pb::ListBansRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "GetBan",
            code(
                c.get_ban(req(pb::GetBanRequest { id: "b1".into() }, token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "ImportBans",
            code(
                c.import_bans(req(
                    pb::ImportBansRequest {
                        format: "plain".into(),
                        body: b"192.0.2.9".to_vec(),
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "ExportBans",
            code(
                c.export_bans(req(pb::ExportBansRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "ListRegistrations",
            code(
                c.list_registrations(req(pb::ListRegistrationsRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "Audit",
            code(
                c.audit(req(pb::AuditRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "GetClusterStatus",
            code(
                c.get_cluster_status(req(pb::ClusterStatusRequest {}, token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "AddMember",
            code(
                c.add_member(req(
                    pb::AddMemberRequest {
                        id: 9,
                        address: "127.0.0.1:1".into(),
                    },
                    token,
                ))
                .await
                .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            "RemoveMember",
            code(
                c.remove_member(req(pb::RemoveMemberRequest { id: 9 }, token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
    ]
}

async fn revision(c: &mut AdminClient<Channel>) -> u64 {
    c.list_bans(req(pb::ListBansRequest::default(), Some(VIEWER)))
        .await
        .unwrap()
        .into_inner()
        .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_authenticate_authorize_and_validate() {
    let (ctl, _dir) = start().await;
    let mut c = AdminClient::connect(format!("http://{}", ctl.grpc_addr))
        .await
        .unwrap();

    for (rpc, code) in codes(&mut c, None).await {
        assert_eq!(code, Code::Unauthenticated, "{rpc} without a token");
    }
    for (rpc, code) in codes(&mut c, Some("wrong")).await {
        assert_eq!(code, Code::Unauthenticated, "{rpc} with a wrong token");
    }
    let operator_rpcs = ["AddBans", "RemoveBans", "ImportBans"];
    let admin_rpcs = ["AddMember", "RemoveMember"];
    for (rpc, code) in codes(&mut c, Some(VIEWER)).await {
        if operator_rpcs.contains(&rpc) || admin_rpcs.contains(&rpc) {
            assert_eq!(code, Code::PermissionDenied, "{rpc} as viewer");
        }
    }
    for (rpc, code) in codes(&mut c, Some(OPERATOR)).await {
        if admin_rpcs.contains(&rpc) {
            assert_eq!(code, Code::PermissionDenied, "{rpc} as operator");
        }
    }
    // Only the operator's AddBans, RemoveBans (of that ban) and ImportBans above wrote.
    assert_eq!(revision(&mut c).await, 3);

    let cidr = |v: &str| pb::BanTarget {
        target: Some(pb::ban_target::Target::Cidr(v.into())),
    };
    let bad: Vec<(pb::AddBansRequest, &str)> = vec![
        (
            pb::AddBansRequest {
                bans: vec![spec(cidr("10.0.0.1/8"))],
            },
            "bans[0].target.cidr",
        ),
        (
            pb::AddBansRequest {
                bans: vec![spec(ip("1.2.3.4")), spec(ip("nope"))],
            },
            "bans[1].target.ip",
        ),
        (
            pb::AddBansRequest {
                bans: vec![pb::BanSpec {
                    ttl_s: -1,
                    ..spec(ip("1.2.3.4"))
                }],
            },
            "ttl_s",
        ),
        (
            pb::AddBansRequest {
                bans: vec![pb::BanSpec {
                    target: None,
                    ..Default::default()
                }],
            },
            "target",
        ),
        (pb::AddBansRequest { bans: vec![] }, "bans"),
        (
            pb::AddBansRequest {
                bans: vec![pb::BanSpec {
                    source: "robot".into(),
                    ..spec(ip("1.2.3.4"))
                }],
            },
            "source",
        ),
    ];
    for (r, field) in bad {
        let e = c.add_bans(req(r, Some(OPERATOR))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = c
        .import_bans(req(
            pb::ImportBansRequest {
                format: "xml".into(),
                body: vec![],
                ..Default::default()
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("format"));
    let e = c
        .list_bans(req(
            pb::ListBansRequest {
                limit: 20_000,
                ..Default::default()
            },
            Some(VIEWER),
        ))
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("limit"));
    assert_eq!(revision(&mut c).await, 3, "invalid requests wrote nothing");

    // The happy path.
    let added = c
        .add_bans(req(
            pb::AddBansRequest {
                bans: vec![spec(cidr("203.0.113.0/24"))],
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap()
        .into_inner();
    let id = added.bans[0].id.clone();
    let got = c
        .get_ban(req(pb::GetBanRequest { id: id.clone() }, Some(VIEWER)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.reason, "grpc");
    let list = c
        .list_bans(req(
            pb::ListBansRequest {
                r#type: "cidr".into(),
                consistent: true,
                ..Default::default()
            },
            Some(VIEWER),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.bans.len(), 1);
    let export = c
        .export_bans(req(
            pb::ExportBansRequest {
                format: "plain".into(),
            },
            Some(VIEWER),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8(export.body)
        .unwrap()
        .contains("203.0.113.0/24"));
    let removed = c
        .remove_bans(req(
            pb::RemoveBansRequest {
                ids: vec![id.clone()],
                targets: vec![],
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.bans.len(), 1);
    let e = c
        .get_ban(req(pb::GetBanRequest { id }, Some(VIEWER)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let st = c
        .get_cluster_status(req(pb::ClusterStatusRequest {}, Some(VIEWER)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.leader, st.role.as_str()), (1, "Leader"));
    let audit = c
        .audit(req(pb::AuditRequest { limit: 10 }, Some(VIEWER)))
        .await
        .unwrap()
        .into_inner();
    assert!(audit
        .entries
        .iter()
        .any(|a| a.who == "operator" && a.action == "ban.remove"));
}

/// The next event of a watch stream, within 5 s.
async fn next(s: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(std::time::Duration::from_secs(5), s.message())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap()
}

/// The watch stream: an edge with the secret gets a snapshot, then each committed change; without
/// it, UNAUTHENTICATED; reconnecting at its revision, only what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_watch_bans_from_a_snapshot_then_deltas() {
    use sipwarden_proto::v1::edge_control_client::EdgeControlClient;
    use sipwarden_proto::v1::watch_event::Kind;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControllerConfig::default();
    cfg.node.data_dir = dir.path().to_path_buf();
    cfg.grpc.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.edges.secret = "edge-secret-0000001".into();
    cfg.auth.tokens = vec![Token {
        name: "operator".into(),
        role: "operator".into(),
        sha256: hash_hex(OPERATOR),
    }];
    let ctl = Controller::start(cfg).await.unwrap();
    let url = format!("http://{}", ctl.grpc_addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    admin
        .add_bans(req(
            pb::AddBansRequest {
                bans: vec![spec(ip("192.0.2.1"))],
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap();

    let mut edges = EdgeControlClient::connect(url).await.unwrap();
    let hello = |revision| pb::EdgeHello {
        edge_id: "e1".into(),
        site: "s1".into(),
        revision,
        relay: String::new(),
    };
    let e = edges
        .watch(req(hello(0), Some("wrong-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut stream = edges
        .watch(req(hello(0), Some("edge-secret-0000001")))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert!(matches!(&first.kind, Some(Kind::Snapshot(s)) if s.bans.len() == 1));
    admin
        .add_bans(req(
            pb::AddBansRequest {
                bans: vec![spec(ip("192.0.2.2"))],
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap();
    let put = next(&mut stream).await;
    assert!(
        matches!(&put.kind, Some(Kind::BanPut(b)) if b.id == "b2"),
        "{put:?}"
    );
    assert_eq!(put.revision, first.revision + 1);
    drop(stream);

    // Reconnecting at the revision it has: no snapshot, only the change it missed.
    admin
        .remove_bans(req(
            pb::RemoveBansRequest {
                ids: vec!["b1".into()],
                targets: vec![],
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap();
    let mut again = edges
        .watch(req(hello(put.revision), Some("edge-secret-0000001")))
        .await
        .unwrap()
        .into_inner();
    let missed = next(&mut again).await;
    assert!(
        matches!(&missed.kind, Some(Kind::BanRemoved(b)) if b.id == "b1"),
        "{missed:?}"
    );

    // Every edge call needs the secret; bad input is refused naming the field.
    let binding = |source: &str| pb::Binding {
        aor: "sip:1001@pbx.example".into(),
        contact: "sip:1001@10.0.0.5".into(),
        source: source.into(),
        transport: "udp".into(),
        expires_unix_ms: 4_102_444_800_000,
        ..Default::default()
    };
    let put = |source: &str| pb::PutBindingsRequest {
        edge_id: "e1".into(),
        site: "s1".into(),
        put: vec![binding(source)],
        removed: vec![],
    };
    let e = edges
        .put_bindings(req(put("192.0.2.9:5060"), Some("wrong-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = edges
        .put_bindings(req(put("nowhere"), Some("edge-secret-0000001")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("put[0].source"), "{}", e.message());
    edges
        .put_bindings(req(put("192.0.2.9:5060"), Some("edge-secret-0000001")))
        .await
        .unwrap();
    let listed = admin
        .list_registrations(req(pb::ListRegistrationsRequest::default(), Some(OPERATOR)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bindings.len(), 1);
    assert_eq!(
        (
            listed.bindings[0].edge_id.as_str(),
            listed.bindings[0].site.as_str()
        ),
        ("e1", "s1"),
        "the edge's identity is forced onto what it publishes"
    );

    let push = |limit: &str| pb::PushCountersRequest {
        edge_id: "e1".into(),
        site: "s1".into(),
        deltas: vec![pb::CounterDelta {
            limit: limit.into(),
            key: "192.0.2.9".into(),
            window: 1,
            count: 1,
        }],
        limits_version: 0,
    };
    let e = edges
        .push_counters(req(push("x"), Some("wrong-secret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = edges
        .push_counters(req(push("no-such-limit"), Some("edge-secret-0000001")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("deltas[0].limit"),
        "{}",
        e.message()
    );
    let r = edges
        .push_counters(req(
            pb::PushCountersRequest {
                deltas: vec![],
                ..push("x")
            },
            Some("edge-secret-0000001"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.limits_changed && r.limits.is_empty(),
        "no limits configured"
    );
}
