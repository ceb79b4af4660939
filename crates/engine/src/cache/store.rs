//! The chunk store: sparse data files, their indexes, capacity and LRU
//! eviction at chunk granularity.
//!
//! Bytes are only read or written outside the lock; the lock guards the slot
//! states. A chunk that a reader is copying out is pinned and never evicted,
//! and a file served by kernel passthrough pins all its chunks.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::index::{Header, Index, Present};
use super::lru::Lru;
use crate::stats::{add, Stats};
use crate::{Error, FileVersion, Result};

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub capacity: u64,
    pub chunk_size: u64,
    /// Keys chunks, so that two sources never share a cache file.
    pub source_id: String,
}

/// One version of one source file in the cache.
pub struct CacheFile {
    pub key: u128,
    pub file: FileVersion,
    pub chunk_size: u64,
    data: File,
    data_path: PathBuf,
    index: Index,
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
    cf: Arc<CacheFile>,
    slots: Vec<Slot>,
    whole_pins: u32,
}

#[derive(Default)]
struct Inner {
    files: HashMap<u128, Entry>,
    lru: Lru,
    used: u64,
    cached: u64,
}

/// What became of an insertion.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    Stored,
    /// Already there, or being written or evicted by someone else.
    Skipped,
    /// No room without evicting pinned (or, for prefetch, unread) chunks.
    NoRoom,
}

pub struct ChunkStore {
    cfg: CacheConfig,
    inner: Mutex<Inner>,
    stats: Arc<Stats>,
    _lock: File,
}

fn key_of(source_id: &str, chunk_size: u64, f: &FileVersion) -> u128 {
    let s = format!(
        "{source_id}\0{}\0{}\0{}\0{chunk_size}",
        f.path, f.version, f.size
    );
    xxhash_rust::xxh3::xxh3_128(s.as_bytes())
}

fn punch_hole(f: &File, range: Range<u64>) {
    // SAFETY: fallocate on an fd we own, with in-range offsets; it only
    // deallocates blocks, the file's size stays.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            range.start as i64,
            (range.end - range.start) as i64,
        )
    };
    if rc != 0 {
        warn!(
            "cannot free cache space (fallocate punch hole): {}",
            std::io::Error::last_os_error()
        );
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let not_writable = |e: std::io::Error| {
        Error::Config(format!(
            "cache dir {} is not writable ({e}); pass --cache-dir a writable directory",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    let path = dir.join(".lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(not_writable)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::Config(format!(
            "cache dir {} is in use by another modelfs process (pid {}); give this mount its own --cache-dir",
            dir.display(),
            pid.trim()
        )));
    }
    f.set_len(0).map_err(not_writable)?;
    f.write_all_at(std::process::id().to_string().as_bytes(), 0)
        .map_err(not_writable)?;
    Ok(f)
}

impl ChunkStore {
    /// Opens (or creates) the cache dir and takes back every chunk a previous
    /// run left there; each is checked against its crc before it is served.
    pub fn open(cfg: CacheConfig, stats: Arc<Stats>) -> Result<Arc<Self>> {
        let lock = lock_dir(&cfg.dir)?;
        let store = Arc::new(ChunkStore {
            cfg,
            inner: Mutex::default(),
            stats,
            _lock: lock,
        });
        store.load()?;
        Ok(store)
    }

    fn paths(&self, key: u128) -> (PathBuf, PathBuf) {
        let base = self.cfg.dir.join(format!("{key:032x}"));
        (base.with_extension("data"), base.with_extension("idx"))
    }

