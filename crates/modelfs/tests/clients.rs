//! Real clients through the mount: Python safetensors (mmap), the safetensors
//! crate, fio with verification.
mod common;

use std::process::Command;

use common::*;

fn script() -> String {
    format!(
        "{}/tests/py/safetensors_mmap.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn python_safetensors_lazy_mmap_load_matches_the_source() {
    let w = Work::new();
    let st = Command::new("python3")
        .args([&script(), "make", w.src().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "python3 with safetensors and numpy is required (./test.sh installs them)"
    );
    let m = w.mount(&["--chunk-size", "2MiB"]);
    for pass in ["cold", "warm"] {
        let out = Command::new("python3")
            .args([
                &script(),
                "check",
                w.src().to_str().unwrap(),
                m.mp.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{pass}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    }
}

#[test]
fn safetensors_crate_loads_a_synthetic_model_through_the_mount() {
    let w = Work::new();
    w.synth("96MiB", 3);
    let m = w.mount(&[]);
    let mut shards = 0;
    for e in std::fs::read_dir(w.src()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".safetensors") {
            assert_same_file(&p, &m.path(&name));
            continue;
        }
        shards += 1;
        let (fa, fb) = (
            std::fs::File::open(&p).unwrap(),
            std::fs::File::open(m.path(&name)).unwrap(),
        );
        // SAFETY: read-only maps of files nobody writes during the test.
        let (ma, mb) = unsafe {
            (
                memmap2::Mmap::map(&fa).unwrap(),
                memmap2::Mmap::map(&fb).unwrap(),
            )
        };
        let a = safetensors::SafeTensors::deserialize(&ma).unwrap();
        let b = safetensors::SafeTensors::deserialize(&mb).unwrap();
        assert_eq!(a.names().len(), b.names().len());
        for (n, t) in a.tensors() {
            let u = b.tensor(&n).unwrap();
            assert_eq!((t.dtype(), t.shape()), (u.dtype(), u.shape()), "{n}");
            assert!(t.data() == u.data(), "{name}:{n} differs");
        }
    }
    assert_eq!(shards, 3);
}

#[test]
fn fio_random_reads_verify() {
    let w = Work::new();
    let file = w.src().join("fio.dat");
    // fio leaves verify state files in its working directory.
    let fio = |path: &std::path::Path, rw: &str, extra: &[&str]| {
        Command::new("fio")
            .current_dir(w.dir.path())
            .args([
                "--name=v",
                "--size=48M",
                "--bs=64k",
                "--verify=crc32c",
                "--randseed=7",
                "--ioengine=psync",
            ])
            .arg(format!("--rw={rw}"))
            .arg(format!("--filename={}", path.display()))
            .args(extra)
            .output()
            .expect("fio is required (./test.sh installs it)")
    };
    // fio writes blocks that carry their own offset and crc32c ...
    assert!(fio(&file, "randwrite", &["--do_verify=0"]).status.success());
    let m = w.mount(&["--chunk-size", "1MiB"]);
    // ... and checks every block it reads back, in random order.
    for pass in ["cold", "warm"] {
        let out = fio(&m.path("fio.dat"), "randread", &[]);
        assert!(
            out.status.success(),
            "{pass}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Mixed-size random reads with fio's own engine, checked against the source.
    let out = Command::new("fio")
        .current_dir(w.dir.path())
        .args([
            "--name=r",
            "--rw=randread",
            "--bsrange=4k-1m",
            "--size=48M",
            "--ioengine=psync",
            "--readonly",
            "--runtime=5",
        ])
        .arg(format!("--filename={}", m.path("fio.dat").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_same_file(&file, &m.path("fio.dat"));
}
