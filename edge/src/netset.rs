//! [`NetSet`]: a map from IPv4/IPv6 networks to values with longest-prefix lookup, built for the
//! pre-parse gate. One hash table per distinct prefix length (the scheme of ipset's `hash:net`): a
//! lookup masks the address once per length present and probes one table, so exact addresses (/32,
//! /128) cost one probe and a ban list of 100,000 entries over a handful of prefix lengths costs a
//! handful. Written here rather than taken from a trie crate because ban lists are dominated by exact
//! addresses, where a hash probe beats a trie walk, and the structure is rebuilt (cloned) on update.
//! The tables hash with foldhash, seeded at random per table: several times cheaper than std's
//! SipHash on a 16-byte key (each gate decision hashes once per prefix length), and the random seed
//! keeps an attacker who chooses the banned addresses from predicting collisions.

use ipnet::IpNet;
type Table<V> = std::collections::HashMap<u128, V, foldhash::fast::RandomState>;
use std::net::IpAddr;

/// Networks of one family, longest prefix first.
#[derive(Debug, Clone)]
struct Family<V> {
    /// `(prefix length, masked address → value)`, sorted by length, longest first.
    tables: Vec<(u8, Table<V>)>,
}

impl<V> Default for Family<V> {
    fn default() -> Self {
        Family { tables: Vec::new() }
    }
}

impl<V> Family<V> {
    fn mask(bits: u8, width: u8, addr: u128) -> u128 {
        if bits == 0 {
            0
        } else {
            addr & (u128::MAX << (width - bits))
        }
    }

    fn get(&self, width: u8, addr: u128) -> Option<(u8, &V)> {
        self.tables
            .iter()
            .find_map(|(len, t)| t.get(&Self::mask(*len, width, addr)).map(|v| (*len, v)))
    }

    fn table(&mut self, len: u8) -> &mut Table<V> {
        let pos = match self.tables.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.tables[i].0 == len => i,
            Some(i) => {
                self.tables.insert(i, (len, Table::default()));
                i
            }
            None => {
                self.tables.push((len, Table::default()));
                self.tables.len() - 1
            }
        };
        &mut self.tables[pos].1
    }

    fn len(&self) -> usize {
        self.tables.iter().map(|(_, t)| t.len()).sum()
    }
}

/// Networks (IPv4 and IPv6) with a value each.
#[derive(Debug, Clone)]
pub struct NetSet<V> {
    v4: Family<V>,
    v6: Family<V>,
}

impl<V> Default for NetSet<V> {
    fn default() -> Self {
        NetSet {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

/// An address as a key: its family's width and its bits (IPv4-mapped IPv6 counts as IPv4).
fn key(ip: IpAddr) -> (bool, u8, u128) {
    match ip {
        IpAddr::V4(a) => (true, 32, u32::from(a) as u128),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (true, 32, u32::from(v4) as u128),
            None => (false, 128, u128::from(a)),
        },
    }
}

/// A network as a key: its family (IPv4?), its prefix length and its masked bits. An
/// IPv4-mapped IPv6 network of a /96 or longer is the IPv4 network it maps (`::ffff:a.b.c.d/128`
/// is `a.b.c.d/32`), as a mapped address is looked up as IPv4; keyed as IPv4 with its IPv6
/// length, it overflowed the mask.
fn net_key(net: IpNet) -> (bool, u8, u128) {
    let (v4, width, bits) = key(net.addr());
    match net {
        IpNet::V6(n) if !v4 || n.prefix_len() < 96 => {
            let len = n.prefix_len();
            (
                false,
                len,
                Family::<()>::mask(len, 128, u128::from(n.addr())),
            )
        }
        IpNet::V6(n) => {
            let len = n.prefix_len() - 96;
            (true, len, Family::<()>::mask(len, width, bits))
        }
        IpNet::V4(n) => {
            let len = n.prefix_len();
            (true, len, Family::<()>::mask(len, width, bits))
        }
    }
}

impl<V> NetSet<V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&self, v4: bool) -> &Family<V> {
        if v4 {
            &self.v4
        } else {
            &self.v6
        }
    }

