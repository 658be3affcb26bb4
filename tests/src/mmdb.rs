//! A small MaxMind DB (`.mmdb`, format 2.0) writer for GeoIP tests: maps non-overlapping networks to
//! ISO country codes in the GeoIP2-Country shape (`{"country": {"iso_code": "DE"}}`), an IPv6 tree
//! with IPv4 under `::/96` as MaxMind's own databases have it, 24-bit records.

use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Clone, Copy)]
enum Rec {
    Empty,
    Node(u32),
    Data(usize),
}

fn ctrl(out: &mut Vec<u8>, ty: u8, size: usize) {
    let (low, extra): (u8, Vec<u8>) = match size {
        0..=28 => (size as u8, vec![]),
        29..=284 => (29, vec![(size - 29) as u8]),
        _ => {
            let s = size - 285;
            (30, vec![(s >> 8) as u8, s as u8])
        }
    };
    if ty <= 7 {
        out.push((ty << 5) | low);
    } else {
        out.push(low);
        out.push(ty - 7);
    }
    out.extend(extra);
}

fn string(out: &mut Vec<u8>, s: &str) {
    ctrl(out, 2, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn uint(out: &mut Vec<u8>, ty: u8, v: u64) {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    ctrl(out, ty, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}

/// The database bytes for `networks` (`("192.0.2.0/24", "DE")`, IPv4 or IPv6).
pub fn country_db(networks: &[(&str, &str)]) -> Vec<u8> {
    let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty, Rec::Empty]];
    let mut countries: Vec<String> = Vec::new();
    for (net, iso) in networks {
        let (addr, len) = net.split_once('/').expect("network with a prefix length");
        let addr: IpAddr = addr.parse().expect("address");
        let len: u32 = len.parse().expect("prefix length");
        let (bits, depth) = match addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 96 + len),
            IpAddr::V6(a) => (u128::from(a), len),
        };
        assert!(
            depth > 0 && depth <= 128,
            "prefix length out of range: {net}"
        );
        let data = match countries.iter().position(|c| c == iso) {
            Some(i) => i,
            None => {
                countries.push(iso.to_string());
                countries.len() - 1
            }
        };
        let mut node = 0usize;
        for i in 0..depth {
            let bit = ((bits >> (127 - i)) & 1) as usize;
            if i == depth - 1 {
                nodes[node][bit] = Rec::Data(data);
            } else {
                node = match nodes[node][bit] {
                    Rec::Node(n) => n as usize,
                    Rec::Empty => {
                        nodes.push([Rec::Empty, Rec::Empty]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Rec::Node(n as u32);
                        n
                    }
                    Rec::Data(_) => panic!("overlapping networks are not supported: {net}"),
                };
            }
        }
    }
    let node_count = nodes.len() as u32;
    let mut data = Vec::new();
    let mut offsets = Vec::new();
    for c in &countries {
        offsets.push(data.len());
        ctrl(&mut data, 7, 1);
        string(&mut data, "country");
        ctrl(&mut data, 7, 1);
        string(&mut data, "iso_code");
        string(&mut data, c);
    }
    let mut out = Vec::new();
    for n in &nodes {
        for r in n {
            let v = match *r {
                Rec::Empty => node_count,
                Rec::Node(i) => i,
                Rec::Data(d) => node_count + 16 + offsets[d] as u32,
            };
            assert!(v < 1 << 24, "database too large for 24-bit records");
            out.extend_from_slice(&v.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    let mut meta = Vec::new();
    let fields: BTreeMap<&str, ()> = [
        "binary_format_major_version",
        "binary_format_minor_version",
        "build_epoch",
        "database_type",
        "description",
        "ip_version",
        "languages",
        "node_count",
        "record_size",
    ]
    .into_iter()
    .map(|k| (k, ()))
    .collect();
    ctrl(&mut meta, 7, fields.len());
    for k in fields.keys() {
        string(&mut meta, k);
        match *k {
            "binary_format_major_version" => uint(&mut meta, 5, 2),
            "binary_format_minor_version" => uint(&mut meta, 5, 0),
            "build_epoch" => uint(&mut meta, 9, 1_700_000_000),
            "database_type" => string(&mut meta, "sipwarden-Test-Country"),
            "description" => ctrl(&mut meta, 7, 0),
            "ip_version" => uint(&mut meta, 5, 6),
            "languages" => ctrl(&mut meta, 11, 0),
            "node_count" => uint(&mut meta, 6, node_count as u64),
            "record_size" => uint(&mut meta, 5, 24),
            _ => unreachable!(),
        }
    }
    out.extend(meta);
    out
}
