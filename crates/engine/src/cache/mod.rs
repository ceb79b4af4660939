//! The node-local chunk cache: one sparse file per source file and version,
//! with a small index of the chunks present and their crc32c.

mod dir;
mod disk;
mod index;
mod lru;
mod retired;
mod store;
mod writer;

#[cfg(test)]
pub(crate) use store::on_tmpfs;
pub use store::{
    CacheConfig, CacheFile, ChunkStore, Evicted, Mode, Reservation, Reserve, WholeFilePin,
};
pub use writer::ChunkWriter;

#[cfg(test)]
mod tests;
