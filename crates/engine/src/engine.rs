//! The read path: a read is split into chunks; each chunk comes from the local
//! cache or, through single-flight, from the first tier that answers.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::{debug, error};

use crate::cache::{CacheConfig, CacheFile, ChunkStore, Insert, WholeFilePin};
use crate::namespace::Namespace;
use crate::prefetch::{PrefetchTicket, Prefetcher};
use crate::singleflight::SingleFlight;
use crate::stats::{add, Stats, StatsSnapshot};
use crate::tier::{OriginTier, Tier};
use crate::{Error, FileVersion, Result, Source};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub chunk_size: u64,
    pub cache_dir: PathBuf,
    pub cache_capacity: u64,
    /// Chunks in flight for prefetch across the whole mount; 0 turns it off.
    pub prefetch_concurrency: usize,
    pub listing_ttl: Duration,
}

pub struct Engine {
    source: Arc<dyn Source>,
    namespace: Namespace,
    store: Arc<ChunkStore>,
    tiers: Vec<Arc<dyn Tier>>,
    flights: SingleFlight<(u128, u64), Bytes>,
    prefetcher: Prefetcher,
    stats: Arc<Stats>,
    cfg: EngineConfig,
}

/// One open handle on one version of a file.
pub struct OpenFile {
    pub file: FileVersion,
    cf: Arc<CacheFile>,
    _prefetch: Option<PrefetchTicket>,
}

