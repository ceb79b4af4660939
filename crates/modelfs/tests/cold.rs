//! The cold read path with chunk buffers reused and a byte budget on what
//! is fetched and not yet released (`--max-inflight`): readers of pieces of
//! one chunk, reads across chunk boundaries and files not a multiple of the
//! chunk size all get the source's bytes, from a local dir (one pread into a
//! reused buffer) and from S3 (the body streamed into it).
mod common;

use std::path::Path;
use std::process::Command;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use common::*;

/// Eight threads of random preads (up to three chunks long, across chunk
/// boundaries and past the end) over `files`, each checked against `src`.
/// Readers that wait on each other for the budget would never finish: that
/// is reported as a failure rather than left to hang the test run.
fn unaligned_readers(mnt: &Path, src: &Path, files: &[&str]) {
    let wants: Vec<Vec<u8>> = files
        .iter()
        .map(|n| std::fs::read(src.join(n)).unwrap())
        .collect();
    let (mnt, files) = (
        mnt.to_path_buf(),
        files.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
    );
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        readers(&mnt, &wants, &files);
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(300)) {
        Ok(()) => {}
        Err(RecvTimeoutError::Timeout) => panic!("readers still waiting after 300 s: a deadlock"),
        Err(RecvTimeoutError::Disconnected) => panic!("a reader failed (see above)"),
    }
}

fn readers(mnt: &Path, wants: &[Vec<u8>], files: &[String]) {
    std::thread::scope(|s| {
        for t in 0..8u64 {
            s.spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for _ in 0..60 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let which = (x >> 60) as usize % files.len();
                    let (name, want) = (&files[which], &wants[which]);
                    let off = (x >> 16) % (want.len() as u64 + 4096);
                    let len = ((x >> 4) % (3 << 20)) as usize + 1;
                    let got = pread(&mnt.join(name), off, len).unwrap();
                    let from = (off as usize).min(want.len());
                    let to = (off as usize + len).min(want.len());
                    assert!(got == want[from..to], "{name}: pread at {off} len {len}");
                }
            });
        }
    });
}

/// Every file read whole by its own `cmp`, all at once.
fn concurrent_cmp(mnt: &Path, src: &Path, files: &[&str]) {
    let readers: Vec<_> = files
        .iter()
        .map(|n| {
            Command::new("cmp")
                .arg(src.join(n))
                .arg(mnt.join(n))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut r in readers {
        assert!(r.wait().unwrap().success(), "a reader saw different bytes");
    }
}

const FILES: [(&str, usize); 3] = [
    ("a.bin", (5 << 20) + 4097),
    ("b.bin", 3 << 20),
    ("c.bin", 777),
];

#[test]
fn a_one_chunk_budget_serves_every_byte_of_a_local_dir() {
    let w = Work::new();
    for (i, (n, len)) in FILES.iter().enumerate() {
        write_file(&w.src().join(n), *len, 40 + i as u64);
    }
    let names: Vec<&str> = FILES.iter().map(|f| f.0).collect();
    let m = w.mount(&["--chunk-size", "1MiB", "--max-inflight", "1MiB"]);
    // Cold: readers of pieces, then whole files, then pieces again from the
    // cache (and through passthrough once a file is complete).
    unaligned_readers(&m.mp, &w.src(), &names);
    concurrent_cmp(&m.mp, &w.src(), &names);
    for n in &names {
        drop_page_cache(&m.path(n));
    }
    unaligned_readers(&m.mp, &w.src(), &names);
    let total: usize = FILES.iter().map(|f| f.1).sum();
    let from_source = m.stat_u64("bytes_from_source");
    assert!(
        from_source >= total as u64 && from_source <= 2 * total as u64,
        "{from_source} bytes from the source for {total}"
    );
}

#[test]
fn a_one_chunk_budget_serves_every_byte_from_s3() {
    let g = s3::garage();
    let w = Work::new();
    for (i, (n, len)) in FILES.iter().enumerate() {
        write_file(&w.src().join(n), *len, 50 + i as u64);
    }
    let names: Vec<&str> = FILES.iter().map(|f| f.0).collect();
    let said = g.push(&w.src(), "s3://models/cold-budget");
    assert!(said.contains("pushed 3 files"), "{said}");
    let m = w.mount_s3(
        "s3://models/cold-budget",
        &["--chunk-size", "1MiB", "--max-inflight", "1MiB"],
    );
    unaligned_readers(&m.mp, &w.src(), &names);
    concurrent_cmp(&m.mp, &w.src(), &names);
    let total: usize = FILES.iter().map(|f| f.1).sum();
    let from_source = m.stat_u64("bytes_from_source");
    assert!(
        from_source >= total as u64 && from_source <= 2 * total as u64,
        "{from_source} bytes from the source for {total}"
    );
}
