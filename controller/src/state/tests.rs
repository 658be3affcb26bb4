use super::*;

const T0: u64 = 1_800_000_000_000;

fn cmd(at: u64, op: Op) -> Command {
    Command {
        at_unix_ms: at,
        who: "alice".into(),
        op,
    }
}

fn ip_ban(ip: &str, expires: Option<u64>) -> NewBan {
    NewBan {
        target: BanTarget::parse("ip", ip).unwrap(),
        reason: "test".into(),
        source: BanSource::Manual,
        expires_unix_ms: expires,
        site: None,
    }
}

fn binding(aor: &str, contact: &str, expires: u64) -> Binding {
    Binding {
        aor: aor.into(),
        contact: contact.into(),
        source: "192.0.2.1:5060".into(),
        transport: "udp".into(),
        edge_id: "e1".into(),
        flow_token: "sw1x".into(),
        expires_unix_ms: expires,
        user_agent: "ua".into(),
        site: "s1".into(),
    }
}

#[test]
fn bans_get_ids_and_a_target_is_banned_once() {
    let mut s = StateMachine::new();
    let a = s.apply(&cmd(
        T0,
        Op::AddBans(vec![ip_ban("192.0.2.1", None), ip_ban("192.0.2.2", None)]),
    ));
    let Applied::Bans(b) = a else { panic!() };
    assert_eq!((b[0].id.as_str(), b[1].id.as_str()), ("b1", "b2"));
    assert_eq!(s.revision(), 1);
    // Banning again updates in place: same id, new expiry.
    let Applied::Bans(again) = s.apply(&cmd(
        T0 + 5,
        Op::AddBans(vec![ip_ban("192.0.2.1", Some(T0 + 1000))]),
    )) else {
        panic!()
    };
    assert_eq!(again[0].id, "b1");
    assert_eq!(again[0].created_unix_ms, T0, "creation time kept");
    assert_eq!(s.bans().count(), 2);
    assert_eq!(s.revision(), 2);
}

#[test]
fn removal_by_id_and_target_and_nothing_matched() {
    let mut s = StateMachine::new();
    s.apply(&cmd(
        T0,
        Op::AddBans(vec![ip_ban("192.0.2.1", None), ip_ban("192.0.2.2", None)]),
    ));
    let target = BanTarget::parse("ip", "192.0.2.2").unwrap();
    let Applied::Removed(r) = s.apply(&cmd(
        T0,
        Op::RemoveBans(vec![
            BanSelector::Id("b1".into()),
            BanSelector::Target(target),
        ]),
    )) else {
        panic!()
    };
    assert_eq!(r.len(), 2);
    assert_eq!(s.bans().count(), 0);
    let rev = s.revision();
    let Applied::Removed(none) =
        s.apply(&cmd(T0, Op::RemoveBans(vec![BanSelector::Id("b9".into())])))
    else {
        panic!()
    };
    assert!(none.is_empty());
    assert_eq!(s.revision(), rev, "no change, no revision");
}

#[test]
fn expiry_uses_the_commands_time_only() {
    let mut s = StateMachine::new();
    s.apply(&cmd(
        T0,
        Op::AddBans(vec![
            ip_ban("192.0.2.1", Some(T0 + 100)),
            ip_ban("192.0.2.2", None),
        ]),
    ));
    s.apply(&cmd(
        T0,
        Op::PutBindings(vec![binding("sip:1@p", "<sip:1@h>", T0 + 50)]),
    ));
    assert_eq!(s.next_expiry(), Some(T0 + 50));
    assert_eq!(
        s.apply(&cmd(T0 + 49, Op::Expire)),
        Applied::Expired {
            bans: 0,
            bindings: 0
        }
    );
    assert_eq!(
        s.apply(&cmd(T0 + 100, Op::Expire)),
        Applied::Expired {
            bans: 1,
            bindings: 1
        }
    );
    assert_eq!(s.bans().count(), 1);
    assert_eq!(s.next_expiry(), None);
}

#[test]
fn bindings_policies_and_audit() {
    let mut s = StateMachine::new();
    s.apply(&cmd(
        T0,
        Op::PutBindings(vec![
            binding("sip:1@p", "<sip:1@a>", T0 + 9),
            binding("sip:1@p", "<sip:1@b>", T0 + 9),
        ]),
    ));
    assert_eq!(s.bindings_of("sip:1@p").len(), 2);
    s.apply(&cmd(
        T0,
        Op::RemoveBindings(vec![("sip:1@p".into(), "<sip:1@a>".into())]),
    ));
    assert_eq!(s.bindings_of("sip:1@p").len(), 1);
    assert_eq!(
        s.apply(&cmd(
            T0,
            Op::PutPolicy {
                name: "default".into(),
                body: "x".into()
            }
        )),
        Applied::Policy {
            name: "default".into(),
            version: 1
        }
    );
    assert_eq!(
        s.apply(&cmd(
            T0,
            Op::PutPolicy {
                name: "default".into(),
                body: "y".into()
            }
        )),
        Applied::Policy {
            name: "default".into(),
            version: 2
        }
    );
    assert_eq!(s.policy("default").unwrap().body, "y");
    s.apply(&cmd(
        T0,
        Op::Note {
            action: "member.add".into(),
            detail: "node 4".into(),
        },
    ));
    let audit: Vec<&str> = s.audit().map(|a| a.action.as_str()).collect();
    // Registrations change with every refresh: they are listed, not audited.
    assert_eq!(audit, ["policy.put", "policy.put", "member.add"]);
    assert!(s.audit().all(|a| a.who == "alice"));
    assert_eq!(s.revision(), 5);
}

