//! Bearer-token authentication and roles for the admin API (REST and gRPC alike). Tokens are
//! configured by their SHA-256 only; a presented token is hashed and compared in constant time.

use super::error::ApiError;
use crate::config::Token;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read bans, registrations, audit, cluster status.
    Viewer,
    /// Also add, remove and import bans.
    Operator,
    /// Also change cluster membership.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: what the audit trail records as "who".
    pub name: String,
    pub role: Role,
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// `(sha256, name, role)`.
    entries: Vec<([u8; 32], String, Role)>,
}

/// SHA-256 of `token`, hex: what goes into `auth.tokens[].sha256`.
pub fn hash_hex(token: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(token.as_bytes()))
}

impl Tokens {
    pub fn new(tokens: &[Token]) -> Tokens {
        let entries = tokens
            .iter()
            .filter_map(|t| {
                let raw = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(t.sha256.as_bytes())
                    .ok()?;
                let hash: [u8; 32] = raw.try_into().ok()?;
                Some((hash, t.name.clone(), Role::parse(&t.role)?))
            })
            .collect();
        Tokens { entries }
    }

    /// Adds one more token (the generated admin token).
    pub fn push(&mut self, token: &str, name: &str, role: Role) {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.entries.push((hash, name.to_string(), role));
    }

    /// The caller presenting `authorization` (`Bearer <token>`), if it needs at least `need`.
    pub fn check(&self, authorization: Option<&str>, need: Role) -> Result<Caller, ApiError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("a bearer token is required".into()))?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every entry so timing does not say which one matched.
        let mut found: Option<&(_, String, Role)> = None;
        for e in &self.entries {
            if bool::from(e.0.ct_eq(&hash)) {
                found = Some(e);
            }
        }
        let (_, name, role) =
            found.ok_or_else(|| ApiError::Unauthenticated("unknown bearer token".into()))?;
        if *role < need {
            return Err(ApiError::PermissionDenied(format!(
                "token {name:?} has role {role:?}; this needs {need:?}"
            )));
        }
        Ok(Caller {
            name: name.clone(),
            role: *role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roles_and_refusals() {
        let tokens = Tokens::new(&[
            Token {
                name: "noc".into(),
                role: "viewer".into(),
                sha256: hash_hex("view-token"),
            },
            Token {
                name: "ops".into(),
                role: "operator".into(),
                sha256: hash_hex("op-token"),
            },
        ]);
        let c = tokens
            .check(Some("Bearer op-token"), Role::Operator)
            .unwrap();
        assert_eq!((c.name.as_str(), c.role), ("ops", Role::Operator));
        assert!(matches!(
            tokens.check(None, Role::Viewer),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(matches!(
            tokens.check(Some("Bearer nope"), Role::Viewer),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(matches!(
            tokens.check(Some("op-token"), Role::Viewer),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(matches!(
            tokens.check(Some("Bearer view-token"), Role::Operator),
            Err(ApiError::PermissionDenied(_))
        ));
        assert!(matches!(
            tokens.check(Some("Bearer op-token"), Role::Admin),
            Err(ApiError::PermissionDenied(_))
        ));
    }
}
