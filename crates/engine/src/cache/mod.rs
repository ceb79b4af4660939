//! The node-local chunk cache: one sparse file per source file and version,
//! with a small index of the chunks present and their crc32c.

mod index;
mod lru;
mod store;

pub use store::{CacheConfig, CacheFile, ChunkStore, Insert, WholeFilePin};