#[test]
fn watchers_get_deltas_or_need_a_snapshot() {
    let mut s = StateMachine::new();
    s.apply(&cmd(T0, Op::AddBans(vec![ip_ban("192.0.2.1", None)])));
    s.apply(&cmd(T0, Op::AddBans(vec![ip_ban("192.0.2.2", None)])));
    let d = s.changes_since(1).unwrap();
    assert_eq!(d.len(), 1);
    assert!(matches!(&d[0], (2, Change::BanPut(b)) if b.id == "b2"));
    assert_eq!(s.changes_since(0).unwrap().len(), 2);
    let restored = StateMachine::restore(&s.snapshot()).unwrap();
    assert!(
        restored.changes_since(1).is_none(),
        "older than a restored snapshot"
    );
    assert_eq!(restored.changes_since(2).unwrap().len(), 0);
}

#[test]
fn snapshot_round_trip_and_determinism() {
    let ops = vec![
        Op::AddBans(vec![
            ip_ban("192.0.2.1", Some(T0 + 10)),
            ip_ban("2001:db8::1", None),
        ]),
        Op::PutBindings(vec![binding("sip:1@p", "<sip:1@a>", T0 + 20)]),
        Op::PutPolicy {
            name: "p".into(),
            body: "b".into(),
        },
        Op::Expire,
        Op::RemoveBans(vec![BanSelector::Id("b2".into())]),
    ];
    let mut a = StateMachine::new();
    let mut b = StateMachine::new();
    for (i, op) in ops.into_iter().enumerate() {
        let c = cmd(T0 + 15 * i as u64, op);
        let bytes = c.encode();
        assert_eq!(a.apply(&c), b.apply(&Command::decode(&bytes).unwrap()));
    }
    assert_eq!(a.snapshot(), b.snapshot(), "same log, same state");
    let r = StateMachine::restore(&a.snapshot()).unwrap();
    assert_eq!(r.revision(), a.revision());
    assert_eq!(r.bans().collect::<Vec<_>>(), a.bans().collect::<Vec<_>>());
    assert_eq!(r.snapshot(), a.snapshot());
    // The target index comes back too: banning the same address again keeps its id.
    let mut r = r;
    let Applied::Bans(b) = r.apply(&cmd(T0 + 100, Op::AddBans(vec![ip_ban("192.0.2.1", None)])))
    else {
        panic!()
    };
    let before: Vec<_> = a
        .bans()
        .filter(|x| x.target == b[0].target)
        .map(|x| x.id.clone())
        .collect();
    assert_eq!(before.len(), 0, "expired in the log above");
    let Applied::Bans(again) =
        r.apply(&cmd(T0 + 101, Op::AddBans(vec![ip_ban("192.0.2.1", None)])))
    else {
        panic!()
    };
    assert_eq!(again[0].id, b[0].id);
}

#[test]
fn an_edge_is_recorded_once_until_it_changes() {
    let mut s = StateMachine::new();
    let edge = EdgeInfo {
        id: "a1".into(),
        site: "hq".into(),
        relay: "10.0.0.1:5060".into(),
    };
    s.apply(&cmd(T0, Op::PutEdge(edge.clone())));
    s.apply(&cmd(T0, Op::PutEdge(edge.clone())));
    assert_eq!(s.revision(), 1, "the same again changes nothing");
    let moved = EdgeInfo {
        relay: "10.0.0.2:5060".into(),
        ..edge
    };
    s.apply(&cmd(T0, Op::PutEdge(moved.clone())));
    assert_eq!(s.revision(), 2);
    assert_eq!(s.edge("a1"), Some(&moved));
    let r = StateMachine::restore(&s.snapshot()).unwrap();
    assert_eq!(r.edges().count(), 1, "kept in snapshots");
}

/// What the derived indexes must say, by a walk of everything.
fn walked(s: &StateMachine) -> ([usize; 3], usize, Option<u64>) {
    let mut counts = [0; 3];
    for b in s.bans() {
        counts[source_slot(&b.source)] += 1;
    }
    let bans = s.bans().filter_map(|b| b.expires_unix_ms);
    let next = bans.chain(s.bindings().map(|b| b.expires_unix_ms)).min();
    (counts, s.bindings().count(), next)
}

