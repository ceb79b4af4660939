//! `--metrics-listen`: one HTTP port for the orchestrator, without the
//! group's token: `/metrics` (Prometheus), `/healthz` (the mount answers) and
//! `/readyz` (everything `--preload` names is cached). The engine keeps its
//! own atomics (they feed `stat`); they are copied into the metrics registry
//! every two seconds. Fetch times per tier are recorded by the tiers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use modelfs_engine::size::ByteSize;
use modelfs_engine::Engine;
use tracing::error;

struct Http {
    engine: Arc<Engine>,
    prometheus: PrometheusHandle,
    /// The mount whose root must answer for `/healthz`; None for `serve`.
    mountpoint: Option<PathBuf>,
}

/// Serves the three endpoints on `addr`; binds before returning, so a taken
/// port is an error at start.
pub fn export(
    addr: SocketAddr,
    engine: Arc<Engine>,
    rt: &tokio::runtime::Handle,
    mountpoint: Option<&Path>,
) -> Result<()> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-listen {addr}"))?;
    listener.set_nonblocking(true)?;
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let state = Arc::new(Http {
        engine: engine.clone(),
        prometheus: prometheus.clone(),
        mountpoint: mountpoint.map(Path::to_path_buf),
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Arc<Http>>| async move { h.prometheus.render() }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!("--metrics-listen {addr} stopped: {e}");
        }
    });
    rt.spawn(async move {
        loop {
            copy_counters(&engine);
            prometheus.run_upkeep();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    Ok(())
}

/// HELP text of every metric, registered once with the recorder.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "modelfs_read_bytes_total",
        Unit::Bytes,
        "Bytes of chunks that reads got, by where they came from: cache, peer, warmup or source"
    );
    describe_counter!(
        "modelfs_served_bytes_total",
        Unit::Bytes,
        "Bytes returned to readers through the mount (not those the kernel served from its page cache or by passthrough)"
    );
    describe_counter!(
        "modelfs_chunks_streamed_total",
        "Chunks written into the cache piece by piece as the origin sent them (object stores, cache on tmpfs)"
    );
    describe_counter!(
        "modelfs_chunks_evicted_total",
        "Chunks evicted from the cache (LRU)"
    );
    describe_counter!(
        "modelfs_chunks_prefetched_total",
        "Chunks fetched ahead of readers"
    );
    describe_counter!(
        "modelfs_chunks_served_to_peers_total",
        "Chunks this node served to its peer group"
    );
    describe_counter!(
        "modelfs_crc_failures_total",
        "Chunks dropped because their crc32c did not match"
    );
    describe_counter!(
        "modelfs_source_requests_total",
        "Requests to the source (origin)"
    );
    describe_counter!(
        "modelfs_source_errors_total",
        "Requests to the source that failed"
    );
    describe_counter!(
        "modelfs_read_errors_total",
        "Reads that returned an error to the reader"
    );
    describe_counter!(
        "modelfs_passthrough_opens_total",
        "Opens served by FUSE passthrough from the cache file"
    );
    describe_counter!(
        "modelfs_peer_errors_total",
        "Failed requests to peers and the warm-up service"
    );
    describe_counter!(
        "modelfs_peer_chunks_verified_total",
        "Chunks from peers and the warm-up service also read from the origin and compared (--peer-verify-sample)"
    );
    describe_counter!(
        "modelfs_peer_lies_caught_total",
        "Chunks from peers and the warm-up service that differed from the origin's; their senders are no longer asked"
    );
    describe_gauge!(
        "modelfs_cache_used_bytes",
        Unit::Bytes,
        "Bytes of chunks in the cache"
    );
    describe_gauge!("modelfs_cache_capacity_bytes", Unit::Bytes, "--cache-size");
    describe_gauge!("modelfs_chunks_cached", "Chunks in the cache");
    describe_gauge!(
        "modelfs_preload_complete",
        "1 once everything --preload names is cached, else 0"
    );
    describe_histogram!(
        "modelfs_fetch_duration_seconds",
        Unit::Seconds,
        "Time to get one missed chunk from a tier: peer, warmup or source"
    );
    describe_histogram!(
        "modelfs_read_duration_seconds",
        Unit::Seconds,
        "Time to answer one FUSE read that reached modelfs (page-cache and passthrough reads never do)"
    );
}

