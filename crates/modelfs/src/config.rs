//! `modelfs run --config FILE`: every mount and warm-up service a file
//! describes, as the container's main process. Two formats: the EAS service
//! JSON as PAI-EAS users already write it (its `storage[]`), and a native
//! TOML file whose keys are the flags of `mount` and `serve`. Each becomes
//! the command line of a child `modelfs mount --foreground` or `modelfs
//! serve`, checked by the same parser as the command line before anything
//! starts.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser};
use modelfs_engine::size::ByteSize;
use serde_json::Value as Json;
use tracing::{error, info, warn};

use crate::daemon::MountArgs;
use crate::serve::ServeArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// An EAS service JSON (its storage[] entries) or a modelfs TOML file
    #[arg(long)]
    pub config: PathBuf,
    /// Print the commands the file stands for, one per line, and start nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// The command lines a config file stands for (after `modelfs`).
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub serves: Vec<Vec<String>>,
    pub mounts: Vec<Vec<String>>,
}

#[derive(Parser)]
#[command(name = "modelfs mount", no_binary_name = true)]
struct MountCmd {
    #[command(flatten)]
    _a: MountArgs,
}

#[derive(Parser)]
#[command(name = "modelfs serve", no_binary_name = true)]
struct ServeCmd {
    #[command(flatten)]
    _a: ServeArgs,
}

pub fn load(path: &Path) -> Result<Plan> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let name = path.display().to_string();
    let json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let plan = if json {
        let v: Json = serde_json::from_str(&text).map_err(|e| anyhow!("{name}: not JSON: {e}"))?;
        eas(&v).map_err(|e| anyhow!("{name}: {e}"))?
    } else {
        let t: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| anyhow!("{name}: not TOML: {}", e.message()))?;
        native(&t).map_err(|e| anyhow!("{name}: {e}"))?
    };
    if plan.mounts.is_empty() && plan.serves.is_empty() {
        bail!("{name}: describes no mount and no service; see examples/ for the formats");
    }
    Ok(plan)
}

// ---- EAS JSON ----

