//! Flags that say how to reach an object store, shared by `mount` and `push`.

use std::time::Duration;

use anyhow::{anyhow, Result};
use modelfs_engine::source::SourceOptions;

#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Object store endpoint, e.g. http://10.0.0.5:9000 (default: the service's own)
    #[arg(long, env = "MODELFS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Object store region (S3)
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