#[test]
fn counts_and_expiries_kept_with_the_state_match_a_walk_of_it_after_every_command() {
    // A fixed pseudo-random walk over few targets and contacts, so that bans are replaced with
    // other sources and expiries, bindings refreshed, and both removed and expired often.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut s = StateMachine::new();
    let mut now = T0;
    let (mut expired_bans, mut expired_bindings) = (0, 0);
    for step in 0..3_000 {
        now += next(20);
        let expires = |k: u64| (k > 0).then_some(now + k * 10);
        let op = match next(6) {
            0 | 1 => Op::AddBans(
                (0..1 + next(3))
                    .map(|_| NewBan {
                        source: match next(3) {
                            0 => BanSource::Manual,
                            1 => BanSource::AutoRule("scanner".into()),
                            _ => BanSource::Feed("apiban".into()),
                        },
                        ..ip_ban(&format!("192.0.2.{}", next(20)), expires(next(4)))
                    })
                    .collect(),
            ),
            2 => Op::RemoveBans(vec![BanSelector::Target(
                BanTarget::parse("ip", &format!("192.0.2.{}", next(20))).unwrap(),
            )]),
            3 => Op::PutBindings(
                (0..1 + next(3))
                    .map(|_| {
                        let aor = format!("sip:{}@example.com", next(10));
                        binding(&aor, &format!("sip:c{}@x", next(3)), now + 1 + next(40))
                    })
                    .collect(),
            ),
            4 => {
                let b: Vec<(String, String)> = s
                    .bindings()
                    .take(1)
                    .map(|b| (b.aor.clone(), b.contact.clone()))
                    .collect();
                Op::RemoveBindings(b)
            }
            _ => Op::Expire,
        };
        let due = |s: &StateMachine| {
            let bans = s.bans().filter(|b| !b.live(now)).count();
            (
                bans,
                s.bindings().filter(|b| b.expires_unix_ms <= now).count(),
            )
        };
        let before = due(&s);
        let applied = s.apply(&cmd(now, op));
        if let Applied::Expired { bans, bindings } = applied {
            assert_eq!(
                (bans, bindings),
                before,
                "step {step}: everything due expired"
            );
            assert_eq!(due(&s), (0, 0), "step {step}: nothing due left");
            expired_bans += bans;
            expired_bindings += bindings;
        }
        assert_eq!(
            (s.ban_counts(), s.binding_count(), s.next_expiry()),
            walked(&s),
            "step {step}"
        );
    }
    assert!(
        expired_bans > 100 && expired_bindings > 100,
        "the walk expired both"
    );
    // A restored snapshot rebuilds the same indexes.
    let r = StateMachine::restore(&s.snapshot()).unwrap();
    assert_eq!(
        (r.ban_counts(), r.binding_count(), r.next_expiry()),
        walked(&s)
    );
    assert_eq!(r.expiries, s.expiries);
}

#[test]
fn expire_reports_bans_by_id_then_bindings_by_aor_whatever_their_expiry_order() {
    let mut s = StateMachine::new();
    s.apply(&cmd(
        T0,
        Op::AddBans(vec![
            ip_ban("192.0.2.1", Some(T0 + 30)),
            ip_ban("192.0.2.2", Some(T0 + 10)),
            ip_ban("192.0.2.3", Some(T0 + 500)),
        ]),
    ));
    s.apply(&cmd(
        T0,
        Op::PutBindings(vec![
            binding("sip:b@x", "sip:1@x", T0 + 5),
            binding("sip:a@x", "sip:1@x", T0 + 20),
        ]),
    ));
    s.apply(&cmd(T0 + 100, Op::Expire));
    let changes = s.changes_since(2).unwrap();
    let got: Vec<String> = changes
        .iter()
        .map(|(_, c)| match c {
            Change::BanRemoved(b) => b.id.clone(),
            Change::BindingRemoved { aor, .. } => aor.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["b1", "b2", "sip:a@x", "sip:b@x"]);
    assert_eq!(s.next_expiry(), Some(T0 + 500));
}

#[test]
fn changes_since_starts_after_every_change_of_the_revision_given() {
    let mut s = StateMachine::new();
    s.apply(&cmd(
        T0,
        Op::AddBans(vec![
            ip_ban("192.0.2.1", None),
            ip_ban("192.0.2.2", None),
            ip_ban("192.0.2.3", None),
        ]),
    ));
    s.apply(&cmd(T0, Op::AddBans(vec![ip_ban("192.0.2.4", None)])));
    s.apply(&cmd(
        T0,
        Op::AddBans(vec![ip_ban("192.0.2.5", None), ip_ban("192.0.2.6", None)]),
    ));
    let revs = |from: u64| -> Vec<u64> {
        s.changes_since(from)
            .unwrap()
            .iter()
            .map(|(r, _)| *r)
            .collect()
    };
    assert_eq!(revs(0), [1, 1, 1, 2, 3, 3]);
    assert_eq!(revs(1), [2, 3, 3]);
    assert_eq!(revs(2), [3, 3]);
    assert!(revs(3).is_empty());
    assert!(revs(9).is_empty(), "ahead of the state: nothing");
}
