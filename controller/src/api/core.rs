//! The admin operations, once, for both front ends (REST in [`super::rest`], gRPC in
//! [`super::grpc`]): each takes an authenticated [`Caller`], validates everything before it
//! proposes anything (invalid input writes nothing), and answers with plain values or an
//! [`ApiError`].

use super::auth::{Caller, Role, Tokens};
use super::error::ApiError;
use crate::raft::node::{Handle, MemberChange, NodeStatus};
use crate::state::{Applied, AuditEntry, BanSelector, Command, NewBan, Op};
use serde::{Deserialize, Serialize};
use sipwarden_shared::ban::{Ban, BanSource, BanTarget, Binding};
use std::sync::Arc;

/// Called with a member's id and its address (added) or `None` (removed), so the transport can
/// reach it before its membership commits.
pub type MemberHook = Arc<dyn Fn(u64, Option<&str>) + Send + Sync>;

/// What the operations share.
#[derive(Clone)]
pub struct Api {
    pub handle: Handle,
    pub tokens: Arc<Tokens>,
    /// Wall clock (Unix ms) stamped into commands.
    pub clock: fn() -> u64,
    pub on_member: MemberHook,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Most bans one bulk request may carry; imports are proposed in chunks of this size.
pub const MAX_BULK: usize = 10_000;
/// Most bans one import may carry.
pub const MAX_IMPORT: usize = 10 * MAX_BULK;

impl Api {
    /// The caller presenting `authorization`, if its role is at least `need`.
    pub fn caller(&self, authorization: Option<&str>, need: Role) -> Result<Caller, ApiError> {
        self.tokens.check(authorization, need)
    }

    /// Proposes `op` as `who` (for operations with no admin route: edges' records).
    pub async fn propose_op(&self, who: &Caller, op: Op) -> Result<Applied, ApiError> {
        self.propose(who, op).await
    }

    async fn propose(&self, who: &Caller, op: Op) -> Result<Applied, ApiError> {
        use tracing::Instrument;
        let span = tracing::info_span!("raft.propose", who = %who.name, op = op.kind());
        let cmd = Command {
            at_unix_ms: (self.clock)(),
            who: who.name.clone(),
            op,
        };
        // The span ends when the command is committed and applied (or the proposal fails).
        Ok(self.handle.propose(cmd).instrument(span).await?)
    }
}

/// A target as the API reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl TargetIn {
    pub fn parse(&self) -> Result<BanTarget, ApiError> {
        BanTarget::parse(&self.kind, &self.value).map_err(|e| ApiError::Invalid(e.to_string()))
    }
}

/// A ban as the API reads it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BanIn {
    pub target: Option<TargetIn>,
    #[serde(default)]
    pub reason: String,
    /// Seconds from now; absent (and no `expires_unix_ms`) is permanent.
    pub ttl_s: Option<i64>,
    pub expires_unix_ms: Option<u64>,
    pub site: Option<String>,
    /// `manual` (default), `feed:<name>` or `auto:<rule>`.
    pub source: Option<String>,
}

impl BanIn {
    /// Validates into a [`NewBan`]; `at` is the index in a bulk request (for the message).
    pub fn validate(&self, now: u64, at: Option<usize>) -> Result<NewBan, ApiError> {
        let pre = at.map(|i| format!("bans[{i}].")).unwrap_or_default();
        let invalid = |m: String| ApiError::Invalid(format!("{pre}{m}"));
        let target = self
            .target
            .as_ref()
            .ok_or_else(|| invalid("target: is required".into()))?
            .parse()
            .map_err(|e| invalid(e.to_string()))?;
        if self.reason.len() > 512 {
            return Err(invalid("reason: at most 512 characters".into()));
        }
        let expires_unix_ms = match (self.ttl_s, self.expires_unix_ms) {
            (Some(_), Some(_)) => {
                return Err(invalid("give ttl_s or expires_unix_ms, not both".into()))
            }
            (Some(t), None) if t <= 0 => return Err(invalid("ttl_s: must be positive".into())),
            (Some(t), None) => Some(now.saturating_add((t as u64).saturating_mul(1000))),
            (None, Some(e)) if e <= now => {
                return Err(invalid("expires_unix_ms: must be in the future".into()))
            }
            (None, e) => e,
        };
        let source = match self.source.as_deref() {
            None | Some("") | Some("manual") => BanSource::Manual,
            Some(s) => match s.split_once(':') {
                Some(("feed", n)) if !n.is_empty() => BanSource::Feed(n.to_string()),
                Some(("auto", n)) if !n.is_empty() => BanSource::AutoRule(n.to_string()),
                _ => {
                    return Err(invalid(format!(
                        "source: {s:?} is not manual, feed:<name> or auto:<rule>"
                    )))
                }
            },
        };
        let site = self.site.clone().filter(|s| !s.is_empty());
        if site.as_ref().is_some_and(|s| s.len() > 64) {
            return Err(invalid("site: at most 64 characters".into()));
        }
        Ok(NewBan {
            target,
            reason: self.reason.clone(),
            source,
            expires_unix_ms,
            site,
        })
    }
}

