//! `--metrics-listen`: one HTTP port for the orchestrator, without the
//! group's token: `/metrics` (Prometheus), `/healthz` (the mount answers) and
//! `/readyz` (everything `--preload` names is cached). The engine keeps its
//! own atomics (they feed `stat`); they are copied into the metrics registry
//! every two seconds.

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
        .install_recorder()
        .context("installing the metrics recorder")?;
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

fn copy_counters(engine: &Engine) {
    let s = engine.snapshot();
    for (name, v) in [
        ("modelfs_bytes_served_total", s.bytes_served),
        ("modelfs_bytes_from_cache_total", s.bytes_from_cache),
        ("modelfs_bytes_from_source_total", s.bytes_from_source),
        ("modelfs_bytes_from_peers_total", s.bytes_from_peers),
        ("modelfs_bytes_from_warmup_total", s.bytes_from_warmup),
        ("modelfs_chunks_evicted_total", s.chunks_evicted),
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
    ] {
        counter!(name).absolute(v);
    }
    gauge!("modelfs_cache_bytes_used").set(s.cache_bytes_used as f64);
    gauge!("modelfs_cache_bytes_capacity").set(s.cache_bytes_capacity as f64);
    gauge!("modelfs_chunks_cached").set(s.chunks_cached as f64);
    for (peer, c) in &s.peers {
        counter!("modelfs_peer_bytes_total", "peer" => peer.clone()).absolute(c.bytes);
        counter!("modelfs_peer_errors_total", "peer" => peer.clone()).absolute(c.errors);
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
