//! Prefetch ahead of the readers of an open file: chunks in order from the
//! first (time to first byte), jumping to where a reader misses (and first
//! fetching the rest of the tensor it missed in, see `follow`), or, in a
//! peer group, in the group's order with a reader's next chunk first; with a bound
//! on chunks in flight for the whole mount. Room is reserved before a chunk
//! is fetched: when there is none (the prefetch window is full of chunks
//! nobody has read, or everything else is pinned) it pauses, fetching
//! nothing, and goes on when readers make room. A chunk it fetched is never
//! fetched again by it, even if a reader's miss evicted it unread.
//!
//! Once a file open for reading is all in the cache, the next shard of its
//! model ("-00002-of-00004") is prefetched while it stays open: loaders
//! (vLLM's, safetensors' own) read shards one after another, and the next
//! one is then mostly cached when it is opened. One shard ahead, no more;
//! with permits only other jobs leave idle, in half the window at most, and
//! what it fetched for a reader that never came stops counting against the
//! window a while after the shard before is closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

use crate::cache::CacheFile;
use crate::engine::{Got, Want};
use crate::stats::add;
use crate::{Engine, FileVersion};

mod follow;
mod shards;

use shards::next_shard;

const NO_HINT: u64 = u64::MAX;
/// Chunks after a reader's miss fetched ahead of a group's sweep order.
const LOOKAHEAD: u64 = 4;

struct Job {
    /// Tickets held: open handles, and the shard before's (see `aheads`).
    opens: AtomicUsize,
    /// Of `opens`, held by the shard before (this file is prefetched ahead).
    aheads: AtomicUsize,
    /// The file is no longer the version prefetched (or gone): stop.
    stale: AtomicBool,
    hint: AtomicU64,
    wake: Notify,
    follow: follow::Follow,
    /// The next shard's prefetch, for as long as this file is open.
    next: Mutex<Option<AheadTicket>>,
}

impl Job {
    /// Handles that hold the file open now.
    fn readers(&self) -> usize {
        self.opens
            .load(SeqCst)
            .saturating_sub(self.aheads.load(SeqCst))
    }
}

#[derive(Default)]
struct Jobs {
    running: HashMap<u128, Arc<Job>>,
    /// Handles open on each file, whichever of its jobs they joined.
    readers: HashMap<u128, usize>,
}

pub struct Prefetcher {
    permits: Arc<Semaphore>,
    jobs: Arc<Mutex<Jobs>>,
}

/// Held by each open handle; prefetch of a file stops when the last one goes.
pub struct PrefetchTicket {
    job: Arc<Job>,
    key: u128,
    jobs: Arc<Mutex<Jobs>>,
}

impl Drop for PrefetchTicket {
    fn drop(&mut self) {
        self.job.opens.fetch_sub(1, SeqCst);
        let mut jobs = self.jobs.lock();
        if let Some(n) = jobs.readers.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                jobs.readers.remove(&self.key);
            }
        }
        drop(jobs);
        self.job.wake.notify_one();
    }
}

/// How long after the shard before is closed the next one, if nobody opened
/// it by then, stops holding the window: a loader closes one shard before
/// it opens the next.
const AHEAD_GRACE: Duration = Duration::from_secs(5);

/// The next shard's prefetch, held by the shard before while it is open.
/// When it goes and nobody ever opened the next shard, what was prefetched
/// of it stays cached but leaves the window, so a load that stopped early
/// does not hold back every other file's prefetch.
struct AheadTicket {
    job: Arc<Job>,
    engine: std::sync::Weak<Engine>,
    cf: Arc<CacheFile>,
    /// Dropped where a handle closes (a FUSE thread): the later check runs
    /// on the runtime that started it.
    rt: tokio::runtime::Handle,
}

impl Drop for AheadTicket {
    fn drop(&mut self) {
        // `opens` first: `Job::readers` never counts this one as a reader.
        self.job.opens.fetch_sub(1, SeqCst);
        self.job.aheads.fetch_sub(1, SeqCst);
        self.job.wake.notify_one();
        let (engine, cf) = (self.engine.clone(), self.cf.clone());
        self.rt.spawn(async move {
            tokio::time::sleep(AHEAD_GRACE).await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            // Under the jobs lock, so no handle opens the file meanwhile.
            let jobs = engine.prefetcher().jobs.lock();
            let held = jobs.readers.contains_key(&cf.key)
                || jobs
                    .running
                    .get(&cf.key)
                    .is_some_and(|j| j.aheads.load(SeqCst) > 0);
            if !held {
                engine.store().forget_unread(&cf);
            }
        });
    }
}

impl Prefetcher {
    pub fn new(concurrency: usize) -> Self {
        Prefetcher {
            permits: Arc::new(Semaphore::new(concurrency)),
            jobs: Arc::default(),
        }
    }

    pub fn start(&self, engine: &Arc<Engine>, cf: &Arc<CacheFile>) -> PrefetchTicket {
        PrefetchTicket {
            job: self.job(engine, cf, false),
            key: cf.key,
            jobs: self.jobs.clone(),
        }
    }

