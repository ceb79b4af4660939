//! The peer group: the instances of one service share their caches. Each
//! chunk has one owner among the live peers (rendezvous hashing); a node that
//! misses a chunk asks its owner, which serves it from its cache or fetches it
//! once for the whole group. A warm-up service answers the same protocol.
//!
//! The protocol is plain HTTP/1.1: `GET /v1/chunk?source=&path=&version=&size=&index=`
//! with `Authorization: Bearer <group token>`; the body is the chunk and
//! `x-modelfs-crc32c` its checksum, which the reader verifies. With
//! `cached_only=1` a node answers from its cache or 404, and fetches nothing.

mod client;
mod membership;
mod rendezvous;
mod server;
mod tiers;

pub use client::{ChunkRequest, PeerClient};
pub use membership::{Membership, PeerSpec};
pub use rendezvous::{owner, ranked};
pub use server::serve;
pub use tiers::{ChunkAsker, PeerTier, WarmupTier};

pub const CRC_HEADER: &str = "x-modelfs-crc32c";

/// Reads the group token from a file (trailing whitespace dropped).
pub fn read_token(path: &std::path::Path) -> crate::Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::Config(format!("peer token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(crate::Error::Config(format!(
            "peer token in {} is shorter than 16 characters; use a long random token",
            path.display()
        )));
    }
    Ok(t)
}
