//! `--log-format json` and the Prometheus metrics' conventions, from a real
//! mount.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn metrics_follow_prometheus_conventions() {
    let w = Work::new();
    let size = (9 << 20) + 123;
    write_file(&w.src().join("f.bin"), size, 1);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = w.mount(&["--metrics-listen", &addr, "--preload", "/"]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    let want = format!("modelfs_read_bytes_total{{tier=\"source\"}} {size}");
    wait_until("the metrics", Duration::from_secs(15), || {
        scrape(&addr).contains(&want)
    });
    let text = scrape(&addr);
    for tier in ["cache", "peer", "warmup", "source"] {
        assert!(
            text.contains(&format!("modelfs_read_bytes_total{{tier=\"{tier}\"}}")),
            "{tier}: {text}"
        );
    }
    assert!(text.contains("# TYPE modelfs_fetch_duration_seconds histogram"));
    assert!(text.contains("# TYPE modelfs_read_duration_seconds histogram"));
    assert!(text.contains("modelfs_read_duration_seconds_count"));
    assert!(text.contains("modelfs_fetch_duration_seconds_bucket{tier=\"source\",le=\"0.001\"}"));
    assert!(text.contains("modelfs_preload_complete 1"), "{text}");
    let mut families = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let f: Vec<&str> = line.split(' ').collect();
        let (name, kind) = (f[2], f[3]);
        families += 1;
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has HELP text"
        );
        match kind {
            "counter" => assert!(name.ends_with("_total"), "{name}"),
            _ => assert!(!name.ends_with("_total"), "{name}"),
        }
        if name.contains("bytes") {
            assert!(
                name.ends_with("_bytes") || name.ends_with("_bytes_total"),
                "the unit is the suffix: {name}"
            );
        }
    }
    assert!(families >= 15, "{text}");
    // Labels: the tier and histogram buckets only, a bounded set.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
        for kv in labels.split(',') {
            let key = kv.split('=').next().unwrap();
            assert!(key == "tier" || key == "le", "{line}");
        }
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 1 << 20, 2);
    let log = w.dir.path().join("mount.log");
    let m = w.mount(&["--log-format", "json", "--log-file", log.to_str().unwrap()]);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
    drop(m);
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mounted = events
        .iter()
        .find(|e| e["message"] == "mounted")
        .unwrap_or_else(|| panic!("no mounted event: {text}"));
    assert_eq!(mounted["level"], "INFO");
    assert!(mounted["mountpoint"].as_str().unwrap().ends_with("/mnt"));
    assert!(events.iter().any(|e| e["message"] == "unmounted"), "{text}");
    // A failing command says why in one JSON line too.
    let out = run(&["--log-format", "json", "stat", "/nonexistent-mount"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let e: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(e["level"], "ERROR");
}
