//! The Helm chart (`charts/sipwarden`), with the real Helm (`scripts/fetch-helm.sh`) and
//! `kubernetes-validate`: lint and render with the default values and with a non-default values
//! file, validate every manifest against the Kubernetes 1.32 schemas, check the wiring (peers
//! match replicas, ports agree, secrets mounted, probes, hardened pods), run the rendered
//! configurations through the binaries' own `--check-config`, and refuse a missing required value
//! with a clear message.

use serde_yaml::Value;
use sipwarden_tests::*;
use std::path::PathBuf;
use std::process::Command;

fn chart() -> PathBuf {
    workspace_root().join("charts/sipwarden")
}

fn helm() -> PathBuf {
    let h = workspace_root().join(".tools/helm");
    assert!(
        h.exists(),
        "Helm is not in .tools: run scripts/fetch-helm.sh (the README's test command does)"
    );
    h
}

/// `helm args…` in the chart directory: (success, stdout, stderr).
fn run_helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm())
        .current_dir(chart())
        .args(args)
        .output()
        .expect("helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Renders the chart as release `sw` in namespace `voice` with `extra` arguments.
fn render(extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "sw", ".", "--namespace", "voice"];
    args.extend_from_slice(extra);
    let (ok, out, err) = run_helm(&args);
    assert!(ok, "helm template {extra:?}: {err}");
    validate(&out);
    out.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

/// `kubernetes-validate --strict` over a rendered stream.
fn validate(rendered: &str) {
    let kv = workspace_root().join(".venv/bin/kubernetes-validate");
    assert!(
        kv.exists(),
        "kubernetes-validate is not in .venv (tests/requirements.txt; the README's test command installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    let out = Command::new(kv)
        .args(["-k", "1.32.0", "--strict"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate:\n{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_sequence()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}"))
}

/// The secret references of a container: (secret name, key).
fn secret_refs(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let r = &e["valueFrom"]["secretKeyRef"];
            r.get("name")
                .map(|n| (s(n).to_string(), s(&r["key"]).to_string()))
        })
        .collect()
}

/// Checks what every workload must have: probes on /healthz and /readyz on the `http` port, a
/// hardened security context, secrets that exist with the keys used.
fn check_workload(w: &Value, secret: &Value) {
    let c = container(w);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
    let pod = &w["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let annotations = &w["spec"]["template"]["metadata"]["annotations"];
    assert!(
        s(&annotations["checksum/config"]).len() == 64,
        "checksum/config"
    );
    let refs = secret_refs(c);
    assert!(!refs.is_empty());
    for (name, key) in refs {
        assert_eq!(name, s(&secret["metadata"]["name"]), "secret name");
        assert!(
            secret["data"].get(key.as_str()).is_some(),
            "the secret has {key}"
        );
    }
}

/// The TOML a ConfigMap carries under `key`.
fn config_text(docs: &[Value], name: &str, key: &str) -> String {
    s(&find(docs, "ConfigMap", name)["data"][key]).to_string()
}

/// Runs `bin --check-config` on `toml` with `env` (and `args`).
fn check_config(bin: &str, toml: &str, args: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    // The rendered config points at /data; check it against a writable directory instead.
    std::fs::write(
        &file,
        toml.replace("\"/data\"", &format!("{:?}", dir.path().join("data"))),
    )
    .unwrap();
    let out = Command::new(workspace_bin(bin))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{bin} --check-config on the rendered configuration:\n{}{}\n{toml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything about the controllers and edges that must agree, for `replicas` controllers.
fn check_wiring(docs: &[Value], replicas: u64, grpc: u64, http: u64, edge_kind: &str) {
    let secret = find(docs, "Secret", "sw-sipwarden-secrets");
    let sts = find(docs, "StatefulSet", "sw-sipwarden-controller");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(replicas));
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(
        sts["spec"]["serviceName"],
        "sw-sipwarden-controller-headless"
    );
    let headless = find(docs, "Service", "sw-sipwarden-controller-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );
    find(docs, "PodDisruptionBudget", "sw-sipwarden-controller");
    let c = container(sts);
    assert_eq!(port(c, "grpc"), grpc);
    assert_eq!(port(c, "http"), http);
    assert!(c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|a| a == "--id-from-hostname"));
    check_workload(sts, secret);

    // The peer list names every replica by its stable DNS name, ids from 1.
    let ctl_toml = config_text(docs, "sw-sipwarden-controller", "controller.toml");
    let cfg: toml_like::Doc = toml_like::parse(&ctl_toml);
    let peers = cfg.list("cluster.peers");
    assert_eq!(peers.len() as u64, replicas, "{ctl_toml}");
    for (i, p) in peers.iter().enumerate() {
        assert_eq!(
            p,
            &format!(
                "{}=sw-sipwarden-controller-{i}.sw-sipwarden-controller-headless.voice.svc:{grpc}",
                i + 1
            )
        );
    }
    assert_eq!(cfg.get("grpc.listen"), format!("0.0.0.0:{grpc}"));
    assert_eq!(cfg.get("http.listen"), format!("0.0.0.0:{http}"));
    check_config(
        "sipwarden-controller",
        &ctl_toml,
        &["--id", "1"],
        &[
            ("SIPWARDEN_CLUSTER__PEER_SECRET", "a-peer-secret-of-16+"),
            ("SIPWARDEN_EDGES__SECRET", "an-edge-secret-of-16+"),
        ],
    );

    // Edges watch every controller, with the edge secret and the shared flow key.
    let edge = find(docs, edge_kind, "sw-sipwarden-edge");
    check_workload(edge, secret);
    let edge_toml = config_text(docs, "sw-sipwarden-edge", "edge.toml");
    let ecfg = toml_like::parse(&edge_toml);
    let endpoints = ecfg.list("controller.endpoints");
    assert_eq!(endpoints.len() as u64, replicas);
    for (i, e) in endpoints.iter().enumerate() {
        assert_eq!(
            e,
            &format!(
                "sw-sipwarden-controller-{i}.sw-sipwarden-controller-headless.voice.svc:{grpc}"
            )
        );
    }
    let ec = container(edge);
    assert_eq!(
        ecfg.get("http.listen"),
        format!("0.0.0.0:{}", port(ec, "http"))
    );
    let keys: Vec<String> = secret_refs(ec).into_iter().map(|(_, k)| k).collect();
    assert!(keys.contains(&"edge-secret".to_string()) && keys.contains(&"flow-key".to_string()));
    check_config(
        "sipwarden-edge",
        &edge_toml,
        &[],
        &[("SIPWARDEN_CONTROLLER__SECRET", "an-edge-secret-of-16+")],
    );
}

/// Just enough TOML reading for the rendered configurations: `section.key` strings and arrays.
mod toml_like {
    pub struct Doc(Vec<(String, String)>);

    pub fn parse(text: &str) -> Doc {
        let mut section = String::new();
        let mut out = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let l = line.trim();
            if l.starts_with('[') && !l.contains('=') {
                section = l.trim_matches(|c| c == '[' || c == ']').to_string();
            } else if let Some((k, v)) = l.split_once('=') {
                let mut v = v.trim().to_string();
                if v == "[" {
                    // A multi-line array.
                    for more in lines.by_ref() {
                        let m = more.trim();
                        if m == "]" {
                            break;
                        }
                        v.push_str(m);
                    }
                }
                out.push((format!("{section}.{}", k.trim()), v));
            }
        }
        Doc(out)
    }

    impl Doc {
        pub fn get(&self, key: &str) -> String {
            self.0
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.trim_matches('"').to_string())
                .unwrap_or_default()
        }

        pub fn list(&self, key: &str) -> Vec<String> {
            let v = self.get(key);
            v.trim_start_matches('[')
                .split(',')
                .map(|x| x.trim().trim_matches('"').to_string())
                .filter(|x| !x.is_empty())
                .collect()
        }
    }
}

#[test]
fn the_chart_lints_and_renders_valid_wired_manifests_with_default_values() {
    let (ok, out, err) = run_helm(&["lint", "--strict", "."]);
    assert!(ok, "helm lint --strict:\n{out}{err}");
    let docs = render(&[]);
    check_wiring(&docs, 3, 7400, 7480, "DaemonSet");
    let edge = find(&docs, "DaemonSet", "sw-sipwarden-edge");
    assert_eq!(edge["spec"]["template"]["spec"]["hostNetwork"], true);
    // No CRD objects unless asked for.
    assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor"));
}

#[test]
fn the_chart_renders_valid_wired_manifests_with_non_default_values() {
    let (ok, out, err) = run_helm(&["lint", "--strict", ".", "-f", "ci/deployment-values.yaml"]);
    assert!(ok, "helm lint --strict (ci values):\n{out}{err}");
    let docs = render(&["-f", "ci/deployment-values.yaml"]);
    check_wiring(&docs, 5, 7401, 7481, "Deployment");
    let lb = find(&docs, "Service", "sw-sipwarden-edge");
    assert_eq!(lb["spec"]["type"], "LoadBalancer");
    let protocols: Vec<&str> = lb["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| s(&p["protocol"]))
        .collect();
    assert_eq!(
        protocols,
        ["UDP", "TCP"],
        "SIP over UDP and TCP on one address"
    );
    let c = container(find(&docs, "StatefulSet", "sw-sipwarden-controller"));
    assert!(s(&c["image"]).starts_with("registry.example.net/voice/sipwarden:0.1.0-test"));
    let env = serde_yaml::to_string(&c["env"]).unwrap();
    assert!(env.contains("redis://redis.voice.svc:6379/0"));
    assert!(env.contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let ctl_toml = config_text(&docs, "sw-sipwarden-controller", "controller.toml");
    assert!(ctl_toml.contains("name = \"calls-per-account\""));
    // Mutual TLS: the certificate Secret is mounted where both rendered configs point.
    for (kind, name, file, section) in [
        (
            "StatefulSet",
            "sw-sipwarden-controller",
            "controller.toml",
            "[grpc.tls]",
        ),
        (
            "Deployment",
            "sw-sipwarden-edge",
            "edge.toml",
            "[controller.tls]",
        ),
    ] {
        let w = find(&docs, kind, name);
        let vols = serde_yaml::to_string(&w["spec"]["template"]["spec"]["volumes"]).unwrap();
        assert!(
            vols.contains("secretName: voice-grpc-tls"),
            "{kind}: {vols}"
        );
        let mounts = serde_yaml::to_string(&container(w)["volumeMounts"]).unwrap();
        assert!(
            mounts.contains("mountPath: /etc/sipwarden/tls"),
            "{kind}: {mounts}"
        );
        let toml = config_text(&docs, name, file);
        assert!(toml.contains(section), "{file}");
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            assert!(
                toml.contains(&format!("/etc/sipwarden/tls/{f}")),
                "{file}: {f}"
            );
        }
    }
    for kind in ["ServiceMonitor", "PrometheusRule", "NetworkPolicy"] {
        assert!(docs.iter().any(|d| d["kind"] == kind), "{kind} rendered");
    }
    // The config checksum follows the configuration.
    let again = render(&["-f", "ci/deployment-values.yaml", "--set", "edge.site=ams1"]);
    let sum = |d: &[Value]| {
        s(
            &find(d, "Deployment", "sw-sipwarden-edge")["spec"]["template"]["metadata"]
                ["annotations"]["checksum/config"],
        )
        .to_string()
    };
    assert_ne!(sum(&docs), sum(&again), "a config change rolls the edges");
}

#[test]
fn a_missing_required_value_fails_rendering_with_a_clear_message() {
    let (ok, _, err) = run_helm(&["template", "sw", ".", "--set", "edge.mode=deployment"]);
    assert!(!ok);
    assert!(
        err.contains("edge.advertise is required when edge.mode is deployment"),
        "{err}"
    );
    let (ok, _, err) = run_helm(&["template", "sw", ".", "--set", "secrets.create=false"]);
    assert!(!ok);
    assert!(
        err.contains("secrets.existingSecret is required when secrets.create is false"),
        "{err}"
    );
    // The schema refuses nonsense, naming the value.
    let (ok, _, err) = run_helm(&["template", "sw", ".", "--set", "controller.replicas=0"]);
    assert!(!ok);
    assert!(err.contains("controller/replicas"), "{err}");
    let (ok, _, err) = run_helm(&["template", "sw", ".", "--set", "secrets.edgeSecret=short"]);
    assert!(!ok);
    assert!(err.contains("secrets/edgeSecret"), "{err}");
}
