//! Flow tokens: the edge's Path and Record-Route URIs carry the client's transport, address and port
//! and the owning edge, signed with the cluster's HMAC key, so a request from the PBX to a phone is
//! routed back statelessly to the right (NATed) flow and a forged or altered token is refused.
//!
//! Wire form (before base32hex, lower case, no padding): `version(1) key_id(1) transport(1)
//! family(1) ip(4|16) port(2) edge_len(1) edge(edge_len) mac(12)`, where `mac` is HMAC-SHA256 over
//! everything before it, truncated to 96 bits (RFC 2104 allows truncation to ≥ 80 bits).

use crate::sip::Transport;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use subtle::ConstantTimeEq;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const MAC_LEN: usize = 12;
/// Prefix of every token in a URI user part, so the edge can tell its tokens from user names.
pub const PREFIX: &str = "sw1";

/// The cluster's HMAC keys: the first signs, all verify (so a key can be rotated while tokens signed
/// with the old one are still in registrations and dialogs). Debug output never shows key bytes.
#[derive(Clone)]
pub struct FlowKeys {
    /// `(HMAC keyed once, key id)`: each MAC clones the keyed state instead of hashing the key's
    /// inner and outer pads again.
    keys: Vec<(HmacSha256, u8)>,
    /// The SipHash-2-4 key of each secret, in the same order, for Via branches (see
    /// [`FlowKeys::branch_mac`]).
    branch: Vec<[u8; 16]>,
}

impl std::fmt::Debug for FlowKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlowKeys({} keys, redacted)", self.keys.len())
    }
}

/// Why a token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlowError {
    #[error("not a flow token")]
    NotAToken,
    #[error("flow token is malformed")]
    Malformed,
    #[error("flow token signature does not verify")]
    BadSignature,
}

/// Where a phone's flow is: how and from where it reached the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowToken {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// The edge that holds the flow (its TCP/TLS connection lives there).
    pub edge: String,
}

impl FlowKeys {
    /// Keys from secret bytes (at least 16 bytes each); each is stretched to 32 bytes with SHA-256.
    pub fn new<I, K>(secrets: I) -> Option<FlowKeys>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let mut keys = Vec::new();
        let mut branch = Vec::new();
        for s in secrets.into_iter().filter(|s| s.as_ref().len() >= 16) {
            let k: [u8; 32] = Sha256::digest(s.as_ref()).into();
            let id = Sha256::digest(k)[0];
            let mac = <HmacSha256 as Mac>::new_from_slice(&k).expect("HMAC takes any key length");
            keys.push((mac, id));
            // Its own key, from the same secret under another label.
            let b = Sha256::new_with_prefix(b"sipwarden via-branch key").chain_update(k);
            branch.push(b.finalize()[..16].try_into().expect("16 of 32 bytes"));
        }
        (!keys.is_empty()).then_some(FlowKeys { keys, branch })
    }

    /// The MAC in a Via branch: SipHash-2-4 with a 128-bit key and 128-bit output over `parts`,
    /// each prefixed by its length. Every request forwarded and every response relayed takes
    /// one, and a branch lives only as long as its transaction, so it is the short-input keyed
    /// PRF SipHash was designed as (a quarter of HMAC-SHA256's cost here) rather than HMAC; flow
    /// tokens, which last as long as a registration or dialog, stay HMAC-SHA256.
    pub fn branch_mac(&self, parts: &[&[u8]]) -> [u8; 16] {
        branch_mac_with(&self.branch[0], parts)
    }

    /// Whether `tag` is a (truncated) [`FlowKeys::branch_mac`] of `parts` under any key.
    pub fn verify_branch_mac(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.branch
            .iter()
            .any(|k| bool::from(branch_mac_with(k, parts)[..tag.len()].ct_eq(tag)))
    }

    /// Signs `flow` into the URI user-part form `sw1<base32hex>`.
    pub fn sign(&self, flow: &FlowToken) -> String {
        self.sign_flow(flow.transport, flow.addr, &flow.edge)
    }

    /// [`FlowKeys::sign`] of the flow `(transport, addr, edge)`, without building a token first.
    pub fn sign_flow(&self, transport: Transport, addr: SocketAddr, edge: &str) -> String {
        let (key, id) = &self.keys[0];
        // On the stack up to a 64-byte edge id: one allocation per token, the string itself.
        let mut raw: SmallVec<[u8; 96]> = SmallVec::new();
        raw.push(VERSION);
        raw.push(*id);
        raw.push(match transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        });
        match addr.ip() {
            IpAddr::V4(ip) => {
                raw.push(4);
                raw.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                raw.push(6);
                raw.extend_from_slice(&ip.octets());
            }
        }
        raw.extend_from_slice(&addr.port().to_be_bytes());
        let edge = &edge.as_bytes()[..edge.len().min(64)];
        raw.push(edge.len() as u8);
        raw.extend_from_slice(edge);
        let mac = mac_with(key, &[&raw]);
        raw.extend_from_slice(&mac[..MAC_LEN]);
        let b32 = &data_encoding::BASE32_DNSSEC;
        let mut out = String::with_capacity(PREFIX.len() + b32.encode_len(raw.len()));
        out.push_str(PREFIX);
        b32.encode_append(&raw, &mut out);
        out
    }

    /// Verifies a token from a URI user part and returns the flow it names.
    pub fn verify(&self, token: &str) -> Result<FlowToken, FlowError> {
        let body = token.strip_prefix(PREFIX).ok_or(FlowError::NotAToken)?;
        let b32 = &data_encoding::BASE32_DNSSEC;
        let len = b32
            .decode_len(body.len())
            .map_err(|_| FlowError::Malformed)?;
        let mut raw: SmallVec<[u8; 96]> = SmallVec::from_elem(0, len);
        let len = b32
            .decode_mut(body.as_bytes(), &mut raw)
            .map_err(|_| FlowError::Malformed)?;
        let raw = &raw[..len];
        if raw.len() < 4 + 4 + 2 + 1 + MAC_LEN || raw[0] != VERSION {
            return Err(FlowError::Malformed);
        }
        let (signed, tag) = raw.split_at(raw.len() - MAC_LEN);
        let key_ok = self
            .keys
            .iter()
            .filter(|(_, id)| *id == signed[1])
            .any(|(k, _)| bool::from(mac_with(k, &[signed])[..MAC_LEN].ct_eq(tag)));
        if !key_ok {
            return Err(FlowError::BadSignature);
        }
        decode_fields(signed).ok_or(FlowError::Malformed)
    }
}

