//! `modelfs mount`: checks, then the engine and the FUSE session; in the
//! background by default, with the parent waiting until the mount is ready
//! (or has failed) so scripts can use the mount as soon as it returns.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, Session, SessionACL};
use modelfs_engine::size::ByteSize;
use modelfs_engine::source::open_source;
use modelfs_engine::{Engine, Error};
use tracing::{info, warn};

use crate::args::{CacheArgs, SourceArgs};
use crate::fuse::ModelFs;
use crate::group::{Group, GroupArgs};
use crate::mountpoint;
use crate::preload::Preload;

pub(crate) const READY_FD: &str = "MODELFS_READY_FD";

#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// A local or NAS directory, or s3://bucket/prefix, oss://, gs://, azblob://
    pub source: String,
    /// An empty directory to mount on
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Chunks prefetched at once across the mount (0 turns prefetch off)
    #[arg(long, default_value_t = 16)]
    pub prefetch_concurrency: usize,
    /// FUSE worker threads
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Kernel readahead for the mount
    #[arg(long, default_value = "16MiB")]
    pub read_ahead: ByteSize,
    /// Stay attached instead of running in the background
    #[arg(long)]
    pub foreground: bool,
    /// Cache PATH in full once mounted ("/" for everything), through peers,
    /// warm-up service and origin; repeatable. /readyz and `warm --check`
    /// answer for these paths
    #[arg(long)]
    pub preload: Vec<String>,
    /// Log of the background daemon (default: /tmp/modelfs-<mount>.log)
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: SourceArgs,
    #[command(flatten)]
    pub group: GroupArgs,
}

fn name_hash(s: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(s.as_bytes()))
}

pub fn mount(args: MountArgs) -> Result<()> {
    if args.foreground {
        let ready = std::env::var(READY_FD)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            // SAFETY: the parent handed us this fd, open and ours alone.
            .map(|fd| unsafe { File::from_raw_fd(fd) });
        std::env::remove_var(READY_FD);
        return run(args, ready);
    }
    background(args)
}

/// Re-runs this binary in the foreground, detached, and waits for its word.
fn background(args: MountArgs) -> Result<()> {
    let mp = mountpoint::absolute(&args.mountpoint)?;
    let log = args.log_file.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "modelfs-{}.log",
            name_hash(&mp.display().to_string())
        ))
    });
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("log file {}", log.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh fds from pipe2.
    let (mut read_end, write_end) =
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wfd = write_end.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(READY_FD, wfd.to_string())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the modelfs daemon")?;
    drop(write_end);
    let mut word = String::new();
    read_end.read_to_string(&mut word)?;
    match word.trim() {
        "ok" => {
            say!(
                "modelfs: {} mounted at {} (pid {}, log {})",
                args.source,
                mp.display(),
                child.id(),
                log.display()
            );
            Ok(())
        }
        "" => {
            let status = child.wait()?;
            bail!(
                "the modelfs daemon exited ({status}) before the mount was ready; see {}",
                log.display()
            )
        }
        msg => {
            let _ = child.wait();
            Err(anyhow!("{}", msg.trim_start_matches("error: ")))
        }
    }
}

struct Mounted {
    _rt: tokio::runtime::Runtime,
    session: fuser::BackgroundSession,
    mountpoint: PathBuf,
}

/// Raises the soft limit on open files to the hard one: a mount holds files
/// of the cache, sockets and /dev/fuse fds, and a shell's soft limit (often
/// 1024) is a guess made for interactive programs.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        return warn!("reading the open files limit: {e}");
    }
    let soft = lim.rlim_cur;
    if soft >= lim.rlim_max {
        return info!(limit = soft, "open files limit");
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        return warn!(limit = soft, "raising the open files limit: {e}");
    }
    info!(
        from = soft,
        to = lim.rlim_max,
        "raised the open files limit"
    );
}

