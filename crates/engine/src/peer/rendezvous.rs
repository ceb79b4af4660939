//! Rendezvous (highest random weight) hashing: every node computes the same
//! owner for a chunk from the same member list, and a member joining or
//! leaving moves only the chunks it owns or comes to own.

use std::net::SocketAddr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

fn seed(m: &SocketAddr) -> u64 {
    xxhash_rust::xxh3::xxh3_64(m.to_string().as_bytes())
}

fn weight(key: &[u8], m: &SocketAddr) -> (u64, SocketAddr) {
    (xxh3_64_with_seed(key, seed(m)), *m)
}

pub fn owner(key: &[u8], members: &[SocketAddr]) -> Option<SocketAddr> {
    members.iter().max_by_key(|m| weight(key, m)).copied()
}

/// The members with their seeds worked out once, for asking the owner of
/// many keys (every chunk of a file) without formatting every address for
/// each: the same answers as `owner`.
pub struct Owners(Vec<(u64, SocketAddr)>);

impl Owners {
    pub fn new(members: &[SocketAddr]) -> Self {
        Owners(members.iter().map(|m| (seed(m), *m)).collect())
    }

    pub fn of(&self, key: &[u8]) -> Option<SocketAddr> {
        self.0
            .iter()
            .max_by_key(|(s, m)| (xxh3_64_with_seed(key, *s), *m))
            .map(|(_, m)| *m)
    }
}

/// Members from the owner down: where else a chunk most likely is.
pub fn ranked(key: &[u8], members: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut v = members.to_vec();
    v.sort_by_key(|m| std::cmp::Reverse(weight(key, m)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| format!("127.0.0.{i}:7070").parse().unwrap())
            .collect()
    }

    #[test]
    fn spreads_evenly_and_moves_little_when_a_member_leaves() {
        let four = addrs(4);
        let keys: Vec<Vec<u8>> = (0..4000u32).map(|k| k.to_le_bytes().to_vec()).collect();
        let mut counts = std::collections::HashMap::new();
        for k in &keys {
            *counts.entry(owner(k, &four).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(
            counts.values().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let three = &four[..3];
        for k in &keys {
            let before = owner(k, &four).unwrap();
            if before != four[3] {
                assert_eq!(owner(k, three).unwrap(), before, "a chunk moved needlessly");
            }
        }
        assert_eq!(owner(b"x", &[]), None);
        let owners = Owners::new(&four);
        assert!(keys.iter().all(|k| owners.of(k) == owner(k, &four)));
        let r = ranked(b"k", &four);
        assert_eq!(r.len(), 4);
        assert_eq!(Some(r[0]), owner(b"k", &four));
    }
}