/// A page of bans.
#[derive(Debug, Serialize)]
pub struct BansOut {
    pub bans: Vec<Ban>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
    pub revision: u64,
}

/// Filters of a ban listing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Substring of the target's value.
    pub contains: Option<String>,
    /// `manual`, `auto` or `feed`.
    pub source: Option<String>,
    pub site: Option<String>,
    pub limit: Option<usize>,
    pub page_token: Option<String>,
    #[serde(default)]
    pub consistent: bool,
}

/// `b42` → 42, for ordering ids numerically.
fn id_key(id: &str) -> u64 {
    id.strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

fn unexpected(a: Applied) -> ApiError {
    ApiError::Internal(format!("unexpected result {a:?}"))
}

/// The export formats (also import).
pub fn format_of(f: Option<&str>) -> Result<&'static str, ApiError> {
    match f.unwrap_or("json") {
        "json" => Ok("json"),
        "plain" => Ok("plain"),
        "apiban" => Ok("apiban"),
        f => Err(ApiError::Invalid(format!(
            "format: {f:?} is not json, plain or apiban"
        ))),
    }
}

impl Api {
    pub async fn add_bans(
        &self,
        who: &Caller,
        input: &[BanIn],
        bulk: bool,
    ) -> Result<Vec<Ban>, ApiError> {
        if input.is_empty() || input.len() > MAX_BULK {
            return Err(ApiError::Invalid(format!(
                "bans: 1 to {MAX_BULK} bans per request"
            )));
        }
        let now = (self.clock)();
        let bans = input
            .iter()
            .enumerate()
            .map(|(i, b)| b.validate(now, bulk.then_some(i)))
            .collect::<Result<Vec<_>, _>>()?;
        match self.propose(who, Op::AddBans(bans)).await? {
            Applied::Bans(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    /// Stores what an edge published: bindings to add or refresh and `(aor, contact)` pairs to
    /// remove. Each binding is validated (the error names `put[i].field`).
    pub async fn put_bindings(
        &self,
        who: &Caller,
        put: Vec<Binding>,
        removed: Vec<(String, String)>,
    ) -> Result<(), ApiError> {
        if put.len() + removed.len() > MAX_BULK {
            return Err(ApiError::Invalid(format!(
                "put, removed: at most {MAX_BULK} bindings per request"
            )));
        }
        let put = put
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                b.validate()
                    .map_err(|e| ApiError::Invalid(format!("put[{i}].{e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(i) = removed
            .iter()
            .position(|(a, c)| a.is_empty() || c.is_empty())
        {
            return Err(ApiError::Invalid(format!(
                "removed[{i}]: aor and contact are required"
            )));
        }
        // Removals first: a de-registration and a new registration of the same contact in one
        // batch leave the new one.
        if !removed.is_empty() {
            self.propose(who, Op::RemoveBindings(removed)).await?;
        }
        if !put.is_empty() {
            self.propose(who, Op::PutBindings(put)).await?;
        }
        Ok(())
    }

    pub async fn remove_bans(
        &self,
        who: &Caller,
        ids: Vec<String>,
        targets: &[TargetIn],
    ) -> Result<Vec<Ban>, ApiError> {
        if ids.is_empty() && targets.is_empty() {
            return Err(ApiError::Invalid(
                "ids or targets: give at least one".into(),
            ));
        }
        let mut sel: Vec<BanSelector> = ids.into_iter().map(BanSelector::Id).collect();
        for (i, t) in targets.iter().enumerate() {
            let t = t
                .parse()
                .map_err(|e| ApiError::Invalid(format!("targets[{i}].{e}")))?;
            sel.push(BanSelector::Target(t));
        }
        match self.propose(who, Op::RemoveBans(sel)).await? {
            Applied::Removed(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove_ban(&self, who: &Caller, id: &str) -> Result<Ban, ApiError> {
        let mut r = self.remove_bans(who, vec![id.to_string()], &[]).await?;
        if r.is_empty() {
            return Err(ApiError::NotFound(format!("no ban {id:?}")));
        }
        Ok(r.remove(0))
    }

    pub async fn list_bans(&self, q: &ListFilter) -> Result<BansOut, ApiError> {
        let limit = q.limit.unwrap_or(100);
        if limit == 0 || limit > 10_000 {
            return Err(ApiError::Invalid("limit: 1 to 10000".into()));
        }
        if let Some(k) = &q.kind {
            if !matches!(k.as_str(), "ip" | "cidr" | "aor" | "user_agent") {
                return Err(ApiError::Invalid(
                    "type: one of ip, cidr, aor, user_agent".into(),
                ));
            }
        }
        if let Some(s) = &q.source {
            if !matches!(s.as_str(), "manual" | "auto" | "feed") {
                return Err(ApiError::Invalid(
                    "source: one of manual, auto, feed".into(),
                ));
            }
        }
        if q.consistent {
            self.handle.read_barrier().await?;
        }
        Ok(self.handle.read(|s| {
            let mut bans: Vec<Ban> = s
                .bans()
                .filter(|b| {
                    q.page_token
                        .as_ref()
                        .is_none_or(|t| id_key(&b.id) > id_key(t))
                })
                .filter(|b| {
                    let (kind, value) = b.target.parts();
                    q.kind.as_deref().is_none_or(|k| k == kind)
                        && q.contains.as_deref().is_none_or(|c| value.contains(c))
                        && q.site
                            .as_deref()
                            .is_none_or(|site| b.site.as_deref() == Some(site))
                        && q.source.as_deref().is_none_or(|src| {
                            matches!(
                                (src, &b.source),
                                ("manual", BanSource::Manual)
                                    | ("auto", BanSource::AutoRule(_))
                                    | ("feed", BanSource::Feed(_))
                            )
                        })
                })
                .cloned()
                .collect();
            bans.sort_by_key(|b| id_key(&b.id));
            let next = (bans.len() > limit).then(|| bans[limit - 1].id.clone());
            bans.truncate(limit);
            BansOut {
                bans,
                next_page_token: next,
                revision: s.revision(),
            }
        }))
    }

    pub fn get_ban(&self, id: &str) -> Result<Ban, ApiError> {
        self.handle
            .read(|s| s.ban(id).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("no ban {id:?}")))
    }

    pub fn revision(&self) -> u64 {
        self.handle.read(|s| s.revision())
    }

    pub fn status(&self) -> NodeStatus {
        self.handle.status.borrow().clone()
    }

    pub async fn add_member(
        &self,
        who: &Caller,
        id: u64,
        address: &str,
    ) -> Result<NodeStatus, ApiError> {
        if id == 0 {
            return Err(ApiError::Invalid("id: must be at least 1".into()));
        }
        if crate::config::parse_peer(&format!("{id}={address}")).is_none() {
            return Err(ApiError::Invalid(format!(
                "address: {address:?} is not host:port"
            )));
        }
        if self.status().voters.contains(&id) {
            return Err(ApiError::Invalid(format!("id: {id} is already a member")));
        }
        (self.on_member)(id, Some(address));
        self.handle
            .change_member(MemberChange {
                id,
                add: true,
                address: address.to_string(),
                who: who.name.clone(),
                at_unix_ms: (self.clock)(),
            })
            .await?;
        Ok(self.status())
    }

    pub async fn remove_member(&self, who: &Caller, id: u64) -> Result<NodeStatus, ApiError> {
        if !self.status().voters.contains(&id) {
            return Err(ApiError::NotFound(format!("no member {id}")));
        }
        self.handle
            .change_member(MemberChange {
                id,
                add: false,
                address: String::new(),
                who: who.name.clone(),
                at_unix_ms: (self.clock)(),
            })
            .await?;
        (self.on_member)(id, None);
        Ok(self.status())
    }

    pub fn audit(&self, limit: Option<usize>) -> Vec<AuditEntry> {
        let limit = limit.unwrap_or(100).min(10_000);
        self.handle
            .read(|s| s.audit().rev().take(limit).cloned().collect())
    }

    pub fn registrations(&self, contains: Option<&str>, limit: Option<usize>) -> Vec<Binding> {
        let limit = limit.unwrap_or(1000).min(100_000);
        self.handle.read(|s| {
            s.bindings()
                .filter(|b| contains.is_none_or(|c| b.aor.contains(c)))
                .take(limit)
                .cloned()
                .collect()
        })
    }

    pub fn registration(&self, aor: &str) -> Result<Vec<Binding>, ApiError> {
        let found: Vec<Binding> = self
            .handle
            .read(|s| s.bindings_of(aor).into_iter().cloned().collect());
        if found.is_empty() {
            return Err(ApiError::NotFound(format!("no registration for {aor:?}")));
        }
        Ok(found)
    }

    /// Every ban in `format`: `(content type, body)`.
    pub fn export(&self, format: &str) -> (&'static str, String) {
        let (bans, revision) = self
            .handle
            .read(|s| (s.bans().cloned().collect::<Vec<_>>(), s.revision()));
        let addr = |b: &Ban| match &b.target {
            BanTarget::Ip(ip) => Some(ip.to_string()),
            BanTarget::Cidr(n) => Some(n.to_string()),
            _ => None,
        };
        match format {
            "plain" => {
                let mut out = String::new();
                for a in bans.iter().filter_map(addr) {
                    out.push_str(&a);
                    out.push('\n');
                }
                ("text/plain", out)
            }
            "apiban" => (
                "application/json",
                serde_json::json!({
                    "ipaddress": bans.iter().filter_map(addr).collect::<Vec<_>>(),
                    "ID": revision.to_string(),
                })
                .to_string(),
            ),
            _ => (
                "application/json",
                serde_json::to_string(&BansOut {
                    bans,
                    next_page_token: None,
                    revision,
                })
                .unwrap_or_default(),
            ),
        }
    }

    /// Imports `body` in `format` (`json` `{"bans": […]}`, `plain` one IP or CIDR per line with
    /// `#` comments, `apiban` `{"ipaddress": […]}`); `ttl_s` and `reason` apply to list formats.
    /// Returns how many bans were imported.
    pub async fn import(
        &self,
        who: &Caller,
        format: &str,
        body: &[u8],
        ttl_s: Option<i64>,
        reason: Option<&str>,
    ) -> Result<usize, ApiError> {
        let now = (self.clock)();
        let entry = |value: &str, line: usize| -> Result<NewBan, ApiError> {
            let kind = if value.contains('/') { "cidr" } else { "ip" };
            BanIn {
                target: Some(TargetIn {
                    kind: kind.into(),
                    value: value.into(),
                }),
                reason: reason.map_or_else(|| format!("import ({format})"), str::to_string),
                ttl_s,
                source: Some(format!("feed:{format}")),
                ..Default::default()
            }
            .validate(now, None)
            .map_err(|e| ApiError::Invalid(format!("entry {line}: {e}")))
        };
        let bans: Vec<NewBan> = match format {
            "json" => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Bulk {
                    bans: Vec<BanIn>,
                }
                let b: Bulk = parse_json(body)?;
                b.bans
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b.validate(now, Some(i)))
                    .collect::<Result<_, _>>()?
            }
            "plain" => {
                let text = std::str::from_utf8(body)
                    .map_err(|_| ApiError::Invalid("request body: not UTF-8".into()))?;
                text.lines()
                    .enumerate()
                    .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(i, l)| entry(l, i))
                    .collect::<Result<_, _>>()?
            }
            _ => {
                #[derive(Deserialize)]
                struct Apiban {
                    ipaddress: Vec<String>,
                }
                let a: Apiban = parse_json(body)?;
                a.ipaddress
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| entry(ip, i))
                    .collect::<Result<_, _>>()?
            }
        };
        if bans.is_empty() || bans.len() > MAX_IMPORT {
            return Err(ApiError::Invalid(format!(
                "request body: 1 to {MAX_IMPORT} bans per import"
            )));
        }
        let total = bans.len();
        for chunk in bans.chunks(MAX_BULK) {
            self.propose(who, Op::AddBans(chunk.to_vec())).await?;
        }
        Ok(total)
    }
}

/// Parses a JSON body strictly; the message names what is wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Invalid(format!("request body: {e}")))
}
