//! SIPVicious (`pip install sipvicious`, in `.venv` via tests/requirements.txt) as the attacker.

use crate::{workspace_root, Proc};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The path of a SIPVicious tool, or a panic that says how to install it.
pub fn tool(name: &str) -> PathBuf {
    let venv = workspace_root().join(".venv/bin").join(name);
    if venv.is_file() {
        return venv;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join(name).is_file() {
            return dir.join(name);
        }
    }
    panic!("`{name}` is not installed: `python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt` (the README's test command does this)");
}

/// What a tool printed, and whether it ended by itself within the limit.
pub struct Run {
    pub output: String,
    pub finished: bool,
}

/// Starts the tool's module with every socket bound to `bind_ip`: SIPVicious 0.3.8 accepts
/// `-b/--bindingip` but never passes it to its scanners, so on loopback all its packets would leave
/// from 127.0.0.1 and two attackers could not be told apart.
const LAUNCHER: &str = r#"
import socket, sys, runpy
ip, module = sys.argv[1], sys.argv[2]
bind = socket.socket.bind
def bound(self, addr):
    return bind(self, (ip,) + tuple(addr[1:]))
socket.socket.bind = bound
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__")
"#;

/// Runs `name` with `args` from `bind_ip`, at most `limit`; killed after.
pub fn run(name: &str, bind_ip: &str, args: &[&str], limit: Duration) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.txt");
    let file = std::fs::File::create(&out).expect("out");
    let bin = tool(name);
    let python = bin.with_file_name("python3");
    let module = name.replacen("sipvicious_", "sipvicious.", 1);
    let mut p = Proc::spawn(
        name,
        Command::new(python)
            .current_dir(dir.path())
            .args(["-c", LAUNCHER, bind_ip, &module])
            .args(["-b", bind_ip])
            .args(args)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file),
    );
    let finished = p.wait_exit(limit).is_some();
    drop(p);
    Run {
        output: std::fs::read_to_string(&out).unwrap_or_default(),
        finished,
    }
}
