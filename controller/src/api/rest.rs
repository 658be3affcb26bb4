//! The REST/JSON admin API under `/api/v1` (axum). Every route authenticates a bearer token and
//! checks its role; bodies are parsed strictly (unknown fields refused) and validated before
//! anything is proposed, so invalid input writes nothing. Writes go through Raft from any node (a
//! follower forwards to the leader); reads are local unless `consistent=true` asks for a
//! linearizable read.

use super::auth::{Caller, Role, Tokens};
use super::error::ApiError;
use crate::raft::node::{Handle, MemberChange};
use crate::state::{Applied, BanSelector, Command, NewBan, Op};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sipwarden_shared::ban::{Ban, BanSource, BanTarget};
use std::sync::Arc;

/// Called with a member's id and its address (added) or `None` (removed), so the transport can
/// reach it before its membership commits.
pub type MemberHook = Arc<dyn Fn(u64, Option<&str>) + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub handle: Handle,
    pub tokens: Arc<Tokens>,
    /// Wall clock (Unix ms) stamped into commands.
    pub clock: fn() -> u64,
    /// Told a new member's address before its membership is proposed.
    pub on_member: MemberHook,
}

/// Most bans one bulk request may carry.
pub const MAX_BULK: usize = 10_000;

fn caller(api: &Api, headers: &HeaderMap, need: Role) -> Result<Caller, ApiError> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    api.tokens.check(auth, need)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Invalid(format!("request body: {e}")))
}

/// A target as the API reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl TargetIn {
    fn parse(&self) -> Result<BanTarget, ApiError> {
        BanTarget::parse(&self.kind, &self.value).map_err(|e| ApiError::Invalid(e.to_string()))
    }
}

