//! Which members an owner has sent whole chunks to: they hold those chunks
//! now, and an owner with too many uploads in flight names them to the next
//! askers instead of sending the chunk itself again. Bounded: a few
//! addresses per chunk, the most recent kept, and chunks in two generations
//! (a new one starts when the current is full; the older is dropped), which
//! keeps the chunks asked for lately, as an LRU would, at a map's cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Holders remembered per chunk, and named in one redirect at most.
pub const PER_CHUNK: usize = 4;

type Generation = HashMap<u128, Vec<SocketAddr>>;

pub struct Holders {
    /// (current, previous)
    gens: Mutex<(Generation, Generation)>,
    per_gen: usize,
}

impl Holders {
    /// Remembers about `chunks` chunks (between half and all of them).
    pub fn new(chunks: usize) -> Self {
        Holders {
            gens: Mutex::default(),
            per_gen: (chunks / 2).max(1),
        }
    }

    /// `addr` now holds `chunk`.
    pub fn add(&self, chunk: u128, addr: SocketAddr) {
        let mut g = self.gens.lock();
        let mut list =
            g.0.remove(&chunk)
                .or_else(|| g.1.remove(&chunk))
                .unwrap_or_default();
        list.retain(|a| *a != addr);
        if list.len() == PER_CHUNK {
            list.remove(0);
        }
        list.push(addr);
        if g.0.len() >= self.per_gen {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(chunk, list);
    }

    /// Up to `PER_CHUNK` holders of `chunk` other than `asker`, in an order
    /// of their own each time, so that askers told at once spread over them.
    pub fn get(&self, chunk: u128, asker: Option<SocketAddr>) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = {
            let g = self.gens.lock();
            let list = g.0.get(&chunk).or_else(|| g.1.get(&chunk));
            list.into_iter()
                .flatten()
                .filter(|a| Some(**a) != asker)
                .copied()
                .collect()
        };
        shuffle(&mut v);
        v
    }
}

/// Fisher-Yates driven by the clock: spreading, not secrecy.
fn shuffle(v: &mut [SocketAddr]) {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        format!("127.0.0.{i}:7070").parse().unwrap()
    }

    #[test]
    fn keeps_the_latest_few_per_chunk_and_leaves_out_the_asker() {
        let h = Holders::new(100);
        for i in 1..=6 {
            h.add(7, a(i));
        }
        h.add(7, a(6));
        let mut got = h.get(7, None);
        got.sort();
        assert_eq!(got, vec![a(3), a(4), a(5), a(6)]);
        let got = h.get(7, Some(a(4)));
        assert_eq!(got.len(), 3);
        assert!(!got.contains(&a(4)));
        assert!(h.get(8, None).is_empty());
    }

    #[test]
    fn bounded_and_keeps_chunks_asked_for_lately() {
        let h = Holders::new(10);
        h.add(0, a(1));
        for c in 1..1000u128 {
            h.add(c, a(2));
            // Chunk 0 stays while it keeps being served.
            if c % 3 == 0 {
                h.add(0, a(1));
            }
        }
        let g = h.gens.lock();
        assert!(g.0.len() + g.1.len() <= 10);
        drop(g);
        assert_eq!(h.get(0, None), vec![a(1)]);
        assert!(h.get(1, None).is_empty());
        assert_eq!(h.get(999, None), vec![a(2)]);
    }
}
