//! The peer group and the warm-up service as tiers of the read path.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use xxhash_rust::xxh3::xxh3_64;

use super::{chunk_key, order, ranked, ChunkRequest, Membership, Owners, PeerClient};
use crate::stats::{add, Stats};
use crate::tier::{record_fetch, Answer, Tier};
use crate::{Error, FileVersion, Result};

/// The object's name that every node shares: its source URL and path.
fn object(source: &str, file: &FileVersion) -> String {
    format!("{}/{}", source.trim_end_matches('/'), file.path)
}

/// What a server is asked to do for a chunk it lacks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// Fetch it for the group.
    Fetch,
    /// Fetch it, or, when busy, name members that hold it.
    FetchOrHolders,
    /// Nothing: answer from the cache only.
    Cached,
}

/// What both tiers share: how to ask one server for one chunk, and counting
/// what each server gave.
pub struct ChunkAsker {
    pub client: PeerClient,
    pub source: String,
    pub chunk_size: u64,
    pub stats: Arc<Stats>,
}

impl ChunkAsker {
    /// Chunk `index` of `file` from the server at `base`, counted under `name`.
    async fn ask(
        &self,
        base: &str,
        name: &str,
        file: &FileVersion,
        index: u64,
        range: Range<u64>,
        ask: Ask,
    ) -> Result<Bytes> {
        let object = object(&self.source, file);
        let req = ChunkRequest {
            object: &object,
            file,
            chunk_size: self.chunk_size,
            index,
            len: range.end - range.start,
            cached_only: ask == Ask::Cached,
            may_redirect: ask == Ask::FetchOrHolders,
        };
        let r = self.client.chunk(base, &req).await;
        match &r {
            Ok(b) => self.stats.peer(name, |c| c.bytes += b.len() as u64),
            Err(Error::Corrupt { .. }) => {
                add(&self.stats.crc_failures, 1);
                self.stats.peer(name, |c| c.crc_failures += 1);
            }
            Err(Error::NotFound(_) | Error::ToSelf(_) | Error::Redirected(_)) => {}
            Err(_) => self.stats.peer(name, |c| c.errors += 1),
        }
        r
    }
}

/// Any error but a plain miss or a redirect: the server is backed off for a
/// while.
fn failed<T>(r: &Result<T>) -> bool {
    matches!(r, Err(e) if !matches!(e, Error::NotFound(_) | Error::Redirected(_)))
}

/// Asks the chunk's owner among the live peers.
pub struct PeerTier {
    pub membership: Arc<Membership>,
    /// `http` or, between peers with TLS, `https`.
    pub scheme: &'static str,
    pub asker: ChunkAsker,
}

#[async_trait]
impl Tier for PeerTier {
    fn name(&self) -> &'static str {
        "peer"
    }

    fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64 {
        &stats.bytes_from_peers
    }

    fn is_peer(&self) -> bool {
        true
    }

    /// Owned chunks first, then the rest from an offset of this node's own
    /// for this file (see `order`).
    fn sweep_order(&self, file: &FileVersion, n_chunks: u64) -> Option<Vec<u64>> {
        let object = object(&self.asker.source, file);
        let owners = Owners::new(&self.membership.live());
        let owned = |i: u64| {
            owners
                .of(chunk_key(&object, &file.version, i).as_bytes())
                .is_some_and(|o| self.membership.is_me(o))
        };
        let start = xxh3_64(format!("{}\0{object}", self.asker.client.node()).as_bytes());
        Some(order::sweep(n_chunks, owned, start))
    }

    /// Its servers are named by their addresses (see `fetch`).
    fn distrust(&self, server: &str) {
        if let Ok(peer) = server.parse() {
            self.membership.quarantine(peer);
        }
    }

    async fn fetch(&self, file: &FileVersion, index: u64, range: Range<u64>) -> Result<Answer> {
        let key = chunk_key(&object(&self.asker.source, file), &file.version, index);
        let ranked = ranked(key.as_bytes(), &self.membership.live());
        // Each pass either answers or learns that one more address is this
        // node's own, so it ends within a pass per member.
        for _ in 0..=ranked.len() {
            let m = &self.membership;
            let Some(&owner) = ranked.first() else {
                return Err(Error::Unavailable("no live peers".into()));
            };
            // The owner fetches for the group. When this node is the owner,
            // the next other node in rank may still hold a copy (a node
            // joining a warm group): ask it for its cache only, so no request
            // ever loops back here. Every node ranks the same members, this
            // one under all its addresses, so all agree on the owner.
            let (peer, ask) = if !m.is_me(owner) {
                (owner, Ask::FetchOrHolders)
            } else if let Some(&other) = ranked.iter().find(|a| !m.is_me(**a)) {
                (other, Ask::Cached)
            } else {
                return Err(Error::Unavailable("this node owns the chunk".into()));
            };
            let t = Instant::now();
            let mut r = self.ask(peer, file, index, &range, ask).await;
            if let Err(Error::Redirected(holders)) = r {
                add(&self.asker.stats.redirects_followed, 1);
                r = match self.ask_holders(&holders, file, index, &range).await {
                    Some(got) => Ok(got),
                    // None had it: the owner again, which now sends it
                    // itself, so a redirect happens once per fetch at most.
                    None => self.ask(peer, file, index, &range, Ask::Fetch).await,
                };
            }
            record_fetch("peer", t, &r);
            if let Err(Error::ToSelf(_)) = r {
                m.mark_self(peer);
                continue;
            }
            if failed(&r) {
                m.back_off(peer);
            }
            return r.map(|(from, bytes)| Answer {
                bytes,
                server: Some(from.to_string()),
            });
        }
        Err(Error::Unavailable(
            "every peer address is this node's own".into(),
        ))
    }
}

