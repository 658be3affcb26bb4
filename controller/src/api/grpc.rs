//! The gRPC front end of the admin API (`sipwarden.v1.Admin`): authenticate from the
//! `authorization` metadata, convert the request, call [`super::core`]; errors become gRPC codes
//! through [`super::error::ApiError`].

use super::auth::{Caller, Role};
use super::core::{format_of, Api, BanIn, ListFilter, TargetIn};
use super::error::ApiError;
use crate::raft::node::NodeStatus;
use sipwarden_proto::v1 as pb;
use sipwarden_proto::v1::admin_server::Admin;
use sipwarden_shared::ban::BanTarget;
use tonic::{Request, Response, Status};

/// The `Admin` service.
pub struct AdminService {
    pub api: Api,
}

fn caller<T>(api: &Api, req: &Request<T>, need: Role) -> Result<Caller, Status> {
    let auth = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    Ok(api.caller(auth, need)?)
}

/// A proto target as the API's input (validated later, with the other fields).
fn target_in(t: &pb::BanTarget) -> Result<TargetIn, ApiError> {
    let parsed = BanTarget::try_from(t).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let (kind, value) = parsed.parts();
    Ok(TargetIn {
        kind: kind.to_string(),
        value,
    })
}

/// A proto ban spec as the API's input (validated by [`super::core`]).
pub fn ban_in(s: &pb::BanSpec, i: usize) -> Result<BanIn, ApiError> {
    let target = match &s.target {
        Some(t) => Some(target_in(t).map_err(|e| ApiError::Invalid(format!("bans[{i}].{e}")))?),
        None => None,
    };
    Ok(BanIn {
        target,
        reason: s.reason.clone(),
        ttl_s: (s.ttl_s != 0).then_some(s.ttl_s),
        expires_unix_ms: (s.expires_unix_ms != 0).then_some(s.expires_unix_ms),
        site: (!s.site.is_empty()).then(|| s.site.clone()),
        source: (!s.source.is_empty()).then(|| s.source.clone()),
    })
}

fn bans_response(
    bans: &[sipwarden_shared::ban::Ban],
    next: Option<String>,
    revision: u64,
) -> pb::BansResponse {
    pb::BansResponse {
        bans: bans.iter().map(pb::Ban::from).collect(),
        next_page_token: next.unwrap_or_default(),
        revision,
    }
}

fn status_pb(s: NodeStatus) -> pb::ClusterStatus {
    pb::ClusterStatus {
        id: s.id,
        leader: s.leader,
        term: s.term,
        role: s.role,
        commit: s.commit,
        applied: s.applied,
        voters: s.voters,
        snapshot_index: s.snapshot_index,
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_bans(
        &self,
        req: Request<pb::AddBansRequest>,
    ) -> Result<Response<pb::BansResponse>, Status> {
        let who = caller(&self.api, &req, Role::Operator)?;
        let input = req
            .get_ref()
            .bans
            .iter()
            .enumerate()
            .map(|(i, s)| ban_in(s, i))
            .collect::<Result<Vec<_>, _>>()?;
        let bans = self.api.add_bans(&who, &input, true).await?;
        Ok(Response::new(bans_response(
            &bans,
            None,
            self.api.revision(),
        )))
    }

    async fn remove_bans(
        &self,
        req: Request<pb::RemoveBansRequest>,
    ) -> Result<Response<pb::BansResponse>, Status> {
        let who = caller(&self.api, &req, Role::Operator)?;
        let r = req.get_ref();
        let targets = r
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| target_in(t).map_err(|e| ApiError::Invalid(format!("targets[{i}].{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let bans = self.api.remove_bans(&who, r.ids.clone(), &targets).await?;
        Ok(Response::new(bans_response(
            &bans,
            None,
            self.api.revision(),
        )))
    }

    async fn list_bans(
        &self,
        req: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::BansResponse>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        let r = req.get_ref();
        let f = ListFilter {
            kind: opt(&r.r#type),
            contains: opt(&r.contains),
            source: opt(&r.source),
            site: opt(&r.site),
            limit: (r.limit != 0).then_some(r.limit as usize),
            page_token: opt(&r.page_token),
            consistent: r.consistent,
        };
        let out = self.api.list_bans(&f).await?;
        Ok(Response::new(bans_response(
            &out.bans,
            out.next_page_token,
            out.revision,
        )))
    }

    async fn get_ban(&self, req: Request<pb::GetBanRequest>) -> Result<Response<pb::Ban>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        let b = self.api.get_ban(&req.get_ref().id)?;
        Ok(Response::new(pb::Ban::from(&b)))
    }

    async fn import_bans(
        &self,
        req: Request<pb::ImportBansRequest>,
    ) -> Result<Response<pb::ImportBansResponse>, Status> {
        let who = caller(&self.api, &req, Role::Operator)?;
        let r = req.get_ref();
        let format = format_of(opt(&r.format).as_deref())?;
        let n = self
            .api
            .import(
                &who,
                format,
                &r.body,
                (r.ttl_s != 0).then_some(r.ttl_s),
                opt(&r.reason).as_deref(),
            )
            .await?;
        Ok(Response::new(pb::ImportBansResponse {
            imported: n as u64,
            revision: self.api.revision(),
        }))
    }

    async fn export_bans(
        &self,
        req: Request<pb::ExportBansRequest>,
    ) -> Result<Response<pb::ExportBansResponse>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        let format = format_of(opt(&req.get_ref().format).as_deref())?;
        let (content_type, body) = self.api.export(format);
        Ok(Response::new(pb::ExportBansResponse {
            content_type: content_type.into(),
            body: body.into_bytes(),
        }))
    }

    async fn list_registrations(
        &self,
        req: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::RegistrationsResponse>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        let r = req.get_ref();
        let bindings = if r.aor.is_empty() {
            self.api.registrations(
                opt(&r.contains).as_deref(),
                (r.limit != 0).then_some(r.limit as usize),
            )
        } else {
            self.api.registration(&r.aor)?
        };
        Ok(Response::new(pb::RegistrationsResponse {
            bindings: bindings.iter().map(pb::Binding::from).collect(),
        }))
    }

    async fn audit(
        &self,
        req: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        let limit = req.get_ref().limit;
        let entries = self
            .api
            .audit((limit != 0).then_some(limit as usize))
            .into_iter()
            .map(|a| pb::AuditEntry {
                revision: a.revision,
                at_unix_ms: a.at_unix_ms,
                who: a.who,
                action: a.action,
                detail: a.detail,
            })
            .collect();
        Ok(Response::new(pb::AuditResponse { entries }))
    }

    async fn get_cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        caller(&self.api, &req, Role::Viewer)?;
        Ok(Response::new(status_pb(self.api.status())))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let who = caller(&self.api, &req, Role::Admin)?;
        let r = req.get_ref();
        let s = self.api.add_member(&who, r.id, &r.address).await?;
        Ok(Response::new(status_pb(s)))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let who = caller(&self.api, &req, Role::Admin)?;
        let s = self.api.remove_member(&who, req.get_ref().id).await?;
        Ok(Response::new(status_pb(s)))
    }
}
