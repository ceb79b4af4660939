//! A group member that is hung: it accepts connections and never answers.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{free_port, token_file, Mount, Work};

/// A member that accepts every connection on `addr` and never answers: it
/// reads what each asker sends (the request line and where it came from are
/// kept for the test) and holds the socket open until dropped.
pub struct HungPeer {
    /// Where it listens.
    pub addr: String,
    /// (where the connection came from, its request line)
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl HungPeer {
    /// Listens on `addr` (port 0: any free one).
    pub fn start(addr: &str) -> HungPeer {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Polled, so that dropping the peer stops the accept loop.
        l.set_nonblocking(true).unwrap();
        let seen: Arc<Mutex<Vec<(SocketAddr, String)>>> = Arc::default();
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, h2, stop2) = (seen.clone(), held.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((mut s, from)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (seen, held) = (s2.clone(), h2.clone());
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut head = vec![];
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push((from, line));
                    // Never answered; open until the peer is dropped.
                    held.lock().unwrap().push(s);
                });
            }
        });
        HungPeer {
            addr,
            seen,
            held,
            stop,
            accept: Some(accept),
        }
    }

    pub fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HungPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.held.lock().unwrap().clear();
    }
}

/// Mounts `w`'s source as one of a group of two whose other member hangs:
/// this one listens on `me_ip` (a free port), the hung one on `hung_ip`
/// (returned, for what it was asked). Peer and origin timeouts are 2 s and
/// the origin is not retried, so a chunk the hung member owns costs a read
/// 2 + 2 s at most before it comes from the origin. `extra` are further
/// flags.
pub fn mount_beside_hung_peer(
    w: &Work,
    me_ip: &str,
    hung_ip: &str,
    extra: &[&str],
) -> (HungPeer, Mount) {
    let token = token_file(w.dir.path());
    let hung = HungPeer::start(&format!("{hung_ip}:0"));
    let me = format!("{me_ip}:{}", free_port());
    let peers = format!("{me},{}", hung.addr);
    let mut args = extra.to_vec();
    args.extend([
        "--listen",
        &me,
        "--peers",
        &peers,
        "--peer-timeout",
        "2",
        "--request-timeout",
        "2",
        "--retries",
        "0",
        "--peer-token-file",
        token.to_str().unwrap(),
    ]);
    let m = w.mount(&args);
    (hung, m)
}