    fn load(&self) -> Result<()> {
        let rd = std::fs::read_dir(&self.cfg.dir).map_err(|e| Error::io("cache dir", e))?;
        let mut inner = self.inner.lock();
        let mut restored = 0u64;
        for ent in rd.flatten() {
            let p = ent.path();
            if p.extension().and_then(|e| e.to_str()) != Some("idx") {
                continue;
            }
            match self.load_one(&p) {
                Some((cf, present)) if !present.is_empty() => {
                    let mut entry = Entry {
                        slots: vec![EMPTY; cf.n_chunks() as usize],
                        cf: cf.clone(),
                        whole_pins: 0,
                    };
                    for (i, crc) in present {
                        let tick = inner.lru.touch((cf.key, i), None);
                        entry.slots[i as usize] = Slot {
                            state: State::Present,
                            crc,
                            verified: false,
                            read: true,
                            pins: 0,
                            tick: Some(tick),
                        };
                        inner.used += cf.chunk_len(i);
                        inner.cached += 1;
                        restored += 1;
                    }
                    inner.files.insert(cf.key, entry);
                }
                _ => {
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::remove_file(p.with_extension("data"));
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
        let victims = self.pick_victims(&mut inner, 0, false).unwrap_or_default();
        drop(inner);
        self.evict(victims);
        Ok(())
    }

    fn load_one(&self, idx_path: &Path) -> Option<(Arc<CacheFile>, Vec<Present>)> {
        let f = File::options().read(true).write(true).open(idx_path).ok()?;
        let (index, header, present) = Index::load(f).ok()??;
        let key = key_of(&self.cfg.source_id, header.chunk_size, &header.file);
        let (data_path, expect_idx) = self.paths(key);
        if header.chunk_size != self.cfg.chunk_size || expect_idx != idx_path {
            return None;
        }
        let data = File::options()
            .read(true)
            .write(true)
            .open(&data_path)
            .ok()?;
        if data.metadata().ok()?.len() != header.file.size {
            return None;
        }
        let cf = Arc::new(CacheFile {
            key,
            file: header.file,
            chunk_size: header.chunk_size,
            data,
            data_path,
            index,
        });
        Some((cf, present))
    }

    /// The cache file for one version of a source file, if there is one.
    pub fn lookup(&self, f: &FileVersion) -> Option<Arc<CacheFile>> {
        let key = key_of(&self.cfg.source_id, self.cfg.chunk_size, f);
        self.inner.lock().files.get(&key).map(|e| e.cf.clone())
    }

    /// The cache file for one version of a source file, made if new.
    pub fn file(&self, f: &FileVersion) -> Result<Arc<CacheFile>> {
        let key = key_of(&self.cfg.source_id, self.cfg.chunk_size, f);
        let mut inner = self.inner.lock();
        if let Some(e) = inner.files.get(&key) {
            return Ok(e.cf.clone());
        }
        let (data_path, idx_path) = self.paths(key);
        let ctx = |e| Error::io(format!("cache file {}", data_path.display()), e);
        let data = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(ctx)?;
        data.set_len(f.size).map_err(ctx)?;
        let idx = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&idx_path)
            .map_err(ctx)?;
        let header = Header {
            chunk_size: self.cfg.chunk_size,
            file: f.clone(),
        };
        let index = Index::create(idx, &header).map_err(ctx)?;
        let cf = Arc::new(CacheFile {
            key,
            file: f.clone(),
            chunk_size: self.cfg.chunk_size,
            data,
            data_path,
            index,
        });
        inner.files.insert(
            key,
            Entry {
                slots: vec![EMPTY; cf.n_chunks() as usize],
                cf: cf.clone(),
                whole_pins: 0,
            },
        );
        Ok(cf)
    }

    fn slot<'a>(inner: &'a mut Inner, cf: &CacheFile, i: u64) -> Option<&'a mut Slot> {
        inner.files.get_mut(&cf.key)?.slots.get_mut(i as usize)
    }

    pub fn contains(&self, cf: &CacheFile, i: u64) -> bool {
        let mut inner = self.inner.lock();
        Self::slot(&mut inner, cf, i).is_some_and(|s| s.state == State::Present)
    }

    /// The first chunk at or after `from` that is not cached.
    pub fn first_missing(&self, cf: &CacheFile, from: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let e = inner.files.get(&cf.key)?;
        (from..cf.n_chunks()).find(|&i| e.slots[i as usize].state != State::Present)
    }

    pub fn mark_read(&self, cf: &CacheFile, i: u64) {
        if let Some(s) = Self::slot(&mut self.inner.lock(), cf, i) {
            s.read = true;
        }
    }

