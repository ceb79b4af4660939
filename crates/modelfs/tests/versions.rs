//! A changed source file is a new version: never stale, never mixed.
mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

fn replace(path: &std::path::Path, len: usize, seed: u64) -> Vec<u8> {
    // A new mtime even on file systems with coarse timestamps.
    std::thread::sleep(Duration::from_millis(20));
    let tmp = path.with_extension("tmp");
    let data = write_file(&tmp, len, seed);
    std::fs::rename(&tmp, path).unwrap();
    data
}

#[test]
fn a_changed_file_is_served_as_the_new_version_only() {
    let w = Work::new();
    let p = w.src().join("a.bin");
    let v1 = write_file(&p, 8 << 20, 1);
    let m = w.mount(&["--chunk-size", "1MiB"]);
    assert!(std::fs::read(m.path("a.bin")).unwrap() == v1);
    let v2 = replace(&p, 8 << 20, 2);
    assert!(
        std::fs::read(m.path("a.bin")).unwrap() == v2,
        "same size, new bytes"
    );
    let v3 = replace(&p, (5 << 20) + 7, 3);
    assert!(std::fs::read(m.path("a.bin")).unwrap() == v3, "new size");
    assert_eq!(
        std::fs::metadata(m.path("a.bin")).unwrap().len(),
        v3.len() as u64
    );
    // In place, without a rename: the same inode, a new mtime.
    std::thread::sleep(Duration::from_millis(20));
    let v4 = pattern(v3.len(), 4);
    std::fs::write(&p, &v4).unwrap();
    assert!(
        std::fs::read(m.path("a.bin")).unwrap() == v4,
        "rewritten in place"
    );
}

#[test]
fn an_open_handle_never_mixes_two_versions() {
    let w = Work::new();
    let p = w.src().join("a.bin");
    let v1 = write_file(&p, 8 << 20, 1);
    let m = w.mount(&["--chunk-size", "1MiB", "--prefetch-concurrency", "0"]);
    let f = std::fs::File::open(m.path("a.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == v1[..1 << 20]);
    let v2 = replace(&p, 8 << 20, 2);
    // Chunk 4 was never cached and the source no longer has version 1.
    let r = f.read_exact_at(&mut buf, 4 << 20);
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        Ok(()) => panic!("the old handle read bytes its version no longer has"),
    }
    assert!(buf != v2[4 << 20..5 << 20]);
    // What the old handle had cached is still its own version.
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == v1[..1 << 20]);
    // A new open sees the new version.
    assert!(std::fs::read(m.path("a.bin")).unwrap() == v2);
    assert!(m.stat_u64("version_changes") >= 1);
}

#[test]
fn a_file_that_vanishes_mid_read_gives_eio() {
    let w = Work::new();
    let p = w.src().join("gone.bin");
    let v1 = write_file(&p, 6 << 20, 8);
    let m = w.mount(&["--chunk-size", "1MiB", "--prefetch-concurrency", "0"]);
    let f = std::fs::File::open(m.path("gone.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == v1[..4096]);
    std::fs::remove_file(&p).unwrap();
    let e = f.read_exact_at(&mut buf, 3 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(m.stat_u64("read_errors") >= 1);
}
