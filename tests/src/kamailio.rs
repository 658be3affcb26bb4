//! Kamailio as the PBX registrar with real digest authentication (`tests/kamailio/registrar.cfg`).

use crate::{port_bound, require_tool, wait_until, workspace_root, Proc};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A running Kamailio, killed on drop.
pub struct Kamailio {
    pub proc: Proc,
    pub log: PathBuf,
    pub addr: String,
}

impl Kamailio {
    /// Starts the registrar on `ip:port`, relaying authenticated calls to `callee` (`ip:port`).
    pub fn start(dir: &Path, ip: &str, port: u16, callee: &str) -> Kamailio {
        let bin = require_tool("kamailio", "kamailio");
        let template =
            std::fs::read_to_string(workspace_root().join("tests/kamailio/registrar.cfg"))
                .expect("registrar.cfg");
        let cfg = dir.join(format!("kamailio-{port}.cfg"));
        std::fs::write(
            &cfg,
            template
                .replace("@IP@", ip)
                .replace("@PORT@", &port.to_string())
                .replace("@CALLEE@", callee),
        )
        .expect("write kamailio config");
        let run = dir.join(format!("kamailio-{port}-run"));
        std::fs::create_dir_all(&run).expect("runtime dir");
        let log = dir.join(format!("kamailio-{port}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let proc = Proc::spawn_group(
            "kamailio",
            Command::new(bin)
                .arg("-f")
                .arg(&cfg)
                .args(["-DD", "-E", "-m", "64", "-M", "8", "-Y"])
                .arg(&run)
                .arg("-P")
                .arg(run.join("kamailio.pid"))
                .stdout(out.try_clone().expect("dup"))
                .stderr(out)
                .stdin(Stdio::null()),
        );
        let mut k = Kamailio {
            proc,
            log,
            addr: format!("{ip}:{port}"),
        };
        if !wait_until(Duration::from_secs(15), || port_bound("udp", port)) {
            let _ = k.proc.wait_exit(Duration::from_millis(100));
            panic!("kamailio did not bind udp {port}; log:\n{}", k.log_text());
        }
        k
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests Kamailio received whose User-Agent contains `ua`.
    pub fn requests_from(&self, ua: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("REQ ") && l.contains(&format!("ua={ua}")))
            .count()
    }
}

impl Drop for Kamailio {
    /// SIGTERM lets the main process stop its worker children; the Proc's SIGKILL follows.
    fn drop(&mut self) {
        self.proc.signal("TERM");
        let _ = self.proc.wait_exit(Duration::from_secs(5));
    }
}
