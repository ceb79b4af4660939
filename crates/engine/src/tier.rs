//! Where a chunk comes from when the local cache misses. The engine asks the
//! tiers in order (owner peer, warm-up service, origin); adding a tier is
//! adding one item to that list.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::stats::Stats;
use crate::{FileVersion, Result, Sink, Source};

/// What a tier answered.
pub struct Answer {
    pub bytes: Bytes,
    /// Which of the tier's servers sent the bytes, by the name `stat` counts
    /// it under (a peer's address, the warm-up service's URL): whom to
    /// distrust if they are not the origin's. `None` from the origin.
    pub server: Option<String>,
}

#[async_trait]
pub trait Tier: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The counter that this tier's bytes are added to.
    fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64;
    /// Peers of the group are skipped when serving a peer's request, so a
    /// request never travels from peer to peer.
    fn is_peer(&self) -> bool {
        false
    }
    /// Whether the tier serves whole chunks only (peers) rather than any
    /// range (the origin).
    fn whole_chunks(&self) -> bool {
        true
    }
    /// The order in which this node should fetch all `n_chunks` chunks of
    /// `file` (a permutation), when the tier has a say in it: the peer group
    /// spreads a fleet's nodes over its owners. `None`: file order.
    fn sweep_order(&self, _file: &FileVersion, _n_chunks: u64) -> Option<Vec<u64>> {
        None
    }
    /// Never ask `server`, one of this tier's, again: it sent a chunk that
    /// differs from the origin's.
    fn distrust(&self, _server: &str) {}
    /// Bytes `range` (chunk `index`) of `file`.
    async fn fetch(&self, file: &FileVersion, index: u64, range: Range<u64>) -> Result<Answer>;
}

/// The source itself: the last tier, that always answers.
pub struct OriginTier(pub Arc<dyn Source>);

#[async_trait]
impl Tier for OriginTier {
    fn name(&self) -> &'static str {
        "origin"
    }

    fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64 {
        &stats.bytes_from_source
    }

    fn whole_chunks(&self) -> bool {
        false
    }

    async fn fetch(&self, file: &FileVersion, _index: u64, range: Range<u64>) -> Result<Answer> {
        let t = Instant::now();
        let r = self.0.read(file, range).await;
        record_fetch("source", t, &r);
        r.map(|bytes| Answer {
            bytes,
            server: None,
        })
    }
}

impl OriginTier {
    /// As [`Tier::fetch`] of `range`, each piece of the body handed to
    /// `sink` as it arrives (see [`Source::read_to`]).
    pub async fn fetch_to(
        &self,
        file: &FileVersion,
        range: Range<u64>,
        sink: &mut (dyn Sink + Send),
    ) -> Result<()> {
        let t = Instant::now();
        let r = self.0.read_to(file, range, sink).await;
        record_fetch("source", t, &r);
        r
    }

    /// Whether [`Self::fetch_to`] streams (see [`Source::streams`]).
    pub fn streams(&self) -> bool {
        self.0.streams()
    }
}

/// Time to get a chunk from `tier`, for `--metrics-listen`'s histogram (a
/// no-op without it). Failures are left out: their time is the timeout's.
pub(crate) fn record_fetch<T>(tier: &'static str, since: Instant, r: &Result<T>) {
    if r.is_ok() {
        metrics::histogram!("modelfs_fetch_duration_seconds", "tier" => tier)
            .record(since.elapsed().as_secs_f64());
    }
}
