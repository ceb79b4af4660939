//! Bad input gets a one-line error naming the problem, a non-zero exit, and
//! leaves nothing mounted.
mod common;

use common::*;

fn expect_error(args: &[&str], needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn each_bad_input_has_its_error() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 10, 1);
    let (src, mnt, cache) = (
        w.src().display().to_string(),
        w.mnt().display().to_string(),
        w.cache.path().display().to_string(),
    );
    let base = |s: &str, m: &str| {
        vec![
            "mount".to_string(),
            s.to_string(),
            m.to_string(),
            "--cache-dir".into(),
            cache.clone(),
        ]
    };
    let call = |v: Vec<String>, extra: &[&str], needle: &str| {
        let mut v = v;
        v.extend(extra.iter().map(|s| s.to_string()));
        expect_error(&v.iter().map(String::as_str).collect::<Vec<_>>(), needle);
        assert!(!is_mounted(&w.mnt()));
    };
    call(base("/no/such/model", &mnt), &[], "cannot be read");
    call(base(&format!("{src}/f.bin"), &mnt), &[], "is a file");
    call(base("ftp://host/models", &mnt), &[], "unknown scheme");
    call(base(&src, "/no/such/mountpoint"), &[], "does not exist");
    call(base(&src, &src), &[], "not empty");
    call(
        base(&src, &mnt),
        &["--cache-size", "1MiB"],
        "below one chunk",
    );
    call(
        base(&src, &mnt),
        &["--chunk-size", "1000"],
        "multiple of 4KiB",
    );
    for bad in [
        "-0.5",
        "--peer-verify-sample=-1",
        "1.5",
        "NaN",
        "inf",
        "lots",
        "",
    ] {
        let args = match bad.strip_prefix("--") {
            Some(_) => vec![bad],
            None => vec!["--peer-verify-sample", bad],
        };
        call(
            base(&src, &mnt),
            &args,
            "give the fraction of chunks to check",
        );
    }
    call(
        vec![
            "mount".into(),
            src.clone(),
            mnt.clone(),
            "--cache-dir".into(),
            "/proc/modelfs-cache".into(),
        ],
        &[],
        "not writable",
    );
    expect_error(&["stat", &mnt], "not a modelfs mount");
    expect_error(&["unmount", &mnt], "is not mounted");
    let out = run(&["mount", &src, &mnt, "--cache-size", "lots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
}

#[test]
fn a_busy_mount_point_or_cache_dir_is_refused() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 10, 1);
    let _m = w.mount(&[]);
    let (src, mnt) = (w.src().display().to_string(), w.mnt().display().to_string());
    let other_cache = tempfile::tempdir_in("/dev/shm").unwrap();
    expect_error(
        &[
            "mount",
            &src,
            &mnt,
            "--cache-dir",
            other_cache.path().to_str().unwrap(),
        ],
        "already mounted",
    );
    let other_mnt = tempfile::tempdir_in("/var/tmp").unwrap();
    expect_error(
        &[
            "mount",
            &src,
            other_mnt.path().to_str().unwrap(),
            "--cache-dir",
            w.cache.path().to_str().unwrap(),
        ],
        "in use by another modelfs",
    );
    assert!(!is_mounted(other_mnt.path()));
    assert_same_file(&w.src().join("f.bin"), &w.mnt().join("f.bin"));
}