    /// Bytes `range` (relative to the chunk) of chunk `i`, if cached. A chunk
    /// restored from an earlier run is checked against its crc on first use.
    pub fn read(&self, cf: &CacheFile, i: u64, range: Range<u64>) -> Option<Bytes> {
        let (verified, crc) = {
            let mut inner = self.inner.lock();
            let s = Self::slot(&mut inner, cf, i)?;
            if s.state != State::Present {
                return None;
            }
            s.pins += 1;
            s.read = true;
            let (old, verified, crc) = (s.tick, s.verified, s.crc);
            let tick = inner.lru.touch((cf.key, i), old);
            Self::slot(&mut inner, cf, i)?.tick = Some(tick);
            (verified, crc)
        };
        let base = cf.chunk_range(i).start;
        let out = if verified {
            read_at(&cf.data, base + range.start, range.end - range.start).ok()
        } else {
            match read_at(&cf.data, base, cf.chunk_len(i)) {
                Ok(whole) if crc32c::crc32c(&whole) == crc => {
                    Some(whole.slice(range.start as usize..range.end as usize))
                }
                other => {
                    add(&self.stats.crc_failures, 1);
                    warn!(path = %cf.file.path, chunk = i, io_error = other.is_err(), "cached chunk failed its check; fetching it again");
                    None
                }
            }
        };
        let mut inner = self.inner.lock();
        let Some(s) = Self::slot(&mut inner, cf, i) else {
            return out;
        };
        s.pins -= 1;
        match out {
            Some(_) => s.verified = true,
            None => {
                let victim = self.take(&mut inner, cf.key, i);
                drop(inner);
                self.evict(victim.into_iter().collect());
            }
        }
        out
    }

    /// The whole of chunk `i`, if cached (and, after a restart, verified).
    pub fn read_chunk(&self, cf: &CacheFile, i: u64) -> Option<Bytes> {
        self.read(cf, i, 0..cf.chunk_len(i))
    }

    /// Removes a present, unpinned chunk from the accounting and returns it
    /// for [`Self::evict`].
    fn take(&self, inner: &mut Inner, key: u128, i: u64) -> Option<(Arc<CacheFile>, u64)> {
        let e = inner.files.get_mut(&key)?;
        let cf = e.cf.clone();
        let s = e.slots.get_mut(i as usize)?;
        if s.state != State::Present || s.pins > 0 {
            return None;
        }
        s.state = State::Evicting;
        let tick = s.tick.take();
        if let Some(t) = tick {
            inner.lru.remove(t);
        }
        inner.used -= cf.chunk_len(i);
        inner.cached -= 1;
        Some((cf, i))
    }

    /// Chooses chunks to evict so that `need` more bytes fit, or `None`
    /// (evicting nothing) if that is impossible.
    fn pick_victims(
        &self,
        inner: &mut Inner,
        need: u64,
        prefetch: bool,
    ) -> Option<Vec<(Arc<CacheFile>, u64)>> {
        let cap = self.cfg.capacity;
        if inner.used + need <= cap {
            return Some(vec![]);
        }
        let mut chosen = vec![];
        let mut freed = 0;
        for (_, (key, i)) in inner.lru.oldest() {
            let e = &inner.files[&key];
            let s = &e.slots[i as usize];
            if s.pins > 0 || e.whole_pins > 0 || (prefetch && !s.read) {
                continue;
            }
            chosen.push((key, i));
            freed += e.cf.chunk_len(i);
            if inner.used - freed + need <= cap {
                break;
            }
        }
        if inner.used - freed + need > cap {
            return None;
        }
        let victims: Vec<_> = chosen
            .into_iter()
            .filter_map(|(k, i)| self.take(inner, k, i))
            .collect();
        add(&self.stats.chunks_evicted, victims.len() as u64);
        Some(victims)
    }

    /// Frees the blocks of chunks already taken out of the accounting.
    fn evict(&self, victims: Vec<(Arc<CacheFile>, u64)>) {
        for (cf, i) in &victims {
            if let Err(e) = cf.index.set(*i, None) {
                warn!("cache index {}: {e}", cf.data_path.display());
            }
            punch_hole(&cf.data, cf.chunk_range(*i));
            debug!(path = %cf.file.path, chunk = i, "evicted");
        }
        let mut inner = self.inner.lock();
        for (cf, i) in victims {
            if let Some(s) = Self::slot(&mut inner, &cf, i) {
                *s = EMPTY;
            }
        }
    }

