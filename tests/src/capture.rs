//! Loopback capture for the load benchmark: how long a proxy holds each message, measured the
//! same way for the edge and for Kamailio, from outside both.
//!
//! `tcpdump` stamps each packet (kernel time, ns) as its sender hands it to loopback. Over TCP
//! each direction of a connection is put back together and cut into messages by Content-Length,
//! a message stamped with the segment that completed it (the proxy cannot act on it before). A
//! message to the proxy and the proxy's forward of it are matched by Call-ID, CSeq and the start
//! line's method or status code, which a stateless proxy passes on unchanged; the difference is
//! the message's transit through the proxy: the hop to it, the wait for a core, the handling. A
//! transaction's figure is its request's transit plus its final response's. The response time of
//! each of the UAC's transactions, through the proxy and straight to the UAS, gives what the proxy
//! adds end to end, the hops after it included.
//!
//! The latency probe cannot give this: it blocks right after each send, so the proxy it wakes gets
//! the probe's core at once, where a SIPp that goes on sending keeps it. The edge's own delay
//! histogram sees every datagram but only the edge's.

use crate::{find_tool, wait_until, Proc};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Packets one capture keeps at most (about 150 MB of SIP over UDP).
const MAX_PACKETS: u32 = 300_000;

/// A running `tcpdump` on `lo`, writing to a file.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
    log: PathBuf,
}

/// One SIP message as captured: a UDP datagram, or a message reassembled from a TCP stream
/// (stamped with the segment that completed it).
#[derive(Clone, Debug)]
pub struct Datagram {
    /// Kernel timestamp, ns since the Unix epoch.
    pub at_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// One captured TCP segment that carried data.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Kernel timestamp, ns since the Unix epoch.
    pub at_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// What a capture held, in capture order.
#[derive(Debug, Default)]
pub struct Packets {
    pub udp: Vec<Datagram>,
    pub tcp: Vec<Segment>,
}

/// What a proxy added to the messages of a capture, ms, each list sorted.
#[derive(Debug, Default)]
pub struct Transit {
    /// Per message: its forward's timestamp minus its own.
    pub messages: Vec<f64>,
    /// Per transaction: its request's transit plus its final response's.
    pub transactions: Vec<f64>,
    /// Messages to the proxy with no forward in the capture (dropped, or cut off by its end).
    pub unmatched: usize,
    /// Packets the kernel dropped before tcpdump read them (its own count).
    pub dropped: u64,
    /// `messages` and `transactions` for what reached the proxy while the UAS kept up (outside
    /// the [`Behind`] spans given to [`transit`]; a transaction when both its messages did).
    pub kept_up_messages: Vec<f64>,
    pub kept_up_transactions: Vec<f64>,
}

/// The spans of a capture while the UAS was behind with its answers: from each request it
/// answered more than `late_ms` after the request reached it to that answer, stretched by a
/// margin past its end (a UAS that catches up sends its backlog as one burst, which a proxy then
/// takes a while to pass on), overlapping spans merged. A proxy's transit in these spans measures
/// the load generator as much as the proxy: any relay queues a burst behind its first message.
#[derive(Debug, Default, PartialEq)]
pub struct Behind {
    spans: Vec<(u64, u64)>,
}

impl Behind {
    pub fn find(answers: &[Timed], late_ms: f64, margin: Duration) -> Behind {
        let margin = margin.as_nanos() as u64;
        let mut late: Vec<(u64, u64)> = answers
            .iter()
            .filter(|a| a.ms > late_ms)
            .map(|a| (a.at_ns, a.at_ns + (a.ms * 1e6) as u64 + margin))
            .collect();
        late.sort_unstable();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (start, end) in late {
            match spans.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => spans.push((start, end)),
            }
        }
        Behind { spans }
    }

    /// Whether `at_ns` falls in a span.
    pub fn contains(&self, at_ns: u64) -> bool {
        let i = self.spans.partition_point(|s| s.0 <= at_ns);
        i > 0 && at_ns <= self.spans[i - 1].1
    }

    /// The share of `from..to` (ns) the spans cover.
    pub fn share(&self, from: u64, to: u64) -> f64 {
        if to <= from {
            return 0.0;
        }
        let covered: u64 = self
            .spans
            .iter()
            .map(|&(s, e)| e.min(to).saturating_sub(s.max(from)))
            .sum();
        covered as f64 / (to - from) as f64
    }
}

