//! The mount under pressure: what it is in the mount table, restarts over a
//! dead mount, a flaky origin, and many files with few descriptors.
mod common;

use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::s3::{garage, Fault, Proxy};
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

/// `count` files of 2 to 6 KiB, each its own bytes, spread over 20 dirs.
fn many_small_files(src: &Path, count: u64) -> Vec<String> {
    (0..count)
        .map(|i| {
            let rel = format!("d{:02}/f{i:05}.bin", i % 20);
            write_file(&src.join(&rel), 2048 + (i as usize * 37) % 4096, 1000 + i);
            rel
        })
        .collect()
}

/// Mounts with the daemon started under `limit` (a bash `ulimit` command).
fn mount_under(w: &Work, limit: &str) -> Mount {
    let out = Command::new("bash")
        .args(["-c", &format!("{limit} && exec \"$0\" \"$@\""), bin()])
        .args([
            "mount",
            w.src().to_str().unwrap(),
            w.mnt().to_str().unwrap(),
        ])
        .arg("--cache-dir")
        .arg(w.cache.path())
        .args(["--cache-size", "2GiB"])
        .output()
        .unwrap();
    // The guard first, so the mount comes down even if the check fails.
    let m = Mount { mp: w.mnt() };
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    m
}

/// (soft, hard) "Max open files" of a process.
fn open_files_limit(pid: u64) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

fn fd_count(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn forgotten_inodes_leave_the_table_and_the_soft_fd_limit_is_raised() {
    let w = Work::new();
    let files = many_small_files(&w.src(), 2000);
    let m = mount_under(&w, "ulimit -Sn 256");
    let pid = m.stat_u64("pid");
    let (soft, hard) = open_files_limit(pid);
    assert_eq!(soft, hard, "the daemon keeps a soft limit of {soft}");
    for rel in &files {
        assert_same_file(&w.src().join(rel), &m.path(rel));
    }
    let known = m.stat_u64("inodes");
    assert!(known > 2000, "{known} inodes after 2000 lookups");
    let held = std::fs::File::open(m.path(&files[7])).unwrap();
    // Reclaims every unused dentry and inode, as memory pressure would; the
    // kernel then forgets the mount's inodes.
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    wait_until("the kernel to forget", Duration::from_secs(10), || {
        m.stat_u64("inodes") < 50
    });
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut buf).unwrap();
    assert!(buf == std::fs::read(w.src().join(&files[7])).unwrap());
    // Forgotten files are looked up again, under new inodes.
    for rel in files.iter().step_by(97) {
        drop_page_cache(&m.path(rel));
        assert_same_file(&w.src().join(rel), &m.path(rel));
    }
}

#[test]
fn twenty_thousand_files_read_under_ulimit_1024() {
    let w = Work::new();
    let files = many_small_files(&w.src(), 20_000);
    let m = mount_under(&w, "ulimit -n 1024");
    let pid = m.stat_u64("pid");
    assert_eq!(open_files_limit(pid).0, "1024");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let errors = std::sync::Mutex::new(Vec::new());
    let max_fds = std::sync::atomic::AtomicUsize::new(fd_count(pid));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(rel) = files.get(i) else { return };
                match std::fs::read(m.path(rel)) {
                    Ok(got) if got == std::fs::read(w.src().join(rel)).unwrap() => {}
                    Ok(_) => errors.lock().unwrap().push(format!("{rel}: wrong bytes")),
                    Err(e) => errors.lock().unwrap().push(format!("{rel}: {e}")),
                }
                if i.is_multiple_of(250) {
                    max_fds.fetch_max(fd_count(pid), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let max_fds = max_fds.into_inner().max(fd_count(pid));
    let errors = errors.into_inner().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} files failed (daemon fds up to {max_fds}); first: {:?}",
        errors.len(),
        files.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(max_fds < 900, "the daemon held {max_fds} fds");
}

#[test]
fn stat_into_a_closed_pipe_exits_quietly() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 6);
    let m = w.mount(&[]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    for json in [false, true] {
        // What `modelfs stat MOUNT | head -1` meets once head has exited.
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds that we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds from pipe; the read end is closed at once.
        let write_end = unsafe {
            drop(std::os::fd::OwnedFd::from_raw_fd(fds[0]));
            std::os::fd::OwnedFd::from_raw_fd(fds[1])
        };
        let mut cmd = Command::new(bin());
        cmd.args(["stat", m.mp.to_str().unwrap()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .stdout(std::process::Stdio::from(write_end))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "json {json}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_failed_check_at_open_is_eio_and_the_file_stays_listed() {
    let g = garage();
    let w = Work::new();
    write_file(&w.src().join("a.bin"), (3 << 20) + 5, 31);
    write_file(&w.src().join("b.bin"), 70_000, 32);
    g.push(&w.src(), "s3://models/flaky-open");
    let proxy = Proxy::start(g.addr());
    let m = Mount::new(
        "s3://models/flaky-open",
        &w.mnt(),
        w.cache.path(),
        &[
            "--endpoint",
            &proxy.endpoint(),
            "--retries",
            "0",
            "--request-timeout",
            "2",
        ],
        &g.env,
    );
    let names = || {
        let mut n: Vec<String> = std::fs::read_dir(&m.mp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(), ["a.bin", "b.bin"]);
    for fault in [Fault::Unavailable, Fault::Reset] {
        proxy.set(fault);
        let e = std::fs::File::open(m.path("a.bin")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{fault:?}: {e}");
        proxy.set(Fault::Pass);
        assert_eq!(names(), ["a.bin", "b.bin"], "after {fault:?}");
        assert_same_file(&w.src().join("a.bin"), &m.path("a.bin"));
    }
}