fn decode_fields(signed: &[u8]) -> Option<FlowToken> {
    let transport = match signed[2] {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        2 => Transport::Tls,
        _ => return None,
    };
    let (ip, rest): (IpAddr, &[u8]) = match signed[3] {
        4 if signed.len() >= 8 => {
            let o: [u8; 4] = signed[4..8].try_into().ok()?;
            (Ipv4Addr::from(o).into(), &signed[8..])
        }
        6 if signed.len() >= 20 => {
            let o: [u8; 16] = signed[4..20].try_into().ok()?;
            (Ipv6Addr::from(o).into(), &signed[20..])
        }
        _ => return None,
    };
    let port = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    let len = *rest.get(2)? as usize;
    let edge = rest.get(3..3 + len)?;
    if rest.len() != 3 + len {
        return None;
    }
    Some(FlowToken {
        transport,
        addr: SocketAddr::new(ip, port),
        edge: String::from_utf8(edge.to_vec()).ok()?,
    })
}

/// SipHash-2-4-128 under `key` of `parts`, each prefixed by its length (4 bytes, big-endian).
///
/// The framed parts are gathered into a buffer on the stack and hashed in as few `write`s as fit:
/// fed piece by piece, `siphasher` buffers every short piece's tail on its own (14 writes for a
/// branch). The bytes hashed are the same either way, so the MAC is too (a test holds the two
/// equal: branches made by an edge of either kind verify at the other during a rolling upgrade).
fn branch_mac_with(key: &[u8; 16], parts: &[&[u8]]) -> [u8; 16] {
    use siphasher::sip128::{Hasher128, SipHasher24};
    use std::hash::Hasher;
    let mut h = SipHasher24::new_with_key(key);
    let mut buf = [0u8; 256];
    let mut n = 0;
    for p in parts {
        let len = (p.len() as u32).to_be_bytes();
        let need = len.len() + p.len();
        if n + need > buf.len() {
            h.write(&buf[..n]);
            n = 0;
            if need > buf.len() {
                h.write(&len);
                h.write(p);
                continue;
            }
        }
        buf[n..n + len.len()].copy_from_slice(&len);
        buf[n + len.len()..n + need].copy_from_slice(p);
        n += need;
    }
    h.write(&buf[..n]);
    h.finish128().as_bytes()
}

