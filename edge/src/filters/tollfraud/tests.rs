use super::*;
use crate::bans::BanStore;
use crate::filters::testkit::*;

fn setup(cfg: policy::TollFraud) -> (TollFraud, Arc<State>) {
    let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
    (TollFraud::new(&cfg, &state), state)
}

/// Runs an INVITE from `account` to `number` through request and (when allowed) completion.
fn call(f: &TollFraud, now: u64, account: &str, number: &str) -> Option<Finding> {
    let raw = request("INVITE", number, account, "");
    let m = parse(&raw);
    let meta = meta(now, "192.0.2.1:5060", Side::Internet);
    let cx = req_cx(&meta, &m);
    let found = f.request(&cx);
    f.completion(&cx, found.is_none());
    found
}

fn quiet() -> policy::TollFraud {
    policy::TollFraud {
        calls_per_min: 0,
        concurrent_calls: 0,
        sequential_run: 0,
        ..Default::default()
    }
}

#[test]
fn numbers_are_normalized() {
    let intl = vec!["00".to_string(), "011".to_string()];
    assert_eq!(normalize("0088123", &intl).as_deref(), Some("+88123"));
    assert_eq!(normalize("01144207", &intl).as_deref(), Some("+44207"));
    assert_eq!(
        normalize("+1 (900) 555-0100", &intl).as_deref(),
        Some("+19005550100")
    );
    assert_eq!(normalize("1001", &intl).as_deref(), Some("1001"));
    assert_eq!(normalize("alice", &intl), None);
    assert_eq!(normalize("00", &intl).as_deref(), Some("00"));
    // A plus only before the first digit (separators may come first), once; nothing but digits
    // and separators after it.
    assert_eq!(normalize("(+44) 20.7", &intl).as_deref(), Some("+44207"));
    assert_eq!(normalize("++44", &intl), None);
    assert_eq!(normalize("44+1", &intl), None);
    assert_eq!(normalize("+", &intl), None);
    assert_eq!(normalize("-", &intl), None);
    assert_eq!(normalize("+0044", &intl).as_deref(), Some("+0044"));
    assert_eq!(normalize("1\u{e9}2", &intl), None);
    assert_eq!(normalize("0011", &intl).as_deref(), Some("+11"));
    assert_eq!(
        normalize("0112", &intl).as_deref(),
        Some("+2"),
        "longest prefix first"
    );
}

#[test]
fn premium_and_high_risk_prefixes() {
    let (f, _) = setup(quiet());
    let found = call(&f, T0, "1001", "0088216123456").unwrap();
    assert_eq!(found.rule, "tollfraud.prefix");
    assert_eq!(found.action.label(), "reject");
    assert!(found.detail.contains("+882"), "{}", found.detail);
    assert_eq!(
        call(&f, T0, "1001", "+5371234567").unwrap().action,
        Action::Alert
    );
    assert!(call(&f, T0, "1001", "+4930123456").is_none());
    assert!(call(&f, T0, "1001", "2001").is_none(), "internal extension");
    let mut cfg = quiet();
    cfg.prefixes = vec![policy::PrefixRule {
        prefix: "1900".into(),
        action: RuleAction::Ban,
        label: "premium".into(),
    }];
    let (f, _) = setup(cfg);
    assert_eq!(
        call(&f, T0, "1001", "19005550100").unwrap().action,
        Action::Ban { ttl_s: 3600 }
    );
}

#[test]
fn calls_per_minute_per_account() {
    let mut cfg = quiet();
    cfg.calls_per_min = 3;
    let (f, _) = setup(cfg);
    for i in 0..3 {
        assert!(call(&f, T0 + i * 1000, "1001", &format!("55512{i}0")).is_none());
    }
    let found = call(&f, T0 + 3_000, "1001", "5559999").unwrap();
    assert_eq!(found.rule, "tollfraud.rate");
    assert!(
        call(&f, T0 + 3_000, "1002", "5559999").is_none(),
        "other account"
    );
    assert!(
        call(&f, T0 + 61_000, "1001", "5559999").is_none(),
        "a minute later"
    );
}

#[test]
fn a_high_call_rate_keeps_only_the_last_minute() {
    // A trunk allowed 6,001 calls a minute places one every 10 ms for three minutes: the account
    // keeps the last minute's times only (not the limit's worth of history), and the rate counts
    // exactly that minute.
    let mut cfg = quiet();
    cfg.calls_per_min = 6_001;
    let (f, state) = setup(cfg);
    for i in 0..18_000u64 {
        assert!(
            call(&f, T0 + i * 10, "trunk", "5550100").is_none(),
            "call {i}"
        );
    }
    let kept = |state: &State| {
        let map = state.dialing.lock();
        assert_eq!(map.len(), 1);
        map.iter().next().map(|(_, a)| a.recent.len()).unwrap()
    };
    // The calls at T0 + 120,000 .. T0 + 179,990 ms: 6,000, counted by the next call.
    assert_eq!(kept(&state), 6_000);
    let last = T0 + 17_999 * 10;
    assert!(call(&f, last, "trunk", "5550100").is_none(), "the 6,001st");
    let found = call(&f, last, "trunk", "5550100").unwrap();
    assert_eq!(found.rule, "tollfraud.rate");
    assert!(found.detail.contains("6001 calls"), "{}", found.detail);
    // A minute later everything before is gone; a call stamped a moment before the last one (a
    // clock read on another thread) is kept in order, as of the last one.
    assert!(call(&f, last + 60_000, "trunk", "5550100").is_none());
    assert_eq!(kept(&state), 1);
    assert!(call(&f, last + 60_000 - 5, "trunk", "5550100").is_none());
    assert_eq!(kept(&state), 2);
    assert!(call(&f, last + 120_000 - 1, "trunk", "5550100").is_none());
    assert_eq!(
        kept(&state),
        3,
        "a minute after the last, not after the earlier clock read"
    );
}

