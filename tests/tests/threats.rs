//! The threat pipeline against real attackers: SIPVicious (svmap, svwar, svcrack) attacks a
//! Kamailio registrar with digest auth through the edge while a legitimate SIPp phone registers
//! and calls; floods; toll fraud; bans kept across a restart; policy reload.

use sipwarden_tests::kamailio::Kamailio;
use sipwarden_tests::*;
use std::time::Duration;

const EDGE_IP: &str = "127.0.0.30";
const PBX_IP: &str = "127.0.0.31";
const PHONE_IP: &str = "127.0.0.32";
const ATTACKER_IP: &str = "127.0.0.33";
const ATTACKER2_IP: &str = "127.0.0.35";
const ATTACKER3_IP: &str = "127.0.0.36";

/// Kamailio on PBX_IP with a SIPp callee behind it, and an edge in front.
struct Site {
    dir: tempfile::TempDir,
    _callee: SippServer,
    kamailio: Kamailio,
    edge: EdgeProc,
}

impl Site {
    fn start(policy: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let callee_port = free_port(PBX_IP);
        let callee = SippServer::start(dir.path(), "uas.xml", PBX_IP, callee_port, "udp");
        let kport = free_port(PBX_IP);
        let kamailio = Kamailio::start(
            dir.path(),
            PBX_IP,
            kport,
            &format!("{PBX_IP}:{callee_port}"),
        );
        let edge = EdgeProc::start(
            EDGE_IP,
            &format!(
                "[[backends]]\naddress = \"{PBX_IP}:{kport}\"\n\n[health]\ninterval_ms = 1000\ntimeout_ms = 500\n\n{policy}"
            ),
        );
        Site {
            dir,
            _callee: callee,
            kamailio,
            edge,
        }
    }

    /// `calls` authenticated register-and-call cycles from the phone, on a thread.
    fn phone(&self, calls: u32) -> std::thread::JoinHandle<SippRun> {
        let dir = self.dir.path().to_path_buf();
        let target = self.edge.addr();
        std::thread::spawn(move || {
            sipp_client_args(
                &dir,
                "phone_auth_call.xml",
                PHONE_IP,
                free_port(PHONE_IP),
                "udp",
                &target,
                "1001",
                calls,
                Duration::from_secs(60),
                &["-au", "1001", "-ap", "secret-1001", "-r", "2"],
            )
        })
    }

    fn attack(&self, tool: &str, args: &[&str]) -> sipvicious::Run {
        self.attack_from(ATTACKER_IP, tool, args)
    }

    fn attack_from(&self, ip: &str, tool: &str, args: &[&str]) -> sipvicious::Run {
        let port = self.edge.sip_port.to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-p", &port, EDGE_IP]);
        let run = sipvicious::run(tool, ip, &all, Duration::from_secs(40));
        println!("--- {tool} {all:?}\n{}", run.output);
        run
    }
}

fn assert_phone_ok(run: SippRun) {
    assert!(run.success, "the legitimate phone failed:\n{}", run.errors);
}

#[test]
fn sipvicious_gets_nothing_and_the_phone_keeps_working() {
    // JSON logs: each security event is a flat JSON line a log shipper can index.
    let site = Site::start("[log]\nformat = \"json\"\n");
    let phone = site.phone(6);

    let map = site.attack("sipvicious_svmap", &[]);
    assert!(map.output.contains("found nothing"), "svmap found the edge");
    let war = site.attack("sipvicious_svwar", &["-e", "1000-1019", "-m", "REGISTER"]);
    assert!(
        war.output.contains("found nothing"),
        "svwar found an extension"
    );
    let crack = site.attack("sipvicious_svcrack", &["-u", "1000", "-r", "1-300"]);
    assert!(
        crack.output.contains("found nothing"),
        "svcrack found a password"
    );

    assert_eq!(
        site.kamailio.requests_from("friendly-scanner"),
        0,
        "no scanner request reached the PBX"
    );
    assert!(site.edge.events("scanner", "ban") >= 1.0);
    assert!(
        site.edge.events("ban", "drop") >= 1.0,
        "later packets stopped at the gate"
    );
    assert_phone_ok(phone.join().unwrap());
}

/// With the User-Agent fingerprint only logged (dry run) — a tool that lies about its
/// User-Agent — the behavioural rules still stop it: extension walking after a few distinct
/// extensions, password guessing after a few wrong passwords.
#[test]
fn behaviour_alone_bans_enumeration_and_password_guessing() {
    let site = Site::start("[policy.scanner]\ndry_run = true\n");
    let phone = site.phone(6);

    let war = site.attack_from(
        ATTACKER2_IP,
        "sipvicious_svwar",
        &["-e", "1000-1019", "-m", "REGISTER"],
    );
    let probes = site.kamailio.requests_from("friendly-scanner");
    println!("svwar: {probes} requests reached the PBX before the ban");
    assert!(
        site.edge.events("enumeration", "ban") >= 1.0,
        "svwar banned by the enumeration rule"
    );
    assert!(probes <= 12, "{probes} probes reached the PBX");
    assert!(
        war.output.lines().filter(|l| l.contains("reqauth")).count() < 8,
        "svwar learned at most the extensions answered before the threshold"
    );

    // A new attacker address for the cracker (the first is banned).
    let before = site.kamailio.log_text().matches("AUTHFAIL 1000").count();
    let crack = site.attack_from(
        ATTACKER3_IP,
        "sipvicious_svcrack",
        &["-u", "1000", "-r", "1-300"],
    );
    let guesses = site.kamailio.log_text().matches("AUTHFAIL 1000").count() - before;
    println!("svcrack: {guesses} password checks reached the PBX before the ban");
    assert!(
        crack.output.contains("found nothing"),
        "svcrack found a password"
    );
    assert!(
        site.edge.events("bruteforce", "ban") >= 1.0,
        "svcrack banned by the brute-force rule"
    );
    assert!(guesses <= 15, "{guesses} guesses reached the PBX");
    assert!(
        site.edge.events("scanner", "ban") == 0.0,
        "the fingerprint rule only logged"
    );
    assert_phone_ok(phone.join().unwrap());
}
