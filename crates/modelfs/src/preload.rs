//! `--preload` of `mount` and `serve`: list what the paths name, warm it all
//! through the engine (peers, warm-up service, origin), and answer at any
//! time how much of it is cached, for `stat`, `/readyz` and `warm --check`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use modelfs_engine::size::ByteSize;
use modelfs_engine::stats::{PreloadStatus, NOT_CACHED_SHOWN};
use modelfs_engine::{Engine, FileVersion};
use parking_lot::Mutex;
use tracing::{error, info, warn};

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The one preload failure that retrying cannot fix.
#[derive(Debug)]
struct TooBig(String);

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooBig {}

pub struct Preload {
    paths: Vec<String>,
    /// None until listed.
    files: Mutex<Option<Vec<FileVersion>>>,
    error: Mutex<String>,
    engine: Weak<Engine>,
}

impl Preload {
    /// Registers the preload with the engine's counters; nothing is read
    /// until [`Preload::run`].
    pub fn new(engine: &Arc<Engine>, paths: Vec<String>) -> Arc<Preload> {
        let p = Arc::new(Preload {
            paths,
            files: Mutex::new(None),
            error: Mutex::new(String::new()),
            engine: Arc::downgrade(engine),
        });
        // Strong: the preload's status outlives its run; it holds the engine
        // weakly, so there is no cycle.
        let status = p.clone();
        engine.stats().preload.set(move || status.status());
        p
    }

    /// Lists and warms everything, `concurrency` chunks at a time; logs when
    /// complete. A failure is kept for `status`, so `/readyz` says why, and
    /// the whole list-and-warm is tried again with backoff: an origin that
    /// was down for a minute must not leave the node unready until a
    /// restart. Only a preload bigger than the cache is given up on, as no
    /// retry can fix it. Returns only once complete or given up.
    pub async fn run(self: Arc<Self>, concurrency: usize) -> Result<()> {
        let mut delay = RETRY_FIRST;
        loop {
            let Err(e) = self.clone().warm(concurrency).await else {
                self.error.lock().clear();
                return Ok(());
            };
            *self.error.lock() = format!("{e:#}");
            if e.downcast_ref::<TooBig>().is_some() {
                error!("preload failed: {e:#}");
                return Err(e);
            }
            // Jittered so that a fleet which lost the origin together does
            // not come back to it in lockstep.
            let wait = delay.mul_f64(rand::random_range(0.5..1.0));
            warn!(
                retry_in_secs = wait.as_secs_f64(),
                "preload failed, retrying: {e:#}"
            );
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    async fn warm(self: Arc<Self>, concurrency: usize) -> Result<()> {
        let Some(engine) = self.engine.upgrade() else {
            return Ok(());
        };
        let t = Instant::now();
        let mut files = vec![];
        for p in &self.paths {
            for (path, meta) in engine.namespace().walk(p).await? {
                files.push(FileVersion {
                    path,
                    version: meta.version,
                    size: meta.size,
                });
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|a, b| a.path == b.path);
        let total: u64 = files.iter().map(|f| f.size).sum();
        let capacity = engine.config().cache_capacity;
        *self.files.lock() = Some(files.clone());
        if total > capacity {
            return Err(anyhow!(TooBig(format!(
                "--preload {} names {}, more than --cache-size {}; raise --cache-size or preload less",
                self.paths.join(" "),
                ByteSize(total),
                ByteSize(capacity)
            ))));
        }
        info!(paths = ?self.paths, files = files.len(), bytes = %ByteSize(total), "preloading");
        for f in &files {
            engine.warm_file(f, concurrency).await?;
        }
        info!(
            paths = ?self.paths,
            files = files.len(),
            bytes = %ByteSize(total),
            secs = t.elapsed().as_secs_f64(),
            "preload complete"
        );
        Ok(())
    }

    pub fn status(&self) -> PreloadStatus {
        let mut s = PreloadStatus {
            paths: self.paths.clone(),
            error: self.error.lock().clone(),
            ..Default::default()
        };
        let (Some(engine), Some(files)) = (self.engine.upgrade(), &*self.files.lock()) else {
            return s;
        };
        s.listed = true;
        s.files = files.len() as u64;
        for f in files {
            let cached = cached_bytes(&engine, f);
            s.bytes += f.size;
            s.bytes_cached += cached;
            if cached == f.size {
                s.files_cached += 1;
            } else if s.not_cached.len() < NOT_CACHED_SHOWN {
                s.not_cached.push(f.path.clone());
            }
        }
        s.complete = s.error.is_empty() && s.files_cached == s.files;
        s
    }
}

fn cached_bytes(engine: &Engine, f: &FileVersion) -> u64 {
    let store = engine.store();
    let Some(cf) = store.lookup(f) else { return 0 };
    (0..cf.n_chunks())
        .filter(|&i| store.contains(&cf, i))
        .map(|i| cf.chunk_len(i))
        .sum()
}