impl PeerTier {
    async fn ask(
        &self,
        peer: SocketAddr,
        file: &FileVersion,
        index: u64,
        range: &Range<u64>,
        ask: Ask,
    ) -> Result<(SocketAddr, Bytes)> {
        let name = peer.to_string();
        let base = format!("{}://{name}", self.scheme);
        self.asker
            .ask(&base, &name, file, index, range.clone(), ask)
            .await
            .map(|b| (peer, b))
    }

    /// The first of `holders` that has the chunk cached, and the chunk.
    /// Only live members other than this node are asked: a holder list is a
    /// peer's word, and this node's token goes nowhere else.
    async fn ask_holders(
        &self,
        holders: &[SocketAddr],
        file: &FileVersion,
        index: u64,
        range: &Range<u64>,
    ) -> Option<(SocketAddr, Bytes)> {
        let m = &self.membership;
        let mut asked = Vec::with_capacity(super::holders::PER_CHUNK);
        for &h in holders {
            // The list is another member's word: each address once, a few at
            // most, and only members still live now (one may have been backed
            // off by the ask before).
            if asked.len() == super::holders::PER_CHUNK || asked.contains(&h) {
                continue;
            }
            if !m.live().contains(&h) || m.is_me(h) {
                continue;
            }
            asked.push(h);
            let r = self.ask(h, file, index, range, Ask::Cached).await;
            match r {
                Ok(got) => {
                    add(&self.asker.stats.chunks_from_holders, 1);
                    return Some(got);
                }
                Err(Error::ToSelf(_)) => m.mark_self(h),
                Err(_) if failed(&r) => m.back_off(h),
                Err(_) => {}
            }
        }
        None
    }
}

/// A warm-up service that holds models in memory before instances start.
pub struct WarmupTier {
    pub base: String,
    pub asker: ChunkAsker,
    pub backoff_until: Mutex<Option<Instant>>,
    /// It sent a chunk that differs from the origin's: never asked again.
    pub distrusted: AtomicBool,
}

#[async_trait]
impl Tier for WarmupTier {
    fn name(&self) -> &'static str {
        "warm-up"
    }

    fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64 {
        &stats.bytes_from_warmup
    }

    fn distrust(&self, _server: &str) {
        self.distrusted.store(true, Relaxed);
    }

    async fn fetch(&self, file: &FileVersion, index: u64, range: Range<u64>) -> Result<Answer> {
        if self.distrusted.load(Relaxed) {
            return Err(Error::Unavailable(
                "the warm-up service sent a wrong chunk before".into(),
            ));
        }
        if self
            .backoff_until
            .lock()
            .is_some_and(|t| t > Instant::now())
        {
            return Err(Error::Unavailable("warm-up service backed off".into()));
        }
        let t = Instant::now();
        let r = self
            .asker
            .ask(&self.base, &self.base, file, index, range, Ask::Fetch)
            .await;
        record_fetch("warmup", t, &r);
        // A miss at the warm-up service (it serves other models) is no failure.
        if failed(&r) {
            *self.backoff_until.lock() = Some(Instant::now() + Duration::from_secs(10));
        }
        r.map(|bytes| Answer {
            bytes,
            server: Some(self.base.clone()),
        })
    }
}
