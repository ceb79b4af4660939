//! The redirect path of the peer group with a holder that is hung: a busy
//! owner names a member it sent chunks to, and that member accepts the
//! asker's connection and never answers (a stopped or wedged process: the
//! kernel still accepts for it). Each node listens, and sends, on its own
//! loopback address (127.0.0.N); a local directory is the origin.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::hung::HungPeer;
use common::*;
use modelfs_engine::peer::{owner, ChunkRequest, PeerClient};
use modelfs_engine::source::{open_source, SourceOptions};
use modelfs_engine::FileVersion;

const MIB: u64 = 1 << 20;

/// A node serving the shared source `src` from a work dir of its own.
/// Fields drop in order: the mount goes before its directories.
struct Node {
    mount: Mount,
    _work: Work,
}

fn node(src: &std::path::Path, extra: &[&str]) -> Node {
    let work = Work::new();
    Node {
        mount: Mount::new(
            src.to_str().unwrap(),
            &work.mnt(),
            work.cache.path(),
            extra,
            &[],
        ),
        _work: work,
    }
}

#[test]
fn a_hung_holder_costs_the_asker_one_peer_timeout_then_the_owner_serves() {
    const CHUNKS: u64 = 4;
    const PEER_TIMEOUT: u64 = 2;
    let w = Work::new();
    let data = write_file(&w.src().join("staging.bin"), (CHUNKS * MIB) as usize, 23);
    let total = data.len() as u64;
    let token = token_file(w.dir.path());
    let port = free_port();
    let (a, h, b) = (
        format!("127.0.0.2:{port}"),
        format!("127.0.0.3:{port}"),
        format!("127.0.0.4:{port}"),
    );
    let members: Vec<SocketAddr> = [&a, &h, &b].iter().map(|x| x.parse().unwrap()).collect();
    let all = format!("{a},{h},{b}");

    // The chunk names every node gives this file, from the engine's own
    // source: its id and the file's version.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let source = open_source(w.src().to_str().unwrap(), &SourceOptions::default()).unwrap();
    let stat = |name: &str| rt.block_on(source.stat(name)).unwrap();
    let version = stat("staging.bin").version;
    let object = |name: &str| format!("{}/{name}", source.id().trim_end_matches('/'));
    // A name under which A owns every chunk (a rename keeps the version):
    // B then asks A for each, and never the hung member as their owner.
    let owned_by_a = |name: &str| {
        (0..CHUNKS).all(|i| {
            let key = format!("{}\0{version}\0{i}", object(name));
            owner(key.as_bytes(), &members) == Some(members[0])
        })
    };
    let name = (0..100_000)
        .map(|n| format!("model-{n}.bin"))
        .find(|n| owned_by_a(n))
        .expect("no name whose chunks A owns");
    std::fs::rename(w.src().join("staging.bin"), w.src().join(&name)).unwrap();
    let meta = stat(&name);
    assert_eq!(meta.version, version, "the rename changed the version");

    // H takes its address first, so no one else can; it answers nothing.
    let hung = HungPeer::start(&h);
    let group = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--peers",
            &all,
            "--peer-token-file",
            token.to_str().unwrap(),
            "--chunk-size",
            "1MiB",
            "--peer-timeout",
            &PEER_TIMEOUT.to_string(),
            // One upload at a time, always naming holders to askers that
            // follow redirects: A answers B 429 for every chunk H holds.
            "--peer-upload-limit",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = group(&["--listen", &a]);
    let node_a = node(
        &w.src(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // H, while it still answered, fetched every chunk from A as a member does
    // (from its own address, with its own id, reading each to the end): A now
    // names H as their holder.
    let client = PeerClient::new(
        "a-long-shared-group-token-for-tests".into(),
        "the-hung-holder".into(),
        Duration::from_secs(10),
        Duration::from_secs(10),
        None,
        Some("127.0.0.3".parse().unwrap()),
    )
    .unwrap();
    let file = FileVersion {
        path: name.clone(),
        version: meta.version.clone(),
        size: meta.size,
    };
    let obj = object(&name);
    for i in 0..CHUNKS {
        let req = ChunkRequest {
            object: &obj,
            file: &file,
            chunk_size: MIB,
            index: i,
            len: MIB,
            cached_only: false,
            may_redirect: false,
        };
        let got = rt
            .block_on(client.chunk(&format!("http://{a}"), &req))
            .unwrap_or_else(|e| panic!("H's fetch of chunk {i} from A: {e}"));
        let at = (i * MIB) as usize;
        assert!(got[..] == data[at..at + MIB as usize], "chunk {i} differs");
    }
    let sa = node_a.mount.stats();
    assert_eq!(sa["chunks_served_to_peers"].as_u64(), Some(CHUNKS), "{sa}");
    assert_eq!(sa["bytes_from_source"].as_u64(), Some(total), "{sa}");

    let args = group(&["--listen", &b]);
    let node_b = node(
        &w.src(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // The bound: every chunk B reads is redirected to H, whose ask costs at
    // most --peer-timeout (to connect and get a first byte from a cache);
    // then H is backed off and A sends the chunk itself. Even one chunk at a
    // time that is CHUNKS peer timeouts; 10 s more for the rest. A holder ask
    // that waited as for a fetch (plus the origin's budget, 150 s here) or
    // not at all would blow it.
    let bound = Duration::from_secs(CHUNKS * PEER_TIMEOUT + 10);
    let took = cmp_within(&w.src().join(&name), &node_b.mount.path(&name), bound);

    let sa = node_a.mount.stats();
    let sb = node_b.mount.stats();
    // A answered B 429 naming H once per chunk, and B followed each.
    assert_eq!(sa["peer_redirects_sent"].as_u64(), Some(CHUNKS), "{sa}");
    assert_eq!(sb["peer_redirects_followed"].as_u64(), Some(CHUNKS), "{sb}");
    // H was asked, and failed: it never answered.
    let seen = hung.seen();
    assert!(!seen.is_empty(), "B never asked the hung holder: {sb}");
    for (from, line) in &seen {
        assert_eq!(from.ip().to_string(), "127.0.0.4", "{seen:?}");
        assert!(line.contains("cached_only=1"), "{seen:?}");
    }
    assert!(seen.len() as u64 <= CHUNKS, "{seen:?}");
    assert!(sb["peers"][&h]["errors"].as_u64().unwrap_or(0) >= 1, "{sb}");
    assert_eq!(sb["chunks_from_holders"].as_u64(), Some(0), "{sb}");
    // Then A sent every chunk from its cache: B read nothing from the origin,
    // and A nothing more than it had for H.
    assert_eq!(sb["bytes_from_source"].as_u64(), Some(0), "{sb}");
    assert_eq!(sb["bytes_from_peers"].as_u64(), Some(total), "{sb}");
    assert_eq!(sb["peers"][&a]["bytes"].as_u64(), Some(total), "{sb}");
    assert_eq!(sb["read_errors"].as_u64(), Some(0), "{sb}");
    assert_eq!(sa["bytes_from_source"].as_u64(), Some(total), "{sa}");
    assert_eq!(
        sa["chunks_served_to_peers"].as_u64(),
        Some(2 * CHUNKS),
        "{sa}"
    );
    eprintln!(
        "{} MiB past a hung holder ({} asks of it): {took:?}",
        total / MIB,
        seen.len()
    );
    drop(node_b);
    drop(node_a);
}
