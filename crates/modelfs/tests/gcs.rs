//! gs:// through a real emulator (gcp-storage-emulator from PyPI, the JSON
//! API), as S3 is tested against Garage and Azure against Azurite.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::s3::spawn_for_process;
use common::*;

/// One emulator per test process, dying with it; its address.
fn emulator() -> &'static str {
    static E: OnceLock<String> = OnceLock::new();
    E.get_or_init(|| {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("gcp-storage-emulator");
        cmd.args(["start", "--host=127.0.0.1", "--in-memory", "--default-bucket=models"])
            .arg(format!("--port={port}"));
        let log = tempfile::tempfile().unwrap();
        spawn_for_process(cmd, log).unwrap_or_else(|e| {
            panic!("starting gcp-storage-emulator: {e} (./test.sh installs it: pip install gcp-storage-emulator)")
        });
        let addr = format!("127.0.0.1:{port}");
        wait_until("the emulator", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        addr
    })
}

/// Uploads every file under `dir` to gs://models/PREFIX/..., as the JSON API's
/// simple upload.
fn upload(dir: &Path, prefix: &str) {
    let script = r#"
import os, sys, urllib.parse, urllib.request
host, root, prefix = sys.argv[1:]
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        name = prefix + "/" + os.path.relpath(p, root)
        url = "http://%s/upload/storage/v1/b/models/o?uploadType=media&name=%s" % (host, urllib.parse.quote(name, safe=""))
        with open(p, "rb") as fh:
            urllib.request.urlopen(urllib.request.Request(url, data=fh.read(), method="POST")).read()
"#;
    let st = Command::new("python3")
        .args(["-c", script, emulator(), dir.to_str().unwrap(), prefix])
        .status()
        .unwrap();
    assert!(st.success());
}

fn files_under(dir: &Path, out: &mut Vec<String>, root: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out, root);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_str().unwrap().to_string());
        }
    }
}

#[test]
fn gs_mounts_through_the_emulator_and_serves_every_byte() {
    let w = Work::new();
    w.synth("24MiB", 2);
    write_file(&w.src().join("tokenizer/vocab.bin"), 70_001, 5);
    upload(&w.src(), "qwen");
    let env = [("STORAGE_EMULATOR_HOST".to_string(), emulator().to_string())];
    let m = Mount::new(
        "gs://models/qwen",
        &w.mnt(),
        w.cache.path(),
        &["--chunk-size", "4MiB"],
        &env,
    );
    let mut want = vec![];
    files_under(&w.src(), &mut want, &w.src());
    want.sort();
    let mut got = vec![];
    files_under(&m.mp, &mut got, &m.mp);
    got.sort();
    assert_eq!(got, want);
    for f in &want {
        assert_same_file(&w.src().join(f), &m.path(f));
    }
    let from_source = m.stat_u64("bytes_from_source");
    for f in &want {
        drop_page_cache(&m.path(f));
        assert_same_file(&w.src().join(f), &m.path(f));
    }
    assert_eq!(
        m.stat_u64("bytes_from_source"),
        from_source,
        "warm reads from the cache"
    );
}

#[test]
fn gs_errors_name_google_settings() {
    let w = Work::new();
    let mnt = w.mnt();
    let mount = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["mount", "gs://models/none", mnt.to_str().unwrap()];
        args.extend(["--retries", "0", "--request-timeout", "5"]);
        args.extend(extra);
        let out = Command::new(bin())
            .args(&args)
            .env_remove("STORAGE_EMULATOR_HOST")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("CLOUDSDK_CONFIG")
            // No gcloud credentials of this machine, and the VM metadata
            // server looked for on a closed loopback port, never off-host.
            .env("HOME", w.dir.path())
            .env("GCE_METADATA_HOST", "127.0.0.1:1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Credentials: Google's, never AWS's.
    let endpoint = format!("http://{}", emulator());
    let err = mount(&["--endpoint", &endpoint], &[]);
    assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{err}");
    assert!(!err.contains("AWS"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // An endpoint that is some web server, not the service.
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let body = "<html><body>Not Found</body></html>";
            let _ = write!(
                c,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let err = mount(&[], &[("STORAGE_EMULATOR_HOST", &web_addr)]);
    assert!(
        err.contains("does not speak the Google Cloud Storage API"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A bucket that does not exist.
    let out = Command::new(bin())
        .args(["mount", "gs://no-such-bucket/m", mnt.to_str().unwrap()])
        .env("STORAGE_EMULATOR_HOST", emulator())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the bucket does not exist"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!is_mounted(&w.mnt()));
}
