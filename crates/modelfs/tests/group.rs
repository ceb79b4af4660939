//! The peer group and the warm-up service, with each node on its own
//! loopback address (127.0.0.N) and Garage as the origin.
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::s3::{garage, s3_model, spawn_for_process};
use common::*;

/// A node: its own mount point and cache, serving chunks on 127.0.0.N.
/// Fields drop in order: the mount goes before its directories.
struct Node {
    mount: Option<Mount>,
    _work: Work,
}

fn node(
    url: &str,
    listen: Option<String>,
    peers: Option<&str>,
    warmup: Option<&str>,
    token: &std::path::Path,
) -> Node {
    let work = Work::new();
    let mut args: Vec<String> = vec!["--peer-token-file".into(), token.display().to_string()];
    if let Some(l) = listen {
        args.extend(["--listen".into(), l]);
    }
    if let Some(p) = peers {
        args.extend(["--peers".into(), p.into()]);
    }
    if let Some(w) = warmup {
        args.extend(["--warmup-service".into(), w.into()]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mount = work.mount_s3(url, &a);
    Node {
        mount: Some(mount),
        _work: work,
    }
}

impl Node {
    fn m(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }
}

/// Every shard through every node at once; all bytes compared.
fn load_all(src: &std::path::Path, nodes: &[&Node]) {
    let mounts: Vec<&Mount> = nodes.iter().map(|n| n.m()).collect();
    cmp_all(src, &mounts);
}

#[test]
fn four_cold_nodes_read_the_origin_once_and_a_fifth_not_at_all() {
    let w = Work::new();
    let url = "s3://models/group-four";
    let total = s3_model(&w, url, "96MiB");
    let token = token_file(w.dir.path());
    let port = free_port();
    let addrs: Vec<String> = (1..=5).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let four = addrs[..4].join(",");
    let nodes: Vec<Node> = (0..4)
        .map(|i| node(url, Some(addrs[i].clone()), Some(&four), None, &token))
        .collect();
    load_all(&w.src(), &nodes.iter().collect::<Vec<_>>());
    let origin: u64 = nodes
        .iter()
        .map(|n| n.m().stat_u64("bytes_from_source"))
        .sum();
    assert!(
        origin >= total && origin as f64 <= total as f64 * 1.05,
        "4 nodes pulled {origin} origin bytes for {total}"
    );
    assert!(nodes.iter().all(|n| n.m().stat_u64("bytes_from_peers") > 0));

    let fifth = node(
        url,
        Some(addrs[4].clone()),
        Some(&addrs.join(",")),
        None,
        &token,
    );
    load_all(&w.src(), &[&fifth]);
    assert_eq!(
        fifth.m().stat_u64("bytes_from_source"),
        0,
        "{}",
        fifth.m().stats()
    );
    assert_eq!(fifth.m().stat_u64("bytes_from_peers"), total);
}

#[test]
fn a_preloaded_warmup_service_leaves_the_origin_alone() {
    let w = Work::new();
    let total = s3_model(&w, "s3://models/warm/qwen", "64MiB");
    let token = token_file(w.dir.path());
    let g = garage();
    let listen = format!("127.0.0.20:{}", free_port());
    let mut cmd = g.cmd();
    cmd.args([
        "serve",
        "s3://models/warm",
        "--listen",
        &listen,
        "--preload",
        "qwen/",
        "--endpoint",
        &g.endpoint,
    ])
    .arg("--peer-token-file")
    .arg(&token)
    .arg("--cache-dir")
    .arg(w.cache.path())
    .args(["--cache-size", "1GiB"]);
    let log = w.dir.path().join("serve.log");
    spawn_for_process(cmd, std::fs::File::create(&log).unwrap()).unwrap();
    wait_until(
        "the warm-up service to preload",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("serving s3://models/warm")
        },
    );
    let service = format!("http://{listen}");
    let a = node("s3://models/warm/qwen", None, None, Some(&service), &token);
    let b = node("s3://models/warm/qwen", None, None, Some(&service), &token);
    load_all(&w.src(), &[&a, &b]);
    for n in [&a, &b] {
        assert_eq!(n.m().stat_u64("bytes_from_source"), 0, "{}", n.m().stats());
        assert_eq!(n.m().stat_u64("bytes_from_warmup"), total);
    }
    // warm --wait fills a node's cache; afterwards reads need no tier at all.
    let c = node("s3://models/warm/qwen", None, None, Some(&service), &token);
    let out = run(&["warm", c.m().mp.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.m().stat_u64("cache_bytes_used"), total);
    load_all(&w.src(), &[&c]);
    assert_eq!(
        c.m().stat_u64("bytes_from_warmup"),
        total,
        "the load after warm came from the cache"
    );
    assert_eq!(c.m().stat_u64("bytes_from_source"), 0);
}

#[test]
fn a_peer_killed_mid_load_does_not_stop_the_others() {
    let w = Work::new();
    let url = "s3://models/group-kill";
    s3_model(&w, url, "128MiB");
    let token = token_file(w.dir.path());
    let port = free_port();
    let addrs: Vec<String> = (1..=3)
        .map(|i| format!("127.0.0.{}:{port}", 10 + i))
        .collect();
    let all = addrs.join(",");
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| node(url, Some(addrs[i].clone()), Some(&all), None, &token))
        .collect();
    let names: Vec<String> = std::fs::read_dir(w.src())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut kids = vec![];
    for n in &nodes[..2] {
        for name in &names {
            kids.push(
                Command::new("cmp")
                    .arg(w.src().join(name))
                    .arg(n.m().path(name))
                    .spawn()
                    .unwrap(),
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let victim = nodes[2].m().stat_u64("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for mut k in kids {
        assert!(
            k.wait().unwrap().success(),
            "a survivor read wrong bytes or failed"
        );
    }
    let dead = nodes.pop().unwrap();
    drop(dead);
}

/// Answers every chunk request with the right length of wrong bytes.
fn lying_peer() -> String {
    let l = TcpListener::bind("127.0.0.30:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().take(200) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let q = |k: &str| -> u64 {
                    req.split(&['?', '&', ' '][..])
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                let (size, cs, i) = (q("size"), q("chunk_size"), q("index"));
                let len = cs.min(size.saturating_sub(i * cs)) as usize;
                let body = vec![0x5a; len];
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nx-modelfs-crc32c: 12345678\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
    addr
}

#[test]
fn a_lying_peer_is_detected_counted_and_never_served() {
    let w = Work::new();
    let url = "s3://models/group-liar";
    let total = s3_model(&w, url, "48MiB");
    let token = token_file(w.dir.path());
    let liar = lying_peer();
    let me = format!("127.0.0.31:{}", free_port());
    let n = node(
        url,
        Some(me.clone()),
        Some(&format!("{me},{liar}")),
        None,
        &token,
    );
    load_all(&w.src(), &[&n]);
    let s = n.m().stats();
    assert!(s["crc_failures"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["peers"][&liar]["crc_failures"].as_u64().unwrap() >= 1,
        "{s}"
    );
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some(total),
        "every chunk came from the origin in the end: {s}"
    );
}

fn http(addr: &str, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn requests_need_the_token_and_stay_inside_the_source() {
    let w = Work::new();
    let url = "s3://models/group-auth";
    s3_model(&w, url, "16MiB");
    let token = token_file(w.dir.path());
    let addr = format!("127.0.0.40:{}", free_port());
    let _n = node(url, Some(addr.clone()), Some(&addr), None, &token);
    let name = std::fs::read_dir(w.src())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.ends_with(".safetensors"))
        .unwrap();
    let q = format!("/v1/chunk?object=s3://models/group-auth/{name}&version=x&size=1&chunk_size=8388608&index=0");
    let get = |path: &str, auth: Option<&str>| {
        let h = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        http(
            &addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{h}Connection: close\r\n\r\n"),
        )
    };
    let no_token = get(&q, None);
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    assert!(!no_token.contains("x-modelfs-crc32c"));
    assert!(get(&q, Some("wrong-token-wrong-token")).starts_with("HTTP/1.1 401"));
    let t = "a-long-shared-group-token-for-tests";
    assert!(get("/v1/health", Some(t)).starts_with("HTTP/1.1 200"));
    assert!(
        get(&q, Some(t)).starts_with("HTTP/1.1 404"),
        "a version the source does not have"
    );
    let escape = "/v1/chunk?object=s3://models/group-auth/../secret&version=x&size=1&chunk_size=8388608&index=0";
    assert!(get(escape, Some(t)).starts_with("HTTP/1.1 400"));
    let other =
        "/v1/chunk?object=s3://models/elsewhere/f&version=x&size=1&chunk_size=8388608&index=0";
    assert!(get(other, Some(t)).starts_with("HTTP/1.1 404"));
}

#[test]
fn group_flags_are_checked_before_mounting() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 10, 1);
    let (src, mnt) = (w.src().display().to_string(), w.mnt().display().to_string());
    let cache = w.cache.path().display().to_string();
    let token = token_file(w.dir.path());
    let base = ["mount", &src, &mnt, "--cache-dir", &cache];
    let expect = |extra: &[&str], needle: &str| {
        let out = Command::new(bin()).args(base).args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{extra:?}: {err}"
        );
        assert!(!is_mounted(&w.mnt()));
    };
    expect(&["--listen", "127.0.0.1:0"], "need --peer-token-file");
    expect(&["--peers", "nonsense"], "host:port");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    expect(
        &[
            "--listen",
            &busy_addr,
            "--peer-token-file",
            token.to_str().unwrap(),
        ],
        "--listen",
    );
    std::fs::write(w.dir.path().join("short"), "abc").unwrap();
    expect(
        &[
            "--listen",
            "127.0.0.1:0",
            "--peer-token-file",
            w.dir.path().join("short").to_str().unwrap(),
        ],
        "shorter than 16",
    );
}
