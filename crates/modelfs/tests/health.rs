//! `/healthz`, `/readyz` and `warm --check` before and after a `--preload`,
//! and `warm` in the foreground, through real mounts.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// GET `path` from `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

fn token(w: &Work) -> String {
    let p = token_file(w.dir.path());
    p.to_str().unwrap().to_string()
}

/// A warm-up service that accepts and never answers until released: each
/// chunk fetch waits (up to a --peer-timeout longer than the test) before
/// the origin is asked, which holds the preload back for as long as the
/// test looks at it, however slow the machine. Released, it closes every
/// connection, so fetches fail over to the origin at once. Its thread
/// lives until the test process exits.
struct Stall {
    url: String,
    released: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

fn stalling_service() -> Stall {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let released = Arc::new(AtomicBool::new(false));
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (r, h) = (released.clone(), held.clone());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut held = h.lock().unwrap();
            // Checked under the lock, so release() cannot miss a connection.
            if r.load(Ordering::SeqCst) {
                let _ = c.shutdown(Shutdown::Both);
            } else {
                held.push(c);
            }
        }
    });
    Stall {
        url,
        released,
        held,
    }
}

impl Stall {
    fn release(&self) {
        let mut held = self.held.lock().unwrap();
        self.released.store(true, Ordering::SeqCst);
        for c in held.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn warm(args: &[&str]) -> (bool, String) {
    let mut all = vec!["warm"];
    all.extend(args);
    let out = run(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn readyz_and_warm_check_answer_for_the_preload_before_and_after() {
    let w = Work::new();
    write_file(&w.src().join("model/a.bin"), 24 << 20, 1);
    write_file(&w.src().join("model/sub/b.bin"), 5 << 20, 2);
    write_file(&w.src().join("other.bin"), 3 << 20, 3);
    let addr = free_addr();
    let stall = stalling_service();
    let tok = token(&w);
    let m = w.mount(&[
        "--preload",
        "model",
        "--metrics-listen",
        &addr,
        "--warmup-service",
        &stall.url,
        "--peer-token-file",
        &tok,
        // Longer than the test: the preload waits until stall.release().
        "--peer-timeout",
        "600",
        // A peer fetching for the group may take the origin's budget.
        "--request-timeout",
        "3",
        "--retries",
        "0",
    ]);
    let mp = m.mp.to_str().unwrap();

    // Before: alive, not ready, and the probe says so without reading.
    assert_eq!(get(&addr, "/healthz").0, 200);
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready"), "{body}");
    let (ok, text) = warm(&["--check", mp]);
    assert!(!ok, "{text}");
    assert!(text.contains("not cached yet"), "{text}");
    let (ok, text) = warm(&["--check", mp, "model/sub"]);
    assert!(!ok, "{text}");

    // After: ready, and every named path checks out.
    stall.release();
    wait_until("the preload", Duration::from_secs(60), || {
        get(&addr, "/readyz").0 == 200
    });
    assert!(get(&addr, "/readyz").1.contains("preload complete"));
    for args in [
        vec!["--check", mp],
        vec!["--check", mp, "model/sub", "model/a.bin"],
        vec!["--check", m.path("model/sub/b.bin").to_str().unwrap()],
    ] {
        let (ok, text) = warm(&args);
        assert!(ok, "{args:?}: {text}");
    }
    // A path outside the preload is answered too, from its own xattr.
    let (ok, text) = warm(&["--check", mp, "other.bin"]);
    assert!(!ok && text.contains("missing other.bin"), "{text}");
    let s = m.stats();
    assert_eq!(s["opens"], 0, "the checks opened no file: {s}");
    assert_eq!(s["bytes_served"], 0, "{s}");
    assert_eq!(s["preload"]["bytes_cached"], (29 << 20) as u64, "{s}");
    assert_eq!(s["preload"]["complete"], true, "{s}");

    // Metrics at /metrics only.
    let (code, body) = get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("modelfs_cache_used_bytes"), "{body}");
    assert_eq!(get(&addr, "/").0, 404);
    assert_eq!(get(&addr, "/anything").0, 404);

    // The preloaded bytes are the source's, and now come from the cache.
    for f in ["model/a.bin", "model/sub/b.bin", "other.bin"] {
        assert_same_file(&w.src().join(f), &m.path(f));
    }
    let s = m.stats();
    assert_eq!(
        s["bytes_from_source"].as_u64().unwrap(),
        (29u64 << 20) + (3 << 20),
        "the preload read each byte from the source once: {s}"
    );

    // A daemon that is gone answers nothing.
    drop(m);
    assert_eq!(get(&addr, "/healthz").0, 0);
}

#[test]
fn a_preload_bigger_than_the_cache_is_not_ready_and_says_why() {
    let w = Work::new();
    write_file(&w.src().join("big.bin"), 16 << 20, 4);
    let addr = free_addr();
    let m = w.mount(&[
        "--preload",
        "/",
        "--metrics-listen",
        &addr,
        "--cache-size",
        "4MiB",
        "--chunk-size",
        "1MiB",
        "--threads",
        "2",
    ]);
    wait_until("the preload to fail", Duration::from_secs(30), || {
        get(&addr, "/readyz").1.contains("failed")
    });
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("raise --cache-size"), "{body}");
    assert_eq!(get(&addr, "/healthz").0, 200, "alive though not ready");
    let (ok, text) = warm(&["--check", m.mp.to_str().unwrap()]);
    assert!(!ok && text.contains("raise --cache-size"), "{text}");
    assert_same_file(&w.src().join("big.bin"), &m.path("big.bin"));
}

#[test]
fn warm_check_answers_for_any_path_without_a_preload() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 3 << 20, 5);
    write_file(&w.src().join("d/g.bin"), 2 << 20, 6);
    let m = w.mount(&["--prefetch-concurrency", "0"]);
    let mp = m.mp.to_str().unwrap();
    let (ok, text) = warm(&["--check", mp]);
    assert!(!ok && text.contains("missing"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert_eq!(m.stats()["opens"], 0, "the check opened no file");
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let (ok, text) = warm(&["--check", mp, "f.bin"]);
    assert!(ok, "{text}");
    let (ok, text) = warm(&["--check", mp]);
    assert!(!ok && text.contains("missing d/g.bin"), "{text}");
    assert_same_file(&w.src().join("d/g.bin"), &m.path("d/g.bin"));
    let (ok, text) = warm(&["--check", mp]);
    assert!(ok, "{text}");
    assert_eq!(m.stats()["opens"], 2, "only the two reads opened files");
}

#[test]
fn warm_reports_a_too_small_cache_before_reading() {
    let w = Work::new();
    write_file(&w.src().join("a.bin"), 6 << 20, 6);
    write_file(&w.src().join("b.bin"), 6 << 20, 7);
    let m = w.mount(&[
        "--cache-size",
        "8MiB",
        "--chunk-size",
        "1MiB",
        "--threads",
        "2",
    ]);
    let (ok, text) = warm(&[m.mp.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("the cache is too small"), "{text}");
    assert!(text.contains("raise --cache-size"), "{text}");
    assert_eq!(m.stat_u64("opens"), 0, "nothing was read: {}", m.stats());

    // The same with paths relative to the working directory.
    let out = Command::new(bin())
        .args(["warm", ".", "a.bin"])
        .current_dir(&m.mp)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("raise --cache-size"), "{text}");
    assert_eq!(m.stat_u64("opens"), 0, "nothing was read: {}", m.stats());
}

#[test]
fn warm_stays_in_the_foreground_with_a_line_per_file() {
    let w = Work::new();
    let files = ["a.bin", "d/b.bin", "d/e/c.bin"];
    for (i, f) in files.iter().enumerate() {
        write_file(&w.src().join(f), (3 << 20) + i * 4097, i as u64);
    }
    let m = w.mount(&[]);
    // Not a terminal: a line per file, as Kubernetes logs want.
    let (ok, text) = warm(&[m.mp.to_str().unwrap()]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("warmed /")).collect();
    assert_eq!(lines.len(), files.len(), "{text}");
    assert!(text.contains("warmed 3 files"), "{text}");
    // It returned once everything was cached.
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(w.src().join(f)).unwrap().len())
        .sum();
    assert_eq!(m.stat_u64("bytes_from_source"), total);
    for f in files {
        assert_same_file(&w.src().join(f), &m.path(f));
    }
    assert_eq!(m.stat_u64("bytes_from_source"), total, "all from the cache");
    // --wait is still accepted.
    let (ok, text) = warm(&[m.mp.to_str().unwrap(), "--wait"]);
    assert!(ok, "{text}");
}

#[test]
fn serve_says_when_the_preload_is_complete() {
    let w = Work::new();
    write_file(&w.src().join("qwen/a.bin"), 9 << 20, 8);
    let addr = free_addr();
    let listen = free_addr();
    let tok = token(&w);
    let log = w.dir.path().join("serve.log");
    let mut child = Command::new(bin())
        .args(["serve", w.src().to_str().unwrap(), "--listen", &listen])
        .args(["--preload", "qwen/", "--metrics-listen", &addr])
        .args(["--peer-token-file", &tok])
        .arg("--cache-dir")
        .arg(w.cache.path())
        .args(["--cache-size", "1GiB"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(w.dir.path().join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    wait_until("serve to preload", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("preload complete")
    });
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("preload complete, 1 of 1 files"), "{body}");
    assert_eq!(get(&addr, "/healthz").0, 200);
    let err = std::fs::read_to_string(w.dir.path().join("serve.err")).unwrap();
    assert!(
        err.contains("preload complete"),
        "the log says so too: {err}"
    );
}

#[test]
fn a_preload_that_failed_is_retried_and_becomes_ready_without_a_restart() {
    // The model is not there yet (an upload still running, an origin that
    // answers nothing): the preload fails, and must not stay failed.
    let w = Work::new();
    std::fs::create_dir_all(w.src()).unwrap();
    let addr = free_addr();
    let m = w.mount(&[
        "--preload",
        "model",
        "--metrics-listen",
        &addr,
        // Each retry lists again rather than trusting the first listing.
        "--listing-ttl",
        "0.1",
    ]);
    wait_until("the preload to fail", Duration::from_secs(30), || {
        !m.stats()["preload"]["error"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    });
    assert_eq!(get(&addr, "/readyz").0, 503);
    let (ok, text) = warm(&["--check", m.mp.to_str().unwrap()]);
    assert!(!ok, "{text}");

    write_file(&w.src().join("model/a.bin"), 9 << 20, 21);
    write_file(&w.src().join("model/b.bin"), 1000, 22);
    wait_until("the retried preload", Duration::from_secs(60), || {
        get(&addr, "/readyz").0 == 200
    });
    let s = m.stats();
    assert_eq!(s["preload"]["error"], "", "{s}");
    assert_eq!(s["preload"]["complete"], true, "{s}");
    let (ok, text) = warm(&["--check", m.mp.to_str().unwrap()]);
    assert!(ok, "{text}");
    // A typo under the preload is no "cached".
    let (ok, text) = warm(&["--check", m.mp.to_str().unwrap(), "model/typo.bin"]);
    assert!(!ok && text.contains("does not exist"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    for f in ["model/a.bin", "model/b.bin"] {
        assert_same_file(&w.src().join(f), &m.path(f));
    }
    assert_eq!(
        m.stat_u64("bytes_from_source"),
        (9 << 20) + 1000,
        "the reads came from the preload's cache"
    );
}

#[test]
fn serve_stops_on_sigterm_during_its_preload() {
    // A preload that cannot finish yet (its model is not there): it retries
    // for as long as it takes, and SIGTERM must not wait for it.
    let w = Work::new();
    std::fs::create_dir_all(w.src()).unwrap();
    let addr = free_addr();
    let listen = free_addr();
    let tok = token(&w);
    let mut child = Command::new(bin())
        .args(["serve", w.src().to_str().unwrap(), "--listen", &listen])
        .args(["--preload", "qwen/", "--metrics-listen", &addr])
        .args(["--peer-token-file", &tok])
        .arg("--cache-dir")
        .arg(w.cache.path())
        .args(["--cache-size", "1GiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let kill = Kill(&mut child);
    wait_until("the preload to fail once", Duration::from_secs(30), || {
        get(&addr, "/readyz").1.contains("failed")
    });
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(kill.0.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let mut status = None;
    wait_until("serve to stop", Duration::from_secs(5), || {
        status = kill.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "stopped in {:?}", t.elapsed());
}

#[test]
fn a_preload_retries_through_an_origin_that_answers_503() {
    use common::s3::{garage, Fault, Proxy};
    let g = garage();
    let w = Work::new();
    write_file(&w.src().join("other.bin"), 1000, 41);
    g.push(&w.src(), "s3://models/retry503");
    let proxy = Proxy::start(g.addr());
    let addr = free_addr();
    let endpoint = proxy.endpoint();
    let m = Mount::new(
        "s3://models/retry503",
        &w.mnt(),
        w.cache.path(),
        &[
            "--endpoint",
            &endpoint,
            "--preload",
            "model",
            "--metrics-listen",
            &addr,
            "--listing-ttl",
            "0.1",
            "--retries",
            "0",
            "--request-timeout",
            "2",
        ],
        &g.env,
    );
    let error = || {
        m.stats()["preload"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Not uploaded yet: failed once.
    wait_until("the preload to fail", Duration::from_secs(30), || {
        !error().is_empty()
    });
    let first = error();
    // Now the origin answers 503 to everything, and the preload goes on
    // failing, with that cause, while the model is uploaded behind it.
    proxy.set(Fault::Unavailable);
    let model = w.dir.path().join("model");
    write_file(&model.join("a.bin"), 9 << 20, 42);
    write_file(&model.join("b.bin"), 1000, 43);
    g.push(&model, "s3://models/retry503/model");
    wait_until("a retry to meet the 503", Duration::from_secs(30), || {
        let e = error();
        !e.is_empty() && e != first
    });
    assert_eq!(get(&addr, "/readyz").0, 503);

    // The origin is back: ready, without a restart, with the source's bytes.
    proxy.set(Fault::Pass);
    wait_until("the retried preload", Duration::from_secs(90), || {
        get(&addr, "/readyz").0 == 200
    });
    assert_eq!(error(), "");
    for f in ["a.bin", "b.bin"] {
        assert_same_file(&model.join(f), &m.path(&format!("model/{f}")));
    }
}
