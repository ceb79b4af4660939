//! `modelfs warm PATH`: fill this node's cache with everything under PATH (in
//! a modelfs mount) through the normal read path: peers, warm-up service,
//! origin, in the foreground; `--check` is the cheap probe that reads nothing.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use modelfs_engine::size::ByteSize;

use crate::args::progress_bar;
use crate::control::read_stats;
use crate::fuse::CACHED_XATTR;
use crate::mountpoint::{mounted_at, FSTYPE};

#[derive(Debug, Clone, clap::Args)]
pub struct WarmArgs {
    /// A modelfs mount, or a directory or file in one
    pub path: PathBuf,
    /// More paths: to warm, or with --check to check (relative to the mount or absolute)
    pub paths: Vec<PathBuf>,
    /// Exit 0 if everything named is cached, 1 if not, reading no byte (a
    /// probe); with no path, what the mount's --preload names (or all of the
    /// mount); fails on a path that does not exist
    #[arg(long)]
    pub check: bool,
    /// Warm in the background and return at once
    #[arg(long, conflicts_with_all = ["check", "wait"])]
    pub background: bool,
    /// Stay until everything is cached (the default; kept for scripts)
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

/// `path` as the mount sees it: relative to its root, no slashes around.
fn in_mount(root: &Path, path: &Path) -> Result<String> {
    let abs = if path.is_absolute() {
        crate::mountpoint::absolute(path)?
    } else {
        crate::mountpoint::absolute(&root.join(path))?
    };
    let rel = abs
        .strip_prefix(root)
        .map_err(|_| anyhow!("{} is not in the mount {}", path.display(), root.display()))?;
    Ok(rel.to_string_lossy().trim_matches('/').to_string())
}

/// Answers from the daemon's preload status (the mount alone, with a
/// preload) or from each file's cached-bytes xattr: no file is opened.
fn check(a: &WarmArgs) -> Result<()> {
    let root = mount_root(&a.path)?;
    let mut named = a
        .paths
        .iter()
        .map(|p| in_mount(&root, p))
        .collect::<Result<Vec<_>>>()?;
    let first = in_mount(&root, &crate::mountpoint::absolute(&a.path)?)?;
    if !first.is_empty() {
        named.push(first);
    }
    // A typo must not pass for "cached": a path the preload does not list
    // is missing from no list. A lookup reads no byte.
    for n in &named {
        let full = root.join(n);
        if let Err(e) = std::fs::symlink_metadata(&full) {
            if e.kind() == std::io::ErrorKind::NotFound {
                bail!(
                    "{} does not exist in the mount {}; check the path",
                    full.display(),
                    root.display()
                );
            }
            return Err(e).with_context(|| full.display().to_string());
        }
    }
    let preload = read_stats(&root)?.preload;
    let Some(p) = preload.filter(|_| named.is_empty()) else {
        return check_files(&root, &named);
    };
    if !p.error.is_empty() {
        bail!("the preload failed: {}", p.error);
    }
    if !p.listed {
        bail!("not cached yet: the mount is still listing what --preload names");
    }
    let missing: Vec<&String> = p.not_cached.iter().collect();
    // The daemon names at most NOT_CACHED_SHOWN missing files.
    let unlisted = (p.files - p.files_cached) as usize > p.not_cached.len();
    let progress = format!(
        "{} of {} files of the preload ({} of {})",
        p.files_cached,
        p.files,
        ByteSize(p.bytes_cached),
        ByteSize(p.bytes)
    );
    if p.complete || (missing.is_empty() && !unlisted) {
        say!("modelfs: cached: {progress}");
        return Ok(());
    }
    let mut names: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
    if missing.len() > 5 || unlisted {
        names.push("...");
    }
    bail!("not cached yet: {progress}; missing {}", names.join(", "))
}

/// Every file under `named` (the whole mount if none), cached or not, from
/// the `user.modelfs.cached` xattr: lookups and listings, no reads.
fn check_files(root: &Path, named: &[String]) -> Result<()> {
    let mut files = vec![];
    let whole = [String::new()];
    for n in if named.is_empty() { &whole[..] } else { named } {
        files_under(&root.join(n), &mut files)?;
    }
    let (mut bytes, mut cached, mut missing) = (0u64, 0u64, vec![]);
    for (f, size) in &files {
        let raw = xattr::get(f, CACHED_XATTR)
            .with_context(|| f.display().to_string())?
            .with_context(|| {
                format!(
                    "{} has no {CACHED_XATTR}; is it in a modelfs mount?",
                    f.display()
                )
            })?;
        let v: serde_json::Value =
            serde_json::from_slice(&raw).context("reading the cached bytes")?;
        let c = v["cached"].as_u64().unwrap_or(0).min(*size);
        bytes += size;
        cached += c;
        if c < *size {
            missing.push(f.strip_prefix(root).unwrap_or(f).display().to_string());
        }
    }
    let progress = format!(
        "{} of {} files ({} of {})",
        files.len() - missing.len(),
        files.len(),
        ByteSize(cached),
        ByteSize(bytes)
    );
    if missing.is_empty() {
        say!("modelfs: cached: {progress}");
        return Ok(());
    }
    let mut names: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
    if missing.len() > 5 {
        names.push("...");
    }
    bail!("not cached yet: {progress}; missing {}", names.join(", "))
}

pub fn run(a: WarmArgs) -> Result<()> {
    if a.check {
        return check(&a);
    }
    // Absolute, so that each file is counted against the mount it is in
    // by path prefix below.
    let named = std::iter::once(&a.path)
        .chain(&a.paths)
        .map(|p| crate::mountpoint::absolute(p))
        .collect::<Result<Vec<_>>>()?;
    let mut roots = named
        .iter()
        .map(|p| mount_root(p))
        .collect::<Result<Vec<_>>>()?;
    roots.sort();
    roots.dedup();
    if a.background {
        let child = Command::new(std::env::current_exe()?)
            .args(["warm", "--parallel", &a.parallel.to_string()])
            .arg(&a.path)
            .args(&a.paths)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        say!(
            "modelfs: warming {} in the background (pid {})",
            a.path.display(),
            child.id()
        );
        return Ok(());
    }
    let mut files = vec![];
    for p in &named {
        files_under(p, &mut files)?;
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    let mut evicted_before = vec![];
    for root in &roots {
        let s = read_stats(root)?;
        let here: u64 = files
            .iter()
            .filter(|f| f.0.starts_with(root))
            .map(|f| f.1)
            .sum();
        if here > s.cache_bytes_capacity {
            bail!(
                "the cache is too small: {} holds {} under {}, more than its --cache-size {}; raise --cache-size to at least {}",
                a.path.display(),
                ByteSize(here),
                root.display(),
                ByteSize(s.cache_bytes_capacity),
                ByteSize(here)
            );
        }
        evicted_before.push(s.chunks_evicted);
    }
    let bar = progress_bar(total)?;
    // Kubernetes logs are no terminal: one line per file instead of a bar.
    let lines = bar.is_hidden();
    let done = Mutex::new((0usize, 0u64));
    let t = Instant::now();
    let queue = Mutex::new(files.iter());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..a.parallel.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 8 << 20];
                loop {
                    let Some((path, size)) = queue.lock().unwrap().next() else {
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
                        if lines {
                            let mut d = done.lock().unwrap();
                            *d = (d.0 + 1, d.1 + size);
                            tell!(
                                "modelfs: warmed {} ({}), {} of {} files, {} of {}",
                                path.display(),
                                ByteSize(*size),
                                d.0,
                                files.len(),
                                ByteSize(d.1),
                                ByteSize(total)
                            );
                        }
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
    let mut evicted = 0;
    for (root, before) in roots.iter().zip(evicted_before) {
        evicted += read_stats(root)?.chunks_evicted - before;
    }
    if evicted > 0 {
        bail!("the cache is too small: {evicted} chunks were evicted while warming {}; raise --cache-size", ByteSize(total));
    }
    say!(
        "modelfs: warmed {} files ({}) in {:.1}s",
        files.len(),
        ByteSize(total),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