/// A ban as the API reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanIn {
    pub target: TargetIn,
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
    fn validate(&self, now: u64, at: Option<usize>) -> Result<NewBan, ApiError> {
        let pre = at.map(|i| format!("bans[{i}].")).unwrap_or_default();
        let invalid = |m: String| ApiError::Invalid(format!("{pre}{m}"));
        let target = self.target.parse().map_err(|e| invalid(e.to_string()))?;
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
            None | Some("manual") => BanSource::Manual,
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
        if let Some(site) = &self.site {
            if site.is_empty() || site.len() > 64 {
                return Err(invalid("site: 1 to 64 characters".into()));
            }
        }
        Ok(NewBan {
            target,
            reason: self.reason.clone(),
            source,
            expires_unix_ms,
            site: self.site.clone(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkIn {
    bans: Vec<BanIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveIn {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    targets: Vec<TargetIn>,
}

#[derive(Serialize)]
struct BansOut {
    bans: Vec<Ban>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
    revision: u64,
}

async fn propose(api: &Api, who: &Caller, op: Op) -> Result<Applied, ApiError> {
    let cmd = Command {
        at_unix_ms: (api.clock)(),
        who: who.name.clone(),
        op,
    };
    Ok(api.handle.propose(cmd).await?)
}

async fn add_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Ban>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: BanIn = parse_body(&body)?;
    let ban = input.validate((api.clock)(), None)?;
    match propose(&api, &who, Op::AddBans(vec![ban])).await? {
        Applied::Bans(mut b) if !b.is_empty() => Ok((StatusCode::CREATED, Json(b.remove(0)))),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn add_bulk(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<BansOut>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: BulkIn = parse_body(&body)?;
    if input.bans.is_empty() || input.bans.len() > MAX_BULK {
        return Err(ApiError::Invalid(format!(
            "bans: 1 to {MAX_BULK} bans per request"
        )));
    }
    let now = (api.clock)();
    let bans = input
        .bans
        .iter()
        .enumerate()
        .map(|(i, b)| b.validate(now, Some(i)))
        .collect::<Result<Vec<_>, _>>()?;
    match propose(&api, &who, Op::AddBans(bans)).await? {
        Applied::Bans(bans) => Ok((
            StatusCode::CREATED,
            Json(BansOut {
                bans,
                next_page_token: None,
                revision: api.handle.read(|s| s.revision()),
            }),
        )),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Substring of the target's value.
    contains: Option<String>,
    /// `manual`, `auto` or `feed`.
    source: Option<String>,
    site: Option<String>,
    limit: Option<usize>,
    page_token: Option<String>,
    #[serde(default)]
    consistent: bool,
}

async fn list_bans(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BansOut>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
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
        api.handle.read_barrier().await?;
    }
    Ok(Json(api.handle.read(|s| {
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
    })))
}

/// `b42` → 42, for ordering ids numerically.
fn id_key(id: &str) -> u64 {
    id.strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

async fn get_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    api.handle
        .read(|s| s.ban(&id).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no ban {id:?}")))
}

async fn remove_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    match propose(
        &api,
        &who,
        Op::RemoveBans(vec![BanSelector::Id(id.clone())]),
    )
    .await?
    {
        Applied::Removed(mut r) if !r.is_empty() => Ok(Json(r.remove(0))),
        Applied::Removed(_) => Err(ApiError::NotFound(format!("no ban {id:?}"))),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn remove_bulk(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<BansOut>, ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: RemoveIn = parse_body(&body)?;
    if input.ids.is_empty() && input.targets.is_empty() {
        return Err(ApiError::Invalid(
            "ids or targets: give at least one".into(),
        ));
    }
    let mut sel: Vec<BanSelector> = input.ids.into_iter().map(BanSelector::Id).collect();
    for (i, t) in input.targets.iter().enumerate() {
        let t = t
            .parse()
            .map_err(|e| ApiError::Invalid(format!("targets[{i}].{e}")))?;
        sel.push(BanSelector::Target(t));
    }
    match propose(&api, &who, Op::RemoveBans(sel)).await? {
        Applied::Removed(bans) => Ok(Json(BansOut {
            bans,
            next_page_token: None,
            revision: api.handle.read(|s| s.revision()),
        })),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn cluster(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Json<crate::raft::node::NodeStatus>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.handle.status.borrow().clone()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberIn {
    id: u64,
    address: String,
}

async fn add_member(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<crate::raft::node::NodeStatus>, ApiError> {
    let who = caller(&api, &headers, Role::Admin)?;
    let m: MemberIn = parse_body(&body)?;
    if m.id == 0 {
        return Err(ApiError::Invalid("id: must be at least 1".into()));
    }
    if crate::config::parse_peer(&format!("{}={}", m.id, m.address)).is_none() {
        return Err(ApiError::Invalid(format!(
            "address: {:?} is not host:port",
            m.address
        )));
    }
    if api.handle.status.borrow().voters.contains(&m.id) {
        return Err(ApiError::Invalid(format!(
            "id: {} is already a member",
            m.id
        )));
    }
    (api.on_member)(m.id, Some(&m.address));
    api.handle
        .change_member(MemberChange {
            id: m.id,
            add: true,
            address: m.address,
            who: who.name,
            at_unix_ms: (api.clock)(),
        })
        .await?;
    Ok(Json(api.handle.status.borrow().clone()))
}

async fn remove_member(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Json<crate::raft::node::NodeStatus>, ApiError> {
    let who = caller(&api, &headers, Role::Admin)?;
    if !api.handle.status.borrow().voters.contains(&id) {
        return Err(ApiError::NotFound(format!("no member {id}")));
    }
    api.handle
        .change_member(MemberChange {
            id,
            add: false,
            address: String::new(),
            who: who.name,
            at_unix_ms: (api.clock)(),
        })
        .await?;
    (api.on_member)(id, None);
    Ok(Json(api.handle.status.borrow().clone()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<crate::state::AuditEntry>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(
        api.handle
            .read(|s| s.audit().rev().take(limit).cloned().collect()),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegQuery {
    /// Substring of the AOR.
    contains: Option<String>,
    limit: Option<usize>,
}

async fn registrations(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<RegQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<sipwarden_shared::ban::Binding>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(1000).min(100_000);
    Ok(Json(api.handle.read(|s| {
        s.bindings()
            .filter(|b| q.contains.as_deref().is_none_or(|c| b.aor.contains(c)))
            .take(limit)
            .cloned()
            .collect()
    })))
}

async fn registration(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(aor): Path<String>,
) -> Result<Json<Vec<sipwarden_shared::ban::Binding>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let found: Vec<_> = api
        .handle
        .read(|s| s.bindings_of(&aor).into_iter().cloned().collect());
    if found.is_empty() {
        return Err(ApiError::NotFound(format!("no registration for {aor:?}")));
    }
    Ok(Json(found))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatQuery {
    /// `json` (default), `plain` (one IP or CIDR per line) or `apiban`.
    format: Option<String>,
    /// Import: TTL applied to every imported ban.
    ttl_s: Option<i64>,
    /// Import: reason applied to every imported ban.
    reason: Option<String>,
}

fn format_of(q: &FormatQuery) -> Result<&str, ApiError> {
    match q.format.as_deref().unwrap_or("json") {
        f @ ("json" | "plain" | "apiban") => Ok(f),
        f => Err(ApiError::Invalid(format!(
            "format: {f:?} is not json, plain or apiban"
        ))),
    }
}

async fn export(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<FormatQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller(&api, &headers, Role::Viewer)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    let format = format_of(&q)?;
    let (bans, revision) = api
        .handle
        .read(|s| (s.bans().cloned().collect::<Vec<_>>(), s.revision()));
    Ok(match format {
        "json" => Json(BansOut {
            bans,
            next_page_token: None,
            revision,
        })
        .into_response(),
        "plain" => {
            let mut out = String::new();
            for b in &bans {
                match &b.target {
                    BanTarget::Ip(ip) => out.push_str(&ip.to_string()),
                    BanTarget::Cidr(n) => out.push_str(&n.to_string()),
                    _ => continue,
                }
                out.push('\n');
            }
            ([(axum::http::header::CONTENT_TYPE, "text/plain")], out).into_response()
        }
        _ => Json(serde_json::json!({
            "ipaddress": bans
                .iter()
                .filter_map(|b| match &b.target {
                    BanTarget::Ip(ip) => Some(ip.to_string()),
                    BanTarget::Cidr(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            "ID": revision.to_string(),
        }))
        .into_response(),
    })
}

/// Reads an import body: `json` is `{"bans":[BanIn…]}`, `plain` one IP or CIDR per line (`#`
/// comments), `apiban` `{"ipaddress":[…]}`.
fn import_bans(
    format: &str,
    body: &[u8],
    q: &FormatQuery,
    now: u64,
) -> Result<Vec<NewBan>, ApiError> {
    let template = |value: &str, line: usize| -> Result<NewBan, ApiError> {
        let kind = if value.contains('/') { "cidr" } else { "ip" };
        let input = BanIn {
            target: TargetIn {
                kind: kind.into(),
                value: value.into(),
            },
            reason: q
                .reason
                .clone()
                .unwrap_or_else(|| format!("import ({format})")),
            ttl_s: q.ttl_s,
            expires_unix_ms: None,
            site: None,
            source: Some(format!("feed:{format}")),
        };
        input
            .validate(now, None)
            .map_err(|e| ApiError::Invalid(format!("entry {line}: {e}")))
    };
    match format {
        "json" => {
            let input: BulkIn = parse_body(body)?;
            input
                .bans
                .iter()
                .enumerate()
                .map(|(i, b)| b.validate(now, Some(i)))
                .collect()
        }
        "plain" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::Invalid("request body: not UTF-8".into()))?;
            text.lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
                .filter(|(_, l)| !l.is_empty())
                .map(|(i, l)| template(l, i))
                .collect()
        }
        _ => {
            #[derive(Deserialize)]
            struct Apiban {
                ipaddress: Vec<String>,
            }
            let a: Apiban = parse_body(body)?;
            a.ipaddress
                .iter()
                .enumerate()
                .map(|(i, ip)| template(ip, i))
                .collect()
        }
    }
}

async fn import(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<FormatQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    let format = format_of(&q)?;
    let bans = import_bans(format, &body, &q, (api.clock)())?;
    if bans.is_empty() || bans.len() > 10 * MAX_BULK {
        return Err(ApiError::Invalid(format!(
            "request body: 1 to {} bans per import",
            10 * MAX_BULK
        )));
    }
    let total = bans.len();
    for chunk in bans.chunks(MAX_BULK) {
        propose(&api, &who, Op::AddBans(chunk.to_vec())).await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "imported": total,
            "revision": api.handle.read(|s| s.revision()),
        })),
    ))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(api): State<Api>) -> (StatusCode, &'static str) {
    if api.handle.status.borrow().leader != 0 {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader")
    }
}

async fn fallback() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// The router of the REST API and probes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/bans", post(add_ban).get(list_bans))
        .route("/api/v1/bans:bulk", post(add_bulk))
        .route("/api/v1/bans:remove", post(remove_bulk))
        .route("/api/v1/bans:export", get(export))
        .route("/api/v1/bans:import", post(import))
        .route("/api/v1/registrations", get(registrations))
        .route("/api/v1/registrations/{aor}", get(registration))
        .route("/api/v1/bans/{id}", get(get_ban).delete(remove_ban))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/members", post(add_member))
        .route("/api/v1/cluster/members/{id}", delete(remove_member))
        .route("/api/v1/audit", get(audit))
        .fallback(fallback)
        .with_state(api)
}
