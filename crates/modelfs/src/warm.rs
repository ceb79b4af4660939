//! `modelfs warm PATH`: fill this node's cache with everything under PATH (in
//! a modelfs mount) through the normal read path: peers, warm-up service,
//! origin. `--wait` is what a Kubernetes init container runs.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use modelfs_engine::size::ByteSize;

use crate::args::progress_bar;
use crate::control::read_stats;
use crate::mountpoint::{mounted_at, FSTYPE};

#[derive(Debug, Clone, clap::Args)]
pub struct WarmArgs {
    /// A modelfs mount, or a directory or file in one
    pub path: PathBuf,
    /// Stay until everything is cached (exit 0) instead of warming in the background
    #[arg(long)]
    pub wait: bool,
    /// Files read at once
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

fn mount_root(path: &Path) -> Result<PathBuf> {
    let abs = crate::mountpoint::absolute(path)?;
    for p in abs.ancestors() {
        if mounted_at(p).is_some_and(|t| t == FSTYPE) && read_stats(p).is_ok() {
            return Ok(p.to_path_buf());
        }
    }
    bail!("{} is not in a modelfs mount", abs.display())
}

fn files_under(p: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let m = std::fs::metadata(p).with_context(|| p.display().to_string())?;
    if m.is_file() {
        out.push((p.to_path_buf(), m.len()));
    } else if m.is_dir() {
        for e in std::fs::read_dir(p)? {
            files_under(&e?.path(), out)?;
        }
    }
    Ok(())
}

pub fn run(a: WarmArgs) -> Result<()> {
    let root = mount_root(&a.path)?;
    if !a.wait {
        let child = Command::new(std::env::current_exe()?)
            .args(["warm", "--wait", "--parallel", &a.parallel.to_string()])
            .arg(&a.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        println!(
            "modelfs: warming {} in the background (pid {})",
            a.path.display(),
            child.id()
        );
        return Ok(());
    }
    let mut files = vec![];
    files_under(&a.path, &mut files)?;
    let total: u64 = files.iter().map(|f| f.1).sum();
    let evicted_before = read_stats(&root)?.chunks_evicted;
    let bar = progress_bar(total)?;
    let t = Instant::now();
    let queue = Mutex::new(files.iter());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..a.parallel.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 8 << 20];
                loop {
                    let Some((path, _)) = queue.lock().unwrap().next() else {
                        return;
                    };
                    let r = (|| -> Result<()> {
                        let mut f = std::fs::File::open(path)?;
                        loop {
                            let n = f.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            bar.inc(n as u64);
                        }
                        // The chunk cache holds the bytes; the page cache need not.
                        // SAFETY: advisory call on an fd we own.
                        unsafe {
                            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                        };
                        Ok(())
                    })();
                    if let Err(e) = r {
                        *failed.lock().unwrap() =
                            Some(e.context(format!("reading {}", path.display())));
                        return;
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let evicted = read_stats(&root)?.chunks_evicted - evicted_before;
    if evicted > 0 {
        bail!("the cache is too small: {evicted} chunks were evicted while warming {}; raise --cache-size", ByteSize(total));
    }
    println!(
        "modelfs: warmed {} files ({}) in {:.1}s",
        files.len(),
        ByteSize(total),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
