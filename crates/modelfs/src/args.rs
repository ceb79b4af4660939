//! Flags shared by several commands: how to reach an object store (`mount`,
//! `push`, `serve`) and how to cache (`mount`, `serve`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressStyle};
use modelfs_engine::size::ByteSize;
use modelfs_engine::source::SourceOptions;
use modelfs_engine::EngineConfig;

#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Cache capacity (20GiB, 512MiB; G means GiB)
    #[arg(long, default_value = "20GiB")]
    pub cache_size: ByteSize,
    /// Where cached chunks live (default: /dev/shm/modelfs/<source hash>, memory)
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Unit of caching and of source reads; the same on every node of a group
    #[arg(long, default_value = "8MiB")]
    pub chunk_size: ByteSize,
    /// How long a directory listing is trusted, in seconds
    #[arg(long, default_value_t = 60.0)]
    pub listing_ttl: f64,
    /// Most bytes prefetched ahead of readers and not read yet (at most half
    /// the cache): what prefetch may fetch that no reader asks for
    #[arg(long, default_value = "1GiB")]
    pub prefetch_window: ByteSize,
    /// Most bytes fetched from the origin and not yet in the cache (at least
    /// one chunk; two chunks more are kept for readers' misses): the daemon's
    /// memory is about 64MiB plus this, whatever the model's size. Default:
    /// the prefetch concurrency times the chunk size
    #[arg(long)]
    pub max_inflight: Option<ByteSize>,
}

impl CacheArgs {
    pub fn engine_config(
        &self,
        source_id: &str,
        prefetch_concurrency: usize,
    ) -> Result<EngineConfig> {
        let cache_dir = self.cache_dir.clone().unwrap_or_else(|| {
            let hash = xxhash_rust::xxh3::xxh3_64(source_id.as_bytes());
            PathBuf::from("/dev/shm/modelfs").join(format!("{hash:016x}"))
        });
        Ok(EngineConfig {
            chunk_size: self.chunk_size.0,
            cache_dir,
            cache_capacity: self.cache_size.0,
            prefetch_concurrency,
            prefetch_window: self.prefetch_window.0,
            listing_ttl: secs(self.listing_ttl, "--listing-ttl")?,
            max_inflight: self.max_inflight.map_or_else(
                || (prefetch_concurrency.max(1) as u64).saturating_mul(self.chunk_size.0),
                |b| b.0,
            ),
            // A group member's setting (see `Group`).
            peer_verify_sample: 0.0,
        })
    }
}

/// A byte progress bar on stderr when it is a terminal, silent otherwise.
pub fn progress_bar(total: u64) -> Result<ProgressBar> {
    let bar = ProgressBar::hidden();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )?);
    bar.set_length(total);
    Ok(bar)
}

#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Object store endpoint, e.g. http://10.0.0.5:9000 (default: the service's own; for S3
    /// also AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the AWS profile's endpoint_url)
    #[arg(long, env = "MODELFS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Object store region (S3; else AWS_DEFAULT_REGION, the AWS profile's, us-east-1)
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// S3 virtual-hosted addressing (bucket.endpoint) instead of path style
    #[arg(long)]
    pub virtual_host_style: bool,
    /// Timeout of one request to an object store, in seconds
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
    /// Retries of a failed request (5xx, SlowDown, reset), with backoff and jitter
    #[arg(long, default_value_t = 4)]
    pub retries: usize,
}

pub fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| anyhow!("{flag} {v}: give a number of seconds"))
}

impl SourceArgs {
    /// The longest the origin may take for one request, retries included.
    pub fn budget(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout.max(0.0)) * (self.retries as u32 + 1)
    }

    pub fn options(&self) -> Result<SourceOptions> {
        Ok(SourceOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            virtual_host_style: self.virtual_host_style,
            request_timeout: secs(self.request_timeout, "--request-timeout")?,
            retries: self.retries,
        })
    }
}
