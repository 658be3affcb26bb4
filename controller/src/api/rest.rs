//! The REST/JSON front end of the admin API under `/api/v1` (axum): authenticate, parse strictly
//! (unknown fields → 400 naming them), call [`super::core`]. Writes go through Raft from any node
//! (a follower forwards to the leader); reads are local unless `consistent=true` asks for a
//! linearizable read. The routes are described in `controller/openapi.json`.

use super::auth::{Caller, Role};
use super::core::{format_of, parse_json, Api, BanIn, BansOut, ListFilter, TargetIn};
use super::error::ApiError;
use crate::raft::node::NodeStatus;
use crate::state::AuditEntry;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use sipwarden_shared::ban::{Ban, Binding};

fn caller(api: &Api, headers: &HeaderMap, need: Role) -> Result<Caller, ApiError> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    api.caller(auth, need)
}

/// A query string, strictly: unknown parameters are refused.
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))
}

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

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

async fn add_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Ban>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: BanIn = parse_json(&body)?;
    let mut b = api.add_bans(&who, &[input], false).await?;
    match b.pop() {
        Some(b) => Ok((StatusCode::CREATED, Json(b))),
        None => Err(ApiError::Internal("no ban stored".into())),
    }
}

async fn add_bulk(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<BansOut>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: BulkIn = parse_json(&body)?;
    let bans = api.add_bans(&who, &input.bans, true).await?;
    Ok((
        StatusCode::CREATED,
        Json(BansOut {
            bans,
            next_page_token: None,
            revision: api.revision(),
        }),
    ))
}

async fn list_bans(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Q<ListFilter>,
) -> Result<Json<BansOut>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.list_bans(&query(q)?).await?))
}

async fn get_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.get_ban(&id)?))
}

async fn remove_ban(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    Ok(Json(api.remove_ban(&who, &id).await?))
}

async fn remove_bulk(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<BansOut>, ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let input: RemoveIn = parse_json(&body)?;
    let bans = api.remove_bans(&who, input.ids, &input.targets).await?;
    Ok(Json(BansOut {
        bans,
        next_page_token: None,
        revision: api.revision(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatQuery {
    format: Option<String>,
    ttl_s: Option<i64>,
    reason: Option<String>,
}

async fn export(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Q<FormatQuery>,
) -> Result<Response, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let q = query(q)?;
    let (content_type, body) = api.export(format_of(q.format.as_deref())?);
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn import(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Q<FormatQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let who = caller(&api, &headers, Role::Operator)?;
    let q = query(q)?;
    let format = format_of(q.format.as_deref())?;
    let n = api
        .import(&who, format, &body, q.ttl_s, q.reason.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"imported": n, "revision": api.revision()})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegQuery {
    contains: Option<String>,
    limit: Option<usize>,
}

async fn registrations(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Q<RegQuery>,
) -> Result<Json<Vec<Binding>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    let q = query(q)?;
    Ok(Json(api.registrations(q.contains.as_deref(), q.limit)))
}

async fn registration(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(aor): Path<String>,
) -> Result<Json<Vec<Binding>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.registration(&aor)?))
}

async fn cluster(State(api): State<Api>, headers: HeaderMap) -> Result<Json<NodeStatus>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.status()))
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
) -> Result<Json<NodeStatus>, ApiError> {
    let who = caller(&api, &headers, Role::Admin)?;
    let m: MemberIn = parse_json(&body)?;
    Ok(Json(api.add_member(&who, m.id, &m.address).await?))
}

async fn remove_member(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Json<NodeStatus>, ApiError> {
    let who = caller(&api, &headers, Role::Admin)?;
    Ok(Json(api.remove_member(&who, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Q<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    caller(&api, &headers, Role::Viewer)?;
    Ok(Json(api.audit(query(q)?.limit)))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(api): State<Api>) -> (StatusCode, &'static str) {
    if api.status().leader != 0 {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader")
    }
}

async fn fallback() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// `(method, path)` of every route, as the OpenAPI document must list them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/bans"),
    ("post", "/api/v1/bans"),
    ("post", "/api/v1/bans:bulk"),
    ("post", "/api/v1/bans:remove"),
    ("get", "/api/v1/bans:export"),
    ("post", "/api/v1/bans:import"),
    ("get", "/api/v1/bans/{id}"),
    ("delete", "/api/v1/bans/{id}"),
    ("get", "/api/v1/registrations"),
    ("get", "/api/v1/registrations/{aor}"),
    ("get", "/api/v1/cluster"),
    ("post", "/api/v1/cluster/members"),
    ("delete", "/api/v1/cluster/members/{id}"),
    ("get", "/api/v1/audit"),
];

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
        .route("/api/v1/bans/{id}", get(get_ban).delete(remove_ban))
        .route("/api/v1/registrations", get(registrations))
        .route("/api/v1/registrations/{aor}", get(registration))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/members", post(add_member))
        .route("/api/v1/cluster/members/{id}", delete(remove_member))
        .route("/api/v1/audit", get(audit))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            admin_span,
        ))
        .with_state(api)
}

/// Prometheus text (unauthenticated, like the probes: keep the HTTP port internal).
async fn metrics(State(api): State<Api>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            sipwarden_shared::promtext::CONTENT_TYPE,
        )],
        api.metrics.encode(&api.handle),
    )
}

/// One span per admin request (`/api/…`), with the route and the answer's status; probes are not
/// traced.
async fn admin_span(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let span = tracing::info_span!(
        "admin.http",
        method = %req.method(),
        path = %req.uri().path(),
        status = tracing::field::Empty
    );
    let method = req.method().to_string();
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    api.metrics
        .admin_requests
        .get_or_create(&crate::metrics::HttpLabels {
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::ROUTES;

    /// The OpenAPI document lists exactly the routes the router serves, each secured by the
    /// bearer scheme and documenting 401 and 403.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../openapi.json")).expect("openapi.json parses");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    op["security"][0].get("bearer").is_some(),
                    "{method} {path} is secured"
                );
                for code in ["401", "403"] {
                    assert!(
                        op["responses"].get(code).is_some(),
                        "{method} {path} documents {code}"
                    );
                }
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