fn mac_with(key: &HmacSha256, parts: &[&[u8]]) -> [u8; 32] {
    let mut m = key.clone();
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(s: &str) -> FlowKeys {
        FlowKeys::new([s.as_bytes()]).unwrap()
    }

    fn flow(addr: &str) -> FlowToken {
        FlowToken {
            transport: Transport::Tcp,
            addr: addr.parse().unwrap(),
            edge: "edge-fra-1".into(),
        }
    }

    /// Branch MACs: length-framed (moving a byte between parts changes the tag), verified under
    /// any configured key (so a rotation keeps transactions in flight), refused under others or
    /// with any bit changed.
    #[test]
    fn branch_macs_frame_their_parts_and_follow_key_rotation() {
        let old = keys("0123456789abcdef0123");
        let parts: [&[u8]; 3] = [b"via-branch", b"ab", b"c"];
        let tag = old.branch_mac(&parts);
        assert_eq!(tag, old.branch_mac(&parts), "deterministic");
        assert_ne!(tag, old.branch_mac(&[b"via-branch", b"a", b"bc"]));
        assert!(old.verify_branch_mac(&parts, &tag[..15]));
        let rotated = FlowKeys::new(["fedcba9876543210fedc", "0123456789abcdef0123"]).unwrap();
        assert!(
            rotated.verify_branch_mac(&parts, &tag[..15]),
            "old key still verifies"
        );
        assert_ne!(rotated.branch_mac(&parts), tag, "new key signs");
        let other = keys("fedcba9876543210fedc");
        assert!(!other.verify_branch_mac(&parts, &tag[..15]));
        for bit in 0..15 * 8 {
            let mut bad = tag;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!old.verify_branch_mac(&parts, &bad[..15]), "bit {bit}");
        }
    }

    /// The MAC over the gathered buffer is the MAC of the parts fed one by one (as edges before
    /// the buffer made it), empty parts and parts past the stack buffer included.
    #[test]
    fn branch_macs_equal_the_piecewise_hash() {
        use siphasher::sip128::{Hasher128, SipHasher24};
        use std::hash::Hasher;
        let key = [7u8; 16];
        let long = vec![b'x'; 300];
        let most = vec![b'y'; 200];
        let sets: [&[&[u8]]; 4] = [
            &[
                b"via-branch",
                b"z9hG4bK-1",
                b"",
                b"10.0.0.1:5060",
                b"1@h",
                &[0, 0, 0, 1],
            ],
            &[b"via-branch", &long, b"c"],
            &[b"via-branch", &most, &most, b"", b"d"],
            &[],
        ];
        for parts in sets {
            let mut h = SipHasher24::new_with_key(&key);
            for p in parts {
                h.write(&(p.len() as u32).to_be_bytes());
                h.write(p);
            }
            assert_eq!(branch_mac_with(&key, parts), h.finish128().as_bytes());
        }
    }

    #[test]
    fn sign_verify_round_trip_v4_and_v6() {
        let k = keys("0123456789abcdef0123");
        for a in ["203.0.113.7:41234", "[2001:db8::1]:5060"] {
            let t = k.sign(&flow(a));
            assert!(t.starts_with(PREFIX));
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()),
                "{t}"
            );
            assert_eq!(k.verify(&t).unwrap(), flow(a));
            let f = flow(a);
            assert_eq!(k.sign_flow(f.transport, f.addr, &f.edge), t);
        }
        // An edge id too long for the stack buffer is cut at 64 bytes, as always.
        let long = FlowToken {
            edge: "e".repeat(200),
            ..flow("203.0.113.7:41234")
        };
        let t = k.sign(&long);
        assert_eq!(k.verify(&t).unwrap().edge, "e".repeat(64));
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let k = keys("0123456789abcdef0123");
        let t = k.sign(&flow("198.51.100.2:5060"));
        let alphabet = "0123456789abcdefghijklmnopqrstuv";
        for i in PREFIX.len()..t.len() {
            let orig = t.as_bytes()[i] as char;
            let repl = alphabet.chars().find(|c| *c != orig).unwrap();
            let mut bad = t.clone();
            bad.replace_range(i..i + 1, &repl.to_string());
            assert!(k.verify(&bad).is_err(), "tampered at {i} accepted");
        }
        assert!(k.verify(&t[..t.len() - 2]).is_err());
        assert_eq!(k.verify("alice"), Err(FlowError::NotAToken));
        assert_eq!(k.verify("sw1!!"), Err(FlowError::Malformed));
    }

    #[test]
    fn another_clusters_key_is_refused_and_rotation_keeps_old_tokens() {
        let old = keys("old-secret-old-secret");
        let other = keys("other-secret-other-secret");
        let t = old.sign(&flow("192.0.2.1:1"));
        assert_eq!(other.verify(&t), Err(FlowError::BadSignature));
        let rotated = FlowKeys::new(["new-secret-new-secret", "old-secret-old-secret"]).unwrap();
        assert_eq!(rotated.verify(&t).unwrap(), flow("192.0.2.1:1"));
        let fresh = rotated.sign(&flow("192.0.2.1:1"));
        assert!(old.verify(&fresh).is_err());
    }

    #[test]
    fn short_secrets_are_rejected_and_debug_is_redacted() {
        assert!(FlowKeys::new(["short"]).is_none());
        let k = keys("0123456789abcdef0123");
        assert!(!format!("{k:?}").contains("0123"));
    }
}