    /// Stores chunk `i`. Prefetched chunks never evict chunks nobody has read.
    pub fn insert(&self, cf: &CacheFile, i: u64, bytes: &[u8], prefetch: bool) -> Result<Insert> {
        let len = cf.chunk_len(i);
        if bytes.len() as u64 != len {
            return Err(Error::Cache(format!(
                "{} chunk {i}: {} bytes where {len} were expected",
                cf.file.path,
                bytes.len()
            )));
        }
        let victims = {
            let mut inner = self.inner.lock();
            match Self::slot(&mut inner, cf, i) {
                Some(s) if s.state == State::Absent => {}
                Some(_) => return Ok(Insert::Skipped),
                None => return Err(Error::Cache(format!("{}: not open", cf.file.path))),
            }
            let Some(victims) = self.pick_victims(&mut inner, len, prefetch) else {
                return Ok(Insert::NoRoom);
            };
            inner.used += len;
            if let Some(s) = Self::slot(&mut inner, cf, i) {
                s.state = State::Writing;
            }
            victims
        };
        self.evict(victims);
        let crc = crc32c::crc32c(bytes);
        let written = cf
            .data
            .write_all_at(bytes, cf.chunk_range(i).start)
            .and_then(|()| cf.index.set(i, Some(crc)));
        let mut inner = self.inner.lock();
        if let Err(e) = written {
            inner.used -= len;
            if let Some(s) = Self::slot(&mut inner, cf, i) {
                *s = EMPTY;
            }
            return Err(Error::io(
                format!("writing cache file {}", cf.data_path.display()),
                e,
            ));
        }
        let tick = inner.lru.touch((cf.key, i), None);
        inner.cached += 1;
        if let Some(s) = Self::slot(&mut inner, cf, i) {
            *s = Slot {
                state: State::Present,
                crc,
                verified: true,
                read: !prefetch,
                pins: 0,
                tick: Some(tick),
            };
        }
        add(&self.stats.chunks_inserted, 1);
        Ok(Insert::Stored)
    }

    /// If every chunk of `cf` is cached and verified, pins them all and
    /// returns the data file, for the kernel to read directly.
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
        let mut inner = self.inner.lock();
        let e = inner.files.get_mut(&cf.key)?;
        if e.slots
            .iter()
            .any(|s| s.state != State::Present || !s.verified)
        {
            return None;
        }
        e.whole_pins += 1;
        drop(inner);
        match File::open(&cf.data_path) {
            Ok(file) => Some(WholeFilePin {
                store: self.clone(),
                cf: cf.clone(),
                file,
            }),
            Err(e) => {
                warn!(
                    "cannot open {} for passthrough: {e}",
                    cf.data_path.display()
                );
                self.unpin_whole(cf);
                None
            }
        }
    }

    fn unpin_whole(&self, cf: &CacheFile) {
        if let Some(e) = self.inner.lock().files.get_mut(&cf.key) {
            e.whole_pins -= 1;
        }
    }

    /// (bytes used, chunks cached)
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        (inner.used, inner.cached)
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }
}

fn read_at(f: &File, offset: u64, len: u64) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

/// Every chunk of one cache file, held in place while the kernel reads the
/// file directly; released on drop.
pub struct WholeFilePin {
    store: Arc<ChunkStore>,
    cf: Arc<CacheFile>,
    pub file: File,
}

