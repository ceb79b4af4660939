//! Host integration through the real binary: `mount -a` from an fstab line
//! in a private mount namespace, and systemd readiness (sd_notify).

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn mount_a_from_an_fstab_line() {
    let w = Work::new();
    let data = write_file(&w.src().join("model/f.bin"), (5 << 20) + 7, 1);
    let fstab = w.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# a comment\n{src} {mnt} fuse.modelfs _netdev,nofail,cache_size=1GiB,cache_dir={cache},chunk_size=4MiB,x-systemd.requires=network-online.target 0 0\n",
            src = w.src().display(),
            mnt = w.mnt().display(),
            cache = w.cache.path().display()
        ),
    )
    .unwrap();
    let out_dir = w.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // mount(8) finds helpers in /sbin (here /usr/sbin): a tmpfs over it, in
    // a private mount namespace, holds ours and nothing of the host changes.
    // The trap takes the mount down whatever happens, so the daemon (which
    // lives in that namespace) exits.
    let script = format!(
        r#"set -e
mount -t tmpfs none /usr/sbin
ln -s {bin} /usr/sbin/mount.fuse.modelfs
trap '{bin} unmount {mnt} >/dev/null 2>&1 || true' EXIT
mount -a -T {fstab} -t fuse.modelfs
cat {mnt}/model/f.bin > {out}/f.bin
{bin} stat {mnt} --json > {out}/stat.json
grep ' {mnt} ' /proc/self/mountinfo > {out}/mountinfo
"#,
        bin = bin(),
        mnt = w.mnt().display(),
        fstab = fstab.display(),
        out = out_dir.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(out_dir.join("f.bin")).unwrap() == data,
        "the bytes read through the fstab mount are the source's"
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("stat.json")).unwrap()).unwrap();
    assert_eq!(s["cache_bytes_capacity"], 1u64 << 30, "cache_size=1GiB");
    assert_eq!(s["chunk_size"], 4u64 << 20, "chunk_size=4MiB");
    let mi = std::fs::read_to_string(out_dir.join("mountinfo")).unwrap();
    // "fuse.modelfs", or "fuse" where the kernel keeps no subtype.
    assert!(mi.contains(" - fuse"), "{mi}");
    assert!(!is_mounted(&w.mnt()), "the host never saw the mount");
}

#[test]
fn the_fstab_helper_refuses_an_unknown_option_in_one_line() {
    let w = Work::new();
    let helper = w.dir.path().join("mount.fuse.modelfs");
    std::os::unix::fs::symlink(bin(), &helper).unwrap();
    let out = Command::new(&helper)
        .arg(w.src())
        .arg(w.mnt())
        .args(["-o", "_netdev,cache_size=1GiB,cache_sise=2GiB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--cache-sise"), "{err}");
    assert!(!is_mounted(&w.mnt()));
}

#[test]
fn systemd_hears_ready_once_mounted_and_stopping_on_sigterm() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 1 << 20, 2);
    let sock_path = w.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(bin())
        .args([
            "mount",
            w.src().to_str().unwrap(),
            w.mnt().to_str().unwrap(),
        ])
        .arg("--foreground")
        .arg("--cache-dir")
        .arg(w.cache.path())
        .args(["--cache-size", "1GiB"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = Mount { mp: w.mnt() };
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(is_mounted(&w.mnt()), "ready means mounted");
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&w.mnt()));
}
