//! `--peer-verify-sample`: a fraction of the chunks that peers and the
//! warm-up service send is read from the origin too and compared byte for
//! byte. The crc32c a server sends only shows that the bytes arrived as it
//! sent them; a server that computes it over wrong bytes passes that check.
//! Which chunks are compared follows from a secret drawn at start, so no
//! server can tell which of its answers will be.

use std::collections::{HashMap, HashSet, VecDeque};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_secret;

use crate::FileVersion;

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
    /// Chunks (cache file key, index) that came from a server unchecked and
    /// were served or cached: those to drop if that server is caught lying
    /// later.
    received: VecDeque<(String, u128, u64)>,
    /// The file version of each key in `received`, with how many entries
    /// name it: what the chunks were of, even once they are evicted (a
    /// kernel's page cache may still hold them).
    files: HashMap<u128, (FileVersion, usize)>,
    liars: HashSet<String>,
}

impl State {
    fn forget(&mut self, key: u128) {
        if let Some((_, n)) = self.files.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.files.remove(&key);
            }
        }
    }
}

/// What a server caught lying sent unchecked, by file version.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sent {
    pub file: FileVersion,
    pub key: u128,
    pub chunks: Vec<u64>,
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

    /// Chunk `index` of `file` (cache file `key`), now cached or served,
    /// came unchecked from `server`. `false` if that server has been caught
    /// since it sent it: the chunk is to be dropped.
    pub fn received(&self, server: &str, file: &FileVersion, key: u128, index: u64) -> bool {
        let mut s = self.state.lock();
        if s.liars.contains(server) {
            return false;
        }
        if s.received.len() == REMEMBERED {
            if let Some((_, old, _)) = s.received.pop_front() {
                s.forget(old);
            }
        }
        s.received.push_back((server.to_string(), key, index));
        s.files.entry(key).or_insert_with(|| (file.clone(), 0)).1 += 1;
        true
    }

    /// `server` sent a chunk that differs from the origin's: the chunks it
    /// sent unchecked, by file version, the first time it is caught; `None`
    /// after.
    pub fn caught(&self, server: &str) -> Option<Vec<Sent>> {
        let mut s = self.state.lock();
        if !s.liars.insert(server.to_string()) {
            return None;
        }
        let mut sent: Vec<(u128, u64)> = vec![];
        s.received.retain(|(from, key, i)| {
            let keep = from != server;
            if !keep {
                sent.push((*key, *i));
            }
            keep
        });
        let mut by_file: Vec<Sent> = vec![];
        let mut at: HashMap<u128, usize> = HashMap::new();
        for (key, i) in sent {
            match at.get(&key) {
                Some(&n) => by_file[n].chunks.push(i),
                None => {
                    let Some((file, _)) = s.files.get(&key) else {
                        continue;
                    };
                    at.insert(key, by_file.len());
                    by_file.push(Sent {
                        file: file.clone(),
                        key,
                        chunks: vec![i],
                    });
                }
            }
            s.forget(key);
        }
        Some(by_file)
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

    fn fv(path: &str) -> FileVersion {
        FileVersion {
            path: path.into(),
            version: "v1".into(),
            size: 1 << 30,
        }
    }

    #[test]
    fn a_liar_is_caught_once_with_what_it_sent() {
        let v = Verifier::new(0.5).unwrap();
        let (f1, f2) = (fv("one"), fv("two"));
        assert!(v.received("a", &f1, 1, 0));
        assert!(v.received("b", &f1, 1, 1));
        assert!(v.received("a", &f2, 2, 5));
        assert!(v.received("a", &f1, 1, 3));
        assert_eq!(
            v.caught("a"),
            Some(vec![
                Sent {
                    file: f1.clone(),
                    key: 1,
                    chunks: vec![0, 3]
                },
                Sent {
                    file: f2.clone(),
                    key: 2,
                    chunks: vec![5]
                },
            ])
        );
        assert!(v.is_liar("a") && !v.is_liar("b"));
        assert_eq!(v.caught("a"), None);
        assert!(!v.received("a", &f1, 3, 0), "sent before it was caught");
        // Only "b"'s chunk of key 1 still names its file.
        assert_eq!(v.state.lock().files.len(), 1);
        let f9 = fv("nine");
        for i in 0..REMEMBERED as u64 + 10 {
            v.received("b", &f9, 9, i);
        }
        let sent = v.caught("b").unwrap();
        assert_eq!(sent.len(), 1, "key 1's chunk was forgotten first");
        assert_eq!(sent[0].file, f9);
        assert_eq!(sent[0].chunks.len(), REMEMBERED);
        assert!(v.state.lock().files.is_empty(), "nothing left to name");
    }
}