    /// Called on the runtime (the job's task).
    fn start_ahead(&self, engine: &Arc<Engine>, cf: &Arc<CacheFile>) -> AheadTicket {
        AheadTicket {
            job: self.job(engine, cf, true),
            engine: Arc::downgrade(engine),
            cf: cf.clone(),
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// The file's job, started if it has none, with one more ticket.
    fn job(&self, engine: &Arc<Engine>, cf: &Arc<CacheFile>, ahead: bool) -> Arc<Job> {
        let mut jobs = self.jobs.lock();
        if !ahead {
            *jobs.readers.entry(cf.key).or_default() += 1;
        }
        if let Some(job) = jobs.running.get(&cf.key) {
            // `aheads` first: `Job::readers` never counts this one as a reader.
            if ahead {
                job.aheads.fetch_add(1, SeqCst);
            }
            job.opens.fetch_add(1, SeqCst);
            return job.clone();
        }
        let job = Arc::new(Job {
            opens: AtomicUsize::new(1),
            aheads: AtomicUsize::new(usize::from(ahead)),
            stale: AtomicBool::new(false),
            hint: AtomicU64::new(NO_HINT),
            wake: Notify::new(),
            follow: follow::Follow::default(),
            next: Mutex::new(None),
        });
        jobs.running.insert(cf.key, job.clone());
        tokio::spawn(run(
            engine.clone(),
            cf.clone(),
            job.clone(),
            self.permits.clone(),
        ));
        job
    }

    /// A reader missed chunk `i` reading byte `offset`: prefetch the rest of
    /// its tensor, then on from there.
    pub fn miss(&self, key: u128, i: u64, offset: u64, chunk_size: u64) {
        let Some(job) = self.jobs.lock().running.get(&key).cloned() else {
            return;
        };
        job.hint
            .store(job.follow.miss(i, offset, chunk_size), SeqCst);
        job.wake.notify_one();
    }
}

/// The background sweep's order over a file's chunks: a permutation and
/// each chunk's place in it.
struct Sweep {
    order: Vec<u64>,
    place: Vec<usize>,
    /// The order is the group's (see `Tier::sweep_order`) rather than file order.
    spread: bool,
}

impl Sweep {
    fn new(engine: &Engine, cf: &CacheFile) -> Sweep {
        let n = cf.n_chunks();
        // Only a file the window holds whole: in an order of its own, a
        // larger one would fill the window with chunks far from its reader
        // and leave the reader to fetch its own, one at a time.
        let cfg = engine.config();
        let fits = cf.file.size <= cfg.prefetch_window.min(cfg.cache_capacity / 2);
        let given = fits.then(|| engine.sweep_order(&cf.file, n)).flatten();
        let spread = given.is_some();
        let order = given.unwrap_or_else(|| (0..n).collect());
        let mut place = vec![0; order.len()];
        for (p, &i) in order.iter().enumerate() {
            place[i as usize] = p;
        }
        Sweep {
            order,
            place,
            spread,
        }
    }
}

async fn run(engine: Arc<Engine>, cf: Arc<CacheFile>, job: Arc<Job>, permits: Arc<Semaphore>) {
    let store = engine.store().clone();
    let n = cf.n_chunks();
    let sweep = Sweep::new(&engine, &cf);
    let len = sweep.order.len();
    let mut dispatched = vec![false; n as usize];
    // Places in the sweep's order: where it goes on, and below which
    // everything was dispatched.
    let (mut next, mut low) = (0usize, 0usize);
    // A reader's next chunks, fetched before the sweep goes on.
    let mut urgent = 0..0u64;
    // Chunks that found no room, to try again once readers have made some
    // (and whether a reader's miss asked for them).
    let retry: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut complete = false;
    {
        let (engine, cf, job) = (engine.clone(), cf.clone(), job.clone());
        tokio::spawn(async move {
            let open = || job.opens.load(SeqCst) > 0;
            job.follow.learn(&engine, &cf, open).await
        });
    }
    while job.opens.load(SeqCst) > 0 && !job.stale.load(SeqCst) {
        let again = std::mem::take(&mut *retry.lock());
        if !again.is_empty() {
            for &(i, _) in &again {
                dispatched[i as usize] = false;
            }
            // Readers' chunks keep their place ahead of the sweep.
            let (theirs, ours): (Vec<_>, Vec<_>) = again.into_iter().partition(|&(_, r)| r);
            job.follow.requeue(theirs.into_iter().map(|(i, _)| i));
            if let Some(first) = ours.into_iter().map(|(i, _)| sweep.place[i as usize]).min() {
                (next, low) = (first, low.min(first));
            }
            // Bounded, so that a file closed meanwhile is noticed.
            tokio::select! {
                _ = store.room_changed(Duration::from_secs(1)) => {}
                _ = job.wake.notified() => {}
            }
            continue;
        }
        let h = job.hint.swap(NO_HINT, SeqCst);
        if h < n {
            // In file order the sweep follows the reader. In the group's
            // order it keeps its place, which spreads the fleet's asks over
            // the owners, and the reader's chunk just goes first.
            if sweep.spread {
                urgent = h..(h + LOOKAHEAD).min(n);
            } else {
                next = sweep.place[h as usize];
            }
        }
        // Chunks of the tensor a reader missed in go first, then a reader's
        // next chunk, then the sweep.
        let readers = job.follow.next(|i| i >= n || dispatched[i as usize]);
        let candidate = readers
            .map(|i| (i, false))
            .or_else(|| {
                urgent
                    .find(|&i| !dispatched[i as usize])
                    .map(|i| (i, false))
            })
            .or_else(|| {
                (next..len)
                    .map(|p| sweep.order[p])
                    .find(|&i| !dispatched[i as usize])
                    .or_else(|| {
                        while low < len && dispatched[sweep.order[low] as usize] {
                            low += 1;
                        }
                        (low < len).then(|| sweep.order[low])
                    })
                    .map(|i| (i, true))
            });
        let Some((i, swept)) = candidate else {
            // A last fetch may have found no room after `retry` was taken
            // above: it pushes before it leaves `in_flight`.
            if in_flight.load(SeqCst) == 0 && retry.lock().is_empty() {
                complete = true;
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), job.wake.notified()).await;
            continue;
        };
        if store.contains(&cf, i) {
            if swept {
                next = sweep.place[i as usize] + 1;
            }
            dispatched[i as usize] = true;
            continue;
        }
        // Ahead of any reader: only with a permit no other job waits for,
        // and in half the window, so files being read come first.
        let ahead = job.readers() == 0;
        if ahead {
            // Fetches in flight are counted once more when they have
            // reserved their room: the share is kept, never exceeded.
            let (unread, window) = engine.store().window_use();
            let flying = in_flight.load(SeqCst) as u64 * cf.chunk_size;
            if unread + flying + cf.chunk_len(i) > window / 2 {
                tokio::select! {
                    _ = store.room_changed(Duration::from_secs(1)) => {}
                    _ = job.wake.notified() => {}
                }
                continue;
            }
        }
        let permit = if ahead {
            match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(50), job.wake.notified()).await;
                    continue;
                }
            }
        } else {
            let Ok(p) = permits.clone().acquire_owned().await else {
                break;
            };
            p
        };
        if swept {
            // While this waited for a permit, readers may have asked for
            // chunks, or chunks came back for want of room: they go first.
            if job.follow.pending() || !retry.lock().is_empty() {
                continue;
            }
            next = sweep.place[i as usize] + 1;
        }
        dispatched[i as usize] = true;
        in_flight.fetch_add(1, SeqCst);
        let (engine, cf, job) = (engine.clone(), cf.clone(), job.clone());
        let (retry, in_flight) = (retry.clone(), in_flight.clone());
        tokio::spawn(async move {
            match engine.fetch(&cf, i, Want::Prefetch).await {
                Ok(Got::Bytes(_)) => {
                    job.follow.fetched(i);
                    add(&engine.stats().chunks_prefetched, 1)
                }
                // Nothing was fetched: try again when there is room.
                Ok(Got::NoRoom) => retry.lock().push((i, job.follow.wanted(i))),
                // The file changed or went: readers learn it at their next
                // open; nothing more of this version is worth fetching.
                Err(crate::Error::VersionChanged { .. } | crate::Error::NotFound(_)) => {
                    job.stale.store(true, SeqCst)
                }
                // Readers that need this chunk will get the error themselves.
                Err(_) => {}
            }
            drop(permit);
            in_flight.fetch_sub(1, SeqCst);
            job.wake.notify_one();
        });
    }
    {
        let mut jobs = engine.prefetcher().jobs.lock();
        if jobs
            .running
            .get(&cf.key)
            .is_some_and(|j| Arc::ptr_eq(j, &job))
        {
            jobs.running.remove(&cf.key);
        }
    }
    if complete && job.readers() > 0 && store.first_missing(&cf, 0).is_none() {
        prefetch_next_shard(&engine, &cf.file, &job).await;
    }
}

/// Starts prefetching the shard after `file`, held by `job` (the file's,
/// which lives as long as the file is open).
async fn prefetch_next_shard(engine: &Arc<Engine>, file: &FileVersion, job: &Job) {
    let Some(path) = next_shard(&file.path) else {
        return;
    };
    // Fresh, as an open would see it: a listing up to --listing-ttl old
    // may name a version that was replaced since.
    let Ok(meta) = engine.namespace().revalidate(&path).await else {
        return;
    };
    if meta.is_dir || job.readers() == 0 {
        return;
    }
    let next = FileVersion {
        path,
        version: meta.version,
        size: meta.size,
    };
    let cf = engine.store().file(&next);
    let ticket = engine.prefetcher().start_ahead(engine, &cf);
    *job.next.lock() = Some(ticket);
}