impl Capture {
    /// Starts `tcpdump` on `lo` for UDP and TCP to or from any of `ports` (at least one), writing
    /// into `dir`; `None` (with a note on stderr) when tcpdump is not installed or does not start
    /// listening within 5 s.
    pub fn start(dir: &Path, ports: &[u16]) -> Option<Capture> {
        let port = *ports.first()?;
        let filter = ports
            .iter()
            .map(|p| format!("port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let Some(tcpdump) = find_tool("tcpdump") else {
            eprintln!("tcpdump is not installed (apt-get install tcpdump): no capture");
            return None;
        };
        let file = dir.join(format!("capture-{port}.pcap"));
        let log = dir.join(format!("capture-{port}.log"));
        let proc = Proc::spawn(
            "tcpdump",
            Command::new(tcpdump)
                .args(["-i", "lo", "-nn", "-q", "-B", "32768"])
                .args([
                    "--time-stamp-precision=nano",
                    "-c",
                    &MAX_PACKETS.to_string(),
                ])
                .arg("-w")
                .arg(&file)
                .arg(format!("(udp or tcp) and ({filter})"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).ok()?),
        );
        let listening = wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
        });
        let capture = Capture { proc, file, log };
        if !listening {
            eprintln!("tcpdump did not start listening: no capture");
            return None;
        }
        Some(capture)
    }

    /// Stops the capture (SIGINT, so tcpdump writes out what it holds) and reads it back, with the
    /// number of datagrams the kernel dropped on the way to tcpdump.
    pub fn finish(mut self) -> (Packets, u64) {
        self.proc.signal("INT");
        if self.proc.wait_exit(Duration::from_secs(5)).is_none() {
            eprintln!("tcpdump did not stop on SIGINT; killed, its capture may be cut short");
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let dropped = log
            .lines()
            .find(|l| l.ends_with("packets dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let packets = std::fs::File::open(&self.file)
            .map(|f| read_pcap(std::io::BufReader::new(f)))
            .unwrap_or_default();
        let _ = std::fs::remove_file(&self.file);
        (packets, dropped)
    }
}

/// The UDP datagrams and the TCP segments with data of a pcap stream with Ethernet framing (as
/// `lo` captures are); anything else in it is skipped, and a truncated file yields what came
/// before the cut.
pub fn read_pcap(input: impl std::io::Read) -> Packets {
    let Ok(mut reader) = PcapReader::new(input) else {
        return Packets::default();
    };
    let mut out = Packets::default();
    while let Some(Ok(packet)) = reader.next_packet() {
        let Ok(sliced) = SlicedPacket::from_ethernet(&packet.data) else {
            continue;
        };
        let (src_ip, dst_ip) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
            ),
            _ => continue,
        };
        let at_ns = packet.timestamp.as_nanos() as u64;
        match &sliced.transport {
            Some(TransportSlice::Udp(udp)) => out.udp.push(Datagram {
                at_ns,
                src: SocketAddr::new(src_ip, udp.source_port()),
                dst: SocketAddr::new(dst_ip, udp.destination_port()),
                payload: udp.payload().to_vec(),
            }),
            Some(TransportSlice::Tcp(tcp)) if !tcp.payload().is_empty() => out.tcp.push(Segment {
                at_ns,
                src: SocketAddr::new(src_ip, tcp.source_port()),
                dst: SocketAddr::new(dst_ip, tcp.destination_port()),
                seq: tcp.sequence_number(),
                payload: tcp.payload().to_vec(),
            }),
            _ => {}
        }
    }
    out
}

/// Every SIP message of a capture in time order: the UDP datagrams, and the messages of each TCP
/// stream.
pub fn messages(packets: &Packets) -> Vec<Datagram> {
    let mut out = packets.udp.clone();
    out.extend(stream_messages(&packets.tcp));
    out.sort_by_key(|d| d.at_ns);
    out
}

/// More than this without a whole message in a stream ends the attempt to frame it.
const MAX_MESSAGE: usize = 1 << 20;

/// One direction of a TCP connection being put back together.
#[derive(Default)]
struct Stream {
    /// The sequence number the next segment should carry; `None` before the first one, and after
    /// a gap until a segment starts a message.
    next: Option<u32>,
    buf: Vec<u8>,
}

