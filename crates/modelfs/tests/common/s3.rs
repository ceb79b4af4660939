//! A Garage S3 server for this test process, and a TCP proxy in front of it
//! that injects faults.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub struct Garage {
    pub endpoint: String,
    pub env: Vec<(String, String)>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh")
}

fn parse_env(out: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Starts a server that lives as long as this test process and dies with it
/// (PR_SET_PDEATHSIG), so a failed test never leaves it running.
pub fn spawn_for_process(mut cmd: Command, log: std::fs::File) -> std::io::Result<()> {
    cmd.stdout(log.try_clone()?).stderr(log);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    // The death signal follows the thread that forked, so that thread waits
    // on the server for the life of the process.
    std::thread::spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            tx.send(Ok(())).unwrap();
            let _ = child.wait();
        }
        Err(e) => tx.send(Err(e)).unwrap(),
    });
    rx.recv().unwrap()
}

/// One Garage per test process, started on first use. It dies with the
/// process (PR_SET_PDEATHSIG), so a failed test never leaves it running.
/// A synthetic model of two shards, `size` in all, pushed to Garage at
/// `url`; its bytes.
pub fn s3_model(w: &super::Work, url: &str, size: &str) -> u64 {
    let total = w.synth(size, 2);
    garage().push(&w.src(), url);
    total
}

pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(|| {
        // Data of earlier test processes that are gone.
        for e in std::fs::read_dir("/var/tmp").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("modelfs-garage-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = PathBuf::from(format!("/var/tmp/modelfs-garage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(script())
            .arg("config")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage.sh config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = std::env::var("GARAGE_BIN").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            let cargo_bin = format!("{home}/.cargo/bin/garage");
            if Path::new(&cargo_bin).exists() {
                cargo_bin
            } else {
                "garage".into()
            }
        });
        let log = std::fs::File::create(dir.join("garage.log")).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(dir.join("garage.toml")).arg("server");
        spawn_for_process(cmd, log)
            .unwrap_or_else(|e| panic!("starting {bin}: {e} (./test.sh installs garage)"));
        let out = Command::new(script())
            .arg("init")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage.sh init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = parse_env(&out.stdout);
        let endpoint = env
            .iter()
            .find(|(k, _)| k == "S3_ENDPOINT")
            .unwrap()
            .1
            .clone();
        Garage { endpoint, env }
    })
}

impl Garage {
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.trim_start_matches("http://").parse().unwrap()
    }

    /// `modelfs` with this Garage's credentials.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(super::bin());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn push(&self, dir: &Path, url: &str) -> String {
        let out = self
            .cmd()
            .args([
                "push",
                dir.to_str().unwrap(),
                url,
                "--endpoint",
                &self.endpoint,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Fault {
    Pass,
    /// Answer every request 503 and close.
    Unavailable,
    /// Reset every connection at once.
    Reset,
    /// Accept and never answer.
    Stall,
    /// Every other new connection answers 503.
    Flaky,
    /// Pass what clients send, and the first `Proxy::cut_after` bytes of
    /// what the server answers on all connections together; then stay silent
    /// with the connections open (bodies that stop half way).
    Cut,
}

/// A TCP proxy to `upstream` whose behaviour the test switches.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    cut: Arc<AtomicUsize>,
}

fn answer_503(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Fault::Pass as u8));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let cut = Arc::new(AtomicUsize::new(usize::MAX));
        let (m, l, limit) = (mode.clone(), live.clone(), cut.clone());
        let count = AtomicUsize::new(0);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst);
                // Under the lock `set` switches and drains with: a
                // connection is handled in one mode, and drained by the next.
                let mut held = l.lock().unwrap();
                let fault = m.load(Ordering::SeqCst);
                match fault {
                    f if f == Fault::Unavailable as u8
                        || (f == Fault::Flaky as u8 && n.is_multiple_of(2)) =>
                    {
                        std::thread::spawn(move || answer_503(client));
                    }
                    f if f == Fault::Reset as u8 => reset(client),
                    f if f == Fault::Stall as u8 => held.push(client),
                    _ => {
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        held.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || pipe(client, server));
                        if fault == Fault::Cut as u8 {
                            let budget = limit.clone();
                            std::thread::spawn(move || pipe_cut(s2, c2, &budget));
                        } else {
                            std::thread::spawn(move || pipe(s2, c2));
                        }
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            live,
            cut,
        }
    }

    /// Switches to `Fault::Cut`: `bytes` of answers are left to pass. The
    /// guard switches back to `Fault::Pass` when dropped, so that a failed
    /// test leaves no daemon waiting on a stalled body.
    pub fn cut_after(&self, bytes: usize) -> PassOnDrop<'_> {
        self.cut.store(bytes, Ordering::SeqCst);
        self.set(Fault::Cut);
        PassOnDrop(self)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches behaviour and drops every open connection, so that pooled
    /// keep-alive connections meet the new behaviour too.
    pub fn set(&self, f: Fault) {
        let mut live = self.live.lock().unwrap();
        self.mode.store(f as u8, Ordering::SeqCst);
        for s in live.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// See [`Proxy::cut_after`].
pub struct PassOnDrop<'a>(&'a Proxy);

impl Drop for PassOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set(Fault::Pass);
    }
}

/// `pipe`, which forwards only what is left of `budget` and leaves both
/// sockets open: the reader sees a stream that stalls, not one that ends.
fn pipe_cut(mut from: TcpStream, mut to: TcpStream, budget: &AtomicUsize) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let left = budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap();
        let pass = n.min(left);
        if to.write_all(&buf[..pass]).is_err() || pass < n {
            return;
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
