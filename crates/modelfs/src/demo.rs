//! `modelfs demo`: a synthetic model, mounted through modelfs, loaded cold
//! and warm with the safetensors crate, every tensor checked against the
//! source, next to reading the source directly.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use modelfs_engine::size::ByteSize;
use safetensors::SafeTensors;

use crate::control;

/// Asks the kernel to drop a file's cached pages so the next read is cold.
pub fn drop_page_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    f.sync_all().ok();
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Loads every tensor of every shard (mmap, as loaders do) and hashes it.
/// Returns the hashes by tensor name and the bytes loaded.
pub fn load(files: &[PathBuf]) -> Result<(HashMap<String, u64>, u64)> {
    let mut hashes = HashMap::new();
    let mut bytes = 0;
    for p in files {
        let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
        // SAFETY: the file is read-only for the life of the map.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        let st =
            SafeTensors::deserialize(&map).with_context(|| format!("parsing {}", p.display()))?;
        for (name, t) in st.tensors() {
            bytes += t.data().len() as u64;
            hashes.insert(name, xxhash_rust::xxh3::xxh3_64(t.data()));
        }
    }
    Ok((hashes, bytes))
}

fn timed_load(files: &[PathBuf], expect: &HashMap<String, u64>) -> Result<f64> {
    let t = Instant::now();
    let (got, bytes) = load(files)?;
    let secs = t.elapsed().as_secs_f64();
    if &got != expect {
        let bad = expect
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .count();
        bail!("{bad} tensors differ from the source");
    }
    Ok(bytes as f64 / secs / 1e6)
}

pub fn run(size: ByteSize, files: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let tmp = tempfile::Builder::new()
        .prefix("modelfs-demo")
        .tempdir_in("/var/tmp")?;
    let src = tmp.path().join("source");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    say!(
        "making a {size} synthetic safetensors model in {}",
        src.display()
    );
    let shards = crate::synth::make_model(&src, size.0, files, 42, "bf16")?;
    for s in &shards {
        drop_page_cache(s)?;
    }
    let (expect, total) = load(&shards)?;
    for s in &shards {
        drop_page_cache(s)?;
    }
    let direct = timed_load(&shards, &expect)?;

    let cache = tempfile::Builder::new()
        .prefix("modelfs-demo-cache")
        .tempdir_in("/dev/shm")?;
    let status = Command::new(&exe)
        .args([
            "mount",
            src.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "--cache-size",
            "4GiB",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .status()?;
    if !status.success() {
        bail!("mount failed");
    }
    let unmount = scopeguard(&mnt);
    let names: Vec<PathBuf> = shards
        .iter()
        .map(|s| mnt.join(s.file_name().unwrap()))
        .collect();
    let cold = timed_load(&names, &expect)?;
    let warm = timed_load(&names, &expect)?;
    for n in &names {
        drop_page_cache(n)?;
    }
    let from_cache = timed_load(&names, &expect)?;
    let s = control::read_stats(&mnt)?;
    drop(unmount);

    say!("");
    say!(
        "{} tensors, {} verified against the source on every load",
        expect.len(),
        ByteSize(total)
    );
    say!(
        "{:<44} {:>10} {:>12}",
        "load (safetensors crate, mmap)",
        "MB/s",
        "vs source"
    );
    for (name, v) in [
        ("source directory, read directly (cold)", direct),
        ("modelfs, cold (from the source)", cold),
        ("modelfs, warm (page cache kept)", warm),
        ("modelfs, page cache dropped (chunk cache)", from_cache),
    ] {
        say!("{name:<44} {v:>10.0} {:>11.2}x", v / direct);
    }
    say!("");
    say!(
        "source bytes read {} for a {} model; passthrough {} ({} of {} opens)",
        ByteSize(s.bytes_from_source),
        ByteSize(total),
        s.passthrough,
        s.passthrough_opens,
        s.opens
    );
    Ok(())
}

/// Unmounts when dropped, so the demo never leaves a mount behind.
struct Unmount(PathBuf);

fn scopeguard(mp: &Path) -> Unmount {
    Unmount(mp.to_path_buf())
}

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = control::unmount(&self.0) {
            tell!("modelfs demo: {e:#}");
        }
    }
}