/// The SIP messages carried by TCP `segments` (in capture order), each stamped with the segment
/// that completed it, framed by Content-Length. A retransmitted or overlapping segment adds only
/// what is new; after a gap (a segment the capture lost) the stream waits for a segment that
/// starts with a start line, as a stream seen from its middle does.
pub fn stream_messages(segments: &[Segment]) -> Vec<Datagram> {
    let mut streams: HashMap<(SocketAddr, SocketAddr), Stream> = HashMap::new();
    let mut out = Vec::new();
    for seg in segments {
        let st = streams.entry((seg.src, seg.dst)).or_default();
        let data: &[u8] = match st.next {
            Some(next) => {
                // Where this segment starts relative to what was expected (sequence numbers
                // wrap).
                let ahead = seg.seq.wrapping_sub(next) as i32;
                if ahead > 0 {
                    st.buf.clear();
                    st.next = None;
                    if !starts_message(&seg.payload) {
                        continue;
                    }
                    &seg.payload
                } else {
                    let seen = ahead.unsigned_abs() as usize;
                    if seen >= seg.payload.len() {
                        continue;
                    }
                    &seg.payload[seen..]
                }
            }
            None if starts_message(&seg.payload) => &seg.payload,
            None => continue,
        };
        st.buf.extend_from_slice(data);
        st.next = Some(seg.seq.wrapping_add(seg.payload.len() as u32));
        if st.buf.len() > MAX_MESSAGE {
            // No end of headers in sight: not SIP as framed here; start over at a message.
            st.buf.clear();
            st.next = None;
            continue;
        }
        while let Some(len) = complete_message(&st.buf) {
            let payload: Vec<u8> = st.buf.drain(..len).collect();
            if !payload.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                out.push(Datagram {
                    at_ns: seg.at_ns,
                    src: seg.src,
                    dst: seg.dst,
                    payload,
                });
            }
        }
    }
    out
}

/// Whether `data` begins a SIP message (a status line, or a method and a URI), or keep-alive
/// CRLFs.
fn starts_message(data: &[u8]) -> bool {
    if data.starts_with(b"SIP/2.0 ") || data.starts_with(b"\r\n") {
        return true;
    }
    let method = data.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method > 0 && data.get(method) == Some(&b' ')
}

/// The length of the first whole message in `buf` (keep-alive CRLFs before it count as one of
/// their own), or `None` while it is incomplete.
fn complete_message(buf: &[u8]) -> Option<usize> {
    let crlf = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if crlf > 0 {
        return Some(crlf);
    }
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..head]);
    let body = text
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| {
            let n = n.trim();
            n.eq_ignore_ascii_case("content-length") || n == "l"
        })
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head + body).then_some(head + body)
}

/// What identifies a SIP message across a stateless proxy: Call-ID, CSeq, and the start line's
/// method or status code.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MessageKey {
    call_id: String,
    cseq: String,
    start: String,
}

impl MessageKey {
    /// Whether the message is a request (its start is a method, not a status code).
    fn is_request(&self) -> bool {
        self.start.parse::<u16>().is_err()
    }

    /// For a final response, the key of the request it answers (the method named in its CSeq).
    fn answers(&self) -> Option<MessageKey> {
        let code = self.start.parse::<u16>().ok()?;
        (code >= 200).then(|| MessageKey {
            start: self.cseq.rsplit(' ').next().unwrap_or_default().to_string(),
            ..self.clone()
        })
    }
}

