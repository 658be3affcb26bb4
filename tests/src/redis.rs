//! A `redis-server` on loopback for the counter-store tests: its own port and directory, no
//! persistence, killed on drop.

use crate::{free_port, require_tool, wait_until, Proc};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct RedisProc {
    pub proc: Proc,
    pub port: u16,
}

impl RedisProc {
    /// Starts `redis-server` on 127.0.0.1 and waits until it answers PING.
    pub fn start(dir: &Path) -> RedisProc {
        let bin = require_tool("redis-server", "redis-server");
        let port = free_port("127.0.0.1");
        let log = std::fs::File::create(dir.join("redis.log")).expect("redis log");
        let proc = Proc::spawn(
            "redis-server",
            Command::new(bin)
                .current_dir(dir)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--pidfile")
                .arg(dir.join("redis.pid"))
                .stdout(log.try_clone().expect("dup"))
                .stderr(Stdio::from(log)),
        );
        let r = RedisProc { proc, port };
        assert!(
            wait_until(Duration::from_secs(10), || r.command("PING").as_deref()
                == Some("+PONG")),
            "redis-server did not answer PING"
        );
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one inline command and returns the answer's lines (`+PONG`; `$2`, `30`; …).
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    }
}
