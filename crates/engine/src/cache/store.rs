//! The chunk registry: which chunks of which file versions are cached, their
//! LRU order, pins, room reserved before a fetch, and eviction.
//!
//! Bytes are read and written outside the lock; the lock guards the slot
//! states and every create or unlink in the cache dir, so a name is never
//! reused while an older file of that name is still being worked on.
//!
//! Room is reserved before any tier is asked, so a chunk that cannot be kept
//! is never fetched for the cache. A file the kernel may map (it was handed
//! to passthrough) is never punched: evicting it retires the whole file.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::dir::{reopen_read_only, CacheDir};
use super::disk::{self, Files};
use super::index::Header;
use super::lru::Lru;
use super::retired::Retired;
use super::writer::{ChunkWriter, Written};
use crate::size::ByteSize;
use crate::stats::{add, Stats};
use crate::{Error, FileVersion, Result};

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: std::path::PathBuf,
    pub capacity: u64,
    pub chunk_size: u64,
    /// Keys chunks, so that two sources never share a cache file.
    pub source_id: String,
    /// At most this many bytes prefetched and not read yet, across the cache.
    pub prefetch_window: u64,
}

/// One version of one source file, held open by whoever reads it. When the
/// last holder goes, its files on disk are closed; its chunks stay cached.
pub struct CacheFile {
    pub key: u128,
    pub file: FileVersion,
    pub chunk_size: u64,
    store: Weak<ChunkStore>,
}

impl CacheFile {
    pub fn n_chunks(&self) -> u64 {
        self.file.size.div_ceil(self.chunk_size)
    }

    /// The bytes of the source file that chunk `i` holds.
    pub fn chunk_range(&self, i: u64) -> Range<u64> {
        let start = i * self.chunk_size;
        start..(start + self.chunk_size).min(self.file.size)
    }

    pub fn chunk_len(&self, i: u64) -> u64 {
        let r = self.chunk_range(i);
        r.end - r.start
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            store.closed(self.key);
        }
    }
}

/// Who wants room: a reader may evict chunks nobody has read yet; prefetch
/// may not, and stays within the prefetch window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Read,
    Prefetch,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Absent,
    Writing,
    Evicting,
    Present,
}

#[derive(Clone, Copy)]
struct Slot {
    state: State,
    crc: u32,
    /// Checked against its crc since this process started.
    verified: bool,
    /// Read by someone since it was cached: prefetch may evict only these.
    read: bool,
    pins: u32,
    tick: Option<u64>,
}

const EMPTY: Slot = Slot {
    state: State::Absent,
    crc: 0,
    verified: false,
    read: false,
    pins: 0,
    tick: None,
};

struct Entry {
    file: FileVersion,
    /// Bumped when the data file is retired; work begun on an older
    /// generation never touches the new one's slots.
    gen: u64,
    slots: Vec<Slot>,
    present_bytes: u64,
    whole_pins: u32,
    /// Handed to the kernel as a passthrough backing file: some process may
    /// map it, so its bytes must never change.
    exposed: bool,
    on_disk: bool,
    files: Option<Arc<Files>>,
    handle: Weak<CacheFile>,
}

/// Generations are unique across entries, so work begun on an entry that was
/// forgotten never matches a new entry of the same key.
static NEXT_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_gen() -> u64 {
    NEXT_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Entry {
    fn new(file: FileVersion, chunk_size: u64) -> Entry {
        let n = file.size.div_ceil(chunk_size) as usize;
        Entry {
            file,
            gen: next_gen(),
            slots: vec![EMPTY; n],
            present_bytes: 0,
            whole_pins: 0,
            exposed: false,
            on_disk: false,
            files: None,
            handle: Weak::new(),
        }
    }

    fn chunk_len(&self, chunk_size: u64, i: u64) -> u64 {
        let start = i * chunk_size;
        (start + chunk_size).min(self.file.size) - start
    }

    fn unread_present(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.state == State::Present && !s.read)
    }
}

struct Inner {
    files: HashMap<u128, Entry>,
    lru: Lru,
    /// Present and reserved bytes.
    used: u64,
    cached: u64,
    /// Prefetched (or being prefetched) and not read yet.
    unread: u64,
    /// The capacity, lowered when the cache's filesystem runs out of space.
    capacity: u64,
    shrunk_at: Option<Instant>,
    /// Present bytes of files pinned whole (open through passthrough).
    pinned: u64,
    /// After a write failed for another cause than space, nothing is
    /// fetched for the cache until then, so a broken cache costs the origin
    /// only what readers read.
    blocked_until: Option<Instant>,
}

/// Room for one chunk, taken before it is fetched. Dropped without
/// [`ChunkStore::commit`], it gives the room back.
pub struct Reservation {
    store: Arc<ChunkStore>,
    key: u128,
    i: u64,
    gen: u64,
    len: u64,
    prefetch: bool,
    done: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.store.release(self);
        }
    }
}

/// Chunks evicted to make room, out of the accounting already: their
/// blocks are freed when this is dropped.
#[must_use = "dropping it frees the evicted chunks' blocks"]
pub struct Evicted {
    store: Arc<ChunkStore>,
    victims: Vec<Victim>,
}

impl Drop for Evicted {
    fn drop(&mut self) {
        self.store.punch(std::mem::take(&mut self.victims));
    }
}

