//! The chunk cache through the mount: single-flight, eviction, restart, passthrough.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn eight_concurrent_readers_read_the_source_about_once() {
    let w = Work::new();
    let size = 256 << 20;
    write_file(&w.src().join("big.safetensors"), size, 9);
    let m = w.mount(&[]);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            Command::new("cmp")
                .arg(w.src().join("big.safetensors"))
                .arg(m.path("big.safetensors"))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut r in readers {
        assert!(r.wait().unwrap().success(), "a reader saw different bytes");
    }
    let from_source = m.stat_u64("bytes_from_source");
    assert!(from_source >= size as u64, "{from_source}");
    assert!(
        from_source as f64 <= size as f64 * 1.05,
        "8 readers pulled {from_source} bytes from the source for a {size}-byte file"
    );
}

#[test]
fn eviction_under_a_small_capacity_keeps_bytes_correct() {
    let w = Work::new();
    let names: Vec<String> = (0..4).map(|i| format!("shard-{i}.bin")).collect();
    for (i, n) in names.iter().enumerate() {
        write_file(&w.src().join(n), 48 << 20, 100 + i as u64);
    }
    let m = w.mount(&[
        "--cache-size",
        "64MiB",
        "--chunk-size",
        "4MiB",
        "--threads",
        "8",
    ]);
    for round in 0..2 {
        for n in names
            .iter()
            .rev()
            .skip(round)
            .chain(names.iter().take(round))
        {
            drop_page_cache(&m.path(n));
            assert_same_file(&w.src().join(n), &m.path(n));
        }
    }
    let s = m.stats();
    assert!(s["chunks_evicted"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cache_bytes_used"].as_u64().unwrap() <= 64 << 20, "{s}");
    // Random reads after all that eviction.
    let src = std::fs::read(w.src().join(&names[1])).unwrap();
    for k in 0..50u64 {
        let off = (k * 7_654_321) % (src.len() as u64 - 70_000);
        let got = pread(&m.path(&names[1]), off, 70_000).unwrap();
        assert!(
            got == src[off as usize..off as usize + 70_000],
            "offset {off}"
        );
    }
}

#[test]
fn a_restart_reuses_the_cache_and_rejects_corrupt_chunks() {
    let w = Work::new();
    let size = 40 << 20;
    write_file(&w.src().join("m.bin"), size, 5);
    let args = ["--chunk-size", "4MiB"];
    {
        let m = w.mount(&args);
        assert_same_file(&w.src().join("m.bin"), &m.path("m.bin"));
        assert_eq!(m.stat_u64("bytes_from_source"), size as u64);
    }
    {
        let m = w.mount(&args);
        assert_same_file(&w.src().join("m.bin"), &m.path("m.bin"));
        assert_eq!(
            m.stat_u64("bytes_from_source"),
            0,
            "a restart must reuse the cache"
        );
    }
    let data = std::fs::read_dir(w.cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"corrupted!", (4 << 20) + 10).unwrap();
    drop(f);
    let m = w.mount(&args);
    assert_same_file(&w.src().join("m.bin"), &m.path("m.bin"));
    let s = m.stats();
    assert_eq!(s["crc_failures"].as_u64(), Some(1), "{s}");
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some(4 << 20),
        "only the bad chunk is fetched again: {s}"
    );
}

#[test]
fn a_fully_cached_file_is_served_through_passthrough() {
    let w = Work::new();
    let size = (24 << 20) + 5;
    write_file(&w.src().join("p.bin"), size, 6);
    let m = w.mount(&["--chunk-size", "4MiB"]);
    assert_same_file(&w.src().join("p.bin"), &m.path("p.bin"));
    wait_until("all chunks cached", Duration::from_secs(20), || {
        m.stat_u64("chunks_cached") == 7
    });
    assert_eq!(m.stats()["passthrough"], "enabled");
    drop_page_cache(&m.path("p.bin"));
    assert_same_file(&w.src().join("p.bin"), &m.path("p.bin"));
    // mmap through passthrough as well.
    let f = std::fs::File::open(m.path("p.bin")).unwrap();
    // SAFETY: read-only map of a read-only file.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    assert!(map[..] == std::fs::read(w.src().join("p.bin")).unwrap()[..]);
    let s = m.stats();
    assert!(s["passthrough_opens"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["bytes_from_source"].as_u64(), Some(size as u64), "{s}");
}
