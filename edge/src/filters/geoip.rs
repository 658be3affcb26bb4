//! `geoip`: country allow/deny by source address, from a MaxMind GeoIP2/GeoLite2 Country or City
//! database (`maxminddb`). The database is read into memory when the policy is built, so a reload
//! picks up a replaced file.

use super::action_of;
use crate::pipeline::{BuildError, Filter, Finding, RequestCx};
use crate::policy;
use crate::proxy::Side;
use maxminddb::{PathElement, Reader};
use std::net::IpAddr;

/// The country rule.
pub struct GeoIp {
    cfg: policy::GeoIp,
    reader: Reader<Vec<u8>>,
}

impl GeoIp {
    /// Opens `cfg.database`.
    pub fn open(cfg: &policy::GeoIp) -> Result<GeoIp, BuildError> {
        let err = |message: String| BuildError::GeoIp {
            path: cfg.database.display().to_string(),
            message,
        };
        let bytes = std::fs::read(&cfg.database).map_err(|e| err(e.to_string()))?;
        GeoIp::from_bytes(cfg, bytes).map_err(err)
    }

    /// A rule over database bytes already read.
    pub fn from_bytes(cfg: &policy::GeoIp, bytes: Vec<u8>) -> Result<GeoIp, String> {
        let reader = Reader::from_source(bytes).map_err(|e| e.to_string())?;
        let mut cfg = cfg.clone();
        for c in cfg
            .allow_countries
            .iter_mut()
            .chain(cfg.deny_countries.iter_mut())
        {
            c.make_ascii_uppercase();
        }
        Ok(GeoIp { cfg, reader })
    }

    /// The ISO code of `ip`'s country (`registered_country` when `country` is absent).
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let found = self.reader.lookup(ip).ok()?;
        for top in ["country", "registered_country"] {
            let path = [PathElement::Key(top), PathElement::Key("iso_code")];
            if let Ok(Some(code)) = found.decode_path::<&str>(&path) {
                return Some(code.to_string());
            }
        }
        None
    }
}

impl Filter for GeoIp {
    fn name(&self) -> &'static str {
        "geoip"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Internet || cx.meta.trusted {
            return None;
        }
        let country = self.country(cx.meta.source.ip());
        let refused = match &country {
            None => !self.cfg.allow_unknown,
            Some(c) => {
                (!self.cfg.allow_countries.is_empty() && !self.cfg.allow_countries.contains(c))
                    || self.cfg.deny_countries.contains(c)
            }
        };
        if !refused {
            return None;
        }
        let detail = match country {
            Some(c) => format!("source country {c} is not accepted"),
            None => "source country unknown and policy.geoip.allow_unknown is false".to_string(),
        };
        Some(Finding::new(
            "geoip",
            action_of(self.cfg.action, self.cfg.ban_ttl_s, 403, "Forbidden"),
            detail,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testkit::*;
    use crate::pipeline::Action;

    fn db() -> Vec<u8> {
        sipwarden_tests::mmdb::country_db(&[
            ("127.0.0.2/32", "DE"),
            ("127.0.0.3/32", "NG"),
            ("2001:db8::/32", "FR"),
        ])
    }

    fn check(g: &GeoIp, source: &str) -> Option<Finding> {
        let raw = request("REGISTER", "100", "100", "");
        let m = parse(&raw);
        let meta = meta(T0, source, Side::Internet);
        g.request(&req_cx(&meta, &m))
    }

    #[test]
    fn countries_from_a_built_database() {
        let g = GeoIp::from_bytes(&policy::GeoIp::default(), db()).unwrap();
        assert_eq!(
            g.country("127.0.0.2".parse().unwrap()).as_deref(),
            Some("DE")
        );
        assert_eq!(
            g.country("2001:db8::7".parse().unwrap()).as_deref(),
            Some("FR")
        );
        assert_eq!(g.country("127.0.0.9".parse().unwrap()), None);
    }

    #[test]
    fn allow_deny_and_unknown() {
        let cfg = policy::GeoIp {
            enabled: true,
            deny_countries: vec!["ng".into()],
            ..Default::default()
        };
        let g = GeoIp::from_bytes(&cfg, db()).unwrap();
        assert!(check(&g, "127.0.0.2:5060").is_none());
        assert_eq!(check(&g, "127.0.0.3:5060").unwrap().action, Action::Drop);
        assert!(
            check(&g, "127.0.0.9:5060").is_none(),
            "unknown allowed by default"
        );
        let cfg = policy::GeoIp {
            enabled: true,
            allow_countries: vec!["FR".into()],
            allow_unknown: false,
            action: policy::RuleAction::Ban,
            ..Default::default()
        };
        let g = GeoIp::from_bytes(&cfg, db()).unwrap();
        assert!(check(&g, "[2001:db8::1]:5060").is_none());
        assert!(check(&g, "127.0.0.2:5060").unwrap().detail.contains("DE"));
        assert!(check(&g, "127.0.0.9:5060")
            .unwrap()
            .detail
            .contains("unknown"));
        assert!(GeoIp::from_bytes(&cfg, b"not a database".to_vec()).is_err());
    }
}