/// The engine's counters, under names that follow Prometheus conventions:
/// the unit, then `_total`; the tier as a label with four values.
fn copy_counters(engine: &Engine) {
    let s = engine.snapshot();
    for (tier, v) in [
        ("cache", s.bytes_from_cache),
        ("peer", s.bytes_from_peers),
        ("warmup", s.bytes_from_warmup),
        ("source", s.bytes_from_source),
    ] {
        counter!("modelfs_read_bytes_total", "tier" => tier).absolute(v);
    }
    for (name, v) in [
        ("modelfs_served_bytes_total", s.bytes_served),
        ("modelfs_chunks_evicted_total", s.chunks_evicted),
        ("modelfs_chunks_streamed_total", s.chunks_streamed),
        ("modelfs_chunks_prefetched_total", s.chunks_prefetched),
        (
            "modelfs_chunks_served_to_peers_total",
            s.chunks_served_to_peers,
        ),
        ("modelfs_crc_failures_total", s.crc_failures),
        ("modelfs_source_requests_total", s.source_requests),
        ("modelfs_source_errors_total", s.source_errors),
        ("modelfs_read_errors_total", s.read_errors),
        ("modelfs_passthrough_opens_total", s.passthrough_opens),
        // Summed over peers: pod addresses change with every rollout, an
        // unbounded label; `stat` has them one by one.
        (
            "modelfs_peer_errors_total",
            s.peers.values().map(|c| c.errors).sum(),
        ),
        ("modelfs_peer_chunks_verified_total", s.peer_chunks_verified),
        ("modelfs_peer_lies_caught_total", s.peer_lies_caught),
    ] {
        counter!(name).absolute(v);
    }
    gauge!("modelfs_cache_used_bytes").set(s.cache_bytes_used as f64);
    gauge!("modelfs_cache_capacity_bytes").set(s.cache_bytes_capacity as f64);
    gauge!("modelfs_chunks_cached").set(s.chunks_cached as f64);
    if let Some(p) = &s.preload {
        gauge!("modelfs_preload_complete").set(if p.complete { 1.0 } else { 0.0 });
    }
}

/// The mount's root answers an xattr request, which always reaches the
/// daemon (attributes may come from the kernel's cache).
async fn mount_answers(mp: &Path) -> std::result::Result<(), String> {
    let probe = {
        let mp = mp.to_path_buf();
        tokio::task::spawn_blocking(move || crate::control::read_stats(&mp).map(|_| ()))
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("{e:#}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{} did not answer within 5s", mp.display())),
    }
}

async fn healthz(State(h): State<Arc<Http>>) -> (StatusCode, String) {
    match &h.mountpoint {
        Some(mp) => match mount_answers(mp).await {
            Ok(()) => (StatusCode::OK, "ok\n".into()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        None => (StatusCode::OK, "ok\n".into()),
    }
}

async fn readyz(State(h): State<Arc<Http>>) -> (StatusCode, String) {
    if let Some(mp) = &h.mountpoint {
        if let Err(e) = mount_answers(mp).await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n"));
        }
    }
    let Some(p) = h.engine.snapshot().preload else {
        return (StatusCode::OK, "ready: nothing to preload\n".into());
    };
    let progress = format!(
        "{} of {} files, {} of {} cached",
        p.files_cached,
        p.files,
        ByteSize(p.bytes_cached),
        ByteSize(p.bytes)
    );
    if p.complete {
        (
            StatusCode::OK,
            format!("ready: preload complete, {progress}\n"),
        )
    } else if !p.error.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: preload failed: {}\n", p.error),
        )
    } else if !p.listed {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: listing what --preload names\n".into(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: preloading, {progress}\n"),
        )
    }
}
