//! A model-based test of the engine under a small cache: random opens,
//! reads, closes, passthrough pins with mappings that outlive them, and
//! restarts, checked against the reference (the source's bytes). After every
//! step: every byte read and every live mapping equals the source, the
//! accounting stays within the capacity, and the blocks the cache dir really
//! holds stay within the capacity plus what is retired.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use modelfs_engine::cache::WholeFilePin;
use modelfs_engine::{
    DirEntry, Engine, EngineConfig, Error, FileVersion, ObjectMeta, OpenFile, Result, Sink, Source,
};
use proptest::prelude::*;

const CS: u64 = 4096;
const CAPACITY: u64 = 6 * CS;
const SIZES: [u64; 4] = [5 * CS + 100, 2 * CS, 1, 3 * CS];

struct MemSource {
    files: BTreeMap<String, Bytes>,
    read: AtomicU64,
}

fn content(n: usize, len: u64) -> Bytes {
    (0..len)
        .map(|b| (b as u8).wrapping_mul(7) ^ (b >> 8) as u8 ^ (n as u8 * 53))
        .collect::<Vec<u8>>()
        .into()
}

impl MemSource {
    fn new() -> Self {
        MemSource {
            files: SIZES
                .iter()
                .enumerate()
                .map(|(n, &len)| (format!("f{n}"), content(n, len)))
                .collect(),
            read: AtomicU64::new(0),
        }
    }

    fn meta(&self, b: &Bytes) -> ObjectMeta {
        ObjectMeta {
            is_dir: false,
            size: b.len() as u64,
            mtime: SystemTime::UNIX_EPOCH,
            version: "v1".into(),
        }
    }
}

#[async_trait]
impl Source for MemSource {
    fn id(&self) -> &str {
        "mem://model"
    }
    async fn list(&self, _dir: &str) -> Result<Vec<DirEntry>> {
        Ok(self
            .files
            .iter()
            .map(|(name, b)| DirEntry {
                name: name.clone(),
                meta: self.meta(b),
            })
            .collect())
    }
    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        let b = self.files.get(path).ok_or(Error::NotFound(path.into()))?;
        Ok(self.meta(b))
    }
    async fn read(&self, file: &FileVersion, range: Range<u64>) -> Result<Bytes> {
        let b = self
            .files
            .get(&file.path)
            .ok_or(Error::NotFound(file.path.clone()))?;
        self.read.fetch_add(range.end - range.start, Relaxed);
        Ok(b.slice(range.start as usize..range.end as usize))
    }
    /// As an object store: the body in pieces (of odd sizes), which the
    /// engine writes into the cache as they come.
    fn streams(&self) -> bool {
        true
    }
    async fn read_to(
        &self,
        file: &FileVersion,
        range: Range<u64>,
        sink: &mut (dyn Sink + Send),
    ) -> Result<()> {
        let b = self.read(file, range).await?;
        for piece in b.chunks(1000) {
            sink.put(piece);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Open(usize),
    Read {
        h: usize,
        off: u64,
        len: u64,
    },
    Close(usize),
    /// Hand the file to "passthrough" and map the data file.
    Pin(usize),
    /// Drop a pin; its mapping stays.
    Unpin(usize),
    Unmap(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SIZES.len()).prop_map(Op::Open),
        8 => (0..8usize, 0..6 * CS, 1..3 * CS).prop_map(|(h, off, len)| Op::Read { h, off, len }),
        2 => (0..8usize).prop_map(Op::Close),
        2 => (0..8usize).prop_map(Op::Pin),
        2 => (0..8usize).prop_map(Op::Unpin),
        1 => (0..8usize).prop_map(Op::Unmap),
        1 => Just(Op::Restart),
    ]
}

fn engine(source: &Arc<MemSource>, dir: &Path) -> Arc<Engine> {
    Engine::new(
        source.clone(),
        EngineConfig {
            chunk_size: CS,
            cache_dir: dir.to_path_buf(),
            cache_capacity: CAPACITY,
            prefetch_concurrency: 2,
            prefetch_window: 2 * CS,
            listing_ttl: Duration::from_secs(60),
            max_inflight: CS,
            peer_verify_sample: 0.0,
        },
        |_| vec![],
    )
    .unwrap()
}

/// Bytes the files in `dir` really hold.
fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("modelfs-model")
        .tempdir_in("/dev/shm")
        .unwrap();
    let source = Arc::new(MemSource::new());
    let _ctx = rt.enter();
    let mut e = engine(&source, dir.path());
    let mut handles: Vec<(usize, OpenFile)> = vec![];
    let mut pins: Vec<WholeFilePin> = vec![];
    let mut maps: Vec<(usize, memmap2::Mmap)> = vec![];
    let version = |n: usize| FileVersion {
        path: format!("f{n}"),
        version: "v1".into(),
        size: SIZES[n],
    };
    for op in ops {
        match op {
            Op::Open(n) => handles.push((n, e.open(version(n)).unwrap())),
            Op::Read { h, off, len } if !handles.is_empty() => {
                let (n, f) = &handles[h % handles.len()];
                let got = rt.block_on(e.read(f, off, len)).unwrap();
                let src = &source.files[&format!("f{n}")];
                let end = (off + len).min(src.len() as u64);
                let want = if off >= end {
                    &[][..]
                } else {
                    &src[off as usize..end as usize]
                };
                assert!(got[..] == *want, "f{n} at {off}+{len}");
            }
            Op::Close(h) if !handles.is_empty() => {
                handles.remove(h % handles.len());
            }
            Op::Pin(h) if !handles.is_empty() => {
                let (n, f) = &handles[h % handles.len()];
                if let Some(pin) = e.pin_complete(f) {
                    // SAFETY: the engine promises these bytes never change.
                    let map = unsafe { memmap2::Mmap::map(&pin.file).unwrap() };
                    maps.push((*n, map));
                    pins.push(pin);
                }
            }
            Op::Unpin(h) if !pins.is_empty() => {
                pins.remove(h % pins.len());
            }
            Op::Unmap(h) if !maps.is_empty() => {
                maps.remove(h % maps.len());
            }
            Op::Restart => {
                handles.clear();
                pins.clear();
                drop(e);
                // Prefetch tasks may hold the engine a little longer.
                let mut tries = 0;
                e = loop {
                    match Engine::new(
                        source.clone(),
                        EngineConfig {
                            chunk_size: CS,
                            cache_dir: dir.path().to_path_buf(),
                            cache_capacity: CAPACITY,
                            prefetch_concurrency: 2,
                            prefetch_window: 2 * CS,
                            listing_ttl: Duration::from_secs(60),
                            max_inflight: CS,
                            peer_verify_sample: 0.0,
                        },
                        |_| vec![],
                    ) {
                        Ok(e) => break e,
                        Err(_) if tries < 100 => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(err) => panic!("restart: {err}"),
                    }
                };
            }
            _ => {}
        }
        for (n, map) in &maps {
            let src = &source.files[&format!("f{n}")];
            assert!(map[..] == src[..], "a live mapping of f{n} changed");
        }
        let s = e.snapshot();
        assert!(
            s.cache_bytes_used <= CAPACITY,
            "used {}",
            s.cache_bytes_used
        );
        assert!(s.prefetch_bytes_unread <= 2 * CS);
        let on_disk = allocated(dir.path());
        assert!(
            on_disk <= CAPACITY + 2 * CS,
            "the cache dir holds {on_disk} bytes for a capacity of {CAPACITY}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn the_cache_never_serves_a_wrong_byte_nor_outgrows_its_capacity(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
