//! `--peer-verify-sample`: a fraction of the chunks that peers and the
//! warm-up service send is read from the origin too and compared byte for
//! byte. The crc32c a server sends only shows that the bytes arrived as it
//! sent them; a server that computes it over wrong bytes passes that check.
//! Which chunks are compared follows from a secret drawn at start, so no
//! server can tell which of its answers will be.

use std::collections::{HashSet, VecDeque};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_secret;

/// Chunks remembered with the server that sent them, oldest forgotten first
/// (they are the likeliest to be evicted already): 64 Ki chunks of 8 MiB are
/// 512 GiB of models, in about 5 MiB of memory.
const REMEMBERED: usize = 1 << 16;

pub(crate) struct Verifier {
    secret: [u8; 192],
    /// A chunk is compared when its hash under the secret is at most this.
    at_most: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cached chunks (cache file key, index) that came from a server
    /// unchecked: those to drop if that server is caught lying later.
    received: VecDeque<(String, u128, u64)>,
    liars: HashSet<String>,
}

impl Verifier {
    /// `None` when `rate` is 0: nothing compared, nothing remembered.
    pub fn new(rate: f64) -> Option<Verifier> {
        if rate <= 0.0 {
            return None;
        }
        let mut secret = [0u8; 192];
        crate::peer::random_bytes(&mut secret);
        Some(Verifier {
            secret,
            // 1.0 saturates to u64::MAX: every chunk.
            at_most: (rate * 2f64.powi(64)) as u64,
            state: Mutex::default(),
        })
    }

    pub fn sampled(&self, key: u128, index: u64) -> bool {
        let mut id = [0u8; 24];
        id[..16].copy_from_slice(&key.to_le_bytes());
        id[16..].copy_from_slice(&index.to_le_bytes());
        xxh3_64_with_secret(&id, &self.secret) <= self.at_most
    }

    pub fn is_liar(&self, server: &str) -> bool {
        self.state.lock().liars.contains(server)
    }

    /// Chunk `index` of cache file `key`, now cached, came unchecked from
    /// `server`. `false` if that server has been caught since it sent it:
    /// the chunk is to be dropped.
    pub fn received(&self, server: &str, key: u128, index: u64) -> bool {
        let mut s = self.state.lock();
        if s.liars.contains(server) {
            return false;
        }
        if s.received.len() == REMEMBERED {
            s.received.pop_front();
        }
        s.received.push_back((server.to_string(), key, index));
        true
    }

    /// `server` sent a chunk that differs from the origin's: the cached
    /// chunks it sent unchecked, the first time it is caught; `None` after.
    pub fn caught(&self, server: &str) -> Option<Vec<(u128, u64)>> {
        let mut s = self.state.lock();
        if !s.liars.insert(server.to_string()) {
            return None;
        }
        let mut sent = vec![];
        s.received.retain(|(from, key, i)| {
            let keep = from != server;
            if !keep {
                sent.push((*key, *i));
            }
            keep
        });
        Some(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_the_rate_and_differs_between_processes() {
        let count = |v: &Verifier| (0..10_000u64).filter(|&i| v.sampled(7, i)).count();
        assert!(Verifier::new(0.0).is_none());
        let all = Verifier::new(1.0).unwrap();
        assert_eq!(count(&all), 10_000);
        let (a, b) = (Verifier::new(0.1).unwrap(), Verifier::new(0.1).unwrap());
        assert!((800..1200).contains(&count(&a)), "{}", count(&a));
        let picks = |v: &Verifier| {
            (0..10_000u64)
                .filter(|&i| v.sampled(7, i))
                .collect::<Vec<_>>()
        };
        assert_ne!(picks(&a), picks(&b), "a secret of their own");
    }

    #[test]
    fn a_liar_is_caught_once_with_what_it_sent() {
        let v = Verifier::new(0.5).unwrap();
        assert!(v.received("a", 1, 0));
        assert!(v.received("b", 1, 1));
        assert!(v.received("a", 2, 5));
        assert_eq!(v.caught("a"), Some(vec![(1, 0), (2, 5)]));
        assert!(v.is_liar("a") && !v.is_liar("b"));
        assert_eq!(v.caught("a"), None);
        assert!(!v.received("a", 3, 0), "sent before it was caught");
        for i in 0..REMEMBERED as u64 + 10 {
            v.received("b", 9, i);
        }
        assert_eq!(v.caught("b").unwrap().len(), REMEMBERED);
    }
}
