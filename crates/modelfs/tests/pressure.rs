//! The mount under pressure: what it is in the mount table, restarts over a
//! dead mount, a flaky origin, many files with few descriptors, and a cache
//! too small for its model or its filesystem (mappings that outlive their fd,
//! origin storms, a full cache filesystem, unsafe cache dirs).
mod common;

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
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

/// The write end of a pipe whose read end is closed: what `modelfs ... |
/// head -1` meets once head has exited.
fn closed_pipe() -> std::process::Stdio {
    let mut fds = [0; 2];
    // Close-on-exec: no child of another test may hold the read end open.
    // SAFETY: pipe2 fills two fds that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds from pipe; the read end is closed at once.
    let write_end = unsafe {
        drop(std::os::fd::OwnedFd::from_raw_fd(fds[0]));
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    std::process::Stdio::from(write_end)
}

fn quiet_success(what: &str, out: &Output) {
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stat_into_a_closed_pipe_exits_quietly() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 6);
    let m = w.mount(&[]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    for json in [false, true] {
        let mut cmd = Command::new(bin());
        cmd.args(["stat", m.mp.to_str().unwrap()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.stdout(closed_pipe()).output().unwrap();
        quiet_success(&format!("json {json}"), &out);
    }
}

/// Mount and unmount print a line when done; a reader of it that went away
/// changes neither what they did nor their exit status.
#[test]
fn mount_and_unmount_into_a_closed_pipe_succeed() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 7);
    let mp = w.mnt();
    let out = Command::new(bin())
        .args(["mount", w.src().to_str().unwrap(), mp.to_str().unwrap()])
        .args(["--cache-dir", w.cache.path().to_str().unwrap()])
        .args(["--cache-size", "64MiB"])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    // Unmounted by the guard if the checks below fail.
    let m = Mount { mp: mp.clone() };
    quiet_success("mount", &out);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let out = Command::new(bin())
        .args(["unmount", mp.to_str().unwrap()])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    quiet_success("unmount", &out);
    assert!(!is_mounted(&mp));
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

// ---- The cache under pressure (issue #8) ----

const MIB: usize = 1 << 20;

/// Runs `modelfs mount` with exactly `args` after the source and mount
/// point (no `--cache-size` added), returning its output and a guard that
/// takes the mount down if it came up.
fn try_mount(w: &Work, args: &[&str]) -> (Output, Mount) {
    let (src, mnt) = (w.src(), w.mnt());
    let mut all = vec!["mount", src.to_str().unwrap(), mnt.to_str().unwrap()];
    all.extend(args);
    let out = run(&all);
    (out, Mount { mp: w.mnt() })
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Where the first difference between what was read and the source is, and
/// whether the bytes read there are zeros (a punched hole).
fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} bytes instead of {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let zeros = got[i..].iter().take(4096).all(|&b| b == 0);
    Some(format!(
        "first difference at byte {i} (zeros there: {zeros})"
    ))
}

#[test]
fn a_mapping_that_outlives_its_fd_keeps_its_bytes() {
    let w = Work::new();
    let model = write_file(&w.src().join("model.bin"), 64 * MIB, 81);
    write_file(&w.src().join("other1.bin"), 48 * MIB, 82);
    write_file(&w.src().join("other2.bin"), 48 * MIB, 83);
    let m = w.mount(&["--cache-size", "96MiB", "--chunk-size", "4MiB"]);
    assert_eq!(m.stats()["passthrough"], "enabled", "{}", m.stats());
    assert_same_file(&w.src().join("model.bin"), &m.path("model.bin"));
    // Passthrough is chosen at open only for a file whose chunks are all
    // cached.
    wait_until("the model to be cached", Duration::from_secs(10), || {
        m.stat_u64("chunks_cached") >= 16
    });
    let before = m.stat_u64("passthrough_opens");
    let f = std::fs::File::open(m.path("model.bin")).unwrap();
    assert!(
        m.stat_u64("passthrough_opens") > before,
        "the second open was not passthrough: {}",
        m.stats()
    );
    // SAFETY: a read-only shared mapping of a file nobody writes.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    // The fd goes; the mapping stays, as after torch/safetensors loads.
    drop(f);
    // 96 MiB more through a 96 MiB cache: the model's chunks are the least
    // recently used and must make room.
    assert_same_file(&w.src().join("other1.bin"), &m.path("other1.bin"));
    assert_same_file(&w.src().join("other2.bin"), &m.path("other2.bin"));
    assert!(m.stat_u64("chunks_evicted") > 0, "{}", m.stats());
    if let Some(d) = first_difference(&map, &model) {
        panic!(
            "the mapping changed after eviction: {d}; stats {}",
            m.stats()
        );
    }
    let retired = m.stat_u64("cache_bytes_retired");
    assert!(retired > 0, "nothing retired while mapped: {}", m.stats());
    drop(map);
    // Its memory goes with the last mapping.
    wait_until("the retired file to go", Duration::from_secs(10), || {
        m.stat_u64("cache_bytes_retired") == 0
    });
}

/// The default --prefetch-window (1GiB), at most half the cache: what
/// prefetch may fetch that no reader asked for.
fn default_window(cache: u64) -> u64 {
    (1u64 << 30).min(cache / 2)
}

/// Reads `range` of `f` in 1 MiB preads, each checked against `want`.
fn read_checked(f: &std::fs::File, want: &[u8], range: std::ops::Range<usize>) {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; MIB];
    for off in range.step_by(MIB) {
        let n = MIB.min(want.len() - off);
        f.read_exact_at(&mut buf[..n], off as u64)
            .unwrap_or_else(|e| panic!("read at {off}: {e}"));
        if let Some(d) = first_difference(&buf[..n], &want[off..off + n]) {
            panic!("read at {off}: {d}");
        }
    }
}

#[test]
fn a_paused_reader_does_not_storm_the_origin() {
    use std::os::fd::AsRawFd;
    let w = Work::new();
    let data = write_file(&w.src().join("big.bin"), 256 * MIB, 84);
    let m = w.mount(&["--cache-size", "64MiB", "--chunk-size", "4MiB"]);
    let window = default_window(64 << 20);
    // Two chunks: fetches in flight when a count is read.
    let slack = 2 * (4 << 20);
    let f = std::fs::File::open(m.path("big.bin")).unwrap();
    // No kernel readahead on this fd: the bytes the mount is asked for are
    // the bytes this reader reads, so the bound measures modelfs' prefetch.
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    read_checked(&f, &data, 0..32 * MIB);
    // The deliberate pause: a loader busy elsewhere while prefetch runs on
    // with a full cache (the old code refetched what found no room, in a
    // loop).
    std::thread::sleep(Duration::from_secs(4));
    let paused = m.stat_u64("bytes_from_source");
    assert!(
        paused <= (32 << 20) + window + slack,
        "{paused} bytes from the origin for 32 MiB read: {}",
        m.stats()
    );
    read_checked(&f, &data, 32 * MIB..data.len());
    let total = m.stat_u64("bytes_from_source");
    eprintln!("origin bytes: {paused} after the pause, {total} in all");
    assert!(
        total <= data.len() as u64 + window + slack,
        "{total} bytes from the origin for {} read: {}",
        data.len(),
        m.stats()
    );
}

fn sha256_of_tar(dir: &Path) -> String {
    // Sorted by name, so the mount and the source give the same stream.
    let out = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; tar cf - --sort=name -C \"$1\" . | tar xOf - | sha256sum",
            "sh",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar of {}: {}",
        dir.display(),
        stderr_of(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn real_clients_over_a_model_bigger_than_the_cache() {
    let w = Work::new();
    w.synth("300MiB", 3);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(w.src())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let len = e.metadata().unwrap().len();
            (e.file_name().into_string().unwrap(), len)
        })
        .collect();
    files.sort();
    let model_bytes: u64 = files.iter().map(|(_, l)| l).sum();
    assert!(files.len() >= 3 && model_bytes > 280 << 20, "{files:?}");
    let want_tar = sha256_of_tar(&w.src());
    let m = w.mount(&["--cache-size", "96MiB", "--chunk-size", "4MiB"]);
    // Four cmp processes, each over every file, each starting at another
    // file, and a tar of the whole mount, all at once.
    let cmps: Vec<std::process::Child> = (0..4)
        .map(|k| {
            let mut order: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
            order.rotate_left(k % files.len());
            Command::new("sh")
                .args([
                    "-c",
                    "for f; do cmp -- \"$SRC/$f\" \"$MNT/$f\" || exit 1; done",
                    "sh",
                ])
                .args(order)
                .env("SRC", w.src())
                .env("MNT", &m.mp)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let got_tar = sha256_of_tar(&m.mp);
    for (k, c) in cmps.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cmp process {k}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr_of(&out)
        );
    }
    assert_eq!(got_tar, want_tar, "the tar of the mount differs");
    // Every client read the whole model once.
    let read = 5 * model_bytes;
    let window = default_window(96 << 20);
    let slack = 2 * (4 << 20);
    let s = m.stats();
    let from_source = s["bytes_from_source"].as_u64().unwrap();
    eprintln!("origin bytes: {from_source} for {read} read by the clients");
    assert!(
        from_source <= read + window + slack,
        "{from_source} bytes from the origin for {read} read by the clients: {s}"
    );
    assert_eq!(s["read_errors"], 0, "{s}");
}

#[test]
fn a_cache_that_does_not_fit_its_filesystem_is_refused() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 85);
    let fs = Tmpfs::new(64 * MIB);
    let cache = fs.path().join("cache");
    // The default --cache-size (20GiB) on a 64 MiB filesystem.
    let (out, _m) = try_mount(&w, &["--cache-dir", cache.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "mounted: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("does not fit") && err.contains("--cache-size") && err.contains("20GiB"),
        "{err}"
    );
    // The other size: what the filesystem has, in MiB.
    assert!(err.contains("MiB"), "{err}");
    assert!(!is_mounted(&w.mnt()), "mounted anyway: {err}");
}

