//! The read path: a read is split into chunks; each chunk comes from the local
//! cache or, through single-flight, from the first tier that answers.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::TryFutureExt;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info};

use crate::cache::{
    CacheConfig, CacheFile, ChunkStore, ChunkWriter, Mode, Reservation, Reserve, WholeFilePin,
};
use crate::namespace::Namespace;
use crate::prefetch::{PrefetchTicket, Prefetcher};
use crate::singleflight::SingleFlight;
use crate::stats::{add, Stats, StatsSnapshot};
use crate::tier::{Answer, OriginTier, Tier};
use crate::verify::Verifier;
use crate::{Error, FileVersion, Result, Source};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub chunk_size: u64,
    pub cache_dir: PathBuf,
    pub cache_capacity: u64,
    /// Chunks in flight for prefetch across the whole mount; 0 turns it off.
    pub prefetch_concurrency: usize,
    /// Bytes prefetched and not read yet, at most (and at most half the
    /// cache): what prefetch may fetch that a reader never asks for.
    pub prefetch_window: u64,
    pub listing_ttl: Duration,
    /// Bytes fetched from tiers and not yet stored, at most (at least one
    /// chunk): with the chunk buffers kept for reuse, what bounds the
    /// memory the read path holds, whatever the model's size.
    pub max_inflight: u64,
    /// The fraction (0 to 1) of chunks from peers and the warm-up service
    /// that is read from the origin too and compared; 0: none.
    pub peer_verify_sample: f64,
}

/// Told that bytes of a file version were dropped from the cache because
/// the server that sent them unchecked was caught lying (see
/// [`Engine::on_dropped`]): the byte ranges of the source file, in order.
pub type DroppedHook = Box<dyn Fn(&FileVersion, &[Range<u64>]) + Send + Sync>;

pub struct Engine {
    source: Arc<dyn Source>,
    namespace: Namespace,
    store: Arc<ChunkStore>,
    /// Asked in order when the cache misses, before the origin.
    tiers: Vec<Arc<dyn Tier>>,
    origin: OriginTier,
    flights: SingleFlight<(u128, u64), Got>,
    prefetcher: Prefetcher,
    /// Bytes of the `max_inflight` budget, taken before a tier is asked.
    inflight: Arc<Semaphore>,
    /// Two chunks more that only readers' misses may take: prefetch can fill
    /// the budget, and a reader must not queue behind all of it.
    readers: Arc<Semaphore>,
    verifier: Option<Verifier>,
    dropped: Arc<Mutex<Vec<DroppedHook>>>,
    stats: Arc<Stats>,
    cfg: EngineConfig,
}

/// Who wants a chunk, which decides what may be evicted for it and what
/// happens when nothing may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// A reader's miss: may evict chunks nobody has read yet.
    Read,
    /// Prefetch: within the prefetch window, evicting only chunks already read.
    Prefetch,
    /// The whole chunk even if it cannot be kept (warm).
    Whole,
    /// A peer's request: never forwarded to another peer, and answered "not
    /// here" rather than fetched when there is no room to keep it.
    Peer,
}

/// What a flight brought: the chunk, or word that it was not fetched
/// because the cache had no room for it.
#[derive(Clone)]
pub(crate) enum Got {
    Bytes(Bytes),
    NoRoom,
}

