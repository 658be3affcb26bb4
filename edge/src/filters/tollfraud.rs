//! `tollfraud`: what a compromised account does once inside — calls to premium and high-risk
//! destinations, many calls a minute, many calls at once, numbers dialled in sequence. Four rules
//! (`tollfraud.prefix`, `tollfraud.rate`, `tollfraud.concurrent`, `tollfraud.sequential`), each
//! with its action (alert, reject, ban).
//!
//! The account is the caller's From AOR. Calls are counted when an INVITE is forwarded; a call is
//! up from the PBX's `200` to the INVITE until a BYE passes either way (or `max_call_s`).

use super::{action_of, drain_due, Stamped, Windows};
use crate::pipeline::sipview::uri_aor;
use crate::pipeline::{Action, Filter, Finding, RequestCx, ResponseCx, State};
use crate::policy::{self, RuleAction};
use crate::proxy::Side;
use lru::LruCache;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Calls up: Call-ID → (account, answered at), and the count per account.
#[derive(Default)]
pub struct Calls {
    inner: Mutex<CallTable>,
}

struct CallTable {
    /// Call-ID → (account, answered at), in the order answered: the sweep takes the calls past
    /// the limit from the front without a walk of the rest.
    by_id: LruCache<String, (String, u64)>,
    per_account: HashMap<String, u32>,
}

impl Default for CallTable {
    fn default() -> CallTable {
        CallTable {
            by_id: LruCache::unbounded(),
            per_account: HashMap::new(),
        }
    }
}

impl Calls {
    pub const MAX_CALLS: usize = 500_000;

    fn lock(&self) -> MutexGuard<'_, CallTable> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call answered.
    pub fn start(&self, call_id: &str, account: String, now_ms: u64) {
        let mut t = self.lock();
        if t.by_id.contains(call_id) || t.by_id.len() >= Self::MAX_CALLS {
            return;
        }
        *t.per_account.entry(account.clone()).or_default() += 1;
        t.by_id.push(call_id.to_string(), (account, now_ms));
    }

    /// A call ended.
    pub fn end(&self, call_id: &str) {
        let mut t = self.lock();
        if let Some((account, _)) = t.by_id.pop(call_id) {
            Self::dec(&mut t.per_account, &account);
        }
    }

    fn dec(per: &mut HashMap<String, u32>, account: &str) {
        if let Some(n) = per.get_mut(account) {
            *n -= 1;
            if *n == 0 {
                per.remove(account);
            }
        }
    }

    /// Calls up for `account`.
    pub fn up(&self, account: &str) -> u32 {
        self.lock().per_account.get(account).copied().unwrap_or(0)
    }

    /// Forgets calls older than `max_ms` (their BYE was lost), oldest first, until the first
    /// that is not (answer times read on different threads may be a tick out of order: such a
    /// call goes a second later).
    pub fn expire(&self, now_ms: u64, max_ms: u64) {
        let mut t = self.lock();
        let CallTable { by_id, per_account } = &mut *t;
        let due = |&(_, at): &(String, u64)| now_ms.saturating_sub(at) >= max_ms;
        drain_due(by_id, usize::MAX, due, |_, (account, _)| {
            Self::dec(per_account, &account)
        });
    }
}

/// The span of the per-account call rate.
const MINUTE_MS: u64 = 60_000;

/// How far an account's last call time may be ahead of the clock before the clock counts as
/// stepped back (the wall clock is set back, as NTP may at boot) rather than read a moment
/// earlier on another thread: times from before such a step are not counted, and the next call
/// forwarded forgets them.
const STEP_MS: u64 = 1_000;

/// What an account dialled lately.
pub struct Activity {
    /// Times of call attempts within the last minute, oldest first and never decreasing (at most
    /// the per-minute limit + 1), so the last minute's count is a binary search.
    recent: VecDeque<u64>,
    last_number: Option<u128>,
    /// Consecutive calls so far, each to the previous number ± 1.
    run: u32,
    run_start_ms: u64,
    stamp: u64,
}