impl Engine {
    /// `tiers` makes the tiers asked in order after the local cache misses
    /// (given the engine's counters); the origin is always the last.
    pub fn new(
        source: Arc<dyn Source>,
        cfg: EngineConfig,
        tiers: impl FnOnce(&Arc<Stats>) -> Vec<Arc<dyn Tier>>,
    ) -> Result<Arc<Self>> {
        if cfg.chunk_size == 0 || !cfg.chunk_size.is_multiple_of(4096) {
            return Err(Error::Config(format!(
                "--chunk-size {} must be a positive multiple of 4KiB",
                cfg.chunk_size
            )));
        }
        let stats = Arc::new(Stats::default());
        let store = ChunkStore::open(
            CacheConfig {
                dir: cfg.cache_dir.clone(),
                capacity: cfg.cache_capacity,
                chunk_size: cfg.chunk_size,
                source_id: source.id().to_string(),
            },
            stats.clone(),
        )?;
        let mut tiers = tiers(&stats);
        tiers.push(Arc::new(OriginTier(source.clone())));
        Ok(Arc::new(Engine {
            namespace: Namespace::new(source.clone(), cfg.listing_ttl),
            source,
            store,
            tiers,
            flights: SingleFlight::default(),
            prefetcher: Prefetcher::new(cfg.prefetch_concurrency),
            stats,
            cfg,
        }))
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub(crate) fn prefetcher(&self) -> &Prefetcher {
        &self.prefetcher
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Opens one version of a file and starts prefetching it.
    pub fn open(self: &Arc<Self>, file: FileVersion) -> Result<OpenFile> {
        let cf = self.store.file(&file)?;
        add(&self.stats.opens, 1);
        let prefetch =
            (self.cfg.prefetch_concurrency > 0).then(|| self.prefetcher.start(self, &cf));
        Ok(OpenFile {
            file,
            cf,
            _prefetch: prefetch,
        })
    }

    /// All chunks of the file, pinned, if every one is cached: the caller may
    /// then let the kernel read the cache file directly.
    pub fn pin_complete(&self, h: &OpenFile) -> Option<WholeFilePin> {
        self.store.pin_whole(&h.cf)
    }

    pub async fn read(self: &Arc<Self>, h: &OpenFile, offset: u64, len: u64) -> Result<Bytes> {
        add(&self.stats.reads, 1);
        let size = h.file.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let cs = self.cfg.chunk_size;
        let parts = futures::future::try_join_all((offset / cs..=(end - 1) / cs).map(|i| {
            let base = i * cs;
            let rel = offset.max(base) - base..end.min(base + cs) - base;
            self.read_chunk(&h.cf, i, rel)
        }))
        .await
        .inspect_err(|e| {
            add(&self.stats.read_errors, 1);
            error!(path = %h.file.path, offset, len, "read failed: {e}");
        })?;
        add(&self.stats.bytes_served, end - offset);
        Ok(match <[Bytes; 1]>::try_from(parts) {
            Ok([one]) => one,
            Err(parts) => {
                let mut b = BytesMut::with_capacity((end - offset) as usize);
                parts.iter().for_each(|p| b.extend_from_slice(p));
                b.freeze()
            }
        })
    }

    async fn read_chunk(
        self: &Arc<Self>,
        cf: &Arc<CacheFile>,
        i: u64,
        rel: Range<u64>,
    ) -> Result<Bytes> {
        if let Some(b) = self.store.read(cf, i, rel.clone()) {
            add(&self.stats.cache_hits, 1);
            add(&self.stats.bytes_from_cache, b.len() as u64);
            return Ok(b);
        }
        add(&self.stats.cache_misses, 1);
        self.prefetcher.hint(cf.key, i + 1);
        let whole = self.fetch(cf, i, false, false).await?;
        self.store.mark_read(cf, i);
        Ok(whole.slice(rel.start as usize..rel.end as usize))
    }

    /// The whole of chunk `i`, fetched once however many ask at a time, and
    /// stored in the cache when there is room. `for_peer` skips the peer
    /// tiers: a peer's request is answered from here, the warm-up service or
    /// the origin, never forwarded to another peer.
    pub async fn fetch(
        self: &Arc<Self>,
        cf: &Arc<CacheFile>,
        i: u64,
        prefetch: bool,
        for_peer: bool,
    ) -> Result<Bytes> {
        let (engine, cf) = (self.clone(), cf.clone());
        self.flights
            .run((cf.key, i), move || async move {
                // Someone may have stored it between our miss and this flight.
                if let Some(b) = engine.store.read_chunk(&cf, i) {
                    return Ok(b);
                }
                let bytes = engine
                    .fetch_from_tiers(&cf.file, i, cf.chunk_range(i), for_peer)
                    .await?;
                match engine.store.insert(&cf, i, &bytes, prefetch) {
                    Ok(Insert::NoRoom) => {
                        debug!(path = %cf.file.path, chunk = i, "no room in the cache")
                    }
                    Ok(_) => {}
                    Err(e) => error!("{e}; serving the chunk uncached"),
                }
                Ok(bytes)
            })
            .await
    }

    async fn fetch_from_tiers(
        &self,
        file: &FileVersion,
        index: u64,
        range: Range<u64>,
        for_peer: bool,
    ) -> Result<Bytes> {
        let last = self.tiers.len() - 1;
        for (n, tier) in self.tiers.iter().enumerate() {
            if for_peer && tier.is_peer() {
                continue;
            }
            if n == last {
                add(&self.stats.source_requests, 1);
            }
            match tier.fetch(file, index, range.clone()).await {
                Ok(b) => {
                    add(tier.counter(&self.stats), b.len() as u64);
                    return Ok(b);
                }
                Err(e @ Error::VersionChanged { .. }) => {
                    add(&self.stats.version_changes, 1);
                    return Err(e);
                }
                Err(e) if n < last => {
                    debug!(tier = tier.name(), "tier failed, trying the next: {e}")
                }
                Err(e) => {
                    add(&self.stats.source_errors, 1);
                    return Err(e);
                }
            }
        }
        unreachable!("the origin tier is always last")
    }

    /// Chunk `i` of `file` for a peer: from the cache, or fetched once for
    /// the group and kept.
    pub async fn serve_chunk(self: &Arc<Self>, file: &FileVersion, i: u64) -> Result<Bytes> {
        let cf = self.store.file(file)?;
        if i >= cf.n_chunks() {
            return Err(Error::NotFound(format!("{} chunk {i}", file.path)));
        }
        if let Some(b) = self.store.read_chunk(&cf, i) {
            return Ok(b);
        }
        self.fetch(&cf, i, false, true).await
    }

    /// Chunk `i` of `file` if this node has it cached; never fetches.
    pub fn cached_chunk(&self, file: &FileVersion, i: u64) -> Result<Bytes> {
        let miss = || Error::NotFound(format!("{} chunk {i}", file.path));
        let cf = self.store.lookup(file).ok_or_else(miss)?;
        if i >= cf.n_chunks() {
            return Err(miss());
        }
        self.store.read_chunk(&cf, i).ok_or_else(miss)
    }

    /// Fetches every chunk of `file` not yet cached, `concurrency` at a time.
    pub async fn warm_file(self: &Arc<Self>, file: &FileVersion, concurrency: usize) -> Result<()> {
        use futures::StreamExt;
        let cf = self.store.file(file)?;
        let results: Vec<Result<()>> = futures::stream::iter(0..cf.n_chunks())
            .map(|i| {
                let cf = cf.clone();
                async move {
                    if self.store.contains(&cf, i) {
                        return Ok(());
                    }
                    self.fetch(&cf, i, false, false).await?;
                    if !self.store.contains(&cf, i) {
                        return Err(Error::Cache(format!(
                            "no room for {} in --cache-size {}",
                            file.path,
                            crate::size::ByteSize(self.cfg.cache_capacity)
                        )));
                    }
                    Ok(())
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        self.stats.fill(&mut s);
        let (used, cached) = self.store.usage();
        s.cache_bytes_used = used;
        s.chunks_cached = cached;
        s.cache_bytes_capacity = self.cfg.cache_capacity;
        s.chunk_size = self.cfg.chunk_size;
        s.cache_dir = self.cfg.cache_dir.display().to_string();
        s.source = self.source.id().to_string();
        s.pid = std::process::id();
        s
    }
}