pub enum Reserve {
    Room(Reservation),
    /// The chunk is present, being written or being evicted.
    Busy,
    NoRoom,
}

/// A chunk taken out of the accounting, its blocks still to be freed.
struct Victim {
    files: Option<Arc<Files>>,
    key: u128,
    gen: u64,
    i: u64,
    range: Range<u64>,
}

/// Chunks to evict, found before anything is changed.
#[derive(Default)]
struct Plan {
    chunks: Vec<(u128, u64)>,
    retire: Vec<u128>,
}

pub struct ChunkStore {
    cfg: CacheConfig,
    dir: CacheDir,
    inner: Mutex<Inner>,
    pub(super) stats: Arc<Stats>,
    retired: Retired,
    /// Woken when room may have appeared (a chunk read, evicted or released).
    room: Notify,
    /// Cache hits are answered from a mapping only on tmpfs: there a page
    /// cannot fail to read, while a disk's I/O error under a mapping would
    /// be EIO for the reader (or SIGBUS) instead of a fetch again.
    map_hits: bool,
}

fn key_of(source_id: &str, chunk_size: u64, f: &FileVersion) -> u128 {
    let s = format!(
        "{source_id}\0{}\0{}\0{}\0{chunk_size}",
        f.path, f.version, f.size
    );
    xxhash_rust::xxh3::xxh3_128(s.as_bytes())
}

fn out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

