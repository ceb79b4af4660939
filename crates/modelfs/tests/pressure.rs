//! The mount under pressure: what it is in the mount table, restarts over a
//! dead mount, a flaky origin, and many files with few descriptors.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The fstype of the mount at `mp` in this process's mountinfo.
fn fstype(mp: &Path) -> Option<String> {
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

/// A FUSE mount that is not modelfs (bindfs), taken down when dropped.
struct Bindfs {
    mp: PathBuf,
}

impl Bindfs {
    fn new(src: &Path, mp: &Path) -> Bindfs {
        let out = Command::new("bindfs")
            .arg(src)
            .arg(mp)
            .output()
            .expect("bindfs is required (./test.sh installs it)");
        assert!(
            out.status.success(),
            "bindfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Bindfs {
            mp: mp.to_path_buf(),
        }
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        if is_mounted(&self.mp) {
            let _ = nix::mount::umount2(&self.mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn unmount_refuses_a_mount_that_is_not_modelfs() {
    let w = Work::new();
    let data = write_file(&w.src().join("f.bin"), 5000, 2);
    let foreign = Bindfs::new(&w.src(), &w.mnt());
    let out = run(&["unmount", foreign.mp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "unmount of a bindfs mount succeeded");
    assert!(err.contains("not a modelfs mount"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(is_mounted(&foreign.mp), "the bindfs mount was taken down");
    assert!(std::fs::read(foreign.mp.join("f.bin")).unwrap() == data);
}

/// SIGKILLs the daemon of `m` and waits until it is gone.
fn kill_daemon(m: &Mount) {
    let pid = m.stat_u64("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the daemon to die", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn unmount_detaches_a_modelfs_mount_whose_daemon_died() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 3);
    let m = w.mount(&[]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    kill_daemon(&m);
    let out = run(&["unmount", m.mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&m.mp));
}

#[test]
fn a_mount_over_a_killed_daemons_mount_point_succeeds() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), (3 << 20) + 17, 4);
    let m = w.mount(&[]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    kill_daemon(&m);
    let again = w.mount(&[]);
    assert_eq!(fstype(&again.mp).as_deref(), Some("fuse.modelfs"));
    assert_same_file(&w.src().join("f.bin"), &again.path("f.bin"));
    drop(again);
    assert!(
        !is_mounted(&w.mnt()),
        "a stale mount stayed under the new one"
    );
}

#[test]
fn a_live_mount_is_not_mounted_over() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 5);
    let m = w.mount(&[]);
    let other = tempfile::Builder::new()
        .prefix("modelfs-test-cache")
        .tempdir_in("/dev/shm")
        .unwrap();
    let out = run(&[
        "mount",
        w.src().to_str().unwrap(),
        m.mp.to_str().unwrap(),
        "--cache-dir",
        other.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already mounted"),
        "{err}"
    );
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
}