fn start(args: &MountArgs) -> Result<Mounted> {
    raise_open_files_limit();
    let mp = mountpoint::check(&args.mountpoint)?;
    let min = args.cache.chunk_size.0 * args.threads.max(1) as u64;
    if args.cache.cache_size.0 < min {
        bail!(
            "--cache-size {} is below one chunk ({}) per FUSE thread ({}); use at least {}",
            args.cache.cache_size,
            args.cache.chunk_size,
            args.threads,
            ByteSize(min)
        );
    }
    let opts = args.store.options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("modelfs-io")
        .enable_all()
        .build()?;
    let source = open_source(&args.source, &opts)?;
    // Prove the source answers before taking the mount point.
    let probe = rt
        .block_on(async { tokio::time::timeout(opts.request_timeout * 2, source.list("")).await });
    match probe {
        Ok(Ok(entries)) if entries.is_empty() && args.source.contains("://") => bail!(
            "source {} holds no objects; check the bucket and prefix",
            args.source
        ),
        Ok(Ok(_)) => {}
        Ok(Err(Error::Source { msg, .. })) => bail!("source {}: {msg}", args.source),
        Ok(Err(e)) => bail!("source {}: {e}", args.source),
        Err(_) => bail!(
            "source {} did not answer within {:?}; check the endpoint and the network",
            args.source,
            opts.request_timeout * 2
        ),
    }
    let mut group = rt.block_on(Group::start(
        &args.group,
        source.id(),
        args.cache.chunk_size.0,
        args.store.budget(),
    ))?;
    let mut cfg = args
        .cache
        .engine_config(source.id(), args.prefetch_concurrency)?;
    cfg.peer_verify_sample = group.verify_sample;
    let engine = Engine::new(source.clone(), cfg, |stats| group.tiers(stats))?;
    let preload = (!args.preload.is_empty()).then(|| Preload::new(&engine, args.preload.clone()));
    group.serve(&engine, rt.handle(), Some(&mp))?;
    let fs = ModelFs::new(engine, rt.handle().clone(), SystemTime::now());
    let dev = mountpoint::mount_fuse(&mp, source.id())?;
    let mut config = Config::default();
    config.n_threads = Some(args.threads.max(1));
    config.clone_fd = true;
    // A session made from an fd never unmounts by itself, so a failed
    // handshake must not leave a mount that nobody serves.
    // Notifications go through the session's fd: started before it serves,
    // so no page the kernel caches from it is missed.
    let invalidator = fs.invalidator();
    let session = match Session::from_fd(fs, dev, SessionACL::All, config).and_then(|s| {
        invalidator.start(s.notifier())?;
        s.spawn()
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = mountpoint::lazy_unmount(&mp);
            bail!("starting the FUSE session on {}: {e}", mp.display());
        }
    };
    if let Err(e) = mountpoint::set_readahead(&mp, args.read_ahead.0 / 1024) {
        warn!("readahead stays at the kernel default: {e:#}");
    }
    if let Some(p) = preload {
        rt.spawn(p.run(args.prefetch_concurrency.max(1)));
    }
    Ok(Mounted {
        _rt: rt,
        session,
        mountpoint: mp,
    })
}

fn run(args: MountArgs, mut ready: Option<File>) -> Result<()> {
    let mut tell = |msg: &str| {
        if let Some(f) = ready.as_mut() {
            let _ = writeln!(f, "{msg}");
        }
    };
    let mounted = match start(&args) {
        Ok(m) => m,
        Err(e) => {
            tell(&format!("error: {e:#}"));
            return Err(e);
        }
    };
    info!(source = %args.source, mountpoint = %mounted.mountpoint.display(), "mounted");
    tell("ok");
    drop(ready);
    crate::host::notify_ready(&format!(
        "{} mounted at {}",
        args.source,
        mounted.mountpoint.display()
    ));

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    while !stop.load(Ordering::Relaxed) && !mounted.session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    shutdown(mounted);
    Ok(())
}

/// Detaches the mount (open files do not keep it busy) and lets the session
/// end; readers still holding files get ENOTCONN once we exit.
fn shutdown(m: Mounted) {
    crate::host::notify_stopping();
    // A notification stuck in the kernel waits on a read only this process
    // answers: exiting under it would leave the mount and the process hung.
    // Past the bound, the connection is aborted so both can end.
    if !crate::fuse::stop_invalidating(Duration::from_secs(5)) {
        warn!("a page-cache invalidation did not return; aborting the FUSE connection");
        abort_connection(&m.mountpoint);
    }
    if mountpoint::mounted_at(&m.mountpoint).is_some() {
        if let Err(e) = mountpoint::lazy_unmount(&m.mountpoint) {
            warn!("{e:#}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while !m.session.guard.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    info!(mountpoint = %m.mountpoint.display(), "unmounted");
    std::process::exit(0);
}

/// Aborts the FUSE connection of the mount at `mp` (fusectl), which fails
/// every request in flight on it. Its number is the mount's device minor,
/// from the mount table: a stat of the mount would be a FUSE request.
fn abort_connection(mp: &std::path::Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mp.to_string_lossy().replace(' ', "\\040");
    let Some(minor) = table.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_str()))
            .then(|| f.get(2)?.split(':').nth(1))
            .flatten()
    }) else {
        return;
    };
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    if let Err(e) = std::fs::write(&abort, "1") {
        warn!("cannot abort the FUSE connection through {abort}: {e}");
    }
}
