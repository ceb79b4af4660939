//! Helpers for tests through a real FUSE mount of the real binary.
#![allow(dead_code)]

pub mod hung;
pub mod s3;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_modelfs")
}

pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("running modelfs")
}

/// A work dir with `src/` (the source), `mnt/` and a cache dir in /dev/shm.
pub struct Work {
    pub dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("modelfs-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
        let cache = tempfile::Builder::new()
            .prefix("modelfs-test-cache")
            .tempdir_in("/dev/shm")
            .unwrap();
        Work { dir, cache }
    }
    /// A synthetic safetensors model in the source dir: `files` shards,
    /// `size` in all; the bytes of its top-level files.
    pub fn synth(&self, size: &str, files: u32) -> u64 {
        let out = run(&[
            "synth",
            self.src().to_str().unwrap(),
            "--size",
            size,
            "--files",
            &files.to_string(),
        ]);
        assert!(
            out.status.success(),
            "synth: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_dir(self.src())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    pub fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    pub fn mount(&self, extra: &[&str]) -> Mount {
        Mount::new(
            self.src().to_str().unwrap(),
            &self.mnt(),
            self.cache.path(),
            extra,
            &[],
        )
    }
    /// Mounts `url` from the test Garage, with its endpoint and credentials.
    pub fn mount_s3(&self, url: &str, extra: &[&str]) -> Mount {
        let g = s3::garage();
        let mut args = vec!["--endpoint", g.endpoint.as_str()];
        args.extend(extra);
        Mount::new(url, &self.mnt(), self.cache.path(), &args, &g.env)
    }
}

/// A running mount; unmounted when dropped, even when the test failed.
pub struct Mount {
    pub mp: PathBuf,
}

impl Mount {
    pub fn new(
        src: &str,
        mp: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Mount {
        let mut args = vec![
            "mount",
            src,
            mp.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        if !extra.contains(&"--cache-size") {
            args.extend(["--cache-size", "2GiB"]);
        }
        args.extend(extra);
        let out = Command::new(bin())
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            mp: mp.to_path_buf(),
        }
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = run(&["stat", self.mp.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn stat_u64(&self, key: &str) -> u64 {
        self.stats()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no key {key}"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run(&["unmount", self.mp.to_str().unwrap()]);
        if is_mounted(&self.mp) {
            let _ = nix::mount::umount2(&self.mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Every top-level file of `src` read through every mount at once with
/// `cmp`; all bytes compared.
pub fn cmp_all(src: &Path, mounts: &[&Mount]) {
    let names: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let mut kids = vec![];
    for m in mounts {
        for name in &names {
            kids.push(
                Command::new("cmp")
                    .arg(src.join(name))
                    .arg(m.path(name))
                    .spawn()
                    .unwrap(),
            );
        }
    }
    for mut k in kids {
        assert!(k.wait().unwrap().success(), "a mount read different bytes");
    }
}

/// A child killed when dropped, so a stalled reader never outlives a failed
/// test (and never holds the mount busy).
pub struct Kid(pub Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmp` of `want` against `got` through the mount, which must finish within
/// `bound`; the time it took.
pub fn cmp_within(want: &Path, got: &Path, bound: Duration) -> Duration {
    let t = Instant::now();
    let mut k = Kid(Command::new("cmp").arg(want).arg(got).spawn().unwrap());
    loop {
        if let Some(st) = k.0.try_wait().unwrap() {
            assert!(st.success(), "{} read different bytes", got.display());
            return t.elapsed();
        }
        assert!(
            t.elapsed() < bound,
            "reading {} took longer than {bound:?}",
            got.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn is_mounted(mp: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
}

/// A loopback port free a moment ago, for a daemon's --listen.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The peer-group token [`token_file`] writes.
pub const TOKEN: &str = "a-long-shared-group-token-for-tests";

/// A peer-group token file in `dir`.
pub fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    p
}

/// The peer port's request target for chunk `index` of `name` in the local
/// source dir `src`, named as a group member names it: with the engine's
/// own source id and version of the file.
pub fn chunk_target(src: &Path, name: &str, chunk_size: u64, index: u64) -> String {
    use modelfs_engine::source::{open_source, SourceOptions};
    let pct = |s: &str| -> String {
        s.bytes()
            .map(|b| match b.is_ascii_alphanumeric() {
                true => (b as char).to_string(),
                false => format!("%{b:02X}"),
            })
            .collect()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let source = open_source(src.to_str().unwrap(), &SourceOptions::default()).unwrap();
    let meta = rt.block_on(source.stat(name)).unwrap();
    let object = format!("{}/{name}", source.id().trim_end_matches('/'));
    format!(
        "/v1/chunk?object={}&version={}&size={}&chunk_size={chunk_size}&index={index}&cached_only=0",
        pct(&object),
        pct(&meta.version),
        meta.size
    )
}

/// A GET of `target` from the peer port at `node`, as a member sends it
/// (token, node id), keeping the connection open.
pub fn peer_request(node: &str, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {node}\r\nAuthorization: Bearer {TOKEN}\r\n\
         x-modelfs-node: a-test-member\r\n\r\n"
    )
}

/// The whole answer of the peer port at `node` to a GET of `target`, on a
/// connection of its own.
pub fn peer_get(node: &str, target: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(node).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = peer_request(node, target).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).unwrap();
    let mut answer = vec![];
    let _ = c.read_to_end(&mut answer);
    answer
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
    v
}

pub fn write_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(len, seed);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Compares two files byte for byte, reporting the first difference.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: sizes differ",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} vs {}: first difference at byte {i}",
            a.display(),
            b.display()
        );
    }
}

pub fn pread(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Drops a file's pages from the kernel page cache, so the next read goes
/// to the file system (the mount) again.
pub fn drop_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// A tmpfs of a given size for a cache dir to live in; lazily unmounted
/// when dropped, even when the test failed (and before its dir goes).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn new(bytes: usize) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("modelfs-test-tmpfs")
            .tempdir_in("/var/tmp")
            .unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={bytes},mode=0700").as_str()),
        )
        .expect("mounting a tmpfs (root is required)");
        Tmpfs { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Fills the filesystem with a file of its own until `free` bytes are
    /// left (give or take a MiB): someone else taking the space.
    pub fn fill_leaving(&self, free: usize) {
        let filler = self.available() as usize - free;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..filler >> 20 {
            std::io::Write::write_all(&mut f, &zeros).unwrap();
        }
    }
    /// Bytes the filesystem can still give.
    pub fn available(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
