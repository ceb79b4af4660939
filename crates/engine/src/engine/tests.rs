//! Readers' misses and prefetch on the same chunk, interleaved by hand: the
//! futures are polled one step at a time on a single-threaded runtime, so
//! each order is exact, not a matter of load.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::poll;

use super::*;
use crate::{DirEntry, ObjectMeta};

const CS: u64 = 4096;

struct Mem {
    bytes: Bytes,
    read: AtomicU64,
}

#[async_trait]
impl Source for Mem {
    fn id(&self) -> &str {
        "mem://one-file"
    }
    async fn list(&self, _dir: &str) -> Result<Vec<DirEntry>> {
        Ok(vec![])
    }
    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        Err(Error::NotFound(path.into()))
    }
    async fn read(&self, _file: &FileVersion, range: Range<u64>) -> Result<Bytes> {
        self.read.fetch_add(range.end - range.start, Relaxed);
        Ok(self.bytes.slice(range.start as usize..range.end as usize))
    }
}

/// Lets the flights' tasks run until none is left.
async fn land(engine: &Engine) {
    for _ in 0..1000 {
        if engine.flights.in_flight() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("flights still in the air");
}

/// An engine over eight chunks of `src`, with a prefetch window of
/// `window` chunks and no prefetch job (the tests play prefetch), and the
/// file opened.
fn engine_over(src: &Arc<Mem>, cache: &std::path::Path, window: u64) -> (Arc<Engine>, OpenFile) {
    let engine = Engine::new(
        src.clone(),
        EngineConfig {
            chunk_size: CS,
            cache_dir: cache.to_path_buf(),
            cache_capacity: 64 * CS,
            prefetch_concurrency: 0,
            prefetch_window: window * CS,
            listing_ttl: Duration::from_secs(60),
            max_inflight: 4 * CS,
            peer_verify_sample: 0.0,
        },
        |_| vec![],
    )
    .unwrap();
    let h = engine
        .open(FileVersion {
            path: "m".into(),
            version: "v1".into(),
            size: 8 * CS,
        })
        .unwrap();
    (engine, h)
}

fn eight_chunks() -> Arc<Mem> {
    Arc::new(Mem {
        bytes: (0..8 * CS).map(|b| (b % 251) as u8).collect(),
        read: AtomicU64::new(0),
    })
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_is_never_left_with_a_prefetch_that_found_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let src = eight_chunks();
    let (engine, h) = engine_over(&src, dir.path(), 2);
    // The window full of chunks nobody has read yet.
    for i in 0..2 {
        let got = engine.fetch(&h.cf, i, Want::Prefetch).await.unwrap();
        assert!(matches!(got, Got::Bytes(_)));
    }
    // Prefetch tries chunk 5 as a reader misses it, and tries it again
    // (it was a reader's) as soon as the first try came back, before the
    // reader's task runs again: as under load.
    let k = 5;
    let first = engine.fetch(&h.cf, k, Want::Prefetch);
    tokio::pin!(first);
    let first_now = poll!(&mut first);
    let read = engine.read(&h, k * CS, CS);
    tokio::pin!(read);
    assert!(poll!(&mut read).is_pending());
    land(&engine).await;
    if first_now.is_pending() {
        first.await.unwrap();
    }
    let again = engine.fetch(&h.cf, k, Want::Prefetch);
    tokio::pin!(again);
    let again_now = poll!(&mut again);
    let read_now = poll!(&mut read);
    land(&engine).await;
    if again_now.is_pending() {
        again.await.unwrap();
    }
    let got = match read_now {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => read.await,
    }
    .unwrap();
    assert_eq!(
        got,
        src.bytes.slice((k * CS) as usize..((k + 1) * CS) as usize)
    );
    let stats = engine.snapshot();
    assert_eq!(stats.reads_uncached, 0, "the reader was served uncached");
    assert!(engine.store.contains(&h.cf, k), "chunk {k} was not kept");
    // Read again, it comes from the cache: the origin sent each chunk once.
    engine.read(&h, k * CS, CS).await.unwrap();
    assert_eq!(src.read.load(Relaxed), 3 * CS);
}

/// Prefetch that asks for a chunk a reader's miss is fetching waits for
/// that fetch: the origin sends the chunk once, and it is kept.
#[tokio::test(flavor = "current_thread")]
async fn prefetch_joins_a_readers_fetch_in_the_air() {
    let dir = tempfile::tempdir().unwrap();
    let src = eight_chunks();
    let (engine, h) = engine_over(&src, dir.path(), 4);
    let k = 3;
    let read = engine.read(&h, k * CS, CS);
    tokio::pin!(read);
    assert!(poll!(&mut read).is_pending());
    assert_eq!(engine.flights.in_flight(), 1);
    let pre = engine.fetch(&h.cf, k, Want::Prefetch);
    tokio::pin!(pre);
    assert!(poll!(&mut pre).is_pending());
    assert_eq!(
        engine.flights.in_flight(),
        1,
        "prefetch started a flight of its own"
    );
    land(&engine).await;
    let want = src.bytes.slice((k * CS) as usize..((k + 1) * CS) as usize);
    assert_eq!(read.await.unwrap(), want);
    match pre.await.unwrap() {
        Got::Bytes(b) => assert_eq!(b, want),
        Got::NoRoom => panic!("prefetch found no room in an empty window"),
    }
    assert_eq!(src.read.load(Relaxed), CS);
    assert!(engine.store.contains(&h.cf, k), "chunk {k} was not kept");
}
