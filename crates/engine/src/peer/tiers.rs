//! The peer group and the warm-up service as tiers of the read path.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{ranked, ChunkRequest, Membership, PeerClient};
use crate::stats::{add, Stats};
use crate::tier::Tier;
use crate::{Error, FileVersion, Result};

/// The object's name that every node shares: its source URL and path.
fn object(source: &str, file: &FileVersion) -> String {
    format!("{}/{}", source.trim_end_matches('/'), file.path)
}

fn record(stats: &Stats, name: &str, r: &Result<Bytes>) {
    match r {
        Ok(b) => stats.peer(name, |c| c.bytes += b.len() as u64),
        Err(Error::Corrupt { .. }) => {
            add(&stats.crc_failures, 1);
            stats.peer(name, |c| c.crc_failures += 1);
        }
        Err(Error::NotFound(_)) => {}
        Err(_) => stats.peer(name, |c| c.errors += 1),
    }
}

/// Asks the chunk's owner among the live peers.
pub struct PeerTier {
    pub membership: Arc<Membership>,
    pub client: PeerClient,
    pub source: String,
    pub chunk_size: u64,
    pub stats: Arc<Stats>,
}

impl PeerTier {
    fn key(&self, file: &FileVersion, index: u64) -> String {
        format!("{}\0{}\0{index}", object(&self.source, file), file.version)
    }
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

    async fn fetch(&self, file: &FileVersion, index: u64, range: Range<u64>) -> Result<Bytes> {
        let ranked = ranked(self.key(file, index).as_bytes(), &self.membership.live());
        let Some(&owner) = ranked.first() else {
            return Err(Error::Unavailable("no live peers".into()));
        };
        // The owner fetches for the group. When this node is the owner, the
        // next in rank may still hold a copy (a node joining a warm group):
        // ask it for its cache only, so no request ever loops back here.
        let (peer, cached_only) = if Some(owner) != self.membership.me() {
            (owner, false)
        } else if let Some(&second) = ranked.get(1) {
            (second, true)
        } else {
            return Err(Error::Unavailable("this node owns the chunk".into()));
        };
        let name = peer.to_string();
        let object = object(&self.source, file);
        let req = ChunkRequest {
            object: &object,
            file,
            chunk_size: self.chunk_size,
            index,
            len: range.end - range.start,
            cached_only,
        };
        let r = self.client.chunk(&format!("http://{peer}"), &req).await;
        record(&self.stats, &name, &r);
        if matches!(&r, Err(e) if !matches!(e, Error::NotFound(_))) {
            self.membership.back_off(peer);
        }
        r
    }
}

/// A warm-up service that holds models in memory before instances start.
pub struct WarmupTier {
    pub base: String,
    pub client: PeerClient,
    pub source: String,
    pub chunk_size: u64,
    pub stats: Arc<Stats>,
    pub backoff_until: Mutex<Option<Instant>>,
}

#[async_trait]
impl Tier for WarmupTier {
    fn name(&self) -> &'static str {
        "warm-up"
    }

    fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64 {
        &stats.bytes_from_warmup
    }

    async fn fetch(&self, file: &FileVersion, index: u64, range: Range<u64>) -> Result<Bytes> {
        if self
            .backoff_until
            .lock()
            .is_some_and(|t| t > Instant::now())
        {
            return Err(Error::Unavailable("warm-up service backed off".into()));
        }
        let object = object(&self.source, file);
        let req = ChunkRequest {
            object: &object,
            file,
            chunk_size: self.chunk_size,
            index,
            len: range.end - range.start,
            cached_only: false,
        };
        let r = self.client.chunk(&self.base, &req).await;
        record(&self.stats, &self.base, &r);
        // A miss at the warm-up service (it serves other models) is no failure.
        if matches!(&r, Err(e) if !matches!(e, Error::NotFound(_))) {
            *self.backoff_until.lock() = Some(Instant::now() + Duration::from_secs(10));
        }
        r
    }
}