/// Keys of the EAS JSON this reads; everything else is the platform's.
fn eas(v: &Json) -> Result<Plan> {
    let top = v
        .as_object()
        .ok_or_else(|| anyhow!("the top level must be an object"))?;
    let mut ignored: Vec<String> = top.keys().filter(|k| *k != "storage").cloned().collect();
    let storage = match top.get("storage") {
        None => {
            bail!("storage: missing; modelfs reads the storage[] entries that have a cache block")
        }
        Some(Json::Array(a)) => a,
        Some(_) => bail!("storage: must be a list of entries"),
    };
    // Where the platform mounts OSS and NAS: mount_path -> the source behind it.
    let mut sources: Vec<(String, Option<String>)> = vec![];
    for (i, e) in storage.iter().enumerate() {
        let key = format!("storage[{i}]");
        let e = e
            .as_object()
            .ok_or_else(|| anyhow!("{key}: must be an object"))?;
        if e.contains_key("cache") {
            continue;
        }
        let mp = str_at(e.get("mount_path"), &format!("{key}.mount_path"))?;
        if let Some(oss) = e.get("oss") {
            let o = oss
                .as_object()
                .ok_or_else(|| anyhow!("{key}.oss: must be an object"))?;
            let url = str_at(o.get("path"), &format!("{key}.oss.path"))?;
            if !url.starts_with("oss://") {
                bail!("{key}.oss.path: {url:?} must be an oss://bucket/prefix URL");
            }
            ignored.extend(
                o.keys()
                    .filter(|k| *k != "path")
                    .map(|k| format!("{key}.oss.{k}")),
            );
            sources.push((trim_dir(&mp), Some(url.trim_end_matches('/').to_string())));
        } else if let Some(nas) = e.get("nas") {
            // The platform mounts the NAS; modelfs reads that directory.
            if let Some(o) = nas.as_object() {
                ignored.extend(o.keys().map(|k| format!("{key}.nas.{k}")));
            }
            sources.push((trim_dir(&mp), None));
        }
        ignored.extend(
            e.keys()
                .filter(|k| !["mount_path", "oss", "nas"].contains(&k.as_str()))
                .map(|k| format!("{key}.{k}")),
        );
    }
    let mut plan = Plan::default();
    let mut used = BTreeSet::new();
    for (i, e) in storage.iter().enumerate() {
        let key = format!("storage[{i}]");
        let Some(e) = e.as_object() else { continue };
        let Some(cache) = e.get("cache") else {
            continue;
        };
        let c = cache
            .as_object()
            .ok_or_else(|| anyhow!("{key}.cache: must be an object"))?;
        let mp = str_at(e.get("mount_path"), &format!("{key}.mount_path"))?;
        absolute(&mp, &format!("{key}.mount_path"))?;
        let path = str_at(c.get("path"), &format!("{key}.cache.path"))?;
        // A cache over a path the platform mounts from OSS reads OSS itself:
        // one mount instead of two.
        let source = if path.contains("://") {
            path.trim_end_matches('/').to_string()
        } else {
            absolute(&path, &format!("{key}.cache.path"))?;
            let p = trim_dir(&path);
            match sources
                .iter()
                .enumerate()
                .find(|(_, (m, _))| p == *m || p.starts_with(&format!("{m}/")))
            {
                Some((j, (m, Some(url)))) => {
                    used.insert(j);
                    format!("{url}{}", &p[m.len()..])
                }
                Some((j, (_, None))) => {
                    used.insert(j);
                    p
                }
                None => p,
            }
        };
        let mut argv = vec![source, trim_dir(&mp)];
        if let Some(cap) = c.get("capacity") {
            let k = format!("{key}.cache.capacity");
            let s = str_at(Some(cap), &k)?;
            s.parse::<ByteSize>().map_err(|e| anyhow!("{k}: {e}"))?;
            argv.push(format!("--cache-size={s}"));
        }
        if let Some(p) = c.get("preload") {
            let k = format!("{key}.cache.preload");
            let list = match p {
                Json::String(s) => vec![s.clone()],
                Json::Array(a) => a
                    .iter()
                    .map(|x| str_at(Some(x), &k))
                    .collect::<Result<_>>()?,
                _ => bail!("{k}: must be a path (\"/\" for everything) or a list of paths"),
            };
            argv.extend(list.into_iter().map(|p| format!("--preload={p}")));
        }
        if let Some(s) = c.get("cacheroot_service") {
            let k = format!("{key}.cache.cacheroot_service");
            let name = str_at(Some(s), &k)?;
            if name.is_empty() || name.contains(char::is_whitespace) {
                bail!("{k}: {name:?} is not a service name or http://host:port");
            }
            // A bare name is a Service in the same namespace on the group port.
            let url = if name.contains("://") {
                name
            } else {
                format!("http://{name}:7070")
            };
            if std::env::var_os("MODELFS_PEER_TOKEN_FILE").is_none() {
                bail!("{k}: a warm-up service needs the group's token: set MODELFS_PEER_TOKEN_FILE to a file holding it");
            }
            argv.push(format!("--warmup-service={url}"));
        }
        ignored.extend(
            c.keys()
                .filter(|k| {
                    !["capacity", "path", "preload", "cacheroot_service"].contains(&k.as_str())
                })
                .map(|k| format!("{key}.cache.{k}")),
        );
        ignored.extend(
            e.keys()
                .filter(|k| !["cache", "mount_path"].contains(&k.as_str()))
                .map(|k| format!("{key}.{k}")),
        );
        check_mount(&argv, &key)?;
        plan.mounts.push(argv);
    }
    for (j, (m, _)) in sources.iter().enumerate() {
        if !used.contains(&j) {
            ignored.push(format!(
                "storage entry mounted at {m} (no cache block reads it)"
            ));
        }
    }
    if !ignored.is_empty() {
        info!("ignoring what modelfs does not use: {}", ignored.join(", "));
    }
    Ok(plan)
}

fn str_at(v: Option<&Json>, key: &str) -> Result<String> {
    match v {
        Some(Json::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Json::String(_)) => bail!("{key}: empty"),
        Some(other) => bail!("{key}: {other} must be a string"),
        None => bail!("{key}: missing"),
    }
}

fn absolute(p: &str, key: &str) -> Result<()> {
    if !p.starts_with('/') {
        bail!("{key}: {p:?} must be an absolute path");
    }
    Ok(())
}

