//! A fleet starting at once: owners that already sent a chunk name its
//! holders instead of sending it again (`--peer-upload-limit`). Each node
//! listens, and sends, on its own loopback address (127.0.0.N); Garage is
//! the origin.
mod common;

use common::s3::s3_model;
use common::*;

/// A node: its own mount point and cache, serving chunks on `listen`.
/// Fields drop in order: the mount goes before its directories.
struct Node {
    mount: Mount,
    _work: Work,
}

fn node(url: &str, listen: &str, peers: &str, token: &std::path::Path, extra: &[&str]) -> Node {
    let work = Work::new();
    let mut args = vec![
        "--peer-token-file",
        token.to_str().unwrap(),
        "--listen",
        listen,
        "--peers",
        peers,
        "--chunk-size",
        "1MiB",
    ];
    args.extend(extra);
    Node {
        mount: work.mount_s3(url, &args),
        _work: work,
    }
}

fn sum(nodes: &[Node], key: &str) -> u64 {
    nodes.iter().map(|n| n.mount.stat_u64(key)).sum()
}

/// Bytes `n` got from the peer at `addr`.
fn from_peer(n: &Node, addr: &str) -> u64 {
    n.mount.stats()["peers"][addr]["bytes"]
        .as_u64()
        .unwrap_or(0)
}

/// A model of `size` at `url` and `n` nodes on 127.0.0.(`base` + i), each
/// with `--peer-upload-limit 0` (an owner that knows a holder always names
/// it): the model's bytes, the nodes' addresses and the nodes.
fn group(w: &Work, url: &str, size: &str, n: u8, base: u8) -> (u64, Vec<String>, Vec<Node>) {
    let total = s3_model(w, url, size);
    let token = token_file(w.dir.path());
    let port = free_port();
    let addrs: Vec<String> = (1..=n)
        .map(|i| format!("127.0.0.{}:{port}", base + i))
        .collect();
    let all = addrs.join(",");
    let nodes = addrs
        .iter()
        .map(|a| node(url, a, &all, &token, &["--peer-upload-limit", "0"]))
        .collect();
    (total, addrs, nodes)
}

/// Every shard through every node at once; all bytes compared.
fn load_all(src: &std::path::Path, nodes: &[&Node]) {
    let mounts: Vec<&Mount> = nodes.iter().map(|n| &n.mount).collect();
    cmp_all(src, &mounts);
}

#[test]
fn a_busy_owner_sends_the_next_asker_to_the_node_it_served() {
    let w = Work::new();
    let url = "s3://models/spread-three";
    let (total, addrs, nodes) = group(&w, url, "48MiB", 3, 30);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    load_all(&w.src(), &[b]);
    let a_sent = a.mount.stat_u64("chunks_served_to_peers");
    assert!(a_sent > 0, "A owns none of 48 chunks?");
    let a_bytes = from_peer(b, &addrs[0]);
    assert!(a_bytes > 0);
    load_all(&w.src(), &[c]);
    // A sent each chunk it owns once, to B; C got them from B.
    assert_eq!(from_peer(c, &addrs[0]), 0, "{}", c.mount.stats());
    assert_eq!(a.mount.stat_u64("chunks_served_to_peers"), a_sent);
    assert_eq!(a.mount.stat_u64("peer_redirects_sent"), a_sent);
    assert_eq!(c.mount.stat_u64("peer_redirects_followed"), a_sent);
    assert_eq!(c.mount.stat_u64("chunks_from_holders"), a_sent);
    assert_eq!(sum(&nodes, "bytes_from_source"), total);
}

#[test]
fn a_holder_that_is_gone_sends_the_asker_back_to_the_owner() {
    let w = Work::new();
    let url = "s3://models/spread-gone";
    let (total, addrs, mut nodes) = group(&w, url, "48MiB", 3, 40);
    load_all(&w.src(), &[&nodes[1]]);
    let a_sent = nodes[0].mount.stat_u64("chunks_served_to_peers");
    assert!(a_sent > 0, "A owns none of 48 chunks?");
    let a_bytes = from_peer(&nodes[1], &addrs[0]);
    let b_origin = nodes[1].mount.stat_u64("bytes_from_source");
    // B, the only holder A knows, goes away.
    drop(nodes.remove(1));
    let (a, c) = (&nodes[0], &nodes[1]);
    load_all(&w.src(), &[c]);
    // C was sent to B, found it gone and got every such chunk from A.
    assert!(c.mount.stat_u64("peer_redirects_followed") >= 1);
    assert_eq!(c.mount.stat_u64("chunks_from_holders"), 0);
    // A also fetches, as their owner now, what B owned.
    assert!(from_peer(c, &addrs[0]) >= a_bytes);
    assert!(a.mount.stat_u64("chunks_served_to_peers") >= 2 * a_sent);
    // What B owned (and took with it) C read from the origin, nothing more.
    let origin = sum(&nodes, "bytes_from_source") + b_origin;
    assert!(origin <= 2 * total, "{origin} origin bytes for {total}");
    assert_eq!(c.mount.stat_u64("read_errors"), 0);
}

#[test]
fn eight_nodes_starting_at_once_read_the_origin_once_and_share_the_uploads() {
    let w = Work::new();
    let url = "s3://models/spread-eight";
    let (total, _, nodes) = group(&w, url, "128MiB", 8, 50);
    load_all(&w.src(), &nodes.iter().collect::<Vec<_>>());
    let origin = sum(&nodes, "bytes_from_source");
    assert!(
        origin >= total && origin as f64 <= total as f64 * 1.05,
        "8 nodes pulled {origin} origin bytes for {total}"
    );
    // Owners named holders, and holders served: the copies of a chunk did
    // not all leave its owner's uplink.
    let from_holders = sum(&nodes, "chunks_from_holders");
    assert!(from_holders > 0, "no chunk came from a holder");
    assert!(sum(&nodes, "peer_redirects_sent") >= from_holders);
    assert_eq!(sum(&nodes, "read_errors"), 0);
    assert_eq!(sum(&nodes, "crc_failures"), 0);
}
