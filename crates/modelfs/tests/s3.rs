//! Object storage through a real S3 server (Garage on loopback).
mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::s3::{garage, Fault, Proxy};
use common::*;

fn py_script() -> String {
    format!(
        "{}/tests/py/safetensors_mmap.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn push_then_mount_serves_every_byte() {
    let g = garage();
    let w = Work::new();
    w.synth("64MiB", 2);
    std::fs::create_dir_all(w.src().join("np")).unwrap();
    let st = Command::new("python3")
        .args([&py_script(), "make", w.src().join("np").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    write_file(&w.src().join("tokenizer/vocab.bin"), 70_000, 3);
    let said = g.push(&w.src(), "s3://models/push-mount");
    assert!(said.contains("pushed 8 files"), "{said}");
    let again = g.push(&w.src(), "s3://models/push-mount");
    assert!(
        again.contains("pushed 0 files") && again.contains("8 already there"),
        "{again}"
    );

    let m = w.mount_s3("s3://models/push-mount", &["--chunk-size", "4MiB"]);
    let mut names: Vec<String> = std::fs::read_dir(&m.mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = std::fs::read_dir(w.src())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.sort();
    assert_eq!(names, want, "prefixes become directories, objects files");
    assert!(m.path("tokenizer").is_dir() && m.path("np").is_dir());
    let mut total = 0;
    for n in &want {
        if m.path(n).is_file() {
            assert_same_file(&w.src().join(n), &m.path(n));
            total += std::fs::metadata(w.src().join(n)).unwrap().len();
        }
    }
    assert_same_file(
        &w.src().join("tokenizer/vocab.bin"),
        &m.path("tokenizer/vocab.bin"),
    );
    total += 70_000;
    for e in std::fs::read_dir(w.src().join("np")).unwrap() {
        total += e.unwrap().metadata().unwrap().len();
    }
    let out = Command::new("python3")
        .args([
            &py_script(),
            "check",
            w.src().join("np").to_str().unwrap(),
            m.path("np").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = m.stats();
    assert_eq!(
        s["bytes_from_source"].as_u64(),
        Some(total),
        "each byte fetched once: {s}"
    );
}

#[test]
fn eight_readers_fetch_each_chunk_from_the_origin_once() {
    let g = garage();
    let w = Work::new();
    let size = 128 << 20;
    write_file(&w.src().join("shard.safetensors"), size, 11);
    g.push(&w.src(), "s3://models/eight");
    let m = w.mount_s3("s3://models/eight", &[]);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            Command::new("cmp")
                .arg(w.src().join("shard.safetensors"))
                .arg(m.path("shard.safetensors"))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut r in readers {
        assert!(r.wait().unwrap().success());
    }
    let from_origin = m.stat_u64("bytes_from_source");
    assert!(
        from_origin as f64 <= size as f64 * 1.05 && from_origin >= size as u64,
        "{from_origin}"
    );
}

#[test]
fn a_replaced_object_is_a_new_version_and_never_mixed() {
    let g = garage();
    let w = Work::new();
    let v1 = write_file(&w.src().join("w.bin"), 8 << 20, 1);
    g.push(&w.src(), "s3://models/replace");
    let m = w.mount_s3(
        "s3://models/replace",
        &["--chunk-size", "1MiB", "--prefetch-concurrency", "0"],
    );
    let f = std::fs::File::open(m.path("w.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == v1[..1 << 20]);
    let v2 = write_file(&w.src().join("w.bin"), 8 << 20, 2);
    g.push(&w.src(), "s3://models/replace");
    // The old handle's next uncached chunk: the ETag no longer matches.
    let e = f.read_exact_at(&mut buf, 5 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf == v1[..1 << 20],
        "what the old version cached stays its own"
    );
    assert!(
        std::fs::read(m.path("w.bin")).unwrap() == v2,
        "a new open reads the new ETag"
    );
    assert!(m.stat_u64("version_changes") >= 1);
}

#[test]
fn listings_of_ten_thousand_objects_page_correctly() {
    let g = garage();
    let w = Work::new();
    let dir = w.src().join("many");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("obj-{i:05}")), format!("{i}")).unwrap();
    }
    let out = g
        .cmd()
        .args([
            "push",
            w.src().to_str().unwrap(),
            "s3://models/paging",
            "--endpoint",
            &g.endpoint,
            "--files",
            "64",
            "--no-read-back",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = w.mount_s3("s3://models/paging", &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names.first().map(String::as_str), Some("obj-00000"));
    assert_eq!(names.last().map(String::as_str), Some("obj-09999"));
    for i in [0, 999, 1000, 5001, 9999] {
        assert_eq!(
            std::fs::read_to_string(m.path(&format!("many/obj-{i:05}"))).unwrap(),
            i.to_string()
        );
    }
}

#[test]
fn faults_give_correct_bytes_or_eio_and_the_mount_recovers() {
    let g = garage();
    let w = Work::new();
    let a = write_file(&w.src().join("a.bin"), 24 << 20, 21);
    write_file(&w.src().join("b.bin"), 16 << 20, 22);
    g.push(&w.src(), "s3://models/faults");
    let proxy = Proxy::start(g.addr());
    let m = Mount::new(
        "s3://models/faults",
        &w.mnt(),
        w.cache.path(),
        &[
            "--endpoint",
            &proxy.endpoint(),
            "--chunk-size",
            "4MiB",
            "--prefetch-concurrency",
            "0",
            "--retries",
            "2",
            "--request-timeout",
            "2",
        ],
        &g.env,
    );
    let f = std::fs::File::open(m.path("a.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == a[..1 << 20]);

    for (fault, offset) in [
        (Fault::Unavailable, 8 << 20),
        (Fault::Reset, 12 << 20),
        (Fault::Stall, 16 << 20),
    ] {
        proxy.set(fault);
        let t = Instant::now();
        match f.read_exact_at(&mut buf, offset) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{fault:?}: {e}"),
            Ok(()) => assert!(
                buf == a[offset as usize..offset as usize + (1 << 20)],
                "{fault:?}: wrong bytes"
            ),
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{fault:?} took {:?}",
            t.elapsed()
        );
        // Cached bytes are still served while the origin is down.
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == a[..1 << 20], "{fault:?}: cached chunk");
    }
    proxy.set(Fault::Pass);
    assert_same_file(&w.src().join("a.bin"), &m.path("a.bin"));
    proxy.set(Fault::Flaky);
    assert_same_file(&w.src().join("b.bin"), &m.path("b.bin"));
    assert!(m.stat_u64("read_errors") >= 1);
}

#[test]
fn bad_object_store_inputs_fail_before_mounting() {
    let g = garage();
    let w = Work::new();
    write_file(&w.src().join("x.bin"), 10, 1);
    g.push(&w.src(), "s3://models/bad");
    let mnt = w.mnt();
    let cache = w.cache.path().to_str().unwrap().to_string();
    let proxy = Proxy::start(g.addr());
    proxy.set(Fault::Stall);
    let https = g.endpoint.replace("http://", "https://");
    let stalled = proxy.endpoint();
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec!["s3://no-such-bucket/m", "--endpoint", &g.endpoint],
            "bucket does not exist",
        ),
        (
            vec![("AWS_SECRET_ACCESS_KEY", "wrong")],
            vec!["s3://models/bad", "--endpoint", &g.endpoint],
            "access denied",
        ),
        (
            vec![],
            vec![
                "s3://models/bad",
                "--endpoint",
                "http://127.0.0.1:1",
                "--retries",
                "0",
            ],
            "cannot connect",
        ),
        (
            vec![],
            vec!["s3://models/bad", "--endpoint", &https, "--retries", "0"],
            "TLS failure",
        ),
        (
            vec![],
            vec![
                "s3://models/bad",
                "--endpoint",
                &stalled,
                "--retries",
                "0",
                "--request-timeout",
                "1",
            ],
            "did not answer",
        ),
        (
            vec![],
            vec!["s3://models/typo", "--endpoint", &g.endpoint],
            "holds no objects",
        ),
        (vec![], vec!["s4://models/bad"], "unknown scheme"),
    ];
    for (env, args, needle) in cases {
        let mut c = g.cmd();
        c.arg("mount")
            .args(&args)
            .arg(&mnt)
            .args(["--cache-dir", &cache]);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} mounted");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!is_mounted(&mnt));
    }
    let mut c = g.cmd();
    let out = c
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args([
            "mount",
            "s3://models/bad",
            mnt.to_str().unwrap(),
            "--cache-dir",
            &cache,
            "--endpoint",
            &g.endpoint,
            "--retries",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no credentials found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn endpoint_and_region_come_from_the_aws_environment_and_profile() {
    let g = garage();
    let w = Work::new();
    write_file(&w.src().join("m/a.bin"), (6 << 20) + 11, 21);
    g.push(&w.src().join("m"), "s3://models/aws-env");
    // The test Garage's credentials, without its AWS_REGION.
    let creds: Vec<(String, String)> = g
        .env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_") && k != "AWS_REGION")
        .cloned()
        .collect();
    let config = w.dir.path().join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\n\n[profile garage]\nregion = garage\nendpoint_url = {}\n",
            g.endpoint
        ),
    )
    .unwrap();
    let cases: [Vec<(&str, String)>; 2] = [
        vec![
            ("AWS_ENDPOINT_URL", g.endpoint.clone()),
            ("AWS_DEFAULT_REGION", "garage".into()),
        ],
        vec![
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_PROFILE", "garage".into()),
        ],
    ];
    for case in cases {
        let mut env = creds.clone();
        env.extend(case.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let m = Mount::new("s3://models/aws-env", &w.mnt(), w.cache.path(), &[], &env);
        assert_same_file(&w.src().join("m/a.bin"), &m.path("a.bin"));
        drop(m);
        std::fs::remove_dir_all(w.cache.path()).unwrap();
        std::fs::create_dir(w.cache.path()).unwrap();
    }
}