#[test]
fn a_clock_set_back_does_not_hold_calls_from_before_it() {
    // Three calls a minute allowed; three placed, then the wall clock is set back an hour: the
    // calls from "the future" are not counted, and the count starts again from the step.
    let mut cfg = quiet();
    cfg.calls_per_min = 3;
    let (f, _) = setup(cfg);
    let late = T0 + 3_600_000;
    for i in 0..3 {
        assert!(call(&f, late + i, "1001", "5550100").is_none());
    }
    assert!(
        call(&f, late + 3, "1001", "5550100").is_some(),
        "the limit holds"
    );
    for i in 0..3 {
        assert!(
            call(&f, T0 + i, "1001", "5550100").is_none(),
            "call {i} after the step"
        );
    }
    let found = call(&f, T0 + 3, "1001", "5550100").unwrap();
    assert_eq!(found.rule, "tollfraud.rate", "counted again from the step");
    // A clock read a moment behind the last call (under a second) still counts with it.
    assert!(call(&f, T0 + 61_000, "1001", "5550100").is_none());
    assert!(call(&f, T0 + 60_500, "1001", "5550100").is_none());
    assert!(call(&f, T0 + 60_600, "1001", "5550100").is_none());
    assert!(call(&f, T0 + 60_700, "1001", "5550100").is_some());
}

#[test]
fn concurrent_calls_follow_200_and_bye() {
    let mut cfg = quiet();
    cfg.concurrent_calls = 2;
    let (f, state) = setup(cfg);
    let pbx = meta(T0, "127.0.0.1:5080", Side::Pbx);
    for id in ["c1", "c2"] {
        let raw = response(200, "INVITE", "1001", "555", id, "");
        let m = parse(&raw);
        f.response(&resp_cx(&pbx, &m, "192.0.2.1:5060", false));
    }
    assert_eq!(state.calls.up("1001@pbx.example"), 2);
    assert_eq!(
        call(&f, T0, "1001", "5551").unwrap().rule,
        "tollfraud.concurrent"
    );
    let bye = request("BYE", "555", "1001", "").replace("Call-ID: call-1001-555", "Call-ID: c1");
    let m = parse(&bye);
    let inet = meta(T0, "192.0.2.1:5060", Side::Internet);
    f.completion(&req_cx(&inet, &m), true);
    assert_eq!(state.calls.up("1001@pbx.example"), 1);
    assert!(call(&f, T0, "1001", "5551").is_none());
    state.calls.expire(T0 + 4 * 3600 * 1000, 4 * 3600 * 1000);
    assert_eq!(state.calls.up("1001@pbx.example"), 0, "lost BYE forgotten");
}

#[test]
fn sequential_dialling() {
    let mut cfg = quiet();
    cfg.sequential_run = 4;
    let (f, _) = setup(cfg);
    for (i, n) in ["+4930100", "+4930101", "+4930102"].iter().enumerate() {
        assert!(call(&f, T0 + i as u64 * 1000, "1001", n).is_none(), "{n}");
    }
    let found = call(&f, T0 + 3_000, "1001", "+4930103").unwrap();
    assert_eq!(found.rule, "tollfraud.sequential");
    assert_eq!(found.action, Action::Ban { ttl_s: 3600 });
    // A gap breaks the run.
    let (f, _) = setup(policy::TollFraud {
        sequential_run: 3,
        ..quiet()
    });
    assert!(call(&f, T0, "1001", "100").is_none());
    assert!(call(&f, T0, "1001", "101").is_none());
    assert!(call(&f, T0, "1001", "205").is_none());
    assert!(call(&f, T0, "1001", "206").is_none());
    assert!(call(&f, T0, "1001", "207").is_some());
}

#[test]
fn calls_whose_bye_was_lost_go_oldest_first_and_only_those() {
    let calls = Calls::default();
    let max = 4 * 3600 * 1000;
    calls.start("c1", "a".into(), T0);
    calls.start("c2", "b".into(), T0 + 10);
    calls.start("c3", "a".into(), T0 + 20);
    calls.start("c4", "a".into(), T0 + 30);
    calls.end("c3");
    // Answered again (a retransmitted 200): still one call, still its first time.
    calls.start("c1", "a".into(), T0 + 25);
    assert_eq!((calls.up("a"), calls.up("b")), (2, 1));
    calls.expire(T0 + 15 + max, max);
    assert_eq!((calls.up("a"), calls.up("b")), (1, 0), "c1 and c2 went");
    calls.expire(T0 + 29 + max, max);
    assert_eq!(calls.up("a"), 1, "c4 has not reached the limit");
    calls.end("c4");
    assert_eq!(calls.up("a"), 0);
    calls.expire(T0 + 100 + max, max);
    assert_eq!(calls.up("a"), 0);
}
