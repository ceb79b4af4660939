//! The peer group: the instances of one service share their caches. Each
//! chunk has one owner among the live peers (rendezvous hashing); a node that
//! misses a chunk asks its owner, which serves it from its cache or fetches it
//! once for the whole group. A warm-up service answers the same protocol.
//!
//! The protocol is plain HTTP/1.1: `GET /v1/chunk?source=&path=&version=&size=&index=`
//! with `Authorization: Bearer <group token>`; the body is the chunk and
//! `x-modelfs-crc32c` its checksum, which the reader verifies. With
//! `cached_only=1` a node answers from its cache or 404, and fetches nothing.
//! An owner already sending `--peer-upload-limit` chunks, asked with
//! `x-modelfs-redirect: 1`, may answer 429 with `x-modelfs-holders:
//! addr,addr` instead: members it has sent the chunk to. The asker asks
//! them with `cached_only=1`, then, if none has it, the owner again without
//! `x-modelfs-redirect`, which the owner then serves: nothing loops.
//! Each request carries `x-modelfs-node` (the sender's id); a server that
//! receives its own id answers 421 at once and the sender treats that
//! address as itself from then on.

mod client;
mod holders;
mod membership;
mod order;
mod rendezvous;
mod server;
mod tiers;
mod tls;

pub use client::{ChunkRequest, PeerClient};
pub use membership::{Membership, PeerSpec};
pub use rendezvous::{owner, ranked, Owners};
pub use server::{serve, Redirects};
pub use tiers::{ChunkAsker, PeerTier, WarmupTier};
pub use tls::{TlsAcceptor, TlsFiles};

pub const CRC_HEADER: &str = "x-modelfs-crc32c";
/// The asking node's id, random per process: a request that reaches the
/// node that sent it (a node that does not know which member address is its
/// own) is refused at once instead of waiting on its own single-flight.
pub const NODE_HEADER: &str = "x-modelfs-node";

/// Sent by an asker that follows redirects to holders (see above).
pub const REDIRECT_HEADER: &str = "x-modelfs-redirect";
/// A busy owner's answer: members that hold the chunk.
pub const HOLDERS_HEADER: &str = "x-modelfs-holders";

/// A chunk's name among the group, the same on every node.
pub(crate) fn chunk_key(object: &str, version: &str, index: u64) -> String {
    format!("{object}\0{version}\0{index}")
}

/// A random id for this node, fresh at every start.
pub fn new_node_id() -> String {
    let mut b = [0u8; 16];
    random_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fills `b` from the kernel's random source (at most 256 bytes).
pub(crate) fn random_bytes(b: &mut [u8]) {
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: time and pid still tell two processes apart,
        // but a peer could guess them (which chunks a node compares).
        tracing::warn!("getrandom failed: node id and check secret come from time and pid");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, piece) in b.chunks_mut(16).enumerate() {
            let seed = format!("{t}-{}-{i}", std::process::id());
            let h = xxhash_rust::xxh3::xxh3_128(seed.as_bytes()).to_le_bytes();
            piece.copy_from_slice(&h[..piece.len()]);
        }
    }
}

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
