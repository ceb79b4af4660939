//! Counters a mount reports through `modelfs stat`. The JSON keys are a
//! contract scripts rely on: add keys, never rename them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// What one peer (or the warm-up service) gave this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerCounters {
    pub bytes: u64,
    pub errors: u64,
    pub crc_failures: u64,
    /// Chunks it sent that differ from the origin's (`--peer-verify-sample`).
    #[serde(default)]
    pub lies: u64,
}

/// How far `--preload` has got, live: what it names, and how much of that is
/// in the cache now (chunks can be evicted after the preload finished).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreloadStatus {
    /// The paths as given to `--preload`.
    pub paths: Vec<String>,
    /// The paths have been listed: `files` and `bytes` are final.
    pub listed: bool,
    pub files: u64,
    pub files_cached: u64,
    pub bytes: u64,
    pub bytes_cached: u64,
    /// Files not wholly cached, by path from the source's root; at most
    /// [`NOT_CACHED_SHOWN`] of `files - files_cached`.
    pub not_cached: Vec<String>,
    /// Listed, every byte cached, and no error.
    pub complete: bool,
    /// Why the preload stopped, if it did ("" otherwise).
    pub error: String,
}

/// Bounds the `stat` answer (an xattr) however big the preload.
pub const NOT_CACHED_SHOWN: usize = 100;

/// Asked at every snapshot, so `stat` and `/readyz` see the cache as it is.
#[derive(Default)]
pub struct PreloadProbe(Mutex<Option<Box<dyn Fn() -> PreloadStatus + Send + Sync>>>);

impl PreloadProbe {
    pub fn set(&self, f: impl Fn() -> PreloadStatus + Send + Sync + 'static) {
        *self.0.lock() = Some(Box::new(f));
    }
}

impl std::fmt::Debug for PreloadProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreloadProbe")
    }
}

#[derive(Default, Debug)]
pub struct Stats {
    pub bytes_served: AtomicU64,
    pub bytes_from_cache: AtomicU64,
    pub bytes_from_source: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub bytes_from_warmup: AtomicU64,
    pub chunks_inserted: AtomicU64,
    /// Of those, written into the cache as the origin sent them.
    pub chunks_streamed: AtomicU64,
    pub chunks_evicted: AtomicU64,
    pub chunks_prefetched: AtomicU64,
    pub crc_failures: AtomicU64,
    pub source_requests: AtomicU64,
    pub source_errors: AtomicU64,
    pub version_changes: AtomicU64,
    pub read_errors: AtomicU64,
    pub reads: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub passthrough_opens: AtomicU64,
    pub opens: AtomicU64,
    pub chunks_served_to_peers: AtomicU64,
    pub cache_write_errors: AtomicU64,
    pub reads_uncached: AtomicU64,
    pub bytes_uncached: AtomicU64,
    pub redirects_sent: AtomicU64,
    pub redirects_followed: AtomicU64,
    pub chunks_from_holders: AtomicU64,
    pub peer_chunks_verified: AtomicU64,
    pub peer_lies_caught: AtomicU64,
    pub peers: Mutex<BTreeMap<String, PeerCounters>>,
    pub preload: PreloadProbe,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub source: String,
    pub pid: u32,
    pub bytes_served: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_source: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_warmup: u64,
    pub hit_ratio: f64,
    pub chunks_cached: u64,
    pub chunks_inserted: u64,
    pub chunks_streamed: u64,
    pub chunks_evicted: u64,
    pub chunks_prefetched: u64,
    pub crc_failures: u64,
    pub source_requests: u64,
    pub source_errors: u64,
    pub version_changes: u64,
    pub read_errors: u64,
    pub reads: u64,
    pub opens: u64,
    pub cache_bytes_used: u64,
    pub cache_bytes_capacity: u64,
    pub chunk_size: u64,
    pub cache_dir: String,
    pub passthrough_opens: u64,
    /// "enabled", or why reads go through userspace instead.
    pub passthrough: String,
    pub chunks_served_to_peers: u64,
    /// By peer address (and the warm-up service's URL).
    pub peers: BTreeMap<String, PeerCounters>,
    /// The capacity in force: lower than `cache_bytes_capacity` after the
    /// cache's filesystem ran out of space.
    pub cache_bytes_capacity_effective: u64,
    /// Evicted cache files that a process still maps: memory eviction could
    /// not reclaim yet, not counted in `cache_bytes_used`.
    pub cache_bytes_retired: u64,
    /// Prefetched and not read yet (bounded by the prefetch window).
    pub prefetch_bytes_unread: u64,
    /// Reads served straight from a tier because the cache had no room.
    pub reads_uncached: u64,
    pub bytes_uncached: u64,
    /// Chunks that could not be written to the cache (full filesystem, I/O).
    pub cache_write_errors: u64,
    /// Peer requests this node, a busy owner, answered with holders of the
    /// chunk instead of the chunk.
    pub peer_redirects_sent: u64,
    /// Such answers this node got from owners.
    pub peer_redirects_followed: u64,
    /// Chunks this node got from a holder an owner named.
    pub chunks_from_holders: u64,
    /// Chunks from peers and the warm-up service also read from the origin
    /// and compared (`--peer-verify-sample`).
    #[serde(default)]
    pub peer_chunks_verified: u64,
    /// Of those, chunks that differed: each server that sent one is never
    /// asked again.
    #[serde(default)]
    pub peer_lies_caught: u64,
    /// `--preload` of a mount or `serve`; null without one.
    #[serde(default)]
    pub preload: Option<PreloadStatus>,
}

impl Stats {
    pub fn peer(&self, name: &str, f: impl FnOnce(&mut PeerCounters)) {
        f(self.peers.lock().entry(name.to_string()).or_default());
    }

    pub fn fill(&self, s: &mut StatsSnapshot) {
        let g = |c: &AtomicU64| c.load(Relaxed);
        s.bytes_served = g(&self.bytes_served);
        s.bytes_from_cache = g(&self.bytes_from_cache);
        s.bytes_from_source = g(&self.bytes_from_source);
        s.bytes_from_peers = g(&self.bytes_from_peers);
        s.bytes_from_warmup = g(&self.bytes_from_warmup);
        s.chunks_inserted = g(&self.chunks_inserted);
        s.chunks_streamed = g(&self.chunks_streamed);
        s.chunks_evicted = g(&self.chunks_evicted);
        s.chunks_prefetched = g(&self.chunks_prefetched);
        s.crc_failures = g(&self.crc_failures);
        s.source_requests = g(&self.source_requests);
        s.source_errors = g(&self.source_errors);
        s.version_changes = g(&self.version_changes);
        s.read_errors = g(&self.read_errors);
        s.reads = g(&self.reads);
        s.opens = g(&self.opens);
        s.passthrough_opens = g(&self.passthrough_opens);
        s.chunks_served_to_peers = g(&self.chunks_served_to_peers);
        s.reads_uncached = g(&self.reads_uncached);
        s.bytes_uncached = g(&self.bytes_uncached);
        s.cache_write_errors = g(&self.cache_write_errors);
        s.peer_redirects_sent = g(&self.redirects_sent);
        s.peer_redirects_followed = g(&self.redirects_followed);
        s.chunks_from_holders = g(&self.chunks_from_holders);
        s.peer_chunks_verified = g(&self.peer_chunks_verified);
        s.peer_lies_caught = g(&self.peer_lies_caught);
        s.peers = self.peers.lock().clone();
        s.preload = self.preload.0.lock().as_ref().map(|f| f());
        let (hits, misses) = (g(&self.cache_hits), g(&self.cache_misses));
        s.hit_ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
    }
}
