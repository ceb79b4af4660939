/// `println!` that never panics: a reader that went away (`unmount | head`)
/// ends the output, not the command, whose work is done either way.
/// Other write errors are said on stderr: these lines report work already
/// done, which a full disk under stdout does not undo.
macro_rules! say {
    ($($arg:tt)*) => {{
        if let Err(e) = crate::control::print(&format!("{}\n", format_args!($($arg)*))) {
            tell!("modelfs: {e:#}");
        }
    }};
}

/// `eprintln!` that never panics, when stderr is a pipe nobody reads
/// (`modelfs mount ... |& head -0`): the exit status still tells.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod config;
mod control;
mod daemon;
mod demo;
mod fuse;
mod group;
mod host;
mod inodes;
mod metrics;
mod mountpoint;
mod preload;
mod push;
mod serve;
mod synth;
mod warm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};
use modelfs_engine::size::ByteSize;

/// modelfs: AI model weights from object storage or a NAS, as a read-only
/// local directory that loads at memory speed once cached.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text, or as one JSON object per event (log collectors)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MODELFS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount SOURCE read-only at MOUNTPOINT with a node-local chunk cache
    Mount(daemon::MountArgs),
    /// Upload a model directory to object storage (parallel multipart, verified)
    Push(push::PushArgs),
    /// Run a warm-up service: preload models into memory and serve them to the group
    Serve(serve::ServeArgs),
    /// Fill this node's cache with everything under PATH, with a progress bar
    Warm(warm::WarmArgs),
    /// Unmount a modelfs mount, even with files open on it
    Unmount { mountpoint: PathBuf },
    /// Start every mount and warm-up service a config file describes, in the
    /// foreground; SIGTERM stops them all
    Run(config::RunArgs),
    /// Counters of a mount: bytes by tier, cache use, passthrough
    Stat {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a synthetic model, load it cold and warm through a mount, verify it
    Demo {
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        #[arg(long, default_value_t = 4)]
        files: usize,
    },
    /// Write a synthetic safetensors model (for tests and benchmarks)
    Synth {
        dir: PathBuf,
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        #[arg(long, default_value_t = 4)]
        files: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// bf16, or f16 (loads with numpy)
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
}

/// Every flag of `mount`, `serve` and `run` may also come from the
/// environment as MODELFS_<FLAG> (`--cache-size`: MODELFS_CACHE_SIZE), for
/// containers and systemd units; a flag on the command line wins.
fn with_env(cmd: clap::Command) -> clap::Command {
    fn flags(c: clap::Command) -> clap::Command {
        let envs: Vec<(String, &'static str)> = c
            .get_arguments()
            .filter(|a| a.get_env().is_none())
            .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
            .filter_map(|a| {
                let long = a.get_long()?;
                let env = format!("MODELFS_{}", long.to_uppercase().replace('-', "_"));
                // clap keeps names as &'static str; a few bytes, once per run.
                Some((a.get_id().to_string(), &*Box::leak(env.into_boxed_str())))
            })
            .collect();
        envs.into_iter()
            .fold(c, |c, (id, env)| c.mut_arg(id, |a| a.env(env)))
    }
    cmd.mut_subcommand("mount", flags)
        .mut_subcommand("serve", flags)
        .mut_subcommand("run", flags)
}

/// Replaces this process with the `modelfs mount` an fstab line stands for;
/// returns only what went wrong.
fn exec_fstab_mount(argv: anyhow::Result<Vec<String>>) -> anyhow::Error {
    let argv = match argv {
        Ok(a) => a,
        Err(e) => return e,
    };
    // Bad options are refused here, in one line, before anything starts.
    if let Err(e) = with_env(Cli::command()).try_get_matches_from(&argv) {
        let text = e.to_string();
        let line = text.lines().next().unwrap_or_default();
        return anyhow::anyhow!("fstab options: {}", line.trim_start_matches("error: "));
    }
    match std::env::current_exe() {
        Ok(exe) => std::os::unix::process::CommandExt::exec(
            std::process::Command::new(exe).args(&argv[1..]),
        )
        .into(),
        Err(e) => e.into(),
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Started by mount(8) for an fstab line: become `modelfs mount ...`
    // (exec, so that the background mount re-runs this binary as itself).
    if let Some(argv) = host::helper_argv(&args) {
        tell!("modelfs: {:#}", exec_fstab_mount(argv));
        return ExitCode::FAILURE;
    }
    let cli = Cli::from_arg_matches(&with_env(Cli::command()).get_matches_from(args))
        .unwrap_or_else(|e| e.exit());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODELFS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let cli_format = cli.log_format;
    // Processes this one starts (the background daemon, `run`'s mounts and
    // services) log the same way.
    std::env::set_var(
        "MODELFS_LOG_FORMAT",
        match cli_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
    );
    let result = match cli.cmd {
        Cmd::Mount(args) => daemon::mount(args),
        Cmd::Push(args) => push::run(args),
        Cmd::Serve(args) => serve::run(args),
        Cmd::Warm(args) => warm::run(args),
        Cmd::Run(args) => config::run(args),
        Cmd::Unmount { mountpoint } => control::unmount(&mountpoint),
        Cmd::Stat { mountpoint, json } => control::stat(&mountpoint, json),
        Cmd::Demo { size, files } => demo::run(size, files),
        Cmd::Synth {
            dir,
            size,
            files,
            seed,
            dtype,
        } => synth::make_model(&dir, size.0, files, seed, &dtype).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match cli_format {
                LogFormat::Text => tell!("modelfs: {e:#}"),
                LogFormat::Json => tracing::error!("{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