impl Drop for WholeFilePin {
    fn drop(&mut self) {
        self.store.unpin_whole(&self.cf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fv(path: &str, size: u64) -> FileVersion {
        FileVersion {
            path: path.into(),
            version: "v1".into(),
            size,
        }
    }

    fn store(dir: &Path, capacity: u64) -> Arc<ChunkStore> {
        ChunkStore::open(
            CacheConfig {
                dir: dir.to_path_buf(),
                capacity,
                chunk_size: 4,
                source_id: "test".into(),
            },
            Arc::default(),
        )
        .unwrap()
    }

    fn chunk(i: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|b| (i as u8).wrapping_mul(31) ^ b as u8)
            .collect()
    }

    #[test]
    fn reads_back_what_was_inserted() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 100);
        let cf = s.file(&fv("a", 10)).unwrap();
        assert_eq!(cf.n_chunks(), 3);
        assert!(s.read(&cf, 0, 0..4).is_none());
        for i in 0..3 {
            let len = cf.chunk_len(i) as usize;
            assert_eq!(
                s.insert(&cf, i, &chunk(i, len), false).unwrap(),
                Insert::Stored
            );
        }
        assert_eq!(
            s.insert(&cf, 1, &chunk(1, 4), false).unwrap(),
            Insert::Skipped
        );
        assert_eq!(&s.read(&cf, 1, 1..3).unwrap()[..], &chunk(1, 4)[1..3]);
        assert_eq!(&s.read(&cf, 2, 0..2).unwrap()[..], &chunk(2, 2)[..]);
        assert_eq!(s.usage(), (10, 3));
        assert!(
            s.insert(&cf, 0, &[1, 2], false).is_err(),
            "wrong length is refused"
        );
    }

    #[test]
    fn evicts_least_recently_used_and_respects_pins() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 8);
        let cf = s.file(&fv("a", 16)).unwrap();
        s.insert(&cf, 0, &chunk(0, 4), false).unwrap();
        s.insert(&cf, 1, &chunk(1, 4), false).unwrap();
        s.read(&cf, 0, 0..4).unwrap(); // chunk 1 is now the oldest
        s.insert(&cf, 2, &chunk(2, 4), false).unwrap();
        assert!(s.contains(&cf, 0) && !s.contains(&cf, 1) && s.contains(&cf, 2));
        assert_eq!(s.usage(), (8, 2));
        assert_eq!(
            s.stats
                .chunks_evicted
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // Files pinned whole for passthrough cannot lose chunks.
        let b = s.file(&fv("b", 4)).unwrap();
        let c = s.file(&fv("c", 4)).unwrap();
        s.insert(&b, 0, &chunk(9, 4), false).unwrap();
        s.insert(&c, 0, &chunk(5, 4), false).unwrap();
        let pins = (s.pin_whole(&b).unwrap(), s.pin_whole(&c).unwrap());
        assert_eq!(
            s.insert(&cf, 3, &chunk(3, 4), false).unwrap(),
            Insert::NoRoom
        );
        assert!(s.contains(&b, 0) && s.contains(&c, 0));
        drop(pins);
        assert_eq!(
            s.insert(&cf, 3, &chunk(3, 4), false).unwrap(),
            Insert::Stored
        );
        assert!(!s.contains(&b, 0), "b was the least recently used");
    }

    #[test]
    fn prefetch_never_evicts_unread_chunks() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 8);
        let cf = s.file(&fv("a", 16)).unwrap();
        s.insert(&cf, 0, &chunk(0, 4), true).unwrap();
        s.insert(&cf, 1, &chunk(1, 4), true).unwrap();
        assert_eq!(
            s.insert(&cf, 2, &chunk(2, 4), true).unwrap(),
            Insert::NoRoom
        );
        s.read(&cf, 0, 0..4).unwrap();
        assert_eq!(
            s.insert(&cf, 2, &chunk(2, 4), true).unwrap(),
            Insert::Stored
        );
        assert!(!s.contains(&cf, 0) && s.contains(&cf, 1));
        // A demand read may evict anything unpinned.
        assert_eq!(
            s.insert(&cf, 3, &chunk(3, 4), false).unwrap(),
            Insert::Stored
        );
    }

    #[test]
    fn restart_reuses_chunks_and_drops_corrupt_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = fv("m/model.safetensors", 12);
        {
            let s = store(d.path(), 100);
            let cf = s.file(&f).unwrap();
            for i in 0..3 {
                s.insert(&cf, i, &chunk(i, 4), false).unwrap();
            }
            // A second process cannot take the same dir.
            let e = ChunkStore::open(s.cfg.clone(), Arc::default())
                .err()
                .unwrap();
            assert!(e.to_string().contains("in use by another modelfs"), "{e}");
        }
        let s = store(d.path(), 100);
        assert_eq!(s.usage(), (12, 3));
        let cf = s.file(&f).unwrap();
        // Corrupt chunk 1 on disk behind the store's back.
        cf.data.write_all_at(b"XXXX", 4).unwrap();
        assert_eq!(&s.read(&cf, 0, 0..4).unwrap()[..], &chunk(0, 4)[..]);
        assert!(s.read(&cf, 1, 0..4).is_none());
        assert_eq!(
            s.stats
                .crc_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(!s.contains(&cf, 1));
        assert!(
            s.pin_whole(&cf).is_none(),
            "a hole is never handed to passthrough"
        );
        s.insert(&cf, 1, &chunk(1, 4), false).unwrap();
        assert!(s.pin_whole(&cf).is_some());

        // Another version of the file is another cache file.
        let newer = FileVersion {
            version: "v2".into(),
            ..f
        };
        let cf2 = s.file(&newer).unwrap();
        assert!(!s.contains(&cf2, 0));
    }

    #[test]
    fn shrinking_capacity_on_restart_evicts() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = store(d.path(), 100);
            let cf = s.file(&fv("a", 16)).unwrap();
            for i in 0..4 {
                s.insert(&cf, i, &chunk(i, 4), false).unwrap();
            }
        }
        let s = store(d.path(), 8);
        assert_eq!(s.usage(), (8, 2));
    }
}
