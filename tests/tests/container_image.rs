//! The container image (`docker/Dockerfile`, built with buildah by `scripts/build-image.sh` from
//! this profile's binaries): it builds, and a container of it — run with podman on the host
//! network, loopback ports only — starts the edge and, with the entrypoint overridden, the
//! controller, each answering `/healthz`; both run as the unprivileged user.

use sipwarden_tests::*;
use std::process::Command;
use std::time::Duration;

/// podman and buildah need runc and bounded ulimits here (../shared/ECOSYSTEM.md).
fn containers_conf(dir: &std::path::Path) -> std::path::PathBuf {
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
    )
    .unwrap();
    conf
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
    let dir = tempfile::tempdir().unwrap();
    let conf = containers_conf(dir.path());
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
