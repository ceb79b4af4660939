//! `modelfs serve`: the warm-up service. No mount: an engine with a big cache,
//! preloaded with whole models, serving chunks to every instance of a service
//! through the peer protocol before and while they start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use modelfs_engine::size::ByteSize;
use modelfs_engine::source::open_source;
use modelfs_engine::Engine;

use crate::args::{CacheArgs, SourceArgs};
use crate::group::{Group, GroupArgs};
use crate::preload::Preload;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// What to serve: s3://bucket, s3://bucket/prefix, oss://, gs://, azblob://, a directory
    pub source: String,
    /// Address the instances reach this service on
    #[arg(long)]
    pub listen: SocketAddr,
    /// Models to load into memory at start (prefixes under SOURCE); repeatable
    #[arg(long)]
    pub preload: Vec<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Chunks fetched at once while preloading
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long)]
    pub peer_token_file: PathBuf,
    #[command(flatten)]
    pub tls: crate::group::PeerTlsArgs,
    /// Serve /metrics (Prometheus), /healthz and /readyz (preload complete) on ADDR:PORT
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub store: SourceArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let source = open_source(&a.source, &a.store.options()?)?;
    if let Err(e) = rt.block_on(source.list("")) {
        bail!("source {}: {e}", a.source);
    }
    let group_args = GroupArgs {
        peers: None,
        listen: Some(a.listen),
        warmup_service: None,
        peer_token_file: Some(a.peer_token_file.clone()),
        peer_timeout: 5.0,
        peer_upload_limit: 0,
        peer_verify_sample: "0".into(),
        tls: a.tls.clone(),
        metrics_listen: a.metrics_listen,
    };
    let mut group = rt.block_on(Group::start(
        &group_args,
        source.id(),
        a.cache.chunk_size.0,
        a.store.budget(),
    ))?;
    let cfg = a.cache.engine_config(source.id(), 0)?;
    let engine = Engine::new(source, cfg, |_| vec![])?;
    group.serve(&engine, rt.handle(), None)?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    if !a.preload.is_empty() {
        let preload = Preload::new(&engine, a.preload.clone());
        // A failed preload leaves the service up, serving what it has and
        // fetching the rest; /readyz says why it is not ready. A preload
        // may take long (and retries until it succeeds): SIGTERM must not
        // wait for it, or Kubernetes kills us only after its grace period.
        let done = rt.block_on(async {
            tokio::select! {
                r = preload.clone().run(a.concurrency) => Some(r),
                () = stopped(&stop) => None,
            }
        });
        let Some(done) = done else {
            say!("modelfs serve: stopped during the preload");
            return Ok(());
        };
        match done {
            Ok(()) => {
                let s = preload.status();
                say!(
                    "modelfs serve: preload complete: {} files, {}",
                    s.files,
                    ByteSize(s.bytes)
                );
            }
            Err(e) => tell!("modelfs serve: preload failed: {e:#}"),
        }
    }
    say!("modelfs serve: serving {} on {}", a.source, a.listen);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
