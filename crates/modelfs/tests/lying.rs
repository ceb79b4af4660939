//! `--peer-verify-sample`: a peer that sends wrong bytes with a crc32c of
//! its own making passes the transfer check; a node that also reads a
//! sample of the chunks from the origin catches it, serves the origin's
//! bytes, never asks it again and drops what it sent before. (A peer whose
//! crc32c does not match is group.rs's.) Every node listens on its own
//! loopback address (127.0.0.10N).
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A peer that answers every chunk request at once with wrong bytes of the
/// right length and the crc32c of those bytes; it counts the requests.
/// Stops accepting when dropped (its connections end with the node's).
struct Liar {
    addr: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Liar {
    fn start(ip: &str) -> Liar {
        let l = TcpListener::bind(format!("{ip}:0")).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(SeqCst) {
                match l.accept() {
                    Ok((conn, _)) => {
                        let r = r.clone();
                        std::thread::spawn(move || lie(conn, &r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Liar {
            addr,
            requests,
            stop,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// Answers the requests of one keep-alive connection.
fn lie(mut conn: TcpStream, requests: &AtomicUsize) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut piece = [0u8; 4096];
            match conn.read(&mut piece) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&piece[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        requests.fetch_add(1, SeqCst);
        // GET /v1/chunk?object=..&size=N&chunk_size=C&index=I.. HTTP/1.1
        let target = head.split_whitespace().nth(1).unwrap_or_default();
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let param = |k: &str| -> u64 {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let (size, cs, index) = (param("size"), param("chunk_size"), param("index"));
        let len = cs.min(size.saturating_sub(index * cs)) as usize;
        let body = vec![0x5a; len];
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nx-modelfs-crc32c: {:08x}\r\n\r\n",
            crc32c::crc32c(&body)
        );
        if conn.write_all(answer.as_bytes()).is_err() || conn.write_all(&body).is_err() {
            return;
        }
    }
}

/// Runs `cmds` at once; whether each succeeded, all within `bound`.
fn all_within(cmds: Vec<Command>, bound: Duration) -> Vec<bool> {
    let t = Instant::now();
    let mut kids: Vec<Kid> = cmds
        .into_iter()
        .map(|mut c| Kid(c.spawn().unwrap()))
        .collect();
    let mut done = vec![None; kids.len()];
    while done.iter().any(Option::is_none) {
        for (k, d) in kids.iter_mut().zip(&mut done) {
            if d.is_none() {
                *d = k.0.try_wait().unwrap().map(|st| st.success());
            }
        }
        assert!(t.elapsed() < bound, "reading took longer than {bound:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    done.into_iter().map(Option::unwrap).collect()
}

fn cmp(want: &Path, got: &Path) -> Command {
    let mut c = Command::new("cmp");
    c.arg(want).arg(got);
    c
}

const BOUND: Duration = Duration::from_secs(60);

/// One node in a group of two: itself and `liar`, which owns about half of
/// the chunks and is asked for a cached copy of the rest.
fn node_with_liar(w: &Work, liar: &Liar, ip: &str, extra: &[&str]) -> Mount {
    let token = token_file(w.dir.path());
    let me = format!("{ip}:{}", free_port());
    let peers = format!("{me},{}", liar.addr);
    let log = w.dir.path().join("node.log");
    let mut args = vec![
        "--listen",
        &me,
        "--peers",
        &peers,
        "--peer-token-file",
        token.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ];
    args.extend(extra);
    w.mount(&args)
}

#[test]
fn a_lying_peer_is_caught_never_served_and_never_asked_again() {
    let w = Work::new();
    let a = write_file(&w.src().join("a.bin"), (24 << 20) + 12345, 101);
    let b = write_file(&w.src().join("b.bin"), 8 << 20, 102);
    let liar = Liar::start("127.0.0.100");
    let m = node_with_liar(
        &w,
        &liar,
        "127.0.0.101",
        &["--chunk-size", "1MiB", "--peer-verify-sample", "1"],
    );
    let ok = all_within(vec![cmp(&w.src().join("a.bin"), &m.path("a.bin"))], BOUND);
    assert!(ok[0], "a wrong byte reached the reader");
    let s = m.stats();
    let caught = s["peer_lies_caught"].as_u64().unwrap();
    assert!(caught >= 1, "{s}");
    assert_eq!(s["peers"][&liar.addr]["lies"].as_u64(), Some(caught), "{s}");
    // Every answer of the liar that was not dropped unread was compared.
    assert_eq!(s["peer_chunks_verified"].as_u64(), Some(caught), "{s}");
    assert_eq!(s["bytes_from_peers"].as_u64(), Some(0), "{s}");
    // Each chunk read from the origin once: the check's read is what a
    // caught chunk is served from.
    assert_eq!(s["bytes_from_source"].as_u64(), Some(a.len() as u64), "{s}");
    let asked = liar.requests();
    assert!(asked as u64 >= caught);

    // Quarantined: it owns nothing here any more.
    let ok = all_within(vec![cmp(&w.src().join("b.bin"), &m.path("b.bin"))], BOUND);
    assert!(ok[0], "a wrong byte reached the reader");
    assert_eq!(liar.requests(), asked, "the liar was asked again");
    let s = m.stats();
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some((a.len() + b.len()) as u64),
        "{s}"
    );
    assert_eq!(s["peer_lies_caught"].as_u64(), Some(caught), "{s}");
    assert_eq!(s["read_errors"].as_u64(), Some(0), "{s}");

    let log = std::fs::read_to_string(w.dir.path().join("node.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("differs from the origin"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains(&liar.addr), "{}", lines[0]);
}

/// How many chunks the node dropped after its catch, from its log line
/// (the drop runs in the background): `None` until it is written.
fn dropped(log: &Path) -> Option<u64> {
    let log = std::fs::read_to_string(log).ok()?;
    let line = log
        .lines()
        .find(|l| l.contains("dropped the chunks a lying peer sent"))?;
    let n = line.split("dropped=").nth(1)?.split_whitespace().next()?;
    n.parse().ok()
}

#[test]
fn what_a_liar_sent_before_it_was_caught_is_dropped_from_the_cache() {
    // One chunk in ten compared, 256 chunks each first asked of the liar:
    // it goes uncaught with odds of 0.9^256. When the first answer compared
    // is its very first, nothing unchecked was cached: that node (odds 0.1)
    // is replaced by a fresh one, whose secret picks other chunks.
    for attempt in 0..6 {
        let w = Work::new();
        write_file(&w.src().join("a.bin"), 16 << 20, 103);
        let liar = Liar::start("127.0.0.102");
        let m = node_with_liar(
            &w,
            &liar,
            "127.0.0.103",
            &["--chunk-size", "64KiB", "--peer-verify-sample", "0.1"],
        );
        let mut cat = Command::new("cat");
        cat.arg(m.path("a.bin")).stdout(std::process::Stdio::null());
        assert!(all_within(vec![cat], BOUND)[0]);
        let s = m.stats();
        assert!(s["peer_lies_caught"].as_u64().unwrap() >= 1, "{s}");
        let log = w.dir.path().join("node.log");
        let t = Instant::now();
        let n = loop {
            if let Some(n) = dropped(&log) {
                break n;
            }
            assert!(t.elapsed() < BOUND, "no drop logged after the catch");
            std::thread::sleep(Duration::from_millis(50));
        };
        let asked = liar.requests();
        eprintln!(
            "attempt {attempt}: {asked} requests to the liar, {} compared, {n} chunks dropped",
            s["peer_chunks_verified"]
        );
        if n == 0 {
            continue;
        }
        // Unchecked chunks it sent before it was caught may have reached
        // that reader; none is left in the cache for the next.
        drop_page_cache(&m.path("a.bin"));
        let ok = all_within(vec![cmp(&w.src().join("a.bin"), &m.path("a.bin"))], BOUND);
        assert!(ok[0], "a chunk the liar sent is still cached");
        assert_eq!(liar.requests(), asked, "the liar was asked again");
        return;
    }
    panic!("six nodes in a row compared the liar's first answer");
}

#[test]
fn a_lying_warmup_service_is_caught_and_never_asked_again() {
    let w = Work::new();
    let a = write_file(&w.src().join("a.bin"), (6 << 20) + 777, 106);
    let b = write_file(&w.src().join("b.bin"), 3 << 20, 107);
    let liar = Liar::start("127.0.0.106");
    let token = token_file(w.dir.path());
    let warmup = format!("http://{}", liar.addr);
    let m = w.mount(&[
        "--warmup-service",
        &warmup,
        "--peer-token-file",
        token.to_str().unwrap(),
        "--chunk-size",
        "1MiB",
        "--peer-verify-sample",
        "1",
    ]);
    let ok = all_within(vec![cmp(&w.src().join("a.bin"), &m.path("a.bin"))], BOUND);
    assert!(ok[0], "a wrong byte reached the reader");
    let asked = liar.requests();
    let ok = all_within(vec![cmp(&w.src().join("b.bin"), &m.path("b.bin"))], BOUND);
    assert!(ok[0], "a wrong byte reached the reader");
    assert_eq!(
        liar.requests(),
        asked,
        "the warm-up service was asked again"
    );
    let s = m.stats();
    assert!(s["peer_lies_caught"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["peers"][&warmup]["lies"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["bytes_from_warmup"].as_u64(), Some(0), "{s}");
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some((a.len() + b.len()) as u64),
        "{s}"
    );
}

/// A node of an honest group: its own mount point and cache.
/// Fields drop in order: the mount goes before its directories.
struct Node {
    mount: Mount,
    _work: Work,
}

#[test]
fn an_honest_group_checking_every_chunk_catches_no_lie() {
    let w = Work::new();
    let cs = 1u64 << 20;
    let sizes = [(20 << 20) + 300_000, 7 << 20];
    for (i, size) in sizes.iter().enumerate() {
        write_file(&w.src().join(format!("f{i}.bin")), *size, 104 + i as u64);
    }
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    let chunks: u64 = sizes.iter().map(|&s| (s as u64).div_ceil(cs)).sum();
    let token = token_file(w.dir.path());
    let port = free_port();
    let addrs = [format!("127.0.0.104:{port}"), format!("127.0.0.105:{port}")];
    let all = addrs.join(",");
    let nodes: Vec<Node> = addrs
        .iter()
        .map(|me| {
            let work = Work::new();
            let mount = Mount::new(
                w.src().to_str().unwrap(),
                &work.mnt(),
                work.cache.path(),
                &[
                    "--listen",
                    me,
                    "--peers",
                    &all,
                    "--peer-token-file",
                    token.to_str().unwrap(),
                    "--chunk-size",
                    "1MiB",
                    "--peer-verify-sample",
                    "1",
                ],
                &[],
            );
            Node { mount, _work: work }
        })
        .collect();
    // Both nodes read everything at once.
    let cmps = nodes
        .iter()
        .flat_map(|n| {
            (0..sizes.len()).map(|i| {
                let f = format!("f{i}.bin");
                cmp(&w.src().join(&f), &n.mount.path(&f))
            })
        })
        .collect();
    assert!(
        all_within(cmps, BOUND).into_iter().all(|ok| ok),
        "a node read different bytes"
    );
    let sum = |k: &str| -> u64 { nodes.iter().map(|n| n.mount.stat_u64(k)).sum() };
    for n in &nodes {
        let s = n.mount.stats();
        assert_eq!(s["peer_lies_caught"].as_u64(), Some(0), "{s}");
        assert_eq!(s["read_errors"].as_u64(), Some(0), "{s}");
    }
    // Each chunk went from the origin to its owner, from the owner to the
    // other node, which read it from the origin again to compare.
    assert_eq!(sum("peer_chunks_verified"), chunks);
    assert_eq!(sum("bytes_from_peers"), total);
    assert_eq!(sum("bytes_from_source"), 2 * total);
}

/// All of `f` from its start, through this one open file.
fn read_from_start(f: &mut std::fs::File) -> Vec<u8> {
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    let mut v = vec![];
    f.read_to_end(&mut v).unwrap();
    v
}

/// How many fresh nodes a test sets up at most until the one-chunk file it
/// reads first happens to be left unchecked (each time with odds 1 - RATE,
/// the node's secret being new each time).
const TRIES: usize = 8;

/// A rate that leaves a file of one chunk unchecked with odds 0.9, and
/// catches a liar within a file of 256 chunks with odds 1 - 0.9^256.
const RATE: &str = "0.1";

#[test]
fn pages_the_kernel_cached_from_a_liar_are_dropped_when_it_is_caught() {
    for attempt in 1..=TRIES {
        let w = Work::new();
        let a = write_file(&w.src().join("a.bin"), 60_000, 120);
        write_file(&w.src().join("b.bin"), 16 << 20, 121);
        let liar = Liar::start("127.0.0.120");
        let m = node_with_liar(
            &w,
            &liar,
            "127.0.0.121",
            &["--chunk-size", "64KiB", "--peer-verify-sample", RATE],
        );
        // Held open throughout: its inode, and the pages cached for it
        // (opens keep the page cache), stay.
        let mut f = std::fs::File::open(m.path("a.bin")).unwrap();
        let first = read_from_start(&mut f);
        if first == a {
            // The chunk was compared (or not asked of the liar): again.
            let s = m.stats();
            eprintln!(
                "attempt {attempt}: a.bin's chunk was checked or not asked of the liar: {} compared, {} bytes from peers",
                s["peer_chunks_verified"], s["bytes_from_peers"]
            );
            continue;
        }
        assert_eq!(first, vec![0x5a; a.len()], "the liar's bytes, unchecked");
        assert_eq!(m.stat_u64("peer_lies_caught"), 0);

        // Reading b catches it; a's chunk is dropped from the cache, and the
        // kernel must drop the pages it cached from it too.
        let mut cat = Command::new("cat");
        cat.arg(m.path("b.bin")).stdout(std::process::Stdio::null());
        assert!(all_within(vec![cat], BOUND)[0]);
        let s = m.stats();
        assert!(s["peer_lies_caught"].as_u64().unwrap() >= 1, "{s}");

        // The page cache is not dropped by hand: the same handle and a new
        // open read the source's bytes (the notification is sent from a
        // thread of its own, so it may take a moment).
        wait_until(
            "the liar's pages dropped from the page cache",
            Duration::from_secs(10),
            || read_from_start(&mut f) == a,
        );
        assert!(std::fs::read(m.path("a.bin")).unwrap() == a);
        let log = std::fs::read_to_string(w.dir.path().join("node.log")).unwrap();
        assert!(log.contains("dropped the kernel's cached pages"), "{log}");
        return;
    }
    panic!("a.bin's chunk was checked in each of {TRIES} attempts");
}

#[test]
fn an_inode_open_through_passthrough_never_serves_a_liars_retired_cache_file_to_new_opens() {
    for attempt in 1..=TRIES {
        let w = Work::new();
        let a = write_file(&w.src().join("a.bin"), 60_000, 122);
        write_file(&w.src().join("b.bin"), 16 << 20, 123);
        let liar = Liar::start("127.0.0.122");
        let token_path = token_file(w.dir.path());
        let me = format!("127.0.0.124:{}", free_port());
        let peers = format!("{me},{}", liar.addr);
        let log = w.dir.path().join("node.log");
        let m = w.mount(&[
            "--listen",
            &me,
            "--peers",
            &peers,
            "--peer-token-file",
            token_path.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
            "--chunk-size",
            "64KiB",
            "--peer-verify-sample",
            RATE,
        ]);
        if std::fs::read(m.path("a.bin")).unwrap() == a {
            let s = m.stats();
            eprintln!(
                "attempt {attempt}: a.bin's chunk was checked or not asked of the liar: {} compared, {} bytes from peers",
                s["peer_chunks_verified"], s["bytes_from_peers"]
            );
            continue;
        }
        assert_eq!(m.stat_u64("peer_lies_caught"), 0);
        assert_eq!(m.stats()["passthrough"], "enabled", "{}", m.stats());

        // Complete in the cache, with the liar's bytes: opened through
        // passthrough, and held open while the liar is caught.
        let opens = m.stat_u64("passthrough_opens");
        let held = std::fs::File::open(m.path("a.bin")).unwrap();
        assert_eq!(m.stat_u64("passthrough_opens"), opens + 1);
        let mut cat = Command::new("cat");
        cat.arg(m.path("b.bin")).stdout(std::process::Stdio::null());
        assert!(all_within(vec![cat], BOUND)[0]);
        assert!(m.stat_u64("peer_lies_caught") >= 1, "{}", m.stats());

        let ebusy = |what: &str| match std::fs::File::open(m.path("a.bin")) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{what}: {e}"),
            Ok(mut f) => panic!(
                "{what}: opened, reading {}",
                if read_from_start(&mut f) == a {
                    "the source's bytes"
                } else {
                    "the liar's bytes"
                }
            ),
        };
        // Its cache file was retired under the open handle: until a.bin is
        // cached again, it cannot be pinned, and cannot be read through the
        // page cache while that handle reads through passthrough.
        ebusy("an open after the catch");
        // Cached again (asked for it as a peer would, since opens are
        // refused): a new cache file, which the old handle's backing is not.
        let answer = peer_get(&me, &chunk_target(&w.src(), "a.bin", 64 << 10, 0));
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        ebusy("an open once a.bin is cached again");

        // The last old handle gone, a new open gets a fresh backing file.
        drop(held);
        let mut f = None;
        wait_until("the old handle released", Duration::from_secs(10), || {
            f = std::fs::File::open(m.path("a.bin")).ok();
            f.is_some()
        });
        assert!(
            read_from_start(f.as_mut().unwrap()) == a,
            "the liar's bytes"
        );
        assert_eq!(m.stat_u64("passthrough_opens"), opens + 2, "{}", m.stats());
        return;
    }
    panic!("a.bin's chunk was checked in each of {TRIES} attempts");
}
