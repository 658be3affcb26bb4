//! TLS for the gRPC links (rustls through tonic): edges ↔ controllers and controllers ↔
//! controllers. One shape of configuration on both sides — a certificate chain and key (PEM) that
//! a process presents, and a CA (PEM) it verifies the other side with. A server with a CA
//! requires client certificates from that CA (mutual TLS); a client with a certificate presents
//! it. Nothing set: plain HTTP/2, authenticated by the shared secrets only.

use serde::{Deserialize, Serialize};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM files; empty paths are unset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain this process presents.
    pub cert: String,
    /// Its private key (never logged).
    pub key: String,
    /// CA the other side's certificate must chain to.
    pub ca: String,
}

/// Why TLS could not be set up; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: String,
    pub message: String,
}

fn read(at: &str, field: &str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(Path::new(path)).map_err(|e| TlsError {
        key: format!("{at}.{field}"),
        message: format!("cannot read {path:?}: {e}"),
    })
}

impl TlsFiles {
    /// Whether TLS is asked for.
    pub fn enabled(&self) -> bool {
        !(self.cert.is_empty() && self.key.is_empty() && self.ca.is_empty())
    }

    /// Checks the combination (`at` is the config key, e.g. `grpc.tls`).
    pub fn validate(&self, at: &str, server: bool) -> Result<(), TlsError> {
        let bad = |field: &str, message: &str| {
            Err(TlsError {
                key: format!("{at}.{field}"),
                message: message.into(),
            })
        };
        if self.cert.is_empty() != self.key.is_empty() {
            return bad("key", "cert and key go together");
        }
        if server && self.enabled() && self.cert.is_empty() {
            return bad("cert", "a TLS server needs a certificate and key");
        }
        if !server && self.enabled() && self.ca.is_empty() {
            return bad(
                "ca",
                "a TLS client needs the CA of the servers it connects to",
            );
        }
        Ok(())
    }

    /// The server side: our identity, and client certificates required when a CA is set.
    pub fn server(&self, at: &str) -> Result<Option<ServerTlsConfig>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut c = ServerTlsConfig::new().identity(Identity::from_pem(
            read(at, "cert", &self.cert)?,
            read(at, "key", &self.key)?,
        ));
        if !self.ca.is_empty() {
            c = c.client_ca_root(Certificate::from_pem(read(at, "ca", &self.ca)?));
        }
        Ok(Some(c))
    }

    /// The client side for a server named `domain`: its CA, and our identity when set.
    pub fn client(&self, at: &str, domain: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut c = ClientTlsConfig::new()
            .domain_name(domain)
            .ca_certificate(Certificate::from_pem(read(at, "ca", &self.ca)?));
        if !self.cert.is_empty() {
            c = c.identity(Identity::from_pem(
                read(at, "cert", &self.cert)?,
                read(at, "key", &self.key)?,
            ));
        }
        Ok(Some(c))
    }
}

/// A gRPC endpoint for `addr` (`host:port`): `https` with `tls` (verified against its CA, under
/// the name `host`) when TLS is configured, else plain `http`.
pub fn endpoint(
    addr: &str,
    tls: &TlsFiles,
    at: &str,
) -> Result<tonic::transport::Endpoint, String> {
    let scheme = if tls.enabled() { "https" } else { "http" };
    let mut e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("{addr:?}: {e}"))?;
    if let Some(c) = tls.client(at, host_of(addr)).map_err(|e| e.to_string())? {
        e = e.tls_config(c).map_err(|e| format!("{at}: {e}"))?;
    }
    Ok(e)
}

/// The host part of `host:port` (brackets of an IPv6 literal removed), for certificate checks.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_are_checked_naming_the_key() {
        let none = TlsFiles::default();
        assert!(none.validate("grpc.tls", true).is_ok());
        let half = TlsFiles {
            cert: "c.pem".into(),
            ..Default::default()
        };
        assert_eq!(
            half.validate("grpc.tls", true).unwrap_err().key,
            "grpc.tls.key"
        );
        let ca_only = TlsFiles {
            ca: "ca.pem".into(),
            ..Default::default()
        };
        assert_eq!(
            ca_only.validate("grpc.tls", true).unwrap_err().key,
            "grpc.tls.cert"
        );
        assert!(ca_only.validate("controller.tls", false).is_ok());
        let missing = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        let e = missing.client("controller.tls", "x").unwrap_err();
        assert_eq!(e.key, "controller.tls.ca");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("ctl-0.ctl:7400"), "ctl-0.ctl");
    }
}