#[test]
fn a_full_cache_filesystem_serves_uncached_instead_of_eio() {
    let w = Work::new();
    let names = ["a.bin", "b.bin", "c.bin"];
    for (i, n) in names.iter().enumerate() {
        write_file(&w.src().join(n), 32 * MIB, 86 + i as u64);
    }
    let fs = Tmpfs::new(64 * MIB);
    let cache = fs.path().join("cache");
    let m = Mount::new(
        w.src().to_str().unwrap(),
        &w.mnt(),
        &cache,
        &["--cache-size", "48MiB", "--chunk-size", "4MiB"],
        &[],
    );
    // Something else fills the filesystem after the mount: about 8 MiB
    // stay free for a 48 MiB cache.
    fs.fill_leaving(8 * MIB);
    for n in names {
        match std::fs::read(m.path(n)) {
            Ok(got) => {
                let want = std::fs::read(w.src().join(n)).unwrap();
                if let Some(d) = first_difference(&got, &want) {
                    panic!("{n}: {d}; stats {}", m.stats());
                }
            }
            Err(e) => panic!("{n}: {e}; stats {}", m.stats()),
        }
    }
    let s = m.stats();
    let capacity = s["cache_bytes_capacity"].as_u64().unwrap();
    let effective = s["cache_bytes_capacity_effective"].as_u64().unwrap();
    let write_errors = s["cache_write_errors"].as_u64().unwrap();
    assert!(
        write_errors > 0 || effective < capacity,
        "the full filesystem went unnoticed: {s}"
    );
    assert_eq!(s["read_errors"], 0, "{s}");
}