pub(crate) fn on_tmpfs(dir: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

const REGROW_AFTER: Duration = Duration::from_secs(10);

impl ChunkStore {
    /// Opens (or creates) the cache dir and takes back every chunk a previous
    /// run left there; each is checked against its crc before it is served.
    /// Refuses a capacity the cache dir's filesystem cannot give.
    pub fn open(cfg: CacheConfig, stats: Arc<Stats>) -> Result<Arc<Self>> {
        let dir = CacheDir::open(&cfg.dir)?;
        let map_hits = on_tmpfs(&cfg.dir);
        let store = Arc::new(ChunkStore {
            inner: Mutex::new(Inner {
                files: HashMap::new(),
                lru: Lru::default(),
                used: 0,
                cached: 0,
                unread: 0,
                capacity: cfg.capacity,
                shrunk_at: None,
                pinned: 0,
                blocked_until: None,
            }),
            cfg,
            dir,
            stats,
            retired: Retired::default(),
            room: Notify::new(),
            map_hits,
        });
        store.restore();
        let held = store.inner.lock().used;
        let free = store
            .dir
            .available()
            .map_err(|e| Error::io("cache dir", e))?;
        if store.cfg.capacity > held + free {
            return Err(Error::Config(format!(
                "--cache-size {} does not fit in cache dir {}: its filesystem has {} free{}; pass --cache-size {} or less, or a --cache-dir on a larger filesystem",
                ByteSize(store.cfg.capacity),
                store.cfg.dir.display(),
                ByteSize(free),
                if held > 0 { format!(" besides the {} this cache holds", ByteSize(held)) } else { String::new() },
                ByteSize((held + free) / (1 << 20) * (1 << 20)),
            )));
        }
        Ok(store)
    }

    /// Takes back the chunks of an earlier run. A complete file may still be
    /// mapped by a process that outlived that run, so it is treated as
    /// exposed; an incomplete one never was (exposed files are never
    /// punched).
    fn restore(&self) {
        let names = self.dir.names().unwrap_or_default();
        let mut inner = self.inner.lock();
        let mut restored = 0u64;
        for name in &names {
            let Some(hex) = name.strip_suffix(".idx") else {
                continue;
            };
            let Ok(key) = u128::from_str_radix(hex, 16) else {
                continue;
            };
            let opened = disk::Files::open(&self.dir, key).filter(|(_, h, _)| {
                h.chunk_size == self.cfg.chunk_size
                    && key_of(&self.cfg.source_id, h.chunk_size, &h.file) == key
            });
            let Some((files, header, present)) = opened.filter(|(_, _, p)| !p.is_empty()) else {
                disk::remove(&self.dir, key);
                continue;
            };
            let mut e = Entry::new(header.file, self.cfg.chunk_size);
            e.on_disk = true;
            for (i, crc) in present {
                let tick = inner.lru.touch((key, i), None);
                e.slots[i as usize] = Slot {
                    state: State::Present,
                    crc,
                    verified: false,
                    read: true,
                    pins: 0,
                    tick: Some(tick),
                };
                let len = e.chunk_len(self.cfg.chunk_size, i);
                e.present_bytes += len;
                inner.used += len;
                inner.cached += 1;
                restored += 1;
            }
            e.exposed = e.slots.iter().all(|s| s.state == State::Present);
            if !e.exposed {
                // A chunk being written when the last run died has bytes
                // but no index entry: nobody counts them, so they go.
                self.punch_absent(&files, &e);
            }
            inner.files.insert(key, e);
        }
        // Files of other chunk sizes or sources, and strays.
        for name in names {
            if let Some(hex) = name.strip_suffix(".data") {
                if u128::from_str_radix(hex, 16).is_ok_and(|k| !inner.files.contains_key(&k)) {
                    self.dir.remove(&name);
                }
            }
        }
        if restored > 0 {
            info!(
                chunks = restored,
                bytes = inner.used,
                "reusing chunks from an earlier run"
            );
        }
        let victims = match self.plan(&inner, 0, Mode::Read, None) {
            Some(plan) => self.apply(&mut inner, plan),
            None => vec![],
        };
        drop(inner);
        self.punch(victims);
    }

    /// Frees the blocks of every chunk of `e` that is not present, in runs.
    fn punch_absent(&self, files: &Files, e: &Entry) {
        let cs = self.cfg.chunk_size;
        let mut run: Option<Range<u64>> = None;
        for (i, s) in e.slots.iter().enumerate() {
            let i = i as u64;
            if s.state == State::Present {
                if let Some(r) = run.take() {
                    let _ = files.punch(r);
                }
                continue;
            }
            let end = (i * cs + cs).min(e.file.size);
            run = Some(run.map_or(i * cs..end, |r| r.start..end));
        }
        if let Some(r) = run {
            let _ = files.punch(r);
        }
    }

    fn key(&self, f: &FileVersion) -> u128 {
        key_of(&self.cfg.source_id, self.cfg.chunk_size, f)
    }

    /// The cache file for one version of a source file. Nothing is written
    /// to disk until a chunk is stored, so opening never fails for want of
    /// space.
    pub fn file(self: &Arc<Self>, f: &FileVersion) -> Arc<CacheFile> {
        let key = self.key(f);
        let mut inner = self.inner.lock();
        let e = inner
            .files
            .entry(key)
            .or_insert_with(|| Entry::new(f.clone(), self.cfg.chunk_size));
        if let Some(cf) = e.handle.upgrade() {
            return cf;
        }
        let cf = Arc::new(CacheFile {
            key,
            file: f.clone(),
            chunk_size: self.cfg.chunk_size,
            store: Arc::downgrade(self),
        });
        e.handle = Arc::downgrade(&cf);
        cf
    }

    /// The cache file of a version this node holds chunks of, if any.
    pub fn lookup(self: &Arc<Self>, f: &FileVersion) -> Option<Arc<CacheFile>> {
        if !self.inner.lock().files.contains_key(&self.key(f)) {
            return None;
        }
        Some(self.file(f))
    }

    /// The last holder of `key` went: close its files.
    fn closed(&self, key: u128) {
        let mut inner = self.inner.lock();
        let Some(e) = inner.files.get_mut(&key) else {
            return;
        };
        if e.handle.strong_count() > 0 {
            return;
        }
        // Dropped after the lock: the fds close when the last reader is done.
        let files = e.files.take();
        self.forget_if_empty(&mut inner, key);
        drop(inner);
        drop(files);
    }

    /// Drops an entry nobody holds and nothing is cached of, with its files.
    fn forget_if_empty(&self, inner: &mut Inner, key: u128) {
        let Some(e) = inner.files.get(&key) else {
            return;
        };
        let idle = e.present_bytes == 0
            && e.whole_pins == 0
            && e.handle.strong_count() == 0
            && e.slots.iter().all(|s| s.state == State::Absent);
        if idle {
            if e.on_disk {
                disk::remove(&self.dir, key);
            }
            inner.files.remove(&key);
        }
    }

    /// The files of `e`: the open ones, or opened again for the caller only
    /// (eviction must not leave a file open that nobody holds).
    fn reopen(&self, key: u128, e: &Entry) -> Option<Arc<Files>> {
        if e.files.is_some() || !e.on_disk {
            return e.files.clone();
        }
        let header = Header {
            chunk_size: self.cfg.chunk_size,
            file: e.file.clone(),
        };
        Files::reopen(&self.dir, key, &header).map(Arc::new)
    }

    /// The files of `key`, kept open for its holder. Files that vanished
    /// (removed behind our back) take their chunks out of the cache.
    fn files(&self, inner: &mut Inner, key: u128) -> Option<Arc<Files>> {
        let e = inner.files.get_mut(&key)?;
        if !e.on_disk {
            return None;
        }
        if let Some(f) = self.reopen(key, e) {
            e.files = Some(f.clone());
            return Some(f);
        }
        warn!(path = %e.file.path, "cache files vanished; fetching again");
        let victims = self.apply(
            inner,
            Plan {
                retire: vec![key],
                ..Plan::default()
            },
        );
        debug_assert!(victims.is_empty());
        None
    }

    fn with_slot<T>(&self, cf: &CacheFile, i: u64, f: impl FnOnce(&Slot) -> T) -> Option<T> {
        let inner = self.inner.lock();
        inner
            .files
            .get(&cf.key)
            .and_then(|e| e.slots.get(i as usize))
            .map(f)
    }

    pub fn contains(&self, cf: &CacheFile, i: u64) -> bool {
        self.with_slot(cf, i, |s| s.state == State::Present)
            .unwrap_or(false)
    }

    /// The first chunk at or after `from` that is not cached.
    pub fn first_missing(&self, cf: &CacheFile, from: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let e = inner.files.get(&cf.key)?;
        (from..cf.n_chunks()).find(|&i| e.slots[i as usize].state != State::Present)
    }

    /// Counts chunk `i` as read: prefetch may now evict it, and the window
    /// has room again.
    pub fn mark_read(&self, cf: &CacheFile, i: u64) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(s) = inner
            .files
            .get_mut(&cf.key)
            .and_then(|e| e.slots.get_mut(i as usize))
        else {
            return;
        };
        if s.read || s.state != State::Present {
            return;
        }
        s.read = true;
        inner.unread -= cf.chunk_len(i);
        drop(g);
        self.room.notify_waiters();
    }

    /// Counts every present chunk of `cf` as read: prefetched for a reader
    /// that never came, they stay cached but leave the prefetch window.
    pub fn forget_unread(&self, cf: &CacheFile) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(e) = inner.files.get_mut(&cf.key) else {
            return;
        };
        let mut freed = 0;
        for (i, s) in e.slots.iter_mut().enumerate() {
            if s.state == State::Present && !s.read {
                s.read = true;
                freed += cf.chunk_len(i as u64);
            }
        }
        inner.unread -= freed;
        drop(g);
        if freed > 0 {
            self.room.notify_waiters();
        }
    }

    /// Bytes prefetched and not read yet, and the most there may be.
    pub fn window_use(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        (inner.unread, self.window(&inner))
    }

    /// Bytes `range` (relative to the chunk) of chunk `i`, if cached. A chunk
    /// restored from an earlier run is checked against its crc on first use.
    pub fn read(&self, cf: &CacheFile, i: u64, range: Range<u64>) -> Option<Bytes> {
        self.read_with(cf, i, range, None)
    }

    /// As [`Self::read`], but the bytes are a mapping of the cache file that
    /// keeps the chunk pinned until they are dropped: for a reply that is
    /// sent at once. A holder that may keep them long (a peer's upload)
    /// uses [`Self::read`], so a slow asker never holds back eviction.
    pub fn read_mapped(
        self: &Arc<Self>,
        cf: &CacheFile,
        i: u64,
        range: Range<u64>,
    ) -> Option<Bytes> {
        self.read_with(cf, i, range, Some(self))
    }

    fn read_with(
        &self,
        cf: &CacheFile,
        i: u64,
        range: Range<u64>,
        map_for: Option<&Arc<Self>>,
    ) -> Option<Bytes> {
        let (files, verified, crc, gen, was_unread) = {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            let len = cf.chunk_len(i);
            let present = inner
                .files
                .get(&cf.key)
                .and_then(|e| e.slots.get(i as usize))
                .is_some_and(|s| s.state == State::Present);
            if !present {
                return None;
            }
            let files = self.files(inner, cf.key)?;
            let e = inner.files.get_mut(&cf.key)?;
            let gen = e.gen;
            let s = &mut e.slots[i as usize];
            s.pins += 1;
            let was_unread = !s.read;
            s.read = true;
            let (old, verified, crc) = (s.tick, s.verified, s.crc);
            if was_unread {
                inner.unread -= len;
            }
            let tick = inner.lru.touch((cf.key, i), old);
            inner.files.get_mut(&cf.key)?.slots[i as usize].tick = Some(tick);
            (files, verified, crc, gen, was_unread)
        };
        if was_unread {
            self.room.notify_waiters();
        }
        let base = cf.chunk_range(i).start;
        // `Err(true)`: the bytes are wrong; `Err(false)`: they could not be read.
        debug_assert!(range.end <= cf.chunk_len(i));
        // A failed mapping (map count, memory) reads the chunk instead.
        let map = map_for
            .filter(|_| verified && self.map_hits)
            .and_then(|store| {
                Some((
                    store,
                    files
                        .map(base + range.start, range.end - range.start, true)
                        .ok()?,
                ))
            });
        let out = if let Some((store, map)) = map {
            drop(files);
            return Some(Bytes::from_owner(Mapped {
                map,
                _pin: ChunkPin {
                    store: Arc::clone(store),
                    key: cf.key,
                    gen,
                    i,
                },
            }));
        } else if verified {
            files
                .read(base + range.start, range.end - range.start)
                .map_err(|_| false)
        } else {
            match files.read(base, cf.chunk_len(i)) {
                Ok(whole) if crc32c::crc32c(&whole) == crc => {
                    Ok(whole.slice(range.start as usize..range.end as usize))
                }
                Ok(_) => Err(true),
                Err(_) => Err(false),
            }
        };
        drop(files);
        let mut inner = self.inner.lock();
        let Some(e) = inner.files.get_mut(&cf.key).filter(|e| e.gen == gen) else {
            return out.ok();
        };
        let s = &mut e.slots[i as usize];
        s.pins -= 1;
        match out {
            Ok(b) => {
                s.verified = true;
                return Some(b);
            }
            Err(false) => {
                warn!(path = %cf.file.path, chunk = i, "cannot read a cached chunk; fetching it again");
                return None;
            }
            Err(true) => {
                add(&self.stats.crc_failures, 1);
                warn!(path = %cf.file.path, chunk = i, "cached chunk failed its check; fetching it again");
            }
        }
        // A chunk that failed its check is wrong for any mapper already, so
        // even in an exposed file it is punched and fetched again in place.
        let plan = Plan {
            chunks: if s.pins == 0 {
                vec![(cf.key, i)]
            } else {
                vec![]
            },
            ..Plan::default()
        };
        let victims = self.apply(&mut inner, plan);
        drop(inner);
        self.punch(victims);
        None
    }

    /// The whole of chunk `i`, if cached (and, after a restart, verified).
    pub fn read_chunk(&self, cf: &CacheFile, i: u64) -> Option<Bytes> {
        self.read(cf, i, 0..cf.chunk_len(i))
    }

    /// Prefetch's share: half of what is not pinned, so a reader's miss
    /// finds chunks already read to evict before any prefetched one.
    fn window(&self, inner: &Inner) -> u64 {
        self.cfg
            .prefetch_window
            .min(inner.capacity.saturating_sub(inner.pinned) / 2)
    }

    /// After the filesystem ran out of space, tries the configured capacity
    /// again once in a while: others may have freed space since.
    fn maybe_regrow(&self, inner: &mut Inner) {
        let Some(at) = inner.shrunk_at else { return };
        if at.elapsed() < REGROW_AFTER {
            return;
        }
        let free = self.dir.available().unwrap_or(0);
        let cap = self
            .cfg
            .capacity
            .min(inner.used + free.saturating_sub(self.cfg.chunk_size));
        if cap > inner.capacity {
            info!(capacity = %ByteSize(cap), "cache filesystem has room again");
            inner.capacity = cap;
        }
        inner.shrunk_at = (inner.capacity < self.cfg.capacity).then(Instant::now);
    }

    /// Room for chunk `i`, before anyone fetches it.
    pub fn reserve(self: &Arc<Self>, cf: &CacheFile, i: u64, mode: Mode) -> Reserve {
        self.reserve_unfreed(cf, i, mode).0
    }

    /// As [`Self::reserve`], but the blocks of the chunks evicted for the
    /// room are freed only when the [`Evicted`] is dropped: for a caller
    /// that reserves under a lock of its own, where freeing them (I/O)
    /// would hold up everyone waiting for that lock.
    pub fn reserve_unfreed(
        self: &Arc<Self>,
        cf: &CacheFile,
        i: u64,
        mode: Mode,
    ) -> (Reserve, Evicted) {
        let mut evicted = Evicted {
            store: self.clone(),
            victims: vec![],
        };
        let len = cf.chunk_len(i);
        let mut inner = self.inner.lock();
        self.maybe_regrow(&mut inner);
        if inner.blocked_until.is_some_and(|t| Instant::now() < t) {
            return (Reserve::NoRoom, evicted);
        }
        let (gen, absent) = match inner.files.get(&cf.key) {
            Some(e) => (
                e.gen,
                e.slots
                    .get(i as usize)
                    .is_some_and(|s| s.state == State::Absent),
            ),
            None => return (Reserve::Busy, evicted),
        };
        if !absent {
            return (Reserve::Busy, evicted);
        }
        let prefetch = mode == Mode::Prefetch;
        if prefetch && inner.unread + len > self.window(&inner) {
            return (Reserve::NoRoom, evicted);
        }
        let Some(plan) = self.plan(&inner, len, mode, Some(cf.key)) else {
            return (Reserve::NoRoom, evicted);
        };
        evicted.victims = self.apply(&mut inner, plan);
        inner.used += len;
        if prefetch {
            inner.unread += len;
        }
        if let Some(e) = inner.files.get_mut(&cf.key) {
            e.slots[i as usize].state = State::Writing;
        }
        let room = Reservation {
            store: self.clone(),
            key: cf.key,
            i,
            gen,
            len,
            prefetch,
            done: false,
        };
        (Reserve::Room(room), evicted)
    }

    /// Stores the bytes of a reserved chunk. `false` if they could not be
    /// kept (the caller still has them to serve).
    pub fn commit(&self, mut r: Reservation, bytes: &[u8]) -> bool {
        if bytes.len() as u64 != r.len {
            warn!(
                chunk = r.i,
                "{} bytes where {} were expected; not cached",
                bytes.len(),
                r.len
            );
            return false;
        }
        let crc = crc32c::crc32c(bytes);
        let Some((files, range)) = self.files_for_write(&r) else {
            return false;
        };
        let written = files.write_chunk(r.i, range, bytes, crc);
        let mut inner = self.inner.lock();
        if let Err(err) = written {
            self.write_failed_for(&mut inner, &r, &err);
            return false;
        }
        self.committed(&mut inner, &mut r, crc, false)
    }

    /// Whether a fetched chunk may be written into the cache as it arrives
    /// ([`Self::writer`]): where hits are answered from a mapping (tmpfs).
    /// Elsewhere the bytes are joined in memory and given to
    /// [`Self::commit`], so the waiters are not served by reading the file
    /// back.
    pub fn takes_streams(&self) -> bool {
        self.map_hits
    }

    /// A writer that puts reserved chunk `r`'s bytes in its cache file as
    /// they arrive, for [`Self::commit_written`]; it holds the room until
    /// then. `None` if the chunk's files could not be made (counted as a
    /// failed write; the room is given back).
    pub fn writer(&self, r: Reservation) -> Option<ChunkWriter> {
        let (files, range) = self.files_for_write(&r)?;
        Some(ChunkWriter::new(r, files, range))
    }

    /// Keeps what `w` wrote and gives it to the waiters: a mapping of the
    /// cache file that pins the chunk until the last of them is done, or,
    /// when the chunk could not be kept, its bytes in memory.
    pub fn commit_written(self: &Arc<Self>, w: ChunkWriter) -> io::Result<Bytes> {
        if !w.complete() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the chunk was not written whole",
            ));
        }
        let (mut r, written) = w.finish();
        let (files, range, crc) = match written {
            Written::InFile { files, range, crc } => (files, range, crc),
            Written::InMemory(bytes, err) => {
                self.write_failed_for(&mut self.inner.lock(), &r, &err);
                return Ok(bytes);
            }
            Written::Lost(err) => {
                self.write_failed_for(&mut self.inner.lock(), &r, &err);
                return Err(err);
            }
        };
        add(&self.stats.chunks_streamed, 1);
        let len = range.end - range.start;
        let kept = match files.index_chunk(r.i, crc) {
            Ok(()) => self.committed(&mut self.inner.lock(), &mut r, crc, true),
            Err(err) => {
                self.write_failed_for(&mut self.inner.lock(), &r, &err);
                false
            }
        };
        if !kept {
            // Not in the index, or its file retired while it was written (a
            // new version, a liar caught): nobody else knows these bytes are
            // there, so they are copied out for the waiters and freed.
            let bytes = files.read(range.start, len);
            let _ = files.unwrite(r.i, range);
            return bytes;
        }
        // `committed` took this pin for the waiters.
        let pin = ChunkPin {
            store: self.clone(),
            key: r.key,
            gen: r.gen,
            i: r.i,
        };
        match files.map(range.start, len, false) {
            Ok(map) => Ok(Bytes::from_owner(Mapped { map, _pin: pin })),
            Err(_) => files.read(range.start, len),
        }
    }

    /// The files reserved chunk `r` goes into, created on its file's first
    /// chunk, and the chunk's range in them.
    fn files_for_write(&self, r: &Reservation) -> Option<(Arc<Files>, Range<u64>)> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let e = inner.files.get_mut(&r.key).filter(|e| e.gen == r.gen)?;
        let range = {
            let start = r.i * self.cfg.chunk_size;
            start..start + r.len
        };
        if !e.on_disk {
            let header = Header {
                chunk_size: self.cfg.chunk_size,
                file: e.file.clone(),
            };
            match Files::create(&self.dir, r.key, &header) {
                Ok(f) => {
                    e.files = Some(Arc::new(f));
                    e.on_disk = true;
                }
                Err(err) => {
                    let path = e.file.path.clone();
                    self.write_failed(inner, &path, &err, r.len);
                    return None;
                }
            }
        }
        Some((self.files(inner, r.key)?, range))
    }

    fn write_failed_for(&self, inner: &mut Inner, r: &Reservation, err: &io::Error) {
        let path = inner
            .files
            .get(&r.key)
            .map(|e| e.file.path.clone())
            .unwrap_or_default();
        self.write_failed(inner, &path, err, r.len);
    }

    /// Marks reserved chunk `r`, now written and indexed, present, with one
    /// pin if `pin` (for a [`ChunkPin`] the caller makes); `false` if its
    /// file was retired meanwhile.
    fn committed(&self, inner: &mut Inner, r: &mut Reservation, crc: u32, pin: bool) -> bool {
        let live = inner
            .files
            .get(&r.key)
            .is_some_and(|e| e.gen == r.gen && (r.i as usize) < e.slots.len());
        if !live {
            return false;
        }
        let tick = inner.lru.touch((r.key, r.i), None);
        let Some(e) = inner.files.get_mut(&r.key) else {
            return false;
        };
        e.present_bytes += r.len;
        e.slots[r.i as usize] = Slot {
            state: State::Present,
            crc,
            verified: true,
            read: !r.prefetch,
            pins: u32::from(pin),
            tick: Some(tick),
        };
        // Pinned whole yet missing chunks: its file was retired under a pin.
        if e.whole_pins > 0 {
            inner.pinned += r.len;
        }
        inner.cached += 1;
        r.done = true;
        add(&self.stats.chunks_inserted, 1);
        true
    }

    /// A write to the cache failed: the chunk is served uncached, and when
    /// the filesystem is full the cache shrinks to what it could hold.
    fn write_failed(&self, inner: &mut Inner, path: &str, err: &io::Error, len: u64) {
        add(&self.stats.cache_write_errors, 1);
        if out_of_space(err) {
            let cap = inner.used.saturating_sub(len);
            if cap < inner.capacity {
                warn!(
                    capacity = %ByteSize(cap),
                    "cache dir {} is full ({err}); using less of it and serving {path} uncached",
                    self.cfg.dir.display()
                );
                inner.capacity = cap;
            }
            inner.shrunk_at = Some(Instant::now());
        } else {
            warn!(
                "cannot write {path} to the cache ({err}); serving uncached for {REGROW_AFTER:?}"
            );
            inner.blocked_until = Some(Instant::now() + REGROW_AFTER);
        }
    }

    fn release(&self, r: &Reservation) {
        let mut inner = self.inner.lock();
        inner.used -= r.len;
        if r.prefetch {
            inner.unread -= r.len;
        }
        if let Some(e) = inner.files.get_mut(&r.key).filter(|e| e.gen == r.gen) {
            if let Some(s) = e.slots.get_mut(r.i as usize) {
                if s.state == State::Writing {
                    *s = EMPTY;
                }
            }
        }
        self.forget_if_empty(&mut inner, r.key);
        drop(inner);
        self.room.notify_waiters();
    }

    /// Chooses chunks whose eviction makes `need` more bytes fit, or `None`
    /// if that is impossible. Readers' chunks go first; prefetch never
    /// evicts a chunk nobody has read. An exposed file goes whole.
    fn plan(&self, inner: &Inner, need: u64, mode: Mode, keep: Option<u128>) -> Option<Plan> {
        let cap = inner.capacity;
        let fits = |freed: u64| inner.used.saturating_sub(freed) + need <= cap;
        let mut plan = Plan::default();
        let mut freed = 0;
        if fits(0) {
            return Some(plan);
        }
        let mut taken: HashSet<(u128, u64)> = HashSet::new();
        let passes: &[bool] = match mode {
            Mode::Read => &[true, false],
            Mode::Prefetch => &[true],
        };
        'passes: for &read_only in passes {
            for (_, (key, i)) in inner.lru.oldest() {
                if fits(freed) {
                    break 'passes;
                }
                let e = &inner.files[&key];
                let s = &e.slots[i as usize];
                if e.whole_pins > 0 || (read_only && !s.read) || taken.contains(&(key, i)) {
                    continue;
                }
                if e.exposed {
                    if Some(key) == keep
                        || plan.retire.contains(&key)
                        || (mode == Mode::Prefetch && e.unread_present())
                    {
                        continue;
                    }
                    plan.retire.push(key);
                    freed += e.present_bytes;
                } else if s.pins == 0 {
                    taken.insert((key, i));
                    plan.chunks.push((key, i));
                    freed += e.chunk_len(self.cfg.chunk_size, i);
                }
            }
        }
        fits(freed).then_some(plan)
    }

    /// Takes the planned chunks out of the accounting and retires exposed
    /// files (under the lock, so their names are free before anyone reuses
    /// them). The chunks' blocks are freed by [`Self::punch`].
    fn apply(&self, inner: &mut Inner, plan: Plan) -> Vec<Victim> {
        let cs = self.cfg.chunk_size;
        let mut evicted = 0;
        for key in plan.retire {
            let Some(e) = inner.files.get_mut(&key) else {
                continue;
            };
            let mut ticks = vec![];
            let (mut unread, mut chunks) = (0, 0);
            for (i, s) in e.slots.iter().enumerate() {
                if s.state == State::Present {
                    ticks.extend(s.tick);
                    chunks += 1;
                    if !s.read {
                        unread += e.chunk_len(cs, i as u64);
                    }
                }
            }
            let bytes = e.present_bytes;
            if e.whole_pins > 0 {
                // Only when its files vanished or held a liar's chunk: a
                // pinned file is never evicted.
                inner.pinned -= bytes;
            }
            let files = self.reopen(key, e);
            e.gen = next_gen();
            e.slots = vec![EMPTY; e.slots.len()];
            e.present_bytes = 0;
            e.exposed = false;
            e.on_disk = false;
            e.files = None;
            if let Some(f) = &files {
                self.retired.add(f, bytes);
            }
            disk::remove(&self.dir, key);
            debug!(path = %e.file.path, "retired a cache file that may be mapped");
            for t in ticks {
                inner.lru.remove(t);
            }
            inner.used -= bytes;
            inner.unread -= unread;
            inner.cached -= chunks;
            evicted += chunks;
            self.forget_if_empty(inner, key);
        }
        let mut victims = vec![];
        for (key, i) in plan.chunks {
            let Some(e) = inner.files.get_mut(&key) else {
                continue;
            };
            let len = e.chunk_len(cs, i);
            let files = self.reopen(key, e);
            let s = &mut e.slots[i as usize];
            if s.state != State::Present || s.pins > 0 {
                continue;
            }
            s.state = State::Evicting;
            let (tick, unread) = (s.tick.take(), !s.read);
            e.present_bytes -= len;
            let gen = e.gen;
            if let Some(t) = tick {
                inner.lru.remove(t);
            }
            inner.used -= len;
            inner.cached -= 1;
            if unread {
                inner.unread -= len;
            }
            evicted += 1;
            let start = i * cs;
            victims.push(Victim {
                files,
                key,
                gen,
                i,
                range: start..start + len,
            });
        }
        add(&self.stats.chunks_evicted, evicted);
        victims
    }

    /// Frees the blocks of chunks already taken out of the accounting.
    fn punch(&self, victims: Vec<Victim>) {
        if victims.is_empty() {
            return;
        }
        for v in &victims {
            if let Some(f) = &v.files {
                if let Err(e) = f.evict(v.i, v.range.clone()) {
                    warn!("cannot free cache space in {}: {e}", self.cfg.dir.display());
                }
            }
        }
        let mut inner = self.inner.lock();
        for v in victims {
            if let Some(e) = inner.files.get_mut(&v.key).filter(|e| e.gen == v.gen) {
                e.slots[v.i as usize] = EMPTY;
            }
            self.forget_if_empty(&mut inner, v.key);
        }
        drop(inner);
        self.room.notify_waiters();
    }

    /// Drops chunk `i` of cache file `key`, if cached: it came from a server
    /// caught lying since. A chunk nobody holds in a file the kernel cannot
    /// map is punched; otherwise the whole file is retired, as eviction
    /// does: holders keep what they have, and the next reads fetch again.
    /// `false` if it was not cached.
    pub(crate) fn discard(&self, key: u128, i: u64) -> bool {
        let mut inner = self.inner.lock();
        let Some(e) = inner.files.get(&key) else {
            return false;
        };
        let Some(s) = e
            .slots
            .get(i as usize)
            .filter(|s| s.state == State::Present)
        else {
            return false;
        };
        let plan = if e.exposed || e.whole_pins > 0 || s.pins > 0 {
            Plan {
                retire: vec![key],
                ..Plan::default()
            }
        } else {
            Plan {
                chunks: vec![(key, i)],
                ..Plan::default()
            }
        };
        let victims = self.apply(&mut inner, plan);
        drop(inner);
        self.punch(victims);
        true
    }

    /// Waits until room may have appeared, or `timeout`.
    pub async fn room_changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.room.notified()).await;
    }

    /// If every chunk of `cf` is cached and verified, pins them all and
    /// returns the data file, for the kernel to read directly. From then on
    /// the file is never punched: a mapping of it may outlive every handle.
    pub fn pin_whole(self: &Arc<Self>, cf: &Arc<CacheFile>) -> Option<WholeFilePin> {
        let unverified: Vec<u64> = {
            let inner = self.inner.lock();
            let e = inner.files.get(&cf.key)?;
            if e.slots.iter().any(|s| s.state != State::Present) {
                return None;
            }
            (0..cf.n_chunks())
                .filter(|&i| !e.slots[i as usize].verified)
                .collect()
        };
        for i in unverified {
            self.read_chunk(cf, i)?;
        }
        let gen;
        let files = {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            let complete = inner.files.get(&cf.key).is_some_and(|e| {
                e.slots
                    .iter()
                    .all(|s| s.state == State::Present && s.verified)
            });
            if !complete {
                return None;
            }
            let files = self.files(inner, cf.key)?;
            let e = inner.files.get_mut(&cf.key)?;
            gen = e.gen;
            if e.whole_pins == 0 {
                inner.pinned += e.present_bytes;
            }
            e.whole_pins += 1;
            e.exposed = true;
            let mut unread = 0;
            let cs = self.cfg.chunk_size;
            for i in 0..e.slots.len() {
                if !e.slots[i].read {
                    e.slots[i].read = true;
                    unread += e.chunk_len(cs, i as u64);
                }
            }
            inner.unread -= unread;
            files
        };
        match reopen_read_only(&files.data) {
            Ok(file) => Some(WholeFilePin {
                store: self.clone(),
                cf: cf.clone(),
                gen,
                file,
            }),
            Err(e) => {
                warn!("cannot hand {} to passthrough: {e}", cf.file.path);
                self.unpin_whole(cf);
                None
            }
        }
    }

    fn unpin_whole(&self, cf: &CacheFile) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(e) = inner.files.get_mut(&cf.key) {
            e.whole_pins -= 1;
            if e.whole_pins == 0 {
                inner.pinned -= e.present_bytes;
            }
        }
        drop(g);
        self.room.notify_waiters();
    }

    /// Bytes of `f` in the cache, without touching its files.
    pub fn cached_bytes(&self, f: &FileVersion) -> u64 {
        let key = self.key(f);
        let inner = self.inner.lock();
        inner.files.get(&key).map_or(0, |e| e.present_bytes)
    }

    /// (bytes used, chunks cached)
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        (inner.used, inner.cached)
    }

    /// (capacity in force, bytes prefetched and not read yet)
    pub fn pressure(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        (inner.capacity, inner.unread)
    }

    /// Bytes of evicted files that a process may still map.
    pub fn retired_bytes(&self) -> u64 {
        self.retired.bytes()
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }
}