fn message_key(payload: &[u8]) -> Option<MessageKey> {
    let text = std::str::from_utf8(payload).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let first = lines.next()?;
    let start = match first.strip_prefix("SIP/2.0 ") {
        Some(rest) => rest.get(..3)?.to_string(),
        None => first.split(' ').next()?.to_string(),
    };
    let (mut call_id, mut cseq) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("call-id") || name == "i" {
            call_id = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("cseq") {
            cseq = Some(value.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    Some(MessageKey {
        call_id: call_id?,
        cseq: cseq?,
        start,
    })
}

/// The transit of each message through the proxy at `proxy` that forwards to the UAS at `uas`,
/// and of each transaction (request and final response), in all and while the UAS kept up (outside
/// `behind`). A retransmission is matched by its
/// first copy in each direction. A message arrives at the proxy when it is sent to the proxy's
/// address or by the UAS, and leaves it when sent from the proxy's address or to the UAS: over
/// TCP the proxy's connections toward the UAS have addresses of their own (the kernel picks the
/// source).
pub fn transit(
    datagrams: &[Datagram],
    proxy: SocketAddr,
    uas: SocketAddr,
    behind: &Behind,
) -> Transit {
    let (held, unmatched) = held(datagrams, proxy, uas);
    let mut out = Transit {
        unmatched,
        ..Transit::default()
    };
    for (key, &(at_ns, ms)) in &held {
        out.messages.push(ms);
        let kept_up = !behind.contains(at_ns);
        if kept_up {
            out.kept_up_messages.push(ms);
        }
        let Some(request) = key.answers() else {
            continue;
        };
        if let Some(&(req_at, req_ms)) = held.get(&request) {
            out.transactions.push(req_ms + ms);
            if kept_up && !behind.contains(req_at) {
                out.kept_up_transactions.push(req_ms + ms);
            }
        }
    }
    for list in [
        &mut out.messages,
        &mut out.transactions,
        &mut out.kept_up_messages,
        &mut out.kept_up_transactions,
    ] {
        list.sort_by(f64::total_cmp);
    }
    out
}

/// Each message's transit through the proxy as [`transit`] finds it, with when it reached the
/// proxy and whether it is a request, in arrival order: where in a run the slow ones were.
pub fn transit_timeline(datagrams: &[Datagram], proxy: SocketAddr, uas: SocketAddr) -> Vec<Timed> {
    let mut out: Vec<Timed> = held(datagrams, proxy, uas)
        .0
        .into_iter()
        .map(|(key, (at_ns, ms))| Timed {
            at_ns,
            ms,
            request: key.is_request(),
        })
        .collect();
    out.sort_by_key(|t| t.at_ns);
    out
}

/// A message's time through something (a proxy's transit, a UAS's answer), and when it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timed {
    /// Kernel timestamp of the message's arrival, ns since the Unix epoch.
    pub at_ns: u64,
    pub ms: f64,
    /// Whether the message timed is a request (for answers, always).
    pub request: bool,
}

/// Each message the proxy forwarded: when it arrived and how long it was held (ms); and how many
/// messages to it have no forward in the capture.
fn held(
    datagrams: &[Datagram],
    proxy: SocketAddr,
    uas: SocketAddr,
) -> (HashMap<MessageKey, (u64, f64)>, usize) {
    let mut arrived: HashMap<MessageKey, u64> = HashMap::new();
    let mut left: HashMap<MessageKey, u64> = HashMap::new();
    for d in datagrams {
        let Some(key) = message_key(&d.payload) else {
            continue;
        };
        if d.src == proxy || d.dst == uas {
            left.entry(key).or_insert(d.at_ns);
        } else if d.dst == proxy || d.src == uas {
            arrived.entry(key).or_insert(d.at_ns);
        }
    }
    let mut unmatched = 0;
    let mut held = HashMap::new();
    for (key, t0) in arrived {
        match left.get(&key) {
            Some(&t1) if t1 >= t0 => {
                held.insert(key, (t0, (t1 - t0) as f64 / 1e6));
            }
            _ => unmatched += 1,
        }
    }
    (held, unmatched)
}

/// Response times at the UAC on `uac` through `target` (a proxy, or the UAS itself), ms, sorted:
/// from each request the UAC sent to `target` to the final response `target` sent back (first
/// copies). The UAC is told by its address alone: over TCP it connects from a port of its own.
/// The latency a proxy adds to a transaction, end to end, is the difference between these through
/// the proxy and straight to the UAS under the same load: besides the proxy's own hold, it counts
/// what the proxy's way of sending does to the hops after it.
pub fn response_times(datagrams: &[Datagram], uac: IpAddr, target: SocketAddr) -> Vec<f64> {
    sorted_ms(&round_trips(
        datagrams,
        |d| d.src.ip() == uac && d.dst == target,
        |d| d.src == target && d.dst.ip() == uac,
    ))
}

/// How long `uas` took to answer each request it was sent, in the order the requests reached it:
/// from the request reaching it to its response leaving (first copies), whoever sent it. Through
/// a proxy, a transaction's response time at the UAC is this plus the proxy's transit both ways,
/// so the two show where a slow transaction spent its time.
pub fn answer_timeline(datagrams: &[Datagram], uas: SocketAddr) -> Vec<Timed> {
    round_trips(datagrams, |d| d.dst == uas, |d| d.src == uas)
}

/// The times of `timed`, ms, sorted.
pub fn sorted_ms(timed: &[Timed]) -> Vec<f64> {
    let mut out: Vec<f64> = timed.iter().map(|t| t.ms).collect();
    out.sort_by(f64::total_cmp);
    out
}

/// From each request that `sent` picks to the first response to it that `answered` picks, in the
/// order the requests were sent.
fn round_trips(
    datagrams: &[Datagram],
    sent: impl Fn(&Datagram) -> bool,
    answered: impl Fn(&Datagram) -> bool,
) -> Vec<Timed> {
    let mut out_at: HashMap<MessageKey, u64> = HashMap::new();
    let mut back_at: HashMap<MessageKey, u64> = HashMap::new();
    for d in datagrams {
        let Some(key) = message_key(&d.payload) else {
            continue;
        };
        if key.is_request() {
            if sent(d) {
                out_at.entry(key).or_insert(d.at_ns);
            }
        } else if let Some(request) = key.answers() {
            if answered(d) {
                back_at.entry(request).or_insert(d.at_ns);
            }
        }
    }
    let mut out: Vec<Timed> = out_at
        .iter()
        .filter_map(|(key, &t0)| {
            let t1 = *back_at.get(key)?;
            (t1 >= t0).then(|| Timed {
                at_ns: t0,
                ms: (t1 - t0) as f64 / 1e6,
                request: true,
            })
        })
        .collect();
    out.sort_by_key(|t| t.at_ns);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    use pcap_file::{DataLink, TsResolution};

    const UAC: &str = "127.0.0.3:5090";
    const PROXY: &str = "127.0.0.2:5070";
    const UAS: &str = "127.0.0.1:5080";

    fn sip(start: &str, call: &str, cseq: &str) -> Vec<u8> {
        format!("{start}\r\nVia: SIP/2.0/UDP x;branch=z9hG4bK1\r\nCall-ID: {call}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n").into_bytes()
    }

    fn datagram(at_us: u64, src: &str, dst: &str, payload: Vec<u8>) -> Datagram {
        Datagram {
            at_ns: at_us * 1000,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload,
        }
    }

    #[test]
    fn a_transaction_adds_its_request_and_final_response() {
        let req = || sip("OPTIONS sip:a@b SIP/2.0", "c1", "1 OPTIONS");
        let ok = || sip("SIP/2.0 200 OK", "c1", "1 OPTIONS");
        let trying = || sip("SIP/2.0 100 Trying", "c1", "1 OPTIONS");
        let caps = [
            datagram(1_000, UAC, PROXY, req()),
            datagram(1_300, PROXY, UAS, req()),
            datagram(1_400, UAS, PROXY, trying()),
            datagram(1_450, PROXY, UAC, trying()),
            datagram(1_500, UAS, PROXY, ok()),
            datagram(1_700, PROXY, UAC, ok()),
            // A retransmission of the request: its first copy counts.
            datagram(1_800, UAC, PROXY, req()),
            // A second transaction whose forward never left.
            datagram(
                2_000,
                UAC,
                PROXY,
                sip("OPTIONS sip:a@b SIP/2.0", "c2", "1 OPTIONS"),
            ),
        ];
        let t = transit(
            &caps,
            PROXY.parse().unwrap(),
            UAS.parse().unwrap(),
            &Behind::default(),
        );
        assert_eq!(t.messages, vec![0.05, 0.2, 0.3]);
        assert_eq!(t.transactions, vec![0.5]);
        assert_eq!(t.unmatched, 1);
        // With the UAS never behind, everything counts as kept up.
        assert_eq!(t.kept_up_messages, t.messages);
        assert_eq!(t.kept_up_transactions, t.transactions);
    }

    fn answered(at_us: u64, ms: f64) -> Timed {
        Timed {
            at_ns: at_us * 1000,
            ms,
            request: true,
        }
    }

    #[test]
    fn the_uas_is_behind_from_each_late_request_to_its_answer_and_a_margin_after() {
        let answers = [
            answered(1_000, 1.0),
            // Late: behind from 2 ms to 8 ms, and 1 ms past.
            answered(2_000, 6.0),
            // Late again within that span: it stretches to 12 + 1 ms.
            answered(5_000, 7.0),
            answered(14_000, 2.0),
            // A span of its own: 20 to 30 ms, and 1 ms past.
            answered(20_000, 10.0),
        ];
        let behind = Behind::find(&answers, 5.0, Duration::from_millis(1));
        assert_eq!(
            behind.spans,
            vec![(2_000_000, 13_000_000), (20_000_000, 31_000_000)]
        );
        for (at_us, inside) in [
            (1_999, false),
            (2_000, true),
            (13_000, true),
            (13_001, false),
            (19_999, false),
            (25_000, true),
            (31_001, false),
        ] {
            assert_eq!(behind.contains(at_us * 1000), inside, "at {at_us} µs");
        }
        // 11 + 11 ms of 40.
        assert!((behind.share(0, 40_000_000) - 0.55).abs() < 1e-9);
        // Clipped to the window asked about.
        assert!((behind.share(10_000_000, 20_000_000) - 0.3).abs() < 1e-9);
        assert_eq!(behind.share(5, 5), 0.0);
        assert_eq!(
            Behind::find(&answers[..1], 5.0, Duration::ZERO),
            Behind::default()
        );
    }

    #[test]
    fn a_transaction_counts_as_kept_up_only_when_both_its_messages_reached_the_proxy_outside_the_spans(
    ) {
        let req = |c: &str| sip("OPTIONS sip:a@b SIP/2.0", c, "1 OPTIONS");
        let ok = |c: &str| sip("SIP/2.0 200 OK", c, "1 OPTIONS");
        let caps = [
            // c1: all before the UAS fell behind.
            datagram(1_000, UAC, PROXY, req("c1")),
            datagram(1_500, PROXY, UAS, req("c1")),
            datagram(1_600, UAS, PROXY, ok("c1")),
            datagram(1_850, PROXY, UAC, ok("c1")),
            // c2: its request before, its response (sent as the UAS caught up) inside.
            datagram(2_000, UAC, PROXY, req("c2")),
            datagram(2_500, PROXY, UAS, req("c2")),
            datagram(9_000, UAS, PROXY, ok("c2")),
            // c3: its request inside, its response just after.
            datagram(9_500, UAC, PROXY, req("c3")),
            datagram(10_000, PROXY, UAS, req("c3")),
            datagram(10_600, UAS, PROXY, ok("c3")),
            datagram(10_850, PROXY, UAC, ok("c3")),
            datagram(11_000, PROXY, UAC, ok("c2")),
        ];
        // The UAS answered c2 6.5 ms late: behind from 2.5 ms to 9 ms, and 1 ms past.
        let answers = answer_timeline(&caps, UAS.parse().unwrap());
        let behind = Behind::find(&answers, 5.0, Duration::from_millis(1));
        let t = transit(&caps, PROXY.parse().unwrap(), UAS.parse().unwrap(), &behind);
        assert_eq!(t.messages, vec![0.25, 0.25, 0.5, 0.5, 0.5, 2.0]);
        assert_eq!(t.transactions, vec![0.75, 0.75, 2.5]);
        // c2's request reached the proxy at 2 ms, before the span, its response inside; c3's
        // request inside, its response after.
        assert_eq!(t.kept_up_messages, vec![0.25, 0.25, 0.5, 0.5]);
        assert_eq!(t.kept_up_transactions, vec![0.75]);
    }

    #[test]
    fn response_times_run_from_the_uacs_request_to_its_final_response() {
        let req = |call: &str| sip("OPTIONS sip:a@b SIP/2.0", call, "1 OPTIONS");
        let ok = |call: &str| sip("SIP/2.0 200 OK", call, "1 OPTIONS");
        const OTHER: &str = "127.0.0.4:6000";
        let caps = [
            datagram(1_000, UAC, PROXY, req("c1")),
            datagram(1_300, PROXY, UAS, req("c1")),
            datagram(
                1_450,
                PROXY,
                UAC,
                sip("SIP/2.0 100 Trying", "c1", "1 OPTIONS"),
            ),
            datagram(1_500, UAS, PROXY, ok("c1")),
            datagram(1_900, PROXY, UAC, ok("c1")),
            // A retransmitted final response: the first copy counts.
            datagram(2_500, PROXY, UAC, ok("c1")),
            // Another UAC's transaction through the same proxy is not this one's.
            datagram(2_000, OTHER, PROXY, req("c2")),
            datagram(2_200, PROXY, OTHER, ok("c2")),
            // Unanswered.
            datagram(3_000, UAC, PROXY, req("c3")),
            // A request with a final response to a different method is no answer to it.
            datagram(4_000, UAC, PROXY, sip("BYE sip:a@b SIP/2.0", "c4", "2 BYE")),
            datagram(4_100, PROXY, UAC, sip("SIP/2.0 200 OK", "c4", "2 INVITE")),
        ];
        let uac = UAC.parse::<SocketAddr>().unwrap().ip();
        assert_eq!(
            response_times(&caps, uac, PROXY.parse().unwrap()),
            vec![0.9]
        );
        // Straight to the UAS: the UAS is the target.
        let direct = [
            datagram(1_000, UAC, UAS, req("d1")),
            datagram(1_250, UAS, UAC, ok("d1")),
        ];
        assert_eq!(
            response_times(&direct, uac, UAS.parse().unwrap()),
            vec![0.25]
        );
        // The UAS's own part: from the forward reaching it to its final response leaving, whoever
        // sent the request.
        let answers = |caps: &[Datagram]| sorted_ms(&answer_timeline(caps, UAS.parse().unwrap()));
        assert_eq!(answers(&caps), vec![0.2]);
        assert_eq!(answers(&direct), vec![0.25]);
    }

    #[test]
    fn messages_are_told_apart_by_call_cseq_and_start_line() {
        let k = |p: Vec<u8>| message_key(&p).unwrap();
        let invite = k(sip("INVITE sip:a@b SIP/2.0", "c", "1 INVITE"));
        assert_eq!(invite.start, "INVITE");
        assert_ne!(invite, k(sip("INVITE sip:a@b SIP/2.0", "c", "2 INVITE")));
        assert_ne!(invite, k(sip("INVITE sip:a@b SIP/2.0", "d", "1 INVITE")));
        assert_eq!(k(sip("SIP/2.0 180 Ringing", "c", "1  INVITE")).start, "180");
        // Compact Call-ID, any case, extra blanks in CSeq.
        let compact = k(b"BYE sip:a SIP/2.0\r\ni: c\r\ncseq:  2   BYE\r\n\r\n".to_vec());
        assert_eq!(
            (compact.call_id.as_str(), compact.cseq.as_str()),
            ("c", "2 BYE")
        );
        assert!(message_key(b"\r\n\r\n").is_none());
        assert!(message_key(b"OPTIONS sip:a SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n").is_none());
    }

    #[test]
    fn pcap_with_ethernet_framing_reads_back_udp_and_tcp_data() {
        let mut file = Vec::new();
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            ..Default::default()
        };
        let mut w = PcapWriter::with_header(&mut file, header).unwrap();
        let udp = |from: SocketAddr, to: SocketAddr, body: &[u8]| {
            let (IpAddr::V4(a), IpAddr::V4(b)) = (from.ip(), to.ip()) else {
                unreachable!()
            };
            let mut bytes = Vec::new();
            PacketBuilder::ethernet2([0; 6], [0; 6])
                .ipv4(a.octets(), b.octets(), 64)
                .udp(from.port(), to.port())
                .write(&mut bytes, body)
                .unwrap();
            bytes
        };
        let one = udp(UAC.parse().unwrap(), PROXY.parse().unwrap(), b"hello");
        let tcp = |seq: u32, body: &[u8]| {
            let mut bytes = Vec::new();
            PacketBuilder::ethernet2([0; 6], [0; 6])
                .ipv4([127, 0, 0, 3], [127, 0, 0, 2], 64)
                .tcp(5090, 5070, seq, 1000)
                .write(&mut bytes, body)
                .unwrap();
            bytes
        };
        let (data, ack) = (tcp(7, b"x"), tcp(8, b""));
        let at = Duration::new(1_700_000_000, 123_456_789);
        for data in [&one, &data, &ack] {
            w.write_packet(&PcapPacket::new(at, data.len() as u32, data))
                .unwrap();
        }
        w.into_writer();
        let got = read_pcap(&file[..]);
        assert_eq!(got.udp.len(), 1);
        assert_eq!(got.udp[0].at_ns, 1_700_000_000_123_456_789);
        assert_eq!(got.udp[0].src, UAC.parse().unwrap());
        assert_eq!(got.udp[0].dst, PROXY.parse().unwrap());
        assert_eq!(got.udp[0].payload, b"hello");
        // TCP segments with data only (no bare acknowledgement).
        assert_eq!(got.tcp.len(), 1);
        assert_eq!((got.tcp[0].seq, &got.tcp[0].payload[..]), (7, &b"x"[..]));
        assert_eq!(got.tcp[0].src, UAC.parse().unwrap());
        // A file cut in the middle of a record yields the records before it.
        let cut = read_pcap(&file[..file.len() - 3]);
        assert_eq!((cut.udp.len(), cut.tcp.len()), (1, 1));
        let none = read_pcap(&b"not a pcap"[..]);
        assert!(none.udp.is_empty() && none.tcp.is_empty());
    }

    fn segment(at_us: u64, seq: u32, payload: &[u8]) -> Segment {
        Segment {
            at_ns: at_us * 1000,
            src: UAC.parse().unwrap(),
            dst: PROXY.parse().unwrap(),
            seq,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn tcp_streams_are_framed_by_content_length() {
        let one = sip("OPTIONS sip:a@b SIP/2.0", "c1", "1 OPTIONS");
        let two = b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: c2\r\nCSeq: 1 MESSAGE\r\nl: 5\r\n\r\nhello"
            .to_vec();
        let three = sip("BYE sip:a@b SIP/2.0", "c3", "2 BYE");
        let (a, b) = one.split_at(20);
        let mut joined = two.clone();
        joined.extend_from_slice(b"\r\n\r\n");
        joined.extend_from_slice(&three);
        let n1 = 1000 + one.len() as u32;
        let segs = [
            // The first message in two segments, the second one retransmitted.
            segment(10, 1000, a),
            segment(20, 1000 + a.len() as u32, b),
            segment(25, 1000 + a.len() as u32, b),
            // A body, a keep-alive, and a third message in one segment.
            segment(30, n1, &joined),
        ];
        let got = stream_messages(&segs);
        let payloads: Vec<&[u8]> = got.iter().map(|d| &d.payload[..]).collect();
        assert_eq!(payloads, vec![&one[..], &two[..], &three[..]]);
        let stamps: Vec<u64> = got.iter().map(|d| d.at_ns / 1000).collect();
        assert_eq!(stamps, vec![20, 30, 30]);
    }

    #[test]
    fn a_tcp_stream_resumes_at_a_start_line_after_a_gap() {
        let one = sip("OPTIONS sip:a@b SIP/2.0", "c1", "1 OPTIONS");
        let two = sip("SIP/2.0 200 OK", "c2", "1 OPTIONS");
        let (a, _lost) = one.split_at(30);
        let segs = [
            // Seen from its middle: skipped until a message starts.
            segment(5, 10, b"ntent-Length: 0\r\n\r\n"),
            segment(10, 1000, a),
            // The rest of the first message was not captured: it is never whole.
            segment(30, 1000 + one.len() as u32, &two),
            // A segment that overlaps what came before adds only what is new (here nothing).
            segment(40, 1000 + one.len() as u32 + 4, &two[4..10]),
        ];
        let got = stream_messages(&segs);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, two);
        // Sequence numbers wrap.
        let (x, y) = one.split_at(10);
        let wrapped = [segment(1, u32::MAX - 4, x), segment(2, 5, y)];
        assert_eq!(stream_messages(&wrapped)[0].payload, one);
    }

    #[test]
    fn over_tcp_a_forward_leaves_from_any_address_of_the_proxy() {
        let req = || sip("OPTIONS sip:a@b SIP/2.0", "c1", "1 OPTIONS");
        let ok = || sip("SIP/2.0 200 OK", "c1", "1 OPTIONS");
        const OUT: &str = "127.0.0.1:40000";
        let caps = [
            datagram(1_000, UAC, PROXY, req()),
            datagram(1_100, OUT, UAS, req()),
            datagram(1_500, UAS, OUT, ok()),
            datagram(1_800, PROXY, UAC, ok()),
        ];
        let t = transit(
            &caps,
            PROXY.parse().unwrap(),
            UAS.parse().unwrap(),
            &Behind::default(),
        );
        assert_eq!(t.messages, vec![0.1, 0.3]);
        assert_eq!(t.transactions, vec![0.4]);
        assert_eq!(t.unmatched, 0);
    }
}