/// An object store's body goes into the cache file piece by piece as it
/// arrives: when the cache's filesystem fills in the middle of a chunk, the
/// pieces already written are taken back into memory and the chunk is
/// served whole, from the one fetch.
#[test]
fn a_cache_filesystem_that_fills_mid_chunk_under_an_object_store_serves_every_byte() {
    let g = garage();
    let w = Work::new();
    let names = ["a.bin", "b.bin", "c.bin"];
    for (i, n) in names.iter().enumerate() {
        write_file(&w.src().join(n), 24 * MIB, 186 + i as u64);
    }
    g.push(&w.src(), "s3://models/fills");
    let fs = Tmpfs::new(64 * MIB);
    let cache = fs.path().join("cache");
    let m = Mount::new(
        "s3://models/fills",
        &w.mnt(),
        &cache,
        &[
            "--endpoint",
            &g.endpoint,
            "--cache-size",
            "48MiB",
            "--chunk-size",
            "4MiB",
            "--prefetch-concurrency",
            "2",
        ],
        &g.env,
    );
    // 10 MiB stay free: two chunks fit, the third fills it half way.
    fs.fill_leaving(10 * MIB);
    for n in names {
        let got = std::fs::read(m.path(n)).unwrap_or_else(|e| panic!("{n}: {e}; {}", m.stats()));
        let want = std::fs::read(w.src().join(n)).unwrap();
        if let Some(d) = first_difference(&got, &want) {
            panic!("{n}: {d}; stats {}", m.stats());
        }
    }
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    assert!(
        stat("cache_write_errors") > 0,
        "the filesystem never filled: {s}"
    );
    assert!(stat("chunks_streamed") > 0, "nothing was streamed: {s}");
    assert_eq!(s["read_errors"], 0, "{s}");
    // A chunk whose write failed was fetched whole once and served; what
    // its reader asks of it next comes from the origin piece by piece, as
    // for any chunk with no room: never more than once more. So for an
    // evicted chunk, read or not.
    let total = 3 * 24 * MIB as u64;
    let again = stat("cache_write_errors") + stat("chunks_evicted");
    assert!(
        stat("bytes_from_source") <= total + again * 4 * MIB as u64,
        "{} bytes from the origin for {total}: {s}",
        stat("bytes_from_source")
    );
}