/// A cached chunk's bytes mapped from the cache file, pinned while mapped.
struct Mapped {
    map: memmap2::Mmap,
    _pin: ChunkPin,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// One pin on chunk `i`; a chunk is never punched while pinned.
struct ChunkPin {
    store: Arc<ChunkStore>,
    key: u128,
    gen: u64,
    i: u64,
}

impl Drop for ChunkPin {
    fn drop(&mut self) {
        let mut inner = self.store.inner.lock();
        if let Some(e) = inner.files.get_mut(&self.key).filter(|e| e.gen == self.gen) {
            let s = &mut e.slots[self.i as usize];
            s.pins -= 1;
        }
        drop(inner);
        // A chunk that was pinned may have been all that stood in the way
        // of room.
        self.store.room.notify_waiters();
    }
}

/// Every chunk of one cache file, held in place while the kernel reads the
/// file directly; released on drop.
pub struct WholeFilePin {
    store: Arc<ChunkStore>,
    cf: Arc<CacheFile>,
    gen: u64,
    /// The data file, opened read-only, for the kernel to read.
    pub file: std::fs::File,
}

impl WholeFilePin {
    /// Whether the pinned file is still the cache's: a file retired since
    /// (chunks dropped from it, maybe a liar's, right after it was pinned)
    /// must not be handed to the kernel.
    pub fn current(&self) -> bool {
        let inner = self.store.inner.lock();
        inner
            .files
            .get(&self.cf.key)
            .is_some_and(|e| e.gen == self.gen)
    }
}

impl Drop for WholeFilePin {
    fn drop(&mut self) {
        self.store.unpin_whole(&self.cf);
    }
}