/// Bytes from the tiers, and the server they came from when they were not
/// compared with the origin's: dropped from the cache if it lies later.
struct Fetched {
    bytes: Bytes,
    unchecked_from: Option<String>,
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
        let rate = cfg.peer_verify_sample;
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::Config(format!(
                "--peer-verify-sample {rate}: give the fraction of chunks to check, from 0 to 1"
            )));
        }
        let stats = Arc::new(Stats::default());
        let store = ChunkStore::open(
            CacheConfig {
                dir: cfg.cache_dir.clone(),
                capacity: cfg.cache_capacity,
                chunk_size: cfg.chunk_size,
                source_id: source.id().to_string(),
                prefetch_window: cfg.prefetch_window,
            },
            stats.clone(),
        )?;
        let tiers = tiers(&stats);
        let origin = OriginTier(source.clone());
        let inflight = cfg
            .max_inflight
            .max(cfg.chunk_size)
            .min(Semaphore::MAX_PERMITS as u64);
        // A local source's buffers are a block larger than a chunk (see
        // `read_at`): the pool keeps the budget's worth of those.
        let buffers = inflight.div_ceil(cfg.chunk_size) * (cfg.chunk_size + 4096);
        crate::buf::keep_idle(buffers as usize);
        Ok(Arc::new(Engine {
            inflight: Arc::new(Semaphore::new(inflight as usize)),
            readers: Arc::new(Semaphore::new(2 * cfg.chunk_size as usize)),
            namespace: Namespace::new(source.clone(), cfg.listing_ttl),
            source,
            store,
            tiers,
            origin,
            flights: SingleFlight::default(),
            prefetcher: Prefetcher::new(cfg.prefetch_concurrency),
            verifier: Verifier::new(rate),
            dropped: Arc::default(),
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

    /// Calls `hook` whenever chunks a server sent unchecked are dropped
    /// because it was caught lying, with the byte ranges they held, whether
    /// or not they were still cached: a front end that keeps copies of what
    /// it served (a kernel's page cache) drops them too. It runs on the
    /// thread that caught the lie (a blocking-pool thread, or an async
    /// worker in the middle of a read), after the chunks left the cache,
    /// with the hooks' lock held: it must neither block, nor wait on a
    /// read, nor add a hook.
    pub fn on_dropped(&self, hook: impl Fn(&FileVersion, &[Range<u64>]) + Send + Sync + 'static) {
        self.dropped.lock().push(Box::new(hook));
    }

    /// Tells the hooks that `chunks` of `file` were dropped.
    fn tell_dropped(&self, file: &FileVersion, chunks: &[u64]) {
        tell_dropped(&self.dropped, self.cfg.chunk_size, file, chunks);
    }

    /// The order in which to fetch all of `file` (see `Tier::sweep_order`):
    /// the first tier's that has one, or `None` for file order.
    pub(crate) fn sweep_order(&self, file: &FileVersion, n_chunks: u64) -> Option<Vec<u64>> {
        self.tiers
            .iter()
            .find_map(|t| t.sweep_order(file, n_chunks))
    }

    /// Opens one version of a file and starts prefetching it.
    pub fn open(self: &Arc<Self>, file: FileVersion) -> Result<OpenFile> {
        let cf = self.store.file(&file);
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
        let chunks = offset / cs..=(end - 1) / cs;
        let several = chunks.start() != chunks.end();
        let parts = futures::future::try_join_all(chunks.map(|i| {
            let base = i * cs;
            let rel = offset.max(base) - base..end.min(base + cs) - base;
            // A piece of a fetched chunk holds the in-flight budget: one part
            // must not keep it while another part waits for it.
            self.read_chunk(&h.cf, i, rel, !several).map_ok(move |b| {
                if several {
                    Bytes::copy_from_slice(&b)
                } else {
                    b
                }
            })
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
        map: bool,
    ) -> Result<Bytes> {
        // A part of a read that spans chunks is copied at once: mapping it
        // would cost more than reading it.
        let hit = if map {
            self.store.read_mapped(cf, i, rel.clone())
        } else {
            self.store.read(cf, i, rel.clone())
        };
        if let Some(b) = hit {
            add(&self.stats.cache_hits, 1);
            add(&self.stats.bytes_from_cache, b.len() as u64);
            return Ok(b);
        }
        add(&self.stats.cache_misses, 1);
        let offset = cf.chunk_range(i).start + rel.start;
        self.prefetcher.miss(cf.key, i, offset, self.cfg.chunk_size);
        match self.fetch(cf, i, Want::Read).await? {
            Got::Bytes(whole) => {
                self.store.mark_read(cf, i);
                Ok(whole.slice(rel.start as usize..rel.end as usize))
            }
            // No room to keep the chunk: fetch just what was asked, so a
            // reader of a full cache costs the origin what it reads. Peers
            // deal in whole chunks, so they are not asked for a piece.
            Got::NoRoom => {
                let base = cf.chunk_range(i).start;
                let range = base + rel.start..base + rel.end;
                let got = self
                    .fetch_from_tiers(cf, i, range, true, true, &mut None)
                    .await?;
                // Not cached, but served: its pages are the reader's kernel's.
                self.remember(cf, i, got.unchecked_from);
                let b = got.bytes;
                add(&self.stats.reads_uncached, 1);
                add(&self.stats.bytes_uncached, b.len() as u64);
                Ok(b)
            }
        }
    }

    /// The whole of chunk `i`, fetched once however many ask at a time, and
    /// kept in the cache when room can be made for it first. A chunk that
    /// cannot be kept is fetched for `Want::Whole` only: prefetch and
    /// readers get `Got::NoRoom` and nothing is read from any tier.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        cf: &Arc<CacheFile>,
        i: u64,
        want: Want,
    ) -> Result<Got> {
        let got = match want {
            Want::Prefetch => self.prefetch(cf, i).await?,
            Want::Read | Want::Whole | Want::Peer => self.flight(cf, i, want).await?,
        };
        match got {
            Got::NoRoom if want == Want::Whole => self.fetch_uncached(cf, i).await,
            other => Ok(other),
        }
    }

    /// Prefetch's fetch of chunk `i`: it joins the chunk's flight, or leads
    /// one only if it could reserve room, under the flights' lock. A flight
    /// that found no room would fetch nothing, and a reader's miss that
    /// joined it would have to ask again, and could join the next such
    /// flight of prefetch's (which tries a reader's chunks again and again
    /// while its window is full): the reader would then be served uncached
    /// and the chunk fetched from the origin a second time later.
    async fn prefetch(self: &Arc<Self>, cf: &Arc<CacheFile>, i: u64) -> Result<Got> {
        let flight = self.flights.join_or_lead((cf.key, i), || {
            let (room, evicted) = self.store.reserve_unfreed(cf, i, Mode::Prefetch);
            match room {
                Reserve::Room(r) => {
                    let fill = self.clone().fill(cf.clone(), i, Want::Prefetch, r);
                    // The evicted chunks' blocks are freed in the flight's
                    // task: not under the flights' lock (it is I/O), and
                    // before the new chunk is written, which on a full
                    // filesystem needs them.
                    Some(async move {
                        drop(evicted);
                        fill.await
                    })
                }
                // Nothing was evicted for no room.
                Reserve::Busy | Reserve::NoRoom => None,
            }
        });
        match flight {
            Some(f) => f.await,
            // Nobody is fetching it: it is cached, or there is no room.
            None => Ok(self.store.read_chunk(cf, i).map_or(Got::NoRoom, Got::Bytes)),
        }
    }

    async fn fetch_uncached(&self, cf: &CacheFile, i: u64) -> Result<Got> {
        let b = self
            .fetch_from_tiers(cf, i, cf.chunk_range(i), false, false, &mut None)
            .await?;
        self.remember(cf, i, b.unchecked_from);
        let b = b.bytes;
        add(&self.stats.reads_uncached, 1);
        add(&self.stats.bytes_uncached, b.len() as u64);
        Ok(Got::Bytes(b))
    }

    /// A flight for a reader, a whole chunk or a peer, which may evict what
    /// nobody has read (prefetch has its own, see [`Self::prefetch`]).
    async fn flight(self: &Arc<Self>, cf: &Arc<CacheFile>, i: u64, want: Want) -> Result<Got> {
        let (engine, cf) = (self.clone(), cf.clone());
        self.flights
            .run((cf.key, i), move || async move {
                // Someone may have stored it between our miss and this flight.
                if let Some(b) = engine.store.read_chunk(&cf, i) {
                    return Ok(Got::Bytes(b));
                }
                match engine.store.reserve(&cf, i, Mode::Read) {
                    Reserve::Room(r) => engine.fill(cf, i, want, r).await,
                    Reserve::Busy | Reserve::NoRoom => Ok(Got::NoRoom),
                }
            })
            .await
    }

    /// A flight's work once it has `room` for chunk `i`: fetch it, keep it,
    /// hand it to the flight's waiters.
    async fn fill(
        self: Arc<Self>,
        cf: Arc<CacheFile>,
        i: u64,
        want: Want,
        room: Reservation,
    ) -> Result<Got> {
        let mut room = Some(room);
        let got = self
            .fetch_from_tiers(
                &cf,
                i,
                cf.chunk_range(i),
                want == Want::Peer,
                want == Want::Read,
                &mut room,
            )
            .await?;
        // Its sender caught lying while this chunk was on its way:
        // no waiter gets it, the origin's is fetched instead.
        let got = match got.unchecked_from {
            Some(ref from) if self.caught(from) => Fetched {
                bytes: self
                    .read_origin(&cf, i, cf.chunk_range(i), want == Want::Read)
                    .await?,
                unchecked_from: None,
            },
            _ => got,
        };
        if let Some(r) = room {
            self.store.commit(r, &got.bytes);
        }
        // Cached or not, it is served: a catch must drop the pages
        // the kernel keeps of it too.
        self.remember(&cf, i, got.unchecked_from);
        Ok(Got::Bytes(got.bytes))
    }

    /// `len` bytes of the in-flight budget, held until the last piece of
    /// what was fetched with it is dropped (see [`held`]). A reader's miss
    /// takes whichever comes first, the budget or the readers' reserve.
    async fn budget(&self, len: u64, reader: bool) -> Result<OwnedSemaphorePermit> {
        let len = len
            // Both semaphores hold at least a chunk, so this never waits
            // for more than they have.
            .min(self.cfg.chunk_size)
            .min(u32::MAX as u64) as u32;
        let budget = self.inflight.clone().acquire_many_owned(len);
        let permit = if reader {
            tokio::select! {
                biased;
                p = budget => p,
                p = self.readers.clone().acquire_many_owned(len) => p,
            }
        } else {
            budget.await
        };
        permit.map_err(|_| Error::Cache("the in-flight budget is closed".into()))
    }

    /// Bytes `range` of `cf` (within chunk `index`) from the first tier
    /// that answers. Tiers that deal in whole chunks are asked for the chunk.
    /// Only the origin's answer takes the in-flight budget: a node waiting
    /// on a peer must not hold budget that peer's own fetch for it may be
    /// waiting for on its side (two nodes would each hold what the other
    /// needs until the peer timeout). What comes from peers is bounded by
    /// the flights that ask for it. With `room` for the chunk, the origin's
    /// bytes are streamed into the cache where it can be (the room is then
    /// used up).
    async fn fetch_from_tiers(
        &self,
        cf: &CacheFile,
        index: u64,
        range: Range<u64>,
        skip_peers: bool,
        reader: bool,
        room: &mut Option<Reservation>,
    ) -> Result<Fetched> {
        let chunk = cf.chunk_range(index);
        // The origin, last, is asked below.
        for tier in &self.tiers {
            if skip_peers && tier.is_peer() {
                continue;
            }
            let ask = if tier.whole_chunks() {
                chunk.clone()
            } else {
                range.clone()
            };
            let answer = match tier.fetch(&cf.file, index, ask.clone()).await {
                Ok(a) => a,
                Err(e @ Error::VersionChanged { .. }) => {
                    add(&self.stats.version_changes, 1);
                    return Err(e);
                }
                Err(e) => {
                    debug!(tier = tier.name(), "tier failed, trying the next: {e}");
                    continue;
                }
            };
            if let Some(f) = self
                .checked(cf, index, tier.as_ref(), answer, reader)
                .await?
            {
                return Ok(Fetched {
                    bytes: part(f.bytes, &ask, &range, cf, index, tier.name())?,
                    unchecked_from: f.unchecked_from,
                });
            }
        }
        if range == chunk && self.origin.streams() && self.store.takes_streams() {
            // Without a writer (its files could not be made) the chunk is
            // fetched to serve, not to keep.
            if let Some(w) = room.take().and_then(|r| self.store.writer(r)) {
                return Ok(Fetched {
                    bytes: self.stream_origin(cf, index, w, reader).await?,
                    unchecked_from: None,
                });
            }
        }
        Ok(Fetched {
            bytes: self.read_origin(cf, index, range, reader).await?,
            unchecked_from: None,
        })
    }

    /// Chunk `index` from the origin, written into the cache by `w` as it
    /// arrives, within the in-flight budget while it streams: once in the
    /// cache it is no longer in memory.
    async fn stream_origin(
        &self,
        cf: &CacheFile,
        index: u64,
        mut w: ChunkWriter,
        reader: bool,
    ) -> Result<Bytes> {
        add(&self.stats.source_requests, 1);
        let range = cf.chunk_range(index);
        let budget = self.budget(range.end - range.start, reader).await?;
        let read = self.origin.fetch_to(&cf.file, range.clone(), &mut w).await;
        drop(budget);
        if let Err(e) = read {
            self.origin_failed(&e);
            return Err(e);
        }
        add(&self.stats.bytes_from_source, range.end - range.start);
        self.store.commit_written(w).map_err(|e| {
            Error::Cache(format!(
                "{} chunk {index}: cannot keep or serve it: {e}",
                cf.file.path
            ))
        })
    }

    fn origin_failed(&self, e: &Error) {
        let counter = match e {
            Error::VersionChanged { .. } => &self.stats.version_changes,
            _ => &self.stats.source_errors,
        };
        add(counter, 1);
    }

    /// Bytes `range` of chunk `index` from the origin, within the in-flight
    /// budget.
    async fn read_origin(
        &self,
        cf: &CacheFile,
        index: u64,
        range: Range<u64>,
        reader: bool,
    ) -> Result<Bytes> {
        let origin = &self.origin;
        add(&self.stats.source_requests, 1);
        let budget = self.budget(range.end - range.start, reader).await?;
        match origin.fetch(&cf.file, index, range.clone()).await {
            Ok(a) => {
                let b = held(a.bytes, budget);
                add(&self.stats.bytes_from_source, b.len() as u64);
                part(b, &range, &range, cf, index, origin.name())
            }
            Err(e) => {
                self.origin_failed(&e);
                Err(e)
            }
        }
    }

    /// What `tier` answered, to serve: its bytes, or, when they were
    /// compared with the origin's (`--peer-verify-sample`) and differ, the
    /// origin's; the server that sent them is never asked again and what it
    /// sent before is dropped from the cache. `None`: the server was caught
    /// since it was asked, and its answer counts for nothing.
    async fn checked(
        &self,
        cf: &CacheFile,
        index: u64,
        tier: &dyn Tier,
        answer: Answer,
        reader: bool,
    ) -> Result<Option<Fetched>> {
        let from_tier = |bytes: Bytes, unchecked_from| {
            add(tier.counter(&self.stats), bytes.len() as u64);
            Some(Fetched {
                bytes,
                unchecked_from,
            })
        };
        let (Some(v), Some(server)) = (&self.verifier, answer.server) else {
            return Ok(from_tier(answer.bytes, None));
        };
        if v.is_liar(&server) {
            return Ok(None);
        }
        if !v.sampled(cf.key, index) {
            return Ok(from_tier(answer.bytes, Some(server)));
        }
        let origin = match self
            .read_origin(cf, index, cf.chunk_range(index), reader)
            .await
        {
            Ok(b) => b,
            Err(e @ Error::VersionChanged { .. }) => return Err(e),
            // The check needs the origin, the read does not: while the
            // origin fails, the group's copy is better than none.
            Err(e) => {
                debug!(%server, "cannot check a chunk against the origin: {e}");
                return Ok(from_tier(answer.bytes, Some(server)));
            }
        };
        add(&self.stats.peer_chunks_verified, 1);
        if origin == answer.bytes {
            return Ok(from_tier(answer.bytes, None));
        }
        add(&self.stats.peer_lies_caught, 1);
        self.stats.peer(&server, |c| c.lies += 1);
        tier.distrust(&server);
        if let Some(sent) = v.caught(&server) {
            error!(
                peer = %server,
                path = %cf.file.path,
                chunk = index,
                sent = sent.iter().map(|s| s.chunks.len()).sum::<usize>(),
                "a chunk from this peer differs from the origin's: serving the origin's, \
                 never asking it again, dropping the chunks it sent before from the cache"
            );
            // Up to 64 Ki punches: off the async workers, which serve reads.
            // The kernel's pages go after the cache's, so a page it reads
            // again comes from an honest source.
            let (store, hooks, cs) = (
                self.store.clone(),
                self.dropped.clone(),
                self.cfg.chunk_size,
            );
            tokio::task::spawn_blocking(move || {
                let mut dropped = 0;
                for s in &sent {
                    dropped += s
                        .chunks
                        .iter()
                        .filter(|&&i| store.discard(s.key, i))
                        .count();
                    // Evicted ones too: a reader's page cache may hold them.
                    tell_dropped(&hooks, cs, &s.file, &s.chunks);
                }
                info!(peer = %server, dropped, "dropped the chunks a lying peer sent unchecked");
            });
        }
        Ok(Some(Fetched {
            bytes: origin,
            unchecked_from: None,
        }))
    }

    /// Whether `server` has been caught lying.
    fn caught(&self, server: &str) -> bool {
        self.verifier.as_ref().is_some_and(|v| v.is_liar(server))
    }

    /// Chunk `i`, just served (and cached if there was room), came
    /// unchecked from `server`: it is dropped again, from the cache and the
    /// front end's copies, if the server was caught lying meanwhile.
    fn remember(&self, cf: &CacheFile, i: u64, server: Option<String>) {
        if let (Some(v), Some(server)) = (&self.verifier, server) {
            if !v.received(&server, &cf.file, cf.key, i) {
                self.store.discard(cf.key, i);
                self.tell_dropped(&cf.file, &[i]);
            }
        }
    }

    /// Chunk `i` of `file` for a peer: from the cache, or fetched once for
    /// the group and kept.
    pub async fn serve_chunk(self: &Arc<Self>, file: &FileVersion, i: u64) -> Result<Bytes> {
        let cf = self.store.file(file);
        if i >= cf.n_chunks() {
            return Err(Error::NotFound(format!("{} chunk {i}", file.path)));
        }
        if let Some(b) = self.store.read_chunk(&cf, i) {
            return Ok(b);
        }
        // A node with no room to keep the chunk does not fetch it for the
        // group: the asker goes to the next tier itself.
        match self.fetch(&cf, i, Want::Peer).await? {
            // The upload may last as long as the asker's connection: it gets
            // its own copy, so it never holds the fetch's budget or buffer.
            Got::Bytes(b) => Ok(Bytes::copy_from_slice(&b)),
            Got::NoRoom => Err(Error::NotFound(format!("{} chunk {i}: no room", file.path))),
        }
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
        let cf = self.store.file(file);
        let n = cf.n_chunks();
        let order = self
            .sweep_order(file, n)
            .unwrap_or_else(|| (0..n).collect());
        let results: Vec<Result<()>> = futures::stream::iter(order)
            .map(|i| {
                let cf = cf.clone();
                async move {
                    if self.store.contains(&cf, i) {
                        return Ok(());
                    }
                    self.fetch(&cf, i, Want::Whole).await?;
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
        (s.cache_bytes_capacity_effective, s.prefetch_bytes_unread) = self.store.pressure();
        s.cache_bytes_retired = self.store.retired_bytes();
        s.chunk_size = self.cfg.chunk_size;
        s.cache_dir = self.cfg.cache_dir.display().to_string();
        s.source = self.source.id().to_string();
        s.pid = std::process::id();
        s
    }
}

/// Bytes `range` of what `tier` answered when asked for `ask`.
fn part(
    b: Bytes,
    ask: &Range<u64>,
    range: &Range<u64>,
    cf: &CacheFile,
    index: u64,
    tier: &str,
) -> Result<Bytes> {
    let (from, to) = (range.start - ask.start, range.end - ask.start);
    if to as usize > b.len() {
        return Err(Error::Cache(format!(
            "{} chunk {index}: the {tier} tier answered {} bytes where {} were expected",
            cf.file.path,
            b.len(),
            ask.end - ask.start
        )));
    }
    Ok(b.slice(from as usize..to as usize))
}

/// `b`, holding `budget` until its last clone or slice is dropped: the
/// in-flight bound then covers a fetched chunk until every reader of it
/// has had its reply, without copying the piece each reader asked for.
fn held(b: Bytes, budget: OwnedSemaphorePermit) -> Bytes {
    struct Held {
        bytes: Bytes,
        _budget: OwnedSemaphorePermit,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    Bytes::from_owner(Held {
        bytes: b,
        _budget: budget,
    })
}

/// Tells `hooks` that `chunks` (of `cs` bytes) of `file` were dropped, as
/// byte ranges with neighbours merged.
fn tell_dropped(hooks: &Mutex<Vec<DroppedHook>>, cs: u64, file: &FileVersion, chunks: &[u64]) {
    let hooks = hooks.lock();
    if hooks.is_empty() {
        return;
    }
    let mut chunks = chunks.to_vec();
    chunks.sort_unstable();
    chunks.dedup();
    let mut ranges: Vec<Range<u64>> = vec![];
    for i in chunks {
        let r = i * cs..((i + 1) * cs).min(file.size);
        match ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => ranges.push(r),
        }
    }
    for hook in hooks.iter() {
        hook(file, &ranges);
    }
}

#[cfg(test)]
mod tests;