/// The bytes the files under `dir` take on their filesystem.
/// A file the daemon removes meanwhile counts for nothing.
fn blocks_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match std::fs::symlink_metadata(e.path()) {
            Ok(md) if md.is_dir() => blocks_under(&e.path()),
            Ok(md) => md.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// A daemon killed while an object store's body streams into the cache
/// file leaves part of a chunk written and not in the index, beside chunks
/// that are: the next daemon keeps those and frees the partial chunk's
/// blocks when it restores the cache, then fetches that chunk again, whole.
#[test]
fn a_daemon_killed_mid_stream_leaves_no_blocks_behind() {
    const CHUNK: u64 = 4 * MIB as u64;
    let g = garage();
    let w = Work::new();
    let want = write_file(&w.src().join("a.bin"), 24 * MIB, 193);
    g.push(&w.src(), "s3://models/killed");
    let proxy = Proxy::start(g.addr());
    let endpoint = proxy.endpoint();
    let fs = Tmpfs::new(64 * MIB);
    let cache = fs.path().join("cache");
    let args = [
        "--endpoint",
        &endpoint,
        "--cache-size",
        "48MiB",
        "--chunk-size",
        "4MiB",
        "--prefetch-window",
        "4MiB",
        "--prefetch-concurrency",
        "1",
        // The stalled bodies must not time out (and be taken back) before
        // the kill.
        "--request-timeout",
        "600",
    ];
    let m = Mount::new("s3://models/killed", &w.mnt(), &cache, &args, &g.env);
    // The first chunk read, and what prefetch takes after it, get cached.
    let f = std::fs::File::open(m.path("a.bin")).unwrap();
    // No kernel readahead: this reader alone decides what is asked for.
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    read_checked(&f, &want, 0..CHUNK as usize);
    // The 4 MiB window holds one chunk ahead: two in all, none in flight.
    let cached = 2;
    wait_until("prefetch to settle", Duration::from_secs(30), || {
        let s = m.stats();
        let stat = |k: &str| s[k].as_u64().unwrap();
        stat("chunks_cached") == cached
            && stat("source_requests") == cached
            && stat("bytes_from_source") == cached * CHUNK
    });
    drop(f);
    // Then the origin sends 2 MiB more, in all, and stalls: the chunks
    // asked for next are only partly written when the daemon dies.
    let cut = proxy.cut_after(2 * MIB);
    // What it reads is compared as it goes: cmp stops at a difference.
    let mut reader = Kid(Command::new("cmp")
        .arg(w.src().join("a.bin"))
        .arg(m.path("a.bin"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap());
    wait_until(
        "part of a chunk in the cache file",
        Duration::from_secs(30),
        || blocks_under(&cache) >= cached * CHUNK + MIB as u64,
    );
    assert_eq!(m.stat_u64("chunks_cached"), cached, "{}", m.stats());
    assert!(
        reader.0.try_wait().unwrap().is_none(),
        "the reader stopped before the kill (a difference?)"
    );
    kill_daemon(&m);
    drop(reader);
    let left = blocks_under(&cache);
    assert!(
        left >= cached * CHUNK + MIB as u64,
        "the kill left {left} bytes"
    );
    drop(cut);
    let again = Mount::new("s3://models/killed", &w.mnt(), &cache, &args, &g.env);
    assert_eq!(again.stat_u64("chunks_cached"), cached, "{}", again.stats());
    let after = blocks_under(&cache);
    assert!(
        after < cached * CHUNK + (256 << 10),
        "{after} bytes in the cache for {cached} chunks after the restart ({left} before it)"
    );
    let got = std::fs::read(again.path("a.bin")).unwrap();
    if let Some(d) = first_difference(&got, &want) {
        panic!("{d}; stats {}", again.stats());
    }
    let s = again.stats();
    assert_eq!(
        s["bytes_from_source"],
        want.len() as u64 - cached * CHUNK,
        "{s}"
    );
    let full = blocks_under(&cache);
    assert!(
        full < want.len() as u64 + (256 << 10),
        "{full} bytes in the cache for a {} byte file",
        want.len()
    );
    drop(again);
}

/// Pages of `map` in the kernel's page cache (`mincore`).
fn resident_pages(map: &memmap2::Mmap) -> usize {
    let page = 4096;
    let mut vec = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes and `vec` has a
    // byte for each of its pages.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

/// Touches every byte of `map` out of file order, each 64 KiB block checked
/// against `want` as it is touched: chunks in a shuffled order, and the
/// blocks of each chunk in a shuffled order too. On a thread of its own,
/// so that a fault that waits for ever (or a file fetched page by page)
/// fails the test within a bound instead of holding it.
fn touch_out_of_order(map: &Arc<memmap2::Mmap>, want: &Arc<Vec<u8>>, chunk: usize) {
    const BLOCK: usize = 64 << 10;
    let bound = Duration::from_secs(60);
    let (chunks, blocks) = (want.len() / chunk, chunk / BLOCK);
    // Steps coprime with the counts: each chunk and block once.
    assert!(
        !chunks.is_multiple_of(7) && !blocks.is_multiple_of(5) && want.len().is_multiple_of(chunk)
    );
    let (map, want) = (Arc::clone(map), Arc::clone(want));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in (0..chunks).map(|k| k * 7 % chunks) {
            for b in (0..blocks).map(|k| k * 5 % blocks) {
                let at = c * chunk + b * BLOCK;
                if let Some(d) = first_difference(&map[at..at + BLOCK], &want[at..at + BLOCK]) {
                    let _ = tx.send(Err(format!("the mapping at {at}: {d}")));
                    return;
                }
            }
        }
        let _ = tx.send(Ok(()));
    });
    match rx.recv_timeout(bound) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("touching the mapping did not end within {bound:?}: {e}"),
    }
}

/// A mapping made while its file was not all cached (so not passthrough:
/// its pages are the daemon's answers), whose fd is closed at once, as
/// torch/safetensors loads do. An object store's bodies stream into the
/// cache file (the cache is on tmpfs, where the store takes streams:
/// `chunks_streamed` counts them), and the cache holds two thirds of the
/// file: the mapping is read out of order while its chunks are evicted,
/// then its pages leave the page cache and are faulted in again from
/// chunks fetched a second time. Every byte is the source's both times,
/// and the second time costs the origin the file once, no more (prefetch
/// is off, so every fetch is a fault's). The kernel keeps the file open for
/// the mapping: the daemon learns of no release until it is unmapped.
#[test]
fn a_mapping_of_a_streamed_file_outlives_its_fd_under_eviction() {
    const CHUNK: usize = 4 * MIB;
    let g = garage();
    let w = Work::new();
    let model = Arc::new(write_file(&w.src().join("model.bin"), 48 * MIB, 281));
    write_file(&w.src().join("other1.bin"), 16 * MIB, 282);
    write_file(&w.src().join("other2.bin"), 16 * MIB, 283);
    g.push(&w.src(), "s3://models/mapped");
    let fs = Tmpfs::new(64 * MIB);
    let cache = fs.path().join("cache");
    let m = Mount::new(
        "s3://models/mapped",
        &w.mnt(),
        &cache,
        &[
            "--endpoint",
            &g.endpoint,
            "--cache-size",
            "32MiB",
            "--chunk-size",
            "4MiB",
            // Off: what the origin sends is what the mapping's faults ask
            // for, so the bounds below are exact.
            "--prefetch-concurrency",
            "0",
        ],
        &g.env,
    );
    let before = m.stat_u64("passthrough_opens");
    let f = std::fs::File::open(m.path("model.bin")).unwrap();
    assert_eq!(
        m.stat_u64("passthrough_opens"),
        before,
        "an uncached file was opened passthrough: {}",
        m.stats()
    );
    // SAFETY: a read-only shared mapping of a file nobody writes.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&f) }.unwrap());
    // The fd goes; the mapping stays.
    drop(f);
    // No fault-around readahead: the kernel asks the mount for the pages
    // touched, in the order touched.
    map.advise(memmap2::Advice::Random).unwrap();
    touch_out_of_order(&map, &model, CHUNK);
    // Each chunk once, whole and kept (not page by page uncached): it is
    // the most recently used of the cache's 8 while its blocks are touched.
    let chunks = (model.len() / CHUNK) as u64;
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(stat("bytes_from_source"), model.len() as u64, "{s}");
    assert_eq!(stat("source_requests"), chunks, "{s}");
    assert_eq!(stat("reads_uncached"), 0, "{s}");
    let evicted = stat("chunks_evicted");
    // 32 MiB more through the 32 MiB cache: the model's 8 chunks go.
    assert_same_file(&w.src().join("other1.bin"), &m.path("other1.bin"));
    assert_same_file(&w.src().join("other2.bin"), &m.path("other2.bin"));
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    assert!(stat("chunks_evicted") >= evicted + 8, "{s}");
    assert!(stat("chunks_streamed") > 0, "nothing was streamed: {s}");
    assert_eq!(stat("read_errors"), 0, "{s}");
    // Its pages leave the page cache: unmapped from this process, then
    // dropped through a fresh fd of the same mount file.
    // SAFETY: the mapping is read-only and file-backed; its pages are
    // faulted in again from the file when next touched.
    unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }.unwrap();
    drop_page_cache(&m.path("model.bin"));
    let resident = resident_pages(&map);
    assert!(
        resident * 4096 < CHUNK,
        "{resident} pages of the mapping still in the page cache"
    );
    let (from_source, streamed, requests) = (
        stat("bytes_from_source"),
        stat("chunks_streamed"),
        stat("source_requests"),
    );
    touch_out_of_order(&map, &model, CHUNK);
    // The figures of the touch alone: the whole compare below may fault
    // pages in again if memory runs short.
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    if let Some(d) = first_difference(&map, &model) {
        panic!("the mapping after eviction: {d}; stats {s}");
    }
    let again = stat("bytes_from_source") - from_source;
    // At most 32 MiB of the model could still be cached: the rest came
    // again, streamed. With no prefetch, only a fault's miss fetches: a
    // chunk once while its blocks are touched (it is then the most recently
    // used of 8, and nothing else is read), or, with no room, just the page
    // faulted in: the file once at most.
    assert!(
        again >= (48 - 32) * MIB as u64,
        "{again} bytes fetched again: the mapping's pages did not come back through the mount: {s}"
    );
    assert!(
        stat("chunks_streamed") > streamed,
        "nothing was streamed again: {s}"
    );
    assert!(
        again <= model.len() as u64,
        "{again} bytes from the origin to fault in {} again: {s}",
        model.len()
    );
    // And in whole chunks, each kept: no page fetched on its own.
    assert!(
        stat("source_requests") - requests <= chunks,
        "more requests than chunks to fault the file in again: {s}"
    );
    assert_eq!(stat("reads_uncached"), 0, "{s}");
    assert_eq!(stat("read_errors"), 0, "{s}");
    drop(map);
}