impl Stamped for Activity {
    fn stamp(&self) -> u64 {
        self.stamp
    }
}

/// How many of `recent` (in order) are a minute or more before `now`: the front of the queue.
fn older_than_a_minute(recent: &VecDeque<u64>, now: u64) -> usize {
    recent.partition_point(|&t| now.saturating_sub(t) >= MINUTE_MS)
}

/// How many of `recent` (in order) fall in the minute up to `now`, leaving out times more than
/// [`STEP_MS`] ahead of it (from before the clock was set back).
fn in_last_minute(recent: &VecDeque<u64>, now: u64) -> usize {
    let not_ahead = recent.partition_point(|&t| t <= now.saturating_add(STEP_MS));
    not_ahead.saturating_sub(older_than_a_minute(recent, now))
}

/// Per-account dialling activity; outlives reloads.
pub type Dialing = Windows<String, Activity>;

/// The dialled number in canonical form: visual separators removed, `+` for an international
/// prefix. `None` when it is not a number.
pub fn normalize(user: &str, international: &[String]) -> Option<String> {
    // Byte by byte into one buffer (every new call from the Internet comes through here twice):
    // visual separators dropped, anything else must be a digit after an optional leading `+`.
    let mut out = String::with_capacity(user.len() + 1);
    out.push('+');
    let mut plus = false;
    for b in user.bytes() {
        match b {
            b'-' | b'.' | b'(' | b')' | b' ' => {}
            b'+' if !plus && out.len() == 1 => plus = true,
            b'0'..=b'9' => out.push(char::from(b)),
            _ => return None,
        }
    }
    let rest = &out[1..];
    if rest.is_empty() {
        return None;
    }
    if plus {
        return Some(out);
    }
    match international
        .iter()
        .filter(|p| rest.starts_with(p.as_str()) && rest.len() > p.len())
        .map(|p| p.len())
        .max()
    {
        Some(n) => {
            out.replace_range(1..=n, "");
            Some(out)
        }
        None => {
            out.remove(0);
            Some(out)
        }
    }
}

/// The toll-fraud rules.
pub struct TollFraud {
    cfg: policy::TollFraud,
    /// Prefix rules, longest first.
    prefixes: Vec<policy::PrefixRule>,
    state: Arc<State>,
}

impl TollFraud {
    pub fn new(cfg: &policy::TollFraud, state: &Arc<State>) -> TollFraud {
        let mut prefixes = cfg.prefixes.clone();
        prefixes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        TollFraud {
            cfg: cfg.clone(),
            prefixes,
            state: state.clone(),
        }
    }

    fn act(&self, a: RuleAction) -> Action {
        action_of(a, self.cfg.ban_ttl_s, 403, "Forbidden")
    }

    /// A new call from the Internet, by an untrusted source.
    fn applies(cx: &RequestCx<'_>) -> bool {
        cx.meta.side == Side::Internet
            && !cx.meta.trusted
            && cx.sip.method() == "INVITE"
            && cx.sip.to_tag().is_none()
    }

    fn number(&self, cx: &RequestCx<'_>) -> Option<String> {
        normalize(cx.sip.ruri_user(), &self.cfg.international_prefixes)
    }
}

