//! Mounts come down cleanly: by `unmount` with readers still open, by
//! SIGTERM, and by Ctrl-C in the foreground.
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn unmount_works_with_readers_open() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 3 << 20, 1);
    let m = w.mount(&[]);
    let pid = m.stat_u64("pid");
    let held = std::fs::File::open(m.path("f.bin")).unwrap();
    let mut holder = Command::new("bash")
        .args([
            "-c",
            &format!("exec 3<{}; sleep 30", m.path("f.bin").display()),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = run(&["unmount", m.mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&m.mp));
    wait_until("the daemon to exit", Duration::from_secs(10), || {
        !alive(pid)
    });
    drop(held);
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn sigterm_unmounts() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 1000, 1);
    let m = w.mount(&[]);
    let pid = m.stat_u64("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("unmount after SIGTERM", Duration::from_secs(10), || {
        !is_mounted(&m.mp) && !alive(pid)
    });
}

#[test]
fn foreground_mount_stops_on_sigint() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 5 << 20, 2);
    let mut child = Command::new(bin())
        .args([
            "mount",
            w.src().to_str().unwrap(),
            w.mnt().to_str().unwrap(),
            "--foreground",
        ])
        .arg("--cache-dir")
        .arg(w.cache.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mp = w.mnt();
    wait_until("the foreground mount", Duration::from_secs(20), || {
        is_mounted(&mp)
    });
    assert_same_file(&w.src().join("f.bin"), &mp.join("f.bin"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mp));
}

#[test]
fn stat_into_a_closed_pipe_does_not_panic() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 1 << 20, 9);
    let m = w.mount(&[]);
    for json in [false, true] {
        let mut cmd = Command::new(bin());
        cmd.args(["stat", m.mp.to_str().unwrap()]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `| head` that has already exited.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert_ne!(out.status.code(), Some(101), "{err}");
    }
}
