//! The mount mirrors the source tree read-only and returns the source's bytes.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn walk(root: &Path) -> BTreeMap<String, (bool, u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.insert(
                rel,
                (
                    m.is_dir(),
                    if m.is_dir() { 0 } else { m.len() },
                    m.modified().unwrap(),
                ),
            );
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn mirrors_the_tree_and_every_byte() {
    let w = Work::new();
    let files = [
        ("a.bin", (20 << 20) + 123),
        ("dir/b.bin", 5000),
        ("dir/sub/empty.bin", 0),
        ("d/e.gguf", 9 << 20),
    ];
    for (i, (p, len)) in files.iter().enumerate() {
        write_file(&w.src().join(p), *len, i as u64);
    }
    let m = w.mount(&["--chunk-size", "1MiB", "--cache-size", "256MiB"]);
    let (src_tree, mnt_tree) = (walk(&w.src()), walk(&m.mp));
    assert_eq!(
        src_tree.keys().collect::<Vec<_>>(),
        mnt_tree.keys().collect::<Vec<_>>()
    );
    for (k, (is_dir, size, mtime)) in &src_tree {
        let (d2, s2, t2) = &mnt_tree[k];
        assert_eq!((is_dir, size), (d2, s2), "{k}");
        if !is_dir {
            assert_eq!(mtime, t2, "{k}: mtime");
        }
    }

    for (p, _) in files {
        // cat through a real process, and a whole-file read.
        let out = Command::new("cat").arg(m.path(p)).output().unwrap();
        assert!(out.status.success());
        assert!(
            out.stdout == std::fs::read(w.src().join(p)).unwrap(),
            "cat {p}"
        );
        assert_same_file(&w.src().join(p), &m.path(p));
    }

    // Random offsets and lengths, across chunk boundaries and past the end.
    let src = std::fs::read(w.src().join("a.bin")).unwrap();
    let mut s = 12345u64;
    for _ in 0..300 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (s >> 20) % (src.len() as u64 + 4096);
        let len = ((s >> 8) % (3 << 20)) as usize + 1;
        let got = pread(&m.path("a.bin"), off, len).unwrap();
        let end = (off as usize + len).min(src.len());
        let want = if off as usize >= src.len() {
            &[][..]
        } else {
            &src[off as usize..end]
        };
        assert!(got == want, "pread at {off} len {len}");
    }

    // dd in 4 KiB blocks from the middle of the file.
    let out = Command::new("dd")
        .args([
            &format!("if={}", m.path("a.bin").display()),
            "bs=4096",
            "skip=1000",
            "count=700",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == src[1000 * 4096..1700 * 4096], "dd");
}

#[test]
fn writes_are_refused_with_erofs() {
    let w = Work::new();
    write_file(&w.src().join("w.bin"), 1000, 1);
    let m = w.mount(&[]);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(std::fs::write(m.path("new.bin"), b"x"), "create");
    erofs(std::fs::write(m.path("w.bin"), b"x"), "overwrite");
    erofs(std::fs::create_dir(m.path("d")), "mkdir");
    erofs(std::fs::rename(m.path("w.bin"), m.path("v.bin")), "rename");
    erofs(std::fs::remove_file(m.path("w.bin")), "unlink");
    erofs(
        std::fs::set_permissions(
            m.path("w.bin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        ),
        "chmod",
    );
    assert_same_file(&w.src().join("w.bin"), &m.path("w.bin"));
    assert_eq!(
        std::fs::read(w.src().join("w.bin")).unwrap(),
        pattern(1000, 1),
        "source untouched"
    );
}

#[test]
fn new_source_files_appear_after_the_listing_ttl() {
    let w = Work::new();
    write_file(&w.src().join("first.bin"), 100, 1);
    let m = w.mount(&["--listing-ttl", "1"]);
    assert_eq!(std::fs::read_dir(&m.mp).unwrap().count(), 1);
    write_file(&w.src().join("second.bin"), 3 << 20, 2);
    wait_until("second.bin to appear", Duration::from_secs(10), || {
        m.path("second.bin").exists()
    });
    assert_same_file(&w.src().join("second.bin"), &m.path("second.bin"));
}

#[test]
fn stat_reports_the_documented_keys() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 3 << 20, 3);
    let m = w.mount(&[]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let s = m.stats();
    for key in [
        "bytes_served",
        "bytes_from_cache",
        "bytes_from_source",
        "bytes_from_peers",
        "bytes_from_warmup",
        "chunks_cached",
        "chunks_evicted",
        "cache_bytes_used",
        "cache_bytes_capacity",
        "passthrough_opens",
    ] {
        assert!(s[key].is_u64(), "stat --json lacks {key}: {s}");
    }
    assert_eq!(s["bytes_served"].as_u64(), Some(3 << 20));
    assert_eq!(s["bytes_from_source"].as_u64(), Some(3 << 20));
    assert_eq!(s["cache_bytes_capacity"].as_u64(), Some(2 << 30));
    let human = run(&["stat", m.mp.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("from source") && text.contains("passthrough"),
        "{text}"
    );
}

#[test]
fn prometheus_metrics_follow_the_counters() {
    use std::io::{Read, Write};
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5 << 20, 4);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = w.mount(&["--metrics-listen", &addr]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let scrape = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let want = format!("modelfs_read_bytes_total{{tier=\"source\"}} {}", 5 << 20);
    wait_until(
        "the metrics to show the read",
        Duration::from_secs(15),
        || scrape().contains(&want),
    );
    assert!(scrape().contains("modelfs_cache_capacity_bytes"));
}