impl Filter for TollFraud {
    fn name(&self) -> &'static str {
        "tollfraud"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        if !Self::applies(cx) {
            return None;
        }
        let account = cx.from_aor();
        let number = self.number(cx);
        if let Some(n) = &number {
            if let Some(r) = self.prefixes.iter().find(|r| n.starts_with(&r.prefix)) {
                return Some(Finding::new(
                    "tollfraud.prefix",
                    self.act(r.action),
                    format!("{account} called {n}: {} range {}", r.label, r.prefix),
                ));
            }
        }
        let now = cx.meta.now_ms;
        if self.cfg.concurrent_calls > 0 {
            let up = self.state.calls.up(account);
            if up >= self.cfg.concurrent_calls {
                return Some(Finding::new(
                    "tollfraud.concurrent",
                    self.act(self.cfg.concurrent_action),
                    format!(
                        "{account} has {up} calls up (limit {})",
                        self.cfg.concurrent_calls
                    ),
                ));
            }
        }
        let (per_min, run) = self.state.dialing.lock().peek(account).map_or((0, 0), |a| {
            let in_min = in_last_minute(&a.recent, now);
            let next = number
                .as_deref()
                .and_then(|n| n.trim_start_matches('+').parse::<u128>().ok());
            let seq = match (a.last_number, next) {
                (Some(l), Some(n))
                    if l.abs_diff(n) == 1
                        && now.saturating_sub(a.run_start_ms)
                            < self.cfg.sequential_window_s * 1000 =>
                {
                    a.run + 1
                }
                _ => 1,
            };
            (in_min as u32, seq)
        });
        if self.cfg.calls_per_min > 0 && per_min >= self.cfg.calls_per_min {
            return Some(Finding::new(
                "tollfraud.rate",
                self.act(self.cfg.calls_per_min_action),
                format!(
                    "{account} placed {per_min} calls in the last minute (limit {})",
                    self.cfg.calls_per_min
                ),
            ));
        }
        if self.cfg.sequential_run > 0 && run >= self.cfg.sequential_run {
            return Some(Finding::new(
                "tollfraud.sequential",
                self.act(self.cfg.sequential_action),
                format!(
                    "{account} dialled {run} consecutive numbers, last {}",
                    number.unwrap_or_default()
                ),
            ));
        }
        None
    }

    fn response(&self, cx: &ResponseCx<'_>) -> Option<Finding> {
        // The PBX answered a call placed from the Internet.
        if cx.meta.side == Side::Pbx
            && cx.status == 200
            && cx.sip.method() == "INVITE"
            && !cx.peer_trusted
        {
            let account = uri_aor(cx.sip.from_uri());
            self.state
                .calls
                .start(cx.sip.call_id(), account, cx.meta.now_ms);
        }
        None
    }

    fn completion(&self, cx: &RequestCx<'_>, forwarded: bool) {
        if !forwarded {
            return;
        }
        if cx.sip.method() == "BYE" {
            self.state.calls.end(cx.sip.call_id());
            return;
        }
        if !Self::applies(cx) {
            return;
        }
        let now = cx.meta.now_ms;
        let account = cx.from_aor();
        let next = self
            .number(cx)
            .and_then(|n| n.trim_start_matches('+').parse::<u128>().ok());
        let keep = self.cfg.calls_per_min as usize + 1;
        self.state.dialing.with(
            account,
            || Activity {
                recent: VecDeque::new(),
                last_number: None,
                run: 0,
                run_start_ms: now,
                stamp: now,
            },
            |a| {
                a.stamp = now;
                // A clock read a moment earlier on another receive thread is stored as the last
                // time, so the times stay in order; what the minute left behind goes. A clock set
                // back leaves the times before it behind too.
                if a.recent.back().is_some_and(|&last| last > now.saturating_add(STEP_MS)) {
                    a.recent.clear();
                }
                let at = a.recent.back().map_or(now, |&last| last.max(now));
                a.recent.push_back(at);
                let over = a.recent.len().saturating_sub(keep);
                a.recent.drain(..older_than_a_minute(&a.recent, at).max(over));
                let sequential = matches!((a.last_number, next), (Some(l), Some(n)) if l.abs_diff(n) == 1)
                    && now.saturating_sub(a.run_start_ms) < self.cfg.sequential_window_s * 1000;
                if sequential {
                    a.run += 1;
                } else {
                    a.run = 1;
                    a.run_start_ms = now;
                }
                a.last_number = next;
            },
        );
    }
}

#[cfg(test)]
mod tests;
