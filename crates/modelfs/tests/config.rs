//! `modelfs run --config`: the seeds' EAS JSON verbatim, the TOML example,
//! one-line errors naming the key, MODELFS_* environment, and a real run of
//! two mounts with a warm-up service.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

fn dry_run(config: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(["run", "--dry-run", "--config"])
        .arg(config)
        .env_remove("MODELFS_PEER_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_seeds_eas_examples_read_verbatim() {
    // Stable Diffusion: a cache over the platform's OSS mount reads OSS itself.
    let out = dry_run(&example("eas-sd-webui.json"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "modelfs mount oss://path/to/models /code/stable-diffusion-webui/data-fast --cache-size=20G --foreground\n"
    );
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one info line: {err}");
    assert!(
        err.contains("INFO") && err.contains("cloud, containers, metadata, options"),
        "{err}"
    );
    assert!(err.contains("storage[1].properties"), "{err}");

    // vLLM with a warm-up service: it needs the group token from the environment.
    let out = dry_run(&example("eas-vllm-cacheroot.json"), &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains("INFO")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("storage[1].cache.cacheroot_service")
            && errors[0].contains("MODELFS_PEER_TOKEN_FILE"),
        "{err}"
    );
    let out = dry_run(
        &example("eas-vllm-cacheroot.json"),
        &[("MODELFS_PEER_TOKEN_FILE", "/etc/modelfs/token")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "modelfs mount oss://path/to/models/Qwen3-8B /mnt/models/Qwen3-8B-fast --cache-size=10G --warmup-service=http://your-cacheroot-service:7070 --foreground\n"
    );
}

#[test]
fn the_toml_example_names_flags_of_mount_and_serve() {
    let out = dry_run(&example("modelfs.toml"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("modelfs serve s3://models "));
    assert!(lines[0].contains("--preload=Qwen3-8B/ --preload=bge-m3/"));
    assert!(lines[1].starts_with("modelfs mount s3://models/Qwen3-8B /mnt/models/Qwen3-8B "));
    assert!(lines[1].contains("--peers=dns:modelfs-qwen:7070"));
    assert!(lines[2].contains("--chunk-size=4MiB") && lines[2].contains("--threads=4"));
}

#[test]
fn a_wrong_config_is_one_line_naming_the_key() {
    let w = Work::new();
    let cases: &[(&str, &str, &str)] = &[
        (
            "json",
            r#"{"storage":[{"cache":{"capacity":"20X","path":"/a"},"mount_path":"/b"}]}"#,
            "storage[0].cache.capacity",
        ),
        (
            "json",
            r#"{"storage":[{"cache":{"path":"/a"},"mount_path":"b"}]}"#,
            "storage[0].mount_path",
        ),
        (
            "json",
            r#"{"storage":[{"cache":{"path":"/a","preload":5},"mount_path":"/b"}]}"#,
            "storage[0].cache.preload",
        ),
        (
            "json",
            r#"{"storage":[{"mount_path":"/a","oss":{"path":"s3://x/"}}]}"#,
            "storage[0].oss.path",
        ),
        ("json", r#"{"containers":[]}"#, "storage: missing"),
        ("json", r#"{"storage":[}"#, "not JSON"),
        (
            "toml",
            "[[mount]]\nsource = \"/a\"\nmountpoint = \"/b\"\ncache-sise = \"1GiB\"\n",
            "mount[0].cache-sise: no such setting",
        ),
        (
            "toml",
            "[[mount]]\nsource = \"/a\"\nmountpoint = \"/b\"\ncache-size = \"lots\"\n",
            "mount[0].cache-size: invalid value 'lots'",
        ),
        (
            "toml",
            "[[mount]]\nsource = \"/a\"\nmountpoint = \"/b\"\nthreads = \"many\"\n",
            "mount[0].threads: invalid value 'many'",
        ),
        (
            "toml",
            "[[mount]]\nsource = \"/a\"\n",
            "mount[0].mountpoint: missing",
        ),
        (
            "toml",
            "[[serve]]\nsource = \"/a\"\npeer-token-file = \"/t\"\n",
            "serve[0]: the following required arguments were not provided",
        ),
        (
            "toml",
            "[[mount]]\nsource = \"/a\"\nmountpoint = \"/b\"\nforeground = true\n",
            "mount[0].foreground",
        ),
        ("toml", "[mounts]\n", "mounts: unknown section"),
        ("toml", "", "describes no mount and no service"),
    ];
    for (i, (ext, body, want)) in cases.iter().enumerate() {
        let f = w.dir.path().join(format!("c{i}.{ext}"));
        std::fs::write(&f, body).unwrap();
        let out = dry_run(&f, &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{body}: accepted");
        assert_eq!(err.lines().count(), 1, "{body}: one line: {err}");
        assert!(err.contains(want), "{body}: wanted {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn every_mount_flag_also_comes_from_the_environment() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 3 << 20, 1);
    let mp = w.mnt();
    let out = Command::new(bin())
        .args(["mount", w.src().to_str().unwrap(), mp.to_str().unwrap()])
        .env("MODELFS_CACHE_SIZE", "3GiB")
        .env("MODELFS_CACHE_DIR", w.cache.path())
        .env("MODELFS_CHUNK_SIZE", "4MiB")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m = Mount { mp };
    assert_eq!(m.stat_u64("cache_bytes_capacity"), 3 << 30);
    assert_eq!(m.stat_u64("chunk_size"), 4 << 20);
    assert_same_file(&w.src().join("f.bin"), &m.path("f.bin"));
}

/// `modelfs run`, stopped and its mounts taken down even if the test fails.
struct Run {
    child: Child,
    mounts: Vec<PathBuf>,
}

impl Drop for Run {
    fn drop(&mut self) {
        // SIGTERM first, so that run stops its children and unmounts;
        // SIGKILL if it has not within 20 s.
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our child, not reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for mp in &self.mounts {
            if is_mounted(mp) {
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

#[test]
fn run_mounts_two_models_with_a_warmup_service_and_stops_on_sigterm() {
    let w = Work::new();
    let models = w.dir.path().join("models");
    for (m, seed) in [("qwen", 1), ("bge", 2)] {
        write_file(&models.join(m).join("model.safetensors"), 17 << 20, seed);
        write_file(&models.join(m).join("config.json"), 1000, seed + 10);
    }
    let token = token_file(w.dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let cache = w.cache.path();
    // The two mount points do not exist yet: run makes them.
    let mp = |m: &str| w.dir.path().join("mnt").join(m);
    let config = format!(
        r#"
[[serve]]
source = "{models}"
listen = "{listen}"
preload = ["qwen/", "bge/"]
cache-dir = "{cache}/serve"
cache-size = "1GiB"
peer-token-file = "{token}"

[[mount]]
source = "{models}/qwen"
mountpoint = "{qwen}"
cache-dir = "{cache}/qwen"
cache-size = "1GiB"
warmup-service = "http://{listen}"
peer-token-file = "{token}"
preload = ["/"]

[[mount]]
source = "{models}/bge"
mountpoint = "{bge}"
cache_dir = "{cache}/bge"
cache_size = "1GiB"
"#,
        models = models.display(),
        cache = cache.display(),
        token = token.display(),
        qwen = mp("qwen").display(),
        bge = mp("bge").display(),
    );
    let f = w.dir.path().join("modelfs.toml");
    std::fs::write(&f, config).unwrap();
    let log = w.dir.path().join("run.log");
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&f)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut run = Run {
        child,
        mounts: vec![mp("qwen"), mp("bge")],
    };
    wait_until("both mounts", Duration::from_secs(60), || {
        is_mounted(&mp("qwen")) && is_mounted(&mp("bge"))
    });
    let qwen = Mount { mp: mp("qwen") };
    let bge = Mount { mp: mp("bge") };
    wait_until("the qwen preload", Duration::from_secs(60), || {
        qwen.stats()["preload"]["complete"] == true
    });
    for (m, name) in [(&qwen, "qwen"), (&bge, "bge")] {
        for f in ["model.safetensors", "config.json"] {
            assert_same_file(&models.join(name).join(f), &m.path(f));
        }
    }
    // run starts the service before the mounts: qwen got it all from there.
    let s = qwen.stats();
    assert_eq!(s["bytes_from_warmup"], (17 << 20) + 1000, "{s}");
    assert_eq!(s["bytes_from_source"], 0, "{s}");

    // SIGTERM stops everything: both mounts gone, the service too, exit 0.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("run to stop", Duration::from_secs(30), || {
        status = run.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(
        status.unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!is_mounted(&mp("qwen")) && !is_mounted(&mp("bge")));
    std::mem::forget(qwen);
    std::mem::forget(bge);
    let serve_gone = std::net::TcpStream::connect(&listen).is_err();
    assert!(serve_gone, "the warm-up service stopped");
}

#[test]
fn a_mount_that_fails_stops_the_others_and_says_why() {
    let w = Work::new();
    write_file(&w.src().join("f.bin"), 1 << 20, 3);
    let (a, b) = (w.dir.path().join("a"), w.dir.path().join("b"));
    let config = format!(
        "[[mount]]\nsource = \"{src}\"\nmountpoint = \"{a}\"\ncache-dir = \"{c}/a\"\ncache-size = \"1GiB\"\n\n\
         [[mount]]\nsource = \"{src}/missing\"\nmountpoint = \"{b}\"\ncache-dir = \"{c}/b\"\ncache-size = \"1GiB\"\n",
        src = w.src().display(),
        a = a.display(),
        b = b.display(),
        c = w.cache.path().display(),
    );
    let f = w.dir.path().join("bad.toml");
    std::fs::write(&f, config).unwrap();
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&f)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = Run {
        child,
        mounts: vec![a.clone(), b.clone()],
    };
    let mut g = _guard;
    let status = g.child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(g.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("modelfs: ") && last.contains("missing"),
        "{err}"
    );
    assert!(!is_mounted(&a), "the first mount was taken down");
}

#[test]
fn run_mounts_an_eas_cache_over_a_nas_path_with_preload() {
    let w = Work::new();
    // The directory the platform mounted the NAS on.
    let nas = w.dir.path().join("nas");
    let data = write_file(&nas.join("Qwen3-8B/model.safetensors"), (9 << 20) + 5, 7);
    let fast = w.dir.path().join("fast/Qwen3-8B");
    let json = format!(
        r#"{{
    "containers": [{{"image": "vllm", "script": "vllm serve {fast}/"}}],
    "storage": [
        {{"mount_path": "{nas}/", "nas": {{"path": "1a2b-xyz.cn-hangzhou.nas.aliyuncs.com:/", "version": "v3"}}}},
        {{"cache": {{"capacity": "1G", "path": "{nas}/Qwen3-8B/", "preload": "/"}}, "mount_path": "{fast}/"}}
    ]
}}"#,
        nas = nas.display(),
        fast = fast.display()
    );
    let f = w.dir.path().join("service.json");
    std::fs::write(&f, json).unwrap();
    let log = w.dir.path().join("run.log");
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&f)
        // The cache dir derives from the source: keep it in this test's.
        .env("MODELFS_CACHE_DIR", w.cache.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut run = Run {
        child,
        mounts: vec![fast.clone()],
    };
    wait_until("the mount", Duration::from_secs(60), || is_mounted(&fast));
    let m = Mount { mp: fast.clone() };
    wait_until("the preload", Duration::from_secs(60), || {
        common::run(&["warm", "--check", fast.to_str().unwrap()])
            .status
            .success()
    });
    assert_eq!(
        m.stat_u64("cache_bytes_capacity"),
        1 << 30,
        "\"1G\" is 1 GiB"
    );
    assert_eq!(
        std::fs::read(m.path("model.safetensors")).unwrap(),
        data,
        "the bytes of the NAS file"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("ignoring what modelfs does not use: containers, storage[0].nas.path"),
        "{text}"
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("run to stop", Duration::from_secs(30), || {
        status = run.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(!is_mounted(&fast));
    std::mem::forget(m);
}

/// The children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Gone, or a zombie nobody reaps (PID 1 in a container may not).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_none_or(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

/// An endpoint that accepts connections and never answers, for as long as
/// the test process lives.
fn silent_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
    format!("http://{addr}")
}

fn start_run(w: &Work, config: &str, mounts: Vec<PathBuf>) -> Run {
    let f = w.dir.path().join("modelfs.toml");
    std::fs::write(&f, config).unwrap();
    let log = w.dir.path().join("run.log");
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&f)
        .env("AWS_ACCESS_KEY_ID", "GKtest")
        .env("AWS_SECRET_ACCESS_KEY", "secret-for-tests")
        .env("AWS_REGION", "garage")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Run { child, mounts }
}

#[test]
fn run_stops_on_sigterm_while_a_service_it_starts_hangs() {
    sigterm_while_starting(true);
}

#[test]
fn run_stops_on_sigterm_while_a_mount_it_starts_hangs() {
    sigterm_while_starting(false);
}

/// `run` whose first child (a service, or a mount) is stuck on a source
/// that never answers: SIGTERM stops it and that child within seconds.
fn sigterm_while_starting(with_serve: bool) {
    let w = Work::new();
    let token = token_file(w.dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let mp = w.dir.path().join("mnt");
    let config = format!(
        r#"
[[serve]]
source = "s3://models"
endpoint = "{endpoint}"
listen = "{listen}"
cache-dir = "{cache}/serve"
cache-size = "1GiB"
peer-token-file = "{token}"

[[mount]]
source = "{src}"
mountpoint = "{mp}"
cache-dir = "{cache}/mount"
"#,
        src = if with_serve {
            w.dir.path().display().to_string()
        } else {
            "s3://models".to_string()
        },
        endpoint = silent_endpoint(),
        cache = w.cache.path().display(),
        token = token.display(),
        mp = mp.display(),
    );
    let config = if with_serve {
        config
    } else {
        // The mount alone, its source the silent endpoint too.
        let (_, mount) = config.split_once("[[mount]]").unwrap();
        format!("[[mount]]{mount}endpoint = \"{}\"\n", silent_endpoint())
    };
    let mut run = start_run(&w, &config, vec![mp.clone()]);
    let pid = run.child.id();
    let mut serve = vec![];
    wait_until("run to start its child", Duration::from_secs(10), || {
        serve = children(pid);
        !serve.is_empty()
    });
    // The child is stuck listing its source; run waits for it.
    std::thread::sleep(Duration::from_secs(1));
    assert!(run.child.try_wait().unwrap().is_none());
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("run to stop", Duration::from_secs(5), || {
        status = run.child.try_wait().unwrap();
        status.is_some()
    });
    let log = std::fs::read_to_string(w.dir.path().join("run.log")).unwrap();
    assert!(status.unwrap().success(), "{log}");
    wait_until("the child to stop", Duration::from_secs(5), || {
        serve.iter().all(|&p| exited(p))
    });
    assert!(!is_mounted(&mp), "nothing was mounted");
}

#[test]
fn run_killed_takes_its_services_and_mounts_with_it() {
    let w = Work::new();
    let models = w.dir.path().join("models");
    write_file(&models.join("qwen/a.bin"), 3 << 20, 31);
    let token = token_file(w.dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let mp = w.dir.path().join("mnt");
    let config = format!(
        r#"
[[serve]]
source = "{models}"
listen = "{listen}"
cache-dir = "{cache}/serve"
cache-size = "1GiB"
peer-token-file = "{token}"

[[mount]]
source = "{models}/qwen"
mountpoint = "{mp}"
cache-dir = "{cache}/mount"
warmup-service = "http://{listen}"
peer-token-file = "{token}"
"#,
        models = models.display(),
        cache = w.cache.path().display(),
        token = token.display(),
        mp = mp.display(),
    );
    let mut run = start_run(&w, &config, vec![mp.clone()]);
    wait_until("the mount", Duration::from_secs(60), || is_mounted(&mp));
    assert_same_file(&models.join("qwen/a.bin"), &mp.join("a.bin"));
    let kids = children(run.child.id());
    assert_eq!(kids.len(), 2, "a service and a mount: {kids:?}");

    // Killed, it cannot stop them itself: the kernel tells them.
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    wait_until("its children to exit", Duration::from_secs(20), || {
        kids.iter().all(|&p| exited(p))
    });
    wait_until("the mount to go", Duration::from_secs(5), || {
        !is_mounted(&mp)
    });
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "the service's port is free"
    );
}