/// (a) A cache dir owned by another user is refused.
fn refuses_a_dir_of_another_user() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 90);
    let cache = w.cache.path().join("c");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
    let (out, _m) = try_mount(&w, &["--cache-dir", cache.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "mounted over uid 65534's dir");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(!is_mounted(&w.mnt()));
}

/// (b) A cache dir others can write is refused.
fn refuses_a_dir_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 91);
    let cache = w.cache.path().join("c");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (out, _m) = try_mount(&w, &["--cache-dir", cache.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "mounted over a 0777 dir");
    assert!(err.contains("writable by other users"), "{err}");
    assert!(!is_mounted(&w.mnt()));
}

/// (c) A symlinked cache dir is refused, even to a fine directory: the
/// link could be swapped under the daemon.
fn refuses_a_symlinked_dir() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 92);
    let real = w.cache.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = w.cache.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (out, _m) = try_mount(&w, &["--cache-dir", link.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "mounted over a symlinked dir");
    assert!(err.contains("link"), "{err}");
    assert!(!is_mounted(&w.mnt()));
}

/// (d) A cache dir the daemon creates is 0700.
fn creates_the_dir_0700() {
    use std::os::unix::fs::PermissionsExt;
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 93);
    let cache = w.cache.path().join("new/cache");
    let (out, m) = try_mount(
        &w,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-size",
            "64MiB",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "created {:o}", mode & 0o777);
}

