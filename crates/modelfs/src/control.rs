//! `modelfs stat` and `modelfs unmount`: they talk to a running mount through
//! an xattr on its root, so they need no socket and work from any process
//! that can see the mount.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use modelfs_engine::size::ByteSize;
use modelfs_engine::stats::StatsSnapshot;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fuse::STATS_XATTR;
use crate::mountpoint::{lazy_unmount, mounted_at, FSTYPE};

pub fn read_stats(mp: &Path) -> Result<StatsSnapshot> {
    serde_json::from_slice(&read_raw(mp)?).context("reading modelfs statistics")
}

/// The statistics as the daemon wrote them, keys it adds (such as `inodes`,
/// from the FUSE layer) included.
fn read_raw(mp: &Path) -> Result<Vec<u8>> {
    match xattr::get(mp, STATS_XATTR) {
        Ok(Some(raw)) => Ok(raw),
        Ok(None) => bail!("{} is not a modelfs mount", mp.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "the modelfs daemon of {} is gone; run `modelfs unmount {}`",
            mp.display(),
            mp.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {
            bail!("{} is not a modelfs mount", mp.display())
        }
        Err(e) => bail!("{}: {e}", mp.display()),
    }
}

pub fn stat(mp: &Path, json: bool) -> Result<()> {
    let all: serde_json::Value =
        serde_json::from_slice(&read_raw(mp)?).context("reading modelfs statistics")?;
    if json {
        return print(&format!("{}\n", serde_json::to_string_pretty(&all)?));
    }
    let inodes = all["inodes"].clone();
    let s: StatsSnapshot = serde_json::from_value(all)?;
    let mut o = String::new();
    let b = |n: u64| ByteSize(n).to_string();
    writeln!(o, "source          {}", s.source)?;
    writeln!(
        o,
        "served          {} (chunk hit ratio {:.1}%)",
        b(s.bytes_served),
        s.hit_ratio * 100.0
    )?;
    writeln!(o, "  from cache    {}", b(s.bytes_from_cache))?;
    writeln!(
        o,
        "  from source   {} in {} requests ({} failed)",
        b(s.bytes_from_source),
        s.source_requests,
        s.source_errors
    )?;
    writeln!(o, "  from peers    {}", b(s.bytes_from_peers))?;
    writeln!(o, "  from warm-up  {}", b(s.bytes_from_warmup))?;
    writeln!(
        o,
        "cache           {} of {} in {} chunks of {}; {} evicted, {} prefetched, {} failed their crc",
        b(s.cache_bytes_used),
        b(s.cache_bytes_capacity),
        s.chunks_cached,
        b(s.chunk_size),
        s.chunks_evicted,
        s.chunks_prefetched,
        s.crc_failures
    )?;
    writeln!(o, "cache dir       {}", s.cache_dir)?;
    writeln!(
        o,
        "passthrough     {} ({} opens of {})",
        s.passthrough, s.passthrough_opens, s.opens
    )?;
    writeln!(o, "inodes          {inodes} held by the kernel")?;
    writeln!(o, "served to peers {} chunks", s.chunks_served_to_peers)?;
    writeln!(
        o,
        "checked         {} chunks from peers against the origin, {} differed",
        s.peer_chunks_verified, s.peer_lies_caught
    )?;
    for (peer, c) in &s.peers {
        writeln!(
            o,
            "  peer {peer:<24} {} received, {} errors, {} failed their crc, {} differed from the origin",
            b(c.bytes),
            c.errors,
            c.crc_failures,
            c.lies
        )?;
    }
    writeln!(o, "daemon pid      {}", s.pid)?;
    print(&o)
}

/// Writes to stdout; a reader that went away (`stat | head -1`) ends the
/// output quietly instead of failing.
pub fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

pub fn unmount(mp: &Path) -> Result<()> {
    let abs = crate::mountpoint::absolute(mp)?;
    match mounted_at(&abs) {
        None => bail!("{} is not mounted", abs.display()),
        Some(t) if t != FSTYPE => bail!(
            "{} is a {t} mount, not a modelfs mount; leaving it mounted (use `umount` for it)",
            abs.display()
        ),
        Some(_) => {}
    }
    if let Ok(s) = read_stats(&abs) {
        let pid = s.pid as i32;
        if kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok()
            && wait_gone(pid, &abs, Duration::from_secs(15))
        {
            say!("modelfs: unmounted {}", abs.display());
            return Ok(());
        }
    }
    // A daemon that is gone or stuck: detach the mount ourselves.
    lazy_unmount(&abs)?;
    say!("modelfs: unmounted {}", abs.display());
    Ok(())
}

/// Waits until the daemon `pid` has exited and `mp` is no longer mounted.
fn wait_gone(pid: i32, mp: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if !alive && mounted_at(mp).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
