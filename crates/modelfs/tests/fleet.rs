//! The peer group under cluster conditions: a node that does not know its
//! own address, a hung owner, a flood of idle connections on the peer port,
//! an asker that stops reading an upload.
//! Every node listens on its own loopback address (127.0.0.N).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn a_node_whose_peer_list_names_itself_twice_reads_at_once() {
    let w = Work::new();
    let data = write_file(&w.src().join("model.bin"), 64 << 20, 9);
    let token = token_file(w.dir.path());
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    // Both are this node: it listens on every address, and knows neither.
    let peers = format!("127.0.0.2:{port},127.0.0.3:{port}");
    let m = w.mount(&[
        "--listen",
        &listen,
        "--peers",
        &peers,
        "--peer-timeout",
        "2",
        "--peer-token-file",
        token.to_str().unwrap(),
    ]);
    let took = cmp_within(
        &w.src().join("model.bin"),
        &m.path("model.bin"),
        Duration::from_secs(20),
    );
    let s = m.stats();
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some(data.len() as u64),
        "{s}"
    );
    assert_eq!(s["bytes_from_peers"].as_u64(), Some(0), "{s}");
    eprintln!("64 MiB through a node that names itself twice: {took:?}");
}

#[test]
fn a_hung_owner_costs_a_read_at_most_the_documented_bound() {
    let w = Work::new();
    write_file(&w.src().join("model.bin"), 32 << 20, 11);
    let (peer, m) = hung::mount_beside_hung_peer(&w, "127.0.0.61", "127.0.0.60", &[]);
    let hung = peer.addr.clone();
    // The bound: 2 s + the origin's budget (2 s) to the first byte (the hung
    // peer never sends one); the chunks it owns are then read from the
    // origin, and it is backed off.
    let took = cmp_within(
        &w.src().join("model.bin"),
        &m.path("model.bin"),
        Duration::from_secs(2 + 2 + 6),
    );
    let s = m.stats();
    assert_eq!(s["bytes_from_source"].as_u64(), Some(32 << 20), "{s}");
    assert!(s["peers"][&hung]["errors"].as_u64().unwrap() >= 1, "{s}");
    eprintln!("32 MiB past a hung owner: {took:?}");
}

fn fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A mount of `w`'s source that is the only member of its group, on `ip`:
/// its peer port's address, and the mount.
fn lone_member(w: &Work, ip: &str, extra: &[&str]) -> (String, Mount) {
    let token = token_file(w.dir.path());
    let me = format!("{ip}:{}", free_port());
    let mut args = vec![
        "--listen",
        &me,
        "--peers",
        &me,
        "--peer-token-file",
        token.to_str().unwrap(),
    ];
    args.extend(extra);
    let m = w.mount(&args);
    (me, m)
}

#[test]
fn a_thousand_idle_connections_to_the_peer_port_do_not_stop_reads() {
    // This process holds the thousand client ends.
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: plain setrlimit on this process; a failure shows in connect.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let w = Work::new();
    write_file(&w.src().join("model.bin"), 32 << 20, 13);
    let (me, m) = lone_member(&w, "127.0.0.70", &[]);
    let pid = m.stat_u64("pid");
    let base = fds(pid);
    let addr: std::net::SocketAddr = me.parse().unwrap();
    // No token, no request: idle connections, as a scanner or a leak makes.
    let mut idle = vec![];
    for _ in 0..1000 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = fds(pid);
    cmp_within(
        &w.src().join("model.bin"),
        &m.path("model.bin"),
        Duration::from_secs(20),
    );
    assert_eq!(m.stat_u64("bytes_from_source"), 32 << 20);
    assert!(
        during <= base + 300,
        "the daemon holds {during} descriptors with 1000 idle connections (from {base})"
    );
    // Idle connections are closed after the header timeout (10 s): those the
    // server took (the rest wait in the backlog) see end-of-file.
    let closed = |idle: &[std::net::TcpStream]| {
        idle.iter()
            .filter(|s| s.set_nonblocking(true).is_ok() && matches!(s.peek(&mut [0u8; 1]), Ok(0)))
            .count()
    };
    wait_until(
        "the server to close idle connections",
        Duration::from_secs(25),
        || closed(&idle) >= 64,
    );
    drop(idle);
    wait_until(
        "the descriptors to come back",
        Duration::from_secs(30),
        || fds(pid) <= base + 10,
    );
}

/// A CA and one certificate it signed for 127.0.0.80-82, made with openssl
/// in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let sh = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let (ca, ca_key, cert, key, csr, ext) = (
        s(p("ca.pem")),
        s(p("ca.key")),
        s(p("node.pem")),
        s(p("node.key")),
        s(p("node.csr")),
        s(p("ext.cnf")),
    );
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        "/CN=modelfs test group CA",
    ]);
    sh(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=modelfs node",
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.80,IP:127.0.0.81,IP:127.0.0.82\n\
         extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (p("ca.pem"), p("node.pem"), p("node.key"))
}

