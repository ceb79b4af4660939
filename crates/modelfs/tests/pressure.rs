//! The mount under pressure: what it is in the mount table, restarts over a
//! dead mount, a flaky origin, and many files with few descriptors.
mod common;

use common::*;

/// The fstype of the mount at `mp` in this process's mountinfo.
fn fstype(mp: &std::path::Path) -> Option<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines()
        .filter(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
        .filter_map(|l| {
            let (_, after) = l.split_once(" - ")?;
            after.split(' ').next().map(str::to_string)
        })
        .next_back()
}

#[test]
fn a_mount_is_fuse_modelfs_in_the_mount_table() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 70_000, 1);
    let m = w.mount(&[]);
    assert_eq!(fstype(&m.mp).as_deref(), Some("fuse.modelfs"));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = format!(" {} fuse.modelfs ", m.mp.display());
    assert!(mounts.contains(&line), "{mounts}");
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
}
