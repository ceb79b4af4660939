//! Prefetch led by readers: a miss inside a tensor (from the file's
//! safetensors or GGUF header) queues that tensor's other chunks ahead of the
//! sweep, nearest first, and the sweep goes on after the tensor. A reader
//! walking tensors in random order through mmap thus has the rest of its
//! tensor in flight at its first fault instead of one fault per chunk, and a
//! small tensor straddling two chunks brings both. Files without a layout go
//! by chunks, as before.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tracing::debug;

use crate::cache::CacheFile;
use crate::engine::{Got, Want};
use crate::layout::{self, Layout, Parsed};
use crate::Engine;

/// Chunks queued for readers, at most: a loader's tensors are seldom more
/// than a few chunks, and a long queue would only hold stale guesses.
const MAX_TARGETS: usize = 256;

/// What is read first to look for a header: most safetensors and GGUF
/// headers fit; a larger one is read as far as it says it goes.
const FIRST_READ: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct Follow {
    layout: OnceLock<Layout>,
    targets: Mutex<Targets>,
}

#[derive(Default)]
struct Targets {
    /// Chunks to fetch before the sweep's, in order.
    queue: VecDeque<u64>,
    /// Chunks readers asked for and not fetched yet, wherever they are: one
    /// already in flight for the sweep when a reader asked that then found
    /// no room must come back to the head of the queue, not the sweep's.
    wanted: HashSet<u64>,
}

impl Targets {
    fn push_front(&mut self, chunks: impl DoubleEndedIterator<Item = u64>) {
        for c in chunks.rev() {
            self.queue.push_front(c);
            self.wanted.insert(c);
        }
        self.queue.truncate(MAX_TARGETS);
        // Chunks dropped from the queue while in flight may linger here:
        // forgetting them only costs their place in line.
        if self.wanted.len() > 4 * MAX_TARGETS {
            self.wanted.clear();
        }
    }
}

impl Follow {
    /// A reader missed chunk `i` reading byte `offset`: queues the other
    /// chunks of its tensor ahead of what was queued before (forward from
    /// `i` first, as loaders walk a tensor forward), and returns the chunk
    /// the sweep should go on from.
    pub(super) fn miss(&self, i: u64, offset: u64, chunk_size: u64) -> u64 {
        let Some(t) = self.layout.get().and_then(|l| l.tensor_at(offset)) else {
            return i + 1;
        };
        // A tensor may span the whole file (a hostile header, GGUF's last
        // tensor): at most a queue's worth either side, so a miss costs O(1).
        let cap = MAX_TARGETS as u64;
        let first = (t.start / chunk_size).max(i.saturating_sub(cap));
        let last = ((t.end - 1) / chunk_size).min(i.saturating_add(cap));
        debug!(chunk = i, first, last, "miss inside a tensor");
        self.targets
            .lock()
            .push_front((i + 1..last + 1).chain((first..i).rev()));
        last + 1
    }

    /// Whether a reader asked for chunk `i`, which is not fetched yet.
    pub(super) fn wanted(&self, i: u64) -> bool {
        self.targets.lock().wanted.contains(&i)
    }

    pub(super) fn fetched(&self, i: u64) {
        self.targets.lock().wanted.remove(&i);
    }

    /// Puts `chunks` that found no room back at the head of the queue, in
    /// their order, to be tried first once there is room.
    pub(super) fn requeue(&self, chunks: impl DoubleEndedIterator<Item = u64>) {
        self.targets.lock().push_front(chunks);
    }

    /// Whether chunks are queued for readers.
    pub(super) fn pending(&self) -> bool {
        !self.targets.lock().queue.is_empty()
    }

    /// The next queued chunk not `done` yet (dispatched, or past the end).
    pub(super) fn next(&self, done: impl Fn(u64) -> bool) -> Option<u64> {
        let mut t = self.targets.lock();
        std::iter::from_fn(|| t.queue.pop_front()).find(|&c| !done(c))
    }

    /// Reads the file's header, fetching what is not cached as prefetch
    /// (within its window, so a file that is not a weights file costs
    /// nothing the sweep would not fetch anyway), and keeps its layout.
    /// Stops once `open` says the file was closed, as the sweep does.
    pub(super) async fn learn(
        &self,
        engine: &Arc<Engine>,
        cf: &Arc<CacheFile>,
        open: impl Fn() -> bool,
    ) {
        let size = cf.file.size;
        let mut want = FIRST_READ.min(size);
        let mut have = Bytes::new();
        loop {
            match prefix(engine, cf, have, want, &open).await {
                Some(b) => have = b,
                None => return,
            }
            match layout::parse(&have, size) {
                Parsed::Layout(l) => {
                    debug!(path = %cf.file.path, tensors = l.tensors().len(), "tensor layout");
                    let _ = self.layout.set(l);
                    return;
                }
                Parsed::More(n) if n > have.len() as u64 => want = n,
                Parsed::More(_) | Parsed::Unknown => return,
            }
        }
    }
}

/// Bytes `0..want` of the file, given the first `have.len()` of them.
async fn prefix(
    engine: &Arc<Engine>,
    cf: &Arc<CacheFile>,
    have: Bytes,
    want: u64,
    open: impl Fn() -> bool,
) -> Option<Bytes> {
    let cs = engine.config().chunk_size;
    let mut out = BytesMut::from(have);
    while (out.len() as u64) < want {
        if !open() {
            return None;
        }
        let at = out.len() as u64;
        let (i, base) = (at / cs, at / cs * cs);
        let rel = at - base..(want - base).min(cf.chunk_len(i));
        let b = match engine.store().read(cf, i, rel.clone()) {
            Some(b) => b,
            None => match engine.fetch(cf, i, Want::Prefetch).await {
                Ok(Got::Bytes(b)) => b.slice(rel.start as usize..rel.end as usize),
                _ => return None,
            },
        };
        if b.is_empty() {
            return None;
        }
        out.extend_from_slice(&b);
    }
    Some(out.freeze())
}