#[test]
fn peers_talk_tls_with_the_groups_ca_and_refuse_plain_http() {
    let src = Work::new();
    let data = write_file(&src.src().join("model.bin"), 48 << 20, 17);
    let token = token_file(src.dir.path());
    let (ca, cert, key) = certificates(src.dir.path());
    let port = free_port();
    let addrs = [format!("127.0.0.80:{port}"), format!("127.0.0.81:{port}")];
    let all = addrs.join(",");
    let works: Vec<Work> = (0..2).map(|_| Work::new()).collect();
    let mounts: Vec<Mount> = (0..2)
        .map(|i| {
            Mount::new(
                src.src().to_str().unwrap(),
                &works[i].mnt(),
                works[i].cache.path(),
                &[
                    "--listen",
                    &addrs[i],
                    "--peers",
                    &all,
                    "--peer-token-file",
                    token.to_str().unwrap(),
                    "--peer-tls-cert",
                    cert.to_str().unwrap(),
                    "--peer-tls-key",
                    key.to_str().unwrap(),
                    "--peer-tls-ca",
                    ca.to_str().unwrap(),
                ],
                &[],
            )
        })
        .collect();
    // Both nodes at once: each asks the other for the chunks it owns.
    let kids: Vec<Kid> = mounts
        .iter()
        .map(|m| {
            Kid(Command::new("cmp")
                .arg(src.src().join("model.bin"))
                .arg(m.path("model.bin"))
                .spawn()
                .unwrap())
        })
        .collect();
    for mut k in kids {
        assert!(k.0.wait().unwrap().success(), "a node read different bytes");
    }
    let origin: u64 = mounts.iter().map(|m| m.stat_u64("bytes_from_source")).sum();
    let peers: u64 = mounts.iter().map(|m| m.stat_u64("bytes_from_peers")).sum();
    assert!(peers > 0, "no chunk went between the peers over TLS");
    assert!(
        origin <= data.len() as u64 * 105 / 100,
        "{origin} origin bytes for {}",
        data.len()
    );
    for m in &mounts {
        let s = m.stats();
        let errors: u64 = s["peers"]
            .as_object()
            .map(|p| p.values().map(|v| v["errors"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        assert_eq!(errors, 0, "{s}");
    }
    // Plain HTTP with the right token gets no chunk and no answer at all.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&addrs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a-long-shared-group-token-for-tests\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "plain http was served"
    );
    // A TLS client without a certificate of the group is refused (mTLS).
    let no_cert = Command::new("curl")
        .args(["-sk", "--max-time", "10", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("https://{}/v1/health", addrs[0]))
        .output();
    if let Ok(o) = no_cert {
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("ok"),
            "a client without a certificate was served"
        );
    }
    let with_cert = Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("-H")
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("https://{}/v1/health", addrs[0]))
        .output();
    if let Ok(o) = with_cert {
        if o.status.code() != Some(127) {
            assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{o:?}");
        }
    }
    drop(mounts);
}

#[test]
fn an_asker_that_stops_reading_an_upload_loses_its_connection() {
    use std::io::{Read, Write};
    // 2 MiB chunks: an asker allows one 2 s at its least rate, as long as
    // the peer timeout, so the server's stall bound is 2 s.
    const CHUNK: u64 = 2 << 20;
    const CHUNKS: u64 = 12;
    let w = Work::new();
    write_file(&w.src().join("big.bin"), (CHUNKS * CHUNK) as usize, 17);
    let (me, m) = lone_member(
        &w,
        "127.0.0.71",
        &["--chunk-size", "2MiB", "--peer-timeout", "2"],
    );
    let target = |i| chunk_target(&w.src(), "big.bin", CHUNK, i);
    // Every chunk asked at once on one connection (pipelined): 24 MiB of
    // answers, far more than the socket buffers hold.
    let mut s = std::net::TcpStream::connect(&me).unwrap();
    let all: String = (0..CHUNKS).map(|i| peer_request(&me, &target(i))).collect();
    s.write_all(all.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The first answer's head: the server is writing.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before any answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Then nothing read for more than twice the stall bound.
    std::thread::sleep(Duration::from_secs(5));
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither sent every chunk nor closed: {e}"),
        }
    }
    assert!(
        (got.len() as u64) < CHUNKS * CHUNK,
        "the stalled uploads went on: {} bytes for {} of chunks",
        got.len(),
        CHUNKS * CHUNK
    );
    // The port serves the next asker, and the node its own readers, every
    // byte right.
    let answer = peer_get(&me, &target(CHUNKS - 1));
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    assert!(answer.len() as u64 > CHUNK, "{} bytes", answer.len());
    cmp_within(
        &w.src().join("big.bin"),
        &m.path("big.bin"),
        Duration::from_secs(60),
    );
}