/// (e) A `.lock` planted as a symlink is never followed: the file it points
/// to keeps its bytes, whether the mount is refused or not.
fn never_follows_a_planted_lock_symlink() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5000, 94);
    let victim = w.dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let cache = w.cache.path().join("c");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&cache)
        .unwrap();
    std::os::unix::fs::symlink(&victim, cache.join(".lock")).unwrap();
    let (out, m) = try_mount(
        &w,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-size",
            "64MiB",
        ],
    );
    if out.status.success() {
        assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    }
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious",
        "the victim was written through .lock (mount ok: {}, {})",
        out.status.success(),
        stderr_of(&out)
    );
    drop(m);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn an_unsafe_cache_dir_is_refused() {
    // Every part runs, and the failure names all that failed.
    let parts: [(&str, fn()); 5] = [
        ("a: another user's dir", refuses_a_dir_of_another_user),
        ("b: a dir others can write", refuses_a_dir_others_can_write),
        ("c: a symlinked dir", refuses_a_symlinked_dir),
        ("d: a new dir is 0700", creates_the_dir_0700),
        (
            "e: a planted .lock symlink",
            never_follows_a_planted_lock_symlink,
        ),
    ];
    let failed: Vec<&str> = parts
        .iter()
        .filter(|(_, part)| std::panic::catch_unwind(part).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "failed parts: {failed:?}");
}