/// "/mnt/models/Qwen3-8B/" and "/mnt/models/Qwen3-8B" are one directory.
fn trim_dir(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

// ---- native TOML ----

/// `[[mount]]` and `[[serve]]` tables whose keys are the commands' flags
/// (`cache-size` or `cache_size`), plus `source` and `mountpoint`.
fn native(t: &toml::Table) -> Result<Plan> {
    let mut plan = Plan::default();
    for k in t.keys() {
        if k != "mount" && k != "serve" {
            bail!("{k}: unknown section; write [[mount]] or [[serve]] tables");
        }
    }
    for (section, out, cmd, positional) in [
        (
            "mount",
            &mut plan.mounts,
            MountCmd::command(),
            &["source", "mountpoint"][..],
        ),
        (
            "serve",
            &mut plan.serves,
            ServeCmd::command(),
            &["source"][..],
        ),
    ] {
        let Some(list) = t.get(section) else { continue };
        let list = list
            .as_array()
            .ok_or_else(|| anyhow!("{section}: write it as [[{section}]] tables"))?;
        let flags: BTreeSet<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        for (i, entry) in list.iter().enumerate() {
            let key = format!("{section}[{i}]");
            let e = entry
                .as_table()
                .ok_or_else(|| anyhow!("{key}: must be a table"))?;
            let mut argv = vec![];
            for p in positional {
                match e.get(*p) {
                    Some(toml::Value::String(s)) => argv.push(s.clone()),
                    Some(_) => bail!("{key}.{p}: must be a string"),
                    None => bail!("{key}.{p}: missing"),
                }
            }
            for (k, v) in e {
                if positional.contains(&k.as_str()) {
                    continue;
                }
                let flag = k.replace('_', "-");
                if flag == "foreground" {
                    bail!("{key}.{k}: `run` keeps every mount in the foreground; remove it");
                }
                if !flags.contains(&flag) {
                    bail!("{key}.{k}: no such setting; the keys are the flags of `modelfs {section} --help`");
                }
                let one = |v: &toml::Value| -> Result<String> {
                    Ok(match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(n) => n.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        _ => bail!("{key}.{k}: {v} must be a string or a number"),
                    })
                };
                match v {
                    toml::Value::Boolean(true) => argv.push(format!("--{flag}")),
                    toml::Value::Boolean(false) => {}
                    toml::Value::Array(a) => {
                        for x in a {
                            argv.push(format!("--{flag}={}", one(x)?));
                        }
                    }
                    v => argv.push(format!("--{flag}={}", one(v)?)),
                }
            }
            if section == "mount" {
                check_mount(&argv, &key)?;
            } else {
                ServeCmd::try_parse_from(&argv).map_err(|e| clap_error(&e, &key))?;
            }
            out.push(argv);
        }
    }
    Ok(plan)
}

fn check_mount(argv: &[String], key: &str) -> Result<()> {
    MountCmd::try_parse_from(argv).map_err(|e| clap_error(&e, key))?;
    Ok(())
}

/// clap's first line, after the setting it is about.
fn clap_error(e: &clap::Error, key: &str) -> anyhow::Error {
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let line = text
        .lines()
        .next()
        .unwrap_or("invalid")
        .trim_start_matches("error: ");
    // "--cache-size <CACHE_SIZE>" names the key cache-size.
    let setting = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a
            .split_whitespace()
            .next()
            .filter(|f| f.starts_with("--"))
            .map(|f| format!(".{}", f.trim_start_matches('-'))),
        _ => None,
    };
    anyhow!("{key}{}: {line}", setting.unwrap_or_default())
}

// ---- running ----

struct Running {
    what: String,
    child: Child,
    mountpoint: Option<PathBuf>,
}

