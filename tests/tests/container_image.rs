//! The container image (`docker/Dockerfile`, built with buildah by `scripts/build-image.sh` from
//! this profile's binaries): it builds, and a container of it — run with podman on the host
//! network, loopback ports only — starts the edge and, with the entrypoint overridden, the
//! controller, each answering `/healthz`; both run as the unprivileged user.

use sipwarden_tests::*;
use std::process::Command;
use std::time::Duration;

/// podman and buildah need runc and bounded ulimits here: the same `docker/containers.conf` the
/// build script uses.
fn containers_conf() -> std::path::PathBuf {
    workspace_root().join("docker/containers.conf")
}

/// A running container, removed on drop.
struct Container {
    name: String,
    conf: std::path::PathBuf,
}

impl Container {
    fn logs(&self) -> String {
        let out = Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

fn run(conf: &std::path::Path, name: &str, image: &str, args: &[&str]) -> Container {
    let out = Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(["run", "-d", "--network", "host", "--name", name])
        .args(args.iter().take_while(|a| **a != "--").copied())
        .arg(image)
        .args(args.iter().skip_while(|a| **a != "--").skip(1).copied())
        .output()
        .expect("podman run");
    assert!(
        out.status.success(),
        "podman run {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Container {
        name: name.into(),
        conf: conf.into(),
    }
}

#[test]
fn the_image_builds_and_its_processes_start_and_answer_healthz() {
    require_tool("buildah", "buildah");
    require_tool("podman", "podman");
    let conf = containers_conf();
    // The binaries of the profile this test was built with.
    let profile = workspace_bin("sipwarden-edge")
        .parent()
        .and_then(|p| p.file_name())
        .map(|p| p.to_string_lossy().to_string())
        .unwrap();
    let tag = format!("localhost/sipwarden:test-{}", std::process::id());
    let out = Command::new(workspace_root().join("scripts/build-image.sh"))
        .args([&profile, &tag])
        .output()
        .expect("build-image.sh");
    assert!(
        out.status.success(),
        "building the image:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    struct Image(String, std::path::PathBuf);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = Command::new("buildah")
                .env("CONTAINERS_CONF", &self.1)
                .args(["rmi", "-f", &self.0])
                .output();
        }
    }
    let _image = Image(tag.clone(), conf.clone());

    let id = std::process::id();
    let (sip, http) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let edge = run(
        &conf,
        &format!("sw-edge-{id}"),
        &tag,
        &[
            "-e",
            &format!("SIPWARDEN_HTTP__LISTEN=127.0.0.1:{http}"),
            "-e",
            &format!("SIPWARDEN_LISTENERS=[{{transport=\"udp\", address=\"127.0.0.1:{sip}\"}}]"),
        ],
    );
    let edge_http: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || http_get(edge_http, "/healthz")
            .is_some_and(|(s, _)| s == 200)),
        "the edge in the image answers /healthz:\n{}",
        edge.logs()
    );

    let (grpc, rest) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let controller = run(
        &conf,
        &format!("sw-controller-{id}"),
        &tag,
        &[
            "--entrypoint",
            "/usr/local/bin/sipwarden-controller",
            "--",
            "--grpc-listen",
            &format!("127.0.0.1:{grpc}"),
            "--http-listen",
            &format!("127.0.0.1:{rest}"),
        ],
    );
    let ctl_http: std::net::SocketAddr = format!("127.0.0.1:{rest}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || http_get(ctl_http, "/healthz")
            .is_some_and(|(s, _)| s == 200)),
        "the controller in the image answers /healthz:\n{}",
        controller.logs()
    );

    // Both run as the unprivileged user the image declares.
    let out = Command::new("podman")
        .env("CONTAINERS_CONF", &conf)
        .args(["inspect", "--format", "{{.Config.User}}", &tag])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65532:65532");
}

/// The compose lab (`docker/compose.yaml`): YAML lint passes; three controllers that each list all
/// three as peers; edges watching all three; the documented admin token matches the configured
/// hash; and each service's own flags and environment pass the binary's `--check-config`.
#[test]
fn the_compose_lab_is_wired_and_its_configurations_check() {
    use serde_yaml::Value;
    let path = workspace_root().join("docker/compose.yaml");
    let yamllint = workspace_root().join(".venv/bin/yamllint");
    let out = Command::new(&yamllint)
        .args([
            "-d",
            "{extends: default, rules: {line-length: {max: 200}, document-start: disable, comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}",
        ])
        .arg(&path)
        .arg(workspace_root().join("docker/otel-collector.yaml"))
        .output()
        .expect("yamllint (tests/requirements.txt)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let services = &doc["services"];
    for s in [
        "controller-1",
        "controller-2",
        "controller-3",
        "edge-a",
        "edge-b",
        "redis",
        "pbx",
        "otel-collector",
    ] {
        assert!(services.get(s).is_some(), "service {s}");
    }
    let env_of = |v: &Value| -> Vec<(String, String)> {
        v.as_mapping()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .filter(|(k, _)| k != "<<")
            .collect()
    };
    let secrets = env_of(&doc["x-secrets"]);
    let tokens = &secrets
        .iter()
        .find(|(k, _)| k == "SIPWARDEN_AUTH__TOKENS")
        .unwrap()
        .1;
    use sha2::Digest;
    let hash = data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(b"lab-admin-token"));
    assert!(tokens.contains(&hash), "the documented admin token matches");

    let dir = tempfile::tempdir().unwrap();
    for i in 1..=3 {
        let args: Vec<String> = services[format!("controller-{i}").as_str()]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let peers = &args[args.iter().position(|a| a == "--peers").unwrap() + 1];
        assert_eq!(
            peers,
            "1=controller-1:7400,2=controller-2:7400,3=controller-3:7400"
        );
        let mut args: Vec<String> = args
            .into_iter()
            .map(|a| a.replace("/data/raft", &dir.path().join("raft").display().to_string()))
            .collect();
        args.push("--check-config".into());
        let out = Command::new(workspace_bin("sipwarden-controller"))
            .args(&args)
            .env_clear()
            .envs(secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "controller-{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let edge_env = env_of(&doc["x-edge-env"]);
    let endpoints = &edge_env
        .iter()
        .find(|(k, _)| k == "SIPWARDEN_CONTROLLER__ENDPOINTS")
        .unwrap()
        .1;
    for i in 1..=3 {
        assert!(endpoints.contains(&format!("controller-{i}:7400")));
    }
    for e in ["edge-a", "edge-b"] {
        let env: Vec<(String, String)> = edge_env
            .iter()
            .cloned()
            .chain(env_of(&services[e]["environment"]))
            .collect();
        let out = Command::new(workspace_bin("sipwarden-edge"))
            .arg("--check-config")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
