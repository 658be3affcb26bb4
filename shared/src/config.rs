//! Configuration loading: compiled-in defaults, then a TOML file, then `SIPWARDEN_*` environment
//! variables, each layer overriding the one before.
//!
//! An environment variable names a key path with `__` between segments and upper-case letters:
//! `SIPWARDEN_TCP__MAX_PER_SOURCE=8` sets `tcp.max_per_source`, `SIPWARDEN_BACKENDS__0__ADDRESS=…`
//! sets the first backend's address (index `len` appends a new entry). The value is read as a TOML
//! value (`8`, `true`, `["a","b"]`, `[{address="…"}]`) unless the key already holds a string, in
//! which case it is taken verbatim. The environment is read through [`EnvSource`] so tests can feed a
//! map.

use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;
use toml::Value;

/// The prefix every override variable carries.
pub const ENV_PREFIX: &str = "SIPWARDEN_";

/// Where environment overrides come from.
pub trait EnvSource {
    /// Every `(name, value)` pair whose name starts with [`ENV_PREFIX`].
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What went wrong while loading configuration; each variant names where.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads the config file at `path`, if one is given: `(path as text, contents)` for [`load`].
pub fn read_file(path: Option<&std::path::Path>) -> Result<Option<(String, String)>, ConfigError> {
    let Some(p) = path else {
        return Ok(None);
    };
    let shown = p.display().to_string();
    match std::fs::read_to_string(p) {
        Ok(text) => Ok(Some((shown, text))),
        Err(source) => Err(ConfigError::Read {
            path: shown,
            source,
        }),
    }
}

/// Builds a `T` from its defaults, an optional TOML document and environment overrides.
///
/// `reserved` names variables that carry the prefix but are not config keys (`SIPWARDEN_CONFIG`).
pub fn load<T>(
    file: Option<(&str, &str)>,
    env: &dyn EnvSource,
    reserved: &[&str],
) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
{
    let mut root = Value::try_from(T::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
    if let Some((path, text)) = file {
        let doc: Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        merge(&mut root, doc);
    }
    let mut vars = env.vars();
    vars.sort();
    for (var, raw) in vars {
        if reserved.contains(&var.as_str()) {
            continue;
        }
        apply_env(&mut root, &var, &raw)?;
    }
    T::deserialize(root).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// Overlays `over` on `base`: tables merge key by key, everything else is replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Table(b), Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn apply_env(root: &mut Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(err("empty key segment (use `__` between keys)".into()));
    }
    let mut node = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        node = match node {
            Value::Table(t) => {
                if last {
                    let value = match t.get(seg) {
                        Some(Value::String(_)) => Value::String(raw.to_string()),
                        _ => parse_value(raw),
                    };
                    t.insert(seg.clone(), value);
                    return Ok(());
                }
                t.entry(seg.clone())
                    .or_insert_with(|| Value::Table(Default::default()))
            }
            Value::Array(a) => {
                let idx: usize = seg
                    .parse()
                    .map_err(|_| err(format!("`{seg}` indexes a list and must be a number")))?;
                if idx > a.len() {
                    return Err(err(format!(
                        "index {idx} skips entries: the list has {} (use {} to append)",
                        a.len(),
                        a.len()
                    )));
                }
                if idx == a.len() {
                    a.push(Value::Table(Default::default()));
                }
                if last {
                    a[idx] = parse_value(raw);
                    return Ok(());
                }
                &mut a[idx]
            }
            _ => {
                return Err(err(format!(
                    "`{}` is not a table or list",
                    path[..i].join(".")
                )))
            }
        };
    }
    Ok(())
}

/// Reads `raw` as a TOML value, or as a plain string when it is not one (`127.0.0.1:5080`).
fn parse_value(raw: &str) -> Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        Err(_) => Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        id: String,
        port: u16,
        inner: Inner,
        list: Vec<Item>,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        enabled: bool,
        name: String,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq, Clone)]
    #[serde(default, deny_unknown_fields)]
    struct Item {
        address: String,
        weight: u32,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let file = "port = 1\n[inner]\nname = \"file\"\n[[list]]\naddress = \"a\"\n";
        let e = env(&[
            ("SIPWARDEN_PORT", "2"),
            ("SIPWARDEN_INNER__ENABLED", "true"),
            ("SIPWARDEN_LIST__0__WEIGHT", "5"),
            ("SIPWARDEN_LIST__1__ADDRESS", "127.0.0.1:5080"),
            ("SIPWARDEN_ID", "1234"),
            ("OTHER", "ignored"),
        ]);
        let c: Cfg = load(Some(("f.toml", file)), &e, &[]).unwrap();
        assert_eq!(c.port, 2);
        assert_eq!(
            c.id, "1234",
            "a string key keeps a numeric-looking value as a string"
        );
        assert!(c.inner.enabled);
        assert_eq!(c.inner.name, "file");
        assert_eq!(
            c.list,
            vec![
                Item {
                    address: "a".into(),
                    weight: 5
                },
                Item {
                    address: "127.0.0.1:5080".into(),
                    weight: 0
                }
            ]
        );
    }

    #[test]
    fn whole_lists_can_be_given_inline() {
        let e = env(&[("SIPWARDEN_LIST", r#"[{address="x", weight=2}]"#)]);
        let c: Cfg = load(None, &e, &[]).unwrap();
        assert_eq!(
            c.list,
            vec![Item {
                address: "x".into(),
                weight: 2
            }]
        );
    }

    #[test]
    fn unknown_keys_and_bad_paths_are_named() {
        let e = env(&[("SIPWARDEN_INNER__TYPO", "1")]);
        let err = load::<Cfg>(None, &e, &[]).unwrap_err().to_string();
        assert!(err.contains("typo"), "{err}");

        let e = env(&[("SIPWARDEN_LIST__3__ADDRESS", "x")]);
        let err = load::<Cfg>(None, &e, &[]).unwrap_err().to_string();
        assert!(
            err.contains("SIPWARDEN_LIST__3__ADDRESS") && err.contains("skips"),
            "{err}"
        );

        let e = env(&[("SIPWARDEN_PORT__X", "1")]);
        assert!(load::<Cfg>(None, &e, &[]).is_err());

        let e = env(&[("SIPWARDEN_CONFIG", "/etc/x.toml")]);
        assert!(load::<Cfg>(None, &e, &["SIPWARDEN_CONFIG"]).is_ok());
    }

    #[test]
    fn bad_toml_names_the_file() {
        let err = load::<Cfg>(Some(("edge.toml", "port = ")), &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("edge.toml"), "{err}");
    }
}