pub fn run(a: RunArgs) -> Result<()> {
    let plan = load(&a.config)?;
    if a.dry_run {
        // A script to run: failing to write it all is an error.
        let mut script = String::new();
        for s in &plan.serves {
            script += &format!("modelfs serve {}\n", shell_words(s));
        }
        for m in &plan.mounts {
            script += &format!("modelfs mount {} --foreground\n", shell_words(m));
        }
        return crate::control::print(&script);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let mut running: Vec<Running> = vec![];
    let started = (|| -> Result<()> {
        for s in &plan.serves {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("serve").args(s).env_remove("NOTIFY_SOCKET");
            die_with_parent(&mut cmd);
            let child = cmd.spawn().context("starting modelfs serve")?;
            running.push(Running {
                what: format!("serve {}", s[0]),
                child,
                mountpoint: None,
            });
            // The mounts below may ask it for chunks from their first read.
            if let Some(r) = running.last_mut() {
                wait_listening(r, s, &stop)?;
            }
        }
        for m in &plan.mounts {
            let mp = PathBuf::from(&m[1]);
            std::fs::create_dir_all(&mp)
                .with_context(|| format!("creating the mount point {}", mp.display()))?;
            let (child, ready) = start_mount(m)?;
            running.push(Running {
                what: format!("mount {} {}", m[0], m[1]),
                child,
                mountpoint: Some(mp),
            });
            if let Some(r) = running.last_mut() {
                wait_mounted(r, m, ready, &stop)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop_all(&mut running);
        if e.downcast_ref::<Stopped>().is_some() {
            info!("stopped while starting");
            return Ok(());
        }
        return Err(e);
    }
    info!(
        mounts = plan.mounts.len(),
        services = plan.serves.len(),
        "everything in {} is running",
        a.config.display()
    );
    crate::host::notify_ready(&format!(
        "{} mounts and {} services running",
        plan.mounts.len(),
        plan.serves.len()
    ));
    let mut failed = None;
    while !stop.load(Ordering::Relaxed) && failed.is_none() {
        for r in &mut running {
            if let Ok(Some(status)) = r.child.try_wait() {
                failed = Some(anyhow!("{} exited ({status}); stopping the others", r.what));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(e) = &failed {
        error!("{e:#}");
    }
    crate::host::notify_stopping();
    stop_all(&mut running);
    failed.map_or(Ok(()), Err)
}

/// How long a child may take to listen or mount: longer than a source's
/// default request budget (30 s × 5 tries), so that its own error, which
/// names the cause, comes first.
const STARTUP: Duration = Duration::from_secs(180);

/// SIGTERM or SIGINT came while starting: not an error.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped while starting")
    }
}

impl std::error::Error for Stopped {}

/// Waits until the service accepts connections on its --listen port, while
/// `stop` is unset and for at most STARTUP.
fn wait_listening(r: &mut Running, argv: &[String], stop: &AtomicBool) -> Result<()> {
    let Some(mut addr) = argv
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    else {
        return Ok(());
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let deadline = Instant::now() + STARTUP;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            info!(source = %argv[0], %addr, pid = r.child.id(), "warm-up service started");
            return Ok(());
        }
        if let Some(status) = r.child.try_wait()? {
            bail!("{} exited ({status}) before listening on {addr}", r.what);
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Stopped.into());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on {addr} within {} s; check that its source answers",
                r.what,
                STARTUP.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `modelfs mount ... --foreground` with the readiness pipe the background
/// mount uses: the child and the pipe's read end for [`wait_mounted`].
fn start_mount(argv: &[String]) -> Result<(Child, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh fds from pipe2.
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let wfd = write_end.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("mount")
        .args(argv)
        .arg("--foreground")
        .env(crate::daemon::READY_FD, wfd.to_string())
        // systemd hears from `run` once everything is up, not from each child.
        .env_remove("NOTIFY_SOCKET");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // --foreground: the child is the process that serves the mount (no
    // detached re-exec, whose fork would clear the death signal).
    die_with_parent(&mut cmd);
    let child = cmd.spawn().context("starting modelfs mount")?;
    drop(write_end);
    Ok((child, read_end))
}

/// Returns once the mount child has said it mounted, or with its error;
/// polls so that `stop` and STARTUP are heard while it is stuck (an origin
/// that does not answer). The caller stops the child on an error.
fn wait_mounted(
    r: &mut Running,
    argv: &[String],
    mut read_end: std::fs::File,
    stop: &AtomicBool,
) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let mut pfd = libc::pollfd {
            fd: read_end.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on an fd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n > 0 {
            break;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("waiting for modelfs mount to start");
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Stopped.into());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not mount within {} s; check that its source answers",
                r.what,
                STARTUP.as_secs()
            );
        }
    }
    // Readable: the child wrote its word, or exited (EOF). It closes the
    // pipe right after the word, so this read ends at once.
    let mut word = String::new();
    read_end.read_to_string(&mut word)?;
    match word.trim() {
        "ok" => {
            info!(source = %argv[0], mountpoint = %argv[1], pid = r.child.id(), "mounted");
            Ok(())
        }
        msg => {
            let status = r.child.wait()?;
            if msg.is_empty() {
                bail!(
                    "modelfs mount {} {} exited ({status}) before mounting",
                    argv[0],
                    argv[1]
                );
            }
            bail!("{}", msg.trim_start_matches("error: "))
        }
    }
}

/// The child gets SIGTERM when `run` dies, even by SIGKILL: otherwise its
/// services hold their ports and its mounts stay up with nobody to stop
/// them, and a restarted `run` finds them in its way.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid(2) cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The signal is sent when the forking thread ends: run spawns
            // from its main thread, which lives as long as run.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // run died before the prctl: no signal will come, so do not start.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// SIGTERM to every child (mounts unmount on it), newest first; SIGKILL and
/// a lazy unmount for any that does not stop within 15 s.
fn stop_all(running: &mut Vec<Running>) {
    for r in running.iter_mut().rev() {
        // A reaped child's pid may be someone else's by now.
        if matches!(r.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for mut r in running.drain(..).rev() {
        while Instant::now() < deadline && matches!(r.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(r.child.try_wait(), Ok(None)) {
            warn!("{} did not stop; killing it", r.what);
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        if let Some(mp) = &r.mountpoint {
            if crate::mountpoint::mounted_at(mp).is_some() {
                let _ = crate::mountpoint::lazy_unmount(mp);
            }
        }
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=/:.,@+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
