//! `--peers dns:NAME:PORT` whose name appears after the mounts start, as a
//! new headless Service's does: the mounts start alone, then find each
//! other (A and AAAA records) and share their caches.
//! The test edits /etc/hosts (glibc reads it at every lookup) and restores it
//! when it ends, failed or not.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// /etc/hosts as it was, written back when dropped, even if the test fails.
struct HostsGuard(String);

impl HostsGuard {
    fn add(&self, lines: &str) {
        std::fs::write("/etc/hosts", format!("{}{lines}", self.0)).unwrap();
    }
}

impl Drop for HostsGuard {
    fn drop(&mut self) {
        std::fs::write("/etc/hosts", &self.0).unwrap();
    }
}

fn node(w: &Work, name: &str, listen: &str, peers: &str, token: &Path, log: &Path) -> Mount {
    let mp = w.dir.path().join(name);
    let cache = w.cache.path().join(name);
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    Mount::new(
        w.src().to_str().unwrap(),
        &mp,
        &cache,
        &[
            "--listen",
            listen,
            "--peers",
            peers,
            "--peer-token-file",
            token.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
            // 80 chunks: each node owns some (with 10, one owned all of
            // them once in a few hundred runs, as the hash of the port fell).
            "--chunk-size",
            "1MiB",
        ],
        &[],
    )
}

#[test]
fn dns_peers_that_appear_after_start() {
    let w = Work::new();
    let files = ["a.bin", "b.bin"];
    for (i, f) in files.iter().enumerate() {
        write_file(&w.src().join(f), 40 << 20, 10 + i as u64);
    }
    let total = 80u64 << 20;
    let token: PathBuf = token_file(w.dir.path());
    let name = format!("modelfs-dns-peers-test-{}", std::process::id());
    let port = free_port();
    let peers = format!("dns:{name}:{port}");
    let hosts = HostsGuard(std::fs::read_to_string("/etc/hosts").unwrap());
    let (log_a, log_b) = (w.dir.path().join("a.log"), w.dir.path().join("b.log"));

    // The name does not resolve: both mount anyway, alone.
    let a = node(
        &w,
        "a",
        &format!("127.0.0.11:{port}"),
        &peers,
        &token,
        &log_a,
    );
    let b = node(&w, "b", &format!("[::1]:{port}"), &peers, &token, &log_b);
    assert!(std::fs::read_to_string(&log_a)
        .unwrap()
        .contains("starting alone"));

    // The records appear: one A, one AAAA.
    hosts.add(&format!("127.0.0.11 {name}\n::1 {name}\n"));
    for log in [&log_a, &log_b] {
        wait_until("the group to form", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(log).unwrap();
            text.contains("peer group changed")
                && text.contains(&format!("127.0.0.11:{port}"))
                && text.contains(&format!("[::1]:{port}"))
        });
    }

    // A loads the model, then B: the group reads each byte from the source
    // once, and each node got chunks from the other (over IPv4 and IPv6).
    for m in [&a, &b] {
        for f in files {
            assert_same_file(&w.src().join(f), &m.path(f));
        }
    }
    let (sa, sb) = (a.stats(), b.stats());
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    assert_eq!(
        n(&sa, "bytes_from_source") + n(&sb, "bytes_from_source"),
        total,
        "{sa}\n{sb}"
    );
    assert!(sa["peers"].get(format!("[::1]:{port}")).is_some(), "{sa}");
    assert!(
        sb["peers"].get(format!("127.0.0.11:{port}")).is_some(),
        "{sb}"
    );
    // Each node owns some chunks: each got the other's from it.
    assert!(n(&sa, "bytes_from_peers") > 0, "{sa}");
    assert!(n(&sb, "bytes_from_peers") > 0, "{sb}");
    drop(hosts);
    assert!(!std::fs::read_to_string("/etc/hosts")
        .unwrap()
        .contains(&name));
}
