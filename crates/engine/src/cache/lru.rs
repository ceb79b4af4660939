//! Least-recently-used order of chunks: a tick per touch, ordered by tick.

use std::collections::BTreeMap;

pub type ChunkId = (u128, u64);

#[derive(Default)]
pub struct Lru {
    by_tick: BTreeMap<u64, ChunkId>,
    next: u64,
}

impl Lru {
    /// Moves `id` to the most recent end; returns its new tick.
    pub fn touch(&mut self, id: ChunkId, old_tick: Option<u64>) -> u64 {
        if let Some(t) = old_tick {
            self.by_tick.remove(&t);
        }
        self.next += 1;
        self.by_tick.insert(self.next, id);
        self.next
    }

    pub fn remove(&mut self, tick: u64) {
        self.by_tick.remove(&tick);
    }

    /// Chunks from least to most recently used.
    pub fn oldest(&self) -> impl Iterator<Item = (u64, ChunkId)> + '_ {
        self.by_tick.iter().map(|(t, id)| (*t, *id))
    }
}