    /// Inserts `net` (host bits ignored), replacing and returning any value it had.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        let (v4, len, masked) = net_key(net);
        let fam = if v4 { &mut self.v4 } else { &mut self.v6 };
        fam.table(len).insert(masked, value)
    }

    /// Removes exactly `net` (not networks inside or around it).
    pub fn remove(&mut self, net: IpNet) -> Option<V> {
        let (v4, len, masked) = net_key(net);
        let fam = if v4 { &mut self.v4 } else { &mut self.v6 };
        let i = fam.tables.iter().position(|(l, _)| *l == len)?;
        let v = fam.tables[i].1.remove(&masked);
        if fam.tables[i].1.is_empty() {
            fam.tables.remove(i);
        }
        v
    }

    /// The value of exactly `net` (host bits ignored), not of networks inside or around it.
    pub fn get(&self, net: IpNet) -> Option<&V> {
        let (v4, len, masked) = net_key(net);
        let (_, t) = self.family(v4).tables.iter().find(|(l, _)| *l == len)?;
        t.get(&masked)
    }

    /// The value of the longest network containing `ip`, with that network's prefix length.
    pub fn lookup(&self, ip: IpAddr) -> Option<(u8, &V)> {
        let (v4, width, bits) = key(ip);
        self.family(v4).get(width, bits)
    }

    /// Every network containing `ip`, longest first, with its prefix length.
    pub fn matches(&self, ip: IpAddr) -> impl Iterator<Item = (u8, &V)> + '_ {
        let (v4, width, bits) = key(ip);
        self.family(v4).tables.iter().filter_map(move |(len, t)| {
            t.get(&Family::<V>::mask(*len, width, bits))
                .map(|v| (*len, v))
        })
    }

    /// Whether any network contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lookup(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the entries for which `keep` says yes.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        for fam in [&mut self.v4, &mut self.v6] {
            for (_, t) in &mut fam.tables {
                t.retain(|_, v| keep(v));
            }
            fam.tables.retain(|(_, t)| !t.is_empty());
        }
    }

    /// Every entry as `(network, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        let v4 = self.v4.tables.iter().flat_map(|(len, t)| {
            t.iter().map(move |(k, v)| {
                let a = std::net::Ipv4Addr::from(*k as u32);
                (IpNet::V4(ipnet::Ipv4Net::new_assert(a, *len)), v)
            })
        });
        let v6 = self.v6.tables.iter().flat_map(|(len, t)| {
            t.iter().map(move |(k, v)| {
                let a = std::net::Ipv6Addr::from(*k);
                (IpNet::V6(ipnet::Ipv6Net::new_assert(a, *len)), v)
            })
        });
        v4.chain(v6)
    }
}

impl FromIterator<IpNet> for NetSet<()> {
    fn from_iter<T: IntoIterator<Item = IpNet>>(iter: T) -> Self {
        let mut s = NetSet::new();
        for n in iter {
            s.insert(n, ());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_host_bits_are_ignored() {
        let mut s = NetSet::new();
        s.insert(net("10.0.0.0/8"), "wide");
        s.insert(net("10.1.2.99/24"), "narrow");
        s.insert(net("10.1.2.3/32"), "host");
        assert_eq!(s.lookup(ip("10.1.2.3")), Some((32, &"host")));
        assert_eq!(s.lookup(ip("10.1.2.4")), Some((24, &"narrow")));
        assert_eq!(s.lookup(ip("10.9.9.9")), Some((8, &"wide")));
        assert_eq!(s.lookup(ip("11.0.0.1")), None);
        assert_eq!(s.len(), 3);
        assert_eq!(s.remove(net("10.1.2.0/24")), Some("narrow"));
        assert_eq!(s.lookup(ip("10.1.2.4")), Some((8, &"wide")));
        let all: Vec<u8> = s.matches(ip("10.1.2.3")).map(|(l, _)| l).collect();
        assert_eq!(all, vec![32, 8]);
        assert_eq!(s.get(net("10.1.2.3/32")), Some(&"host"));
        assert_eq!(
            s.get(net("10.200.0.0/8")),
            Some(&"wide"),
            "host bits ignored"
        );
        assert_eq!(s.get(net("10.1.2.3/31")), None, "only that exact network");
        assert_eq!(s.get(net("10.1.2.0/24")), None, "removed");
        assert_eq!(
            s.get(net("::ffff:10.1.2.3/128")),
            Some(&"host"),
            "a mapped /128 is the IPv4 /32"
        );
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let mut s = NetSet::new();
        s.insert(net("2001:db8::/32"), 1);
        s.insert(net("192.0.2.0/24"), 2);
        s.insert(net("::/0"), 3);
        assert_eq!(s.lookup(ip("2001:db8:1::5")), Some((32, &1)));
        assert_eq!(s.lookup(ip("::ffff:192.0.2.9")), Some((24, &2)));
        // A mapped network is the IPv4 network it maps, whichever way it is written.
        assert_eq!(s.insert(net("::ffff:198.51.100.7/128"), 4), None);
        s.insert(net("::ffff:203.0.113.0/120"), 5);
        assert_eq!(s.lookup(ip("198.51.100.7")), Some((32, &4)));
        assert_eq!(s.lookup(ip("::ffff:198.51.100.7")), Some((32, &4)));
        assert_eq!(s.get(net("198.51.100.7/32")), Some(&4));
        assert_eq!(s.lookup(ip("203.0.113.9")), Some((24, &5)));
        assert_eq!(s.remove(net("203.0.113.0/24")), Some(5));
        assert_eq!(s.remove(net("::ffff:198.51.100.7/128")), Some(4));
        assert_eq!(s.lookup(ip("198.51.100.7")), None);
        assert_eq!(s.lookup(ip("2001:db9::1")), Some((0, &3)));
        assert_eq!(
            s.lookup(ip("198.51.100.1")),
            None,
            "v6 ::/0 does not cover v4"
        );
    }

    #[test]
    fn retain_and_iter() {
        let mut s = NetSet::new();
        for i in 0..10u8 {
            s.insert(net(&format!("192.0.2.{i}/32")), i);
        }
        s.insert(net("2001:db8::/48"), 100);
        s.retain(|v| v % 2 == 0);
        assert_eq!(s.len(), 6);
        let mut nets: Vec<String> = s.iter().map(|(n, _)| n.to_string()).collect();
        nets.sort();
        assert_eq!(nets[0], "192.0.2.0/32");
        assert!(nets.contains(&"2001:db8::/48".to_string()));
    }
}
